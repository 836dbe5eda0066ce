"""benchmarks/gpu_kernels.py --dry-run: the prepared GPU benchmark runs end to end on CPU (Triton interpreter), writes
its rows, and every Triton result agrees with the torch provider's."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from tests.script_module import REPO


def test_dry_run_writes_agreeing_rows(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "gpu_kernels.csv"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_kernels.py"), "--dry-run", "--out", str(out)],
                   check=True, env=env, cwd=REPO, capture_output=True, timeout=600)
    rows = list(csv.DictReader(open(out)))
    ops = ("best_match", "match_merge", "attention_rows")
    assert {(r["op"], r["provider"]) for r in rows} == {(op, p) for op in ops for p in ("torch", "triton")}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    for r in rows:
        assert r["device"] == "cpu (dry run)" and float(r["p50_ms"]) > 0
        tol = 1e-5 if r["dtype"] == "float32" else 2e-2
        assert float(r["max_abs_diff_vs_torch"]) <= tol, r
        if r["dtype"] == "float32":
            assert r["indices_equal_torch"] == "True", r


def test_without_a_gpu_or_the_interpreter_it_says_so():
    import torch

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for args in ([["--dry-run"]] if torch.cuda.is_available() else [[], ["--dry-run"]]):
        p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_kernels.py"), *args], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and ("no CUDA device" in p.stderr or "TRITON_INTERPRET=1" in p.stderr)
