"""`mmcompress bench`: keeps parsing, outputs, resume after SIGKILL, torchrun sharding, bad input.

Runs on a tiny random LLaVA saved as a local HF directory (the generic `--model DIR` path) and a toy task loaded by
import path (`tests.bench_fixtures:ToyTask`).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mmcompress.evals.runner import BenchConfig, parse_keeps, read_records, run

from tests.bench_fixtures import save_tiny_llava

REPO = Path(__file__).resolve().parent.parent
TASK = "tests.bench_fixtures:ToyTask"
TIME_COLS = {"encode_ms", "compress_ms", "prefill_ms", "decode_ms", "peak_mem_mb"}
SUMMARY_TIME_COLS = TIME_COLS | {"prefill_ratio", "ratio_spread"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmcompress", "bench", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _args(model: Path, out: Path, methods: str = "tome,uniform,pool", keep: str = "0.5,8",
          batch: int = 2) -> list[str]:
    return ["--model", str(model), "--task", TASK, "--methods", methods, "--keep", keep, "--limit", "0",
            "--batch-size", str(batch), "--out", str(out), "--no-progress", "--threads", "1"]


def _strip(rows: list[dict], cols: set[str]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in cols} for r in rows]


def _summary(out: Path) -> list[dict]:
    with (out / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def test_parse_keeps():
    assert parse_keeps("1,0.5,0.25,64,auto") == [1.0, 0.5, 0.25, 64, "auto"]
    assert parse_keeps("1.0, 128") == [1.0, 128]
    for bad in ("0", "1.5", "x", "", "64.5", "-2"):
        with pytest.raises(ValueError, match="keep"):
            parse_keeps(bad)


def test_outputs_hold_baselines_and_every_sample(tiny_dir, tmp_path):
    out = tmp_path / "run"
    res = run(BenchConfig(model=str(tiny_dir), tasks=[TASK], methods=["tome"], keeps=[0.5, 4], batch_size=4,
                          out=out, progress=False))
    rows = res["summary"]
    assert [(r["method"], r["keep"]) for r in rows] == [("none", "1"), ("random", "0.5"), ("random", "4"),
                                                       ("resize", "0.5"), ("resize", "4"), ("tome", "0.5"),
                                                       ("tome", "4")]
    assert all(r["n"] == 23 and r["complete"] for r in rows)
    none = rows[0]
    assert none["tokens"] == 16 and none["pct_of_none"] == 1.0
    # resize: the 4 x 4 patch grid downsampled to 2 x 3 (8 tokens) and 2 x 2 (4 tokens)
    assert [r["tokens"] for r in rows[1:]] == [8, 4, 6, 4, 8, 4]
    assert [r["at_budget"] for r in rows] == ["", True, True, True, True, True, True]
    assert rows[1]["flops_ratio"] < 1 and rows[4]["prefill_gflops"] < rows[3]["prefill_gflops"]
    assert json.loads(rows[5]["metrics"]) == {"answered": 23}  # the task's own extra metric is kept
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 7 * 23 and len({(r["method"], r["keep"], r["id"]) for r in recs}) == 7 * 23
    assert {"id", "prediction", "answer", "score", "tokens", "encode_ms", "compress_ms", "prefill_ms", "decode_ms",
            "peak_mem_mb", "meta", "text_tokens", "layer_tokens", "prefill_flops"} <= set(recs[0])
    timing = json.loads((out / "parts" / "toy" / "resize@4.timing.json").read_text())
    assert timing["replay"] and timing["threads"] == 1 and timing["repeats"] == 7
    # 7 pairs, two more at a time where the halves disagree (a tiny model on a busy machine can)
    assert len(timing["prefill_ms_runs"]) == timing["pairs"] in (7, 9, 11, 13, 15, 17, 19, 21)
    assert timing["cpu"] and timing["cpus"] >= 1
    assert "timed on " in (out / "summary.md").read_text()
    assert all(r["timing"].startswith("interleaved") for r in rows)
    assert (out / "pareto.png").stat().st_size > 10_000
    md = (out / "summary.md").read_text()
    assert "| none | 1 | 16.0 |" in md and "n = 23" in md and "1 torch thread(s)" in md
    # the same out folder without --resume is refused, a resume with other settings too
    with pytest.raises(ValueError, match="--resume"):
        run(BenchConfig(model=str(tiny_dir), tasks=[TASK], methods=["tome"], keeps=[0.5], batch_size=4, out=out,
                        progress=False))
    with pytest.raises(ValueError, match="batch_size"):
        run(BenchConfig(model=str(tiny_dir), tasks=[TASK], methods=["tome"], keeps=[0.5], batch_size=3, out=out,
                        resume=True, progress=False))


def test_resume_after_sigkill_equals_uninterrupted_run(tiny_dir, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    p = _cli(_args(tiny_dir, ref))
    assert p.wait(timeout=600) == 0, p.stderr.read()
    total_ref = len((ref / "samples.jsonl").read_text().splitlines())
    assert total_ref == 23 * (1 + 2 * 5)  # none; random, resize, tome, uniform, pool at 2 budgets

    p = _cli(_args(tiny_dir, killed))
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        n = sum(len(read_records(f)) for f in killed.glob("parts/*/*.jsonl"))
        if n >= total_ref // 3:
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert p.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "summary.csv").exists()
    partial = sum(len(read_records(f)) for f in killed.glob("parts/*/*.jsonl"))
    assert 0 < partial < total_ref
    # a torn last line, as a kill during a write leaves it, is cut off and its sample redone
    part = sorted(killed.glob("parts/*/*.jsonl"), key=os.path.getmtime)[-1]
    with part.open("a") as f:
        f.write('{"task": "toy", "id": "q')

    p = _cli([*_args(tiny_dir, killed), "--resume"])
    assert p.wait(timeout=600) == 0, p.stderr.read()
    a = [json.loads(x) for x in (ref / "samples.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (killed / "samples.jsonl").read_text().splitlines()]
    assert _strip(a, TIME_COLS) == _strip(b, TIME_COLS)
    assert _strip(_summary(ref), SUMMARY_TIME_COLS) == _strip(_summary(killed), SUMMARY_TIME_COLS)
    # every part line is unique: nothing was redone twice into the files
    ids = [(r["method"], r["keep"], r["id"]) for f in killed.glob("parts/*/*.jsonl") for r in read_records(f)]
    assert len(ids) == len(set(ids)) == total_ref


def test_torchrun_two_processes_equal_one(tiny_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = lambda out: _args(tiny_dir, out, methods="tome", keep="0.5")  # noqa: E731
    p = _cli(args(one))
    assert p.wait(timeout=600) == 0, p.stderr.read()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "mmcompress", "bench", *args(two)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = {f.name.rsplit(".", 2)[-2] for f in two.glob("parts/*/*.jsonl")}
    assert ranks == {"rank0", "rank1"}  # both processes did work
    a = [json.loads(x) for x in (one / "samples.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (two / "samples.jsonl").read_text().splitlines()]
    assert _strip(a, TIME_COLS) == _strip(b, TIME_COLS)
    assert _strip(_summary(one), SUMMARY_TIME_COLS) == _strip(_summary(two), SUMMARY_TIME_COLS)


def test_cli_bad_input_names_the_argument(tiny_dir, tmp_path):
    p = _cli(_args(tiny_dir, tmp_path / "x", keep="0.5,lots"))
    assert p.wait(timeout=120) == 2 and "keep" in p.stderr.read()
    p = _cli(["--task", "no_such_task", "--out", str(tmp_path / "y")])
    assert p.wait(timeout=120) == 2 and "unknown task 'no_such_task'" in p.stderr.read()
    p = _cli(["--model", str(tmp_path / "missing"), "--task", TASK, "--out", str(tmp_path / "z")])
    assert p.wait(timeout=120) == 2 and "model" in p.stderr.read()


def test_unrunnable_setting_is_reported_not_hidden(tiny_dir, tmp_path):
    out = tmp_path / "fv"
    res = run(BenchConfig(model=str(tiny_dir), tasks=[TASK], methods=["fastv"], keeps=["auto", 8], batch_size=8,
                          out=out, progress=False, timing_repeats=0))
    assert "toy fastv@auto" in res["skipped"] and "fraction" in res["skipped"]["toy fastv@auto"]
    assert "Skipped settings" in (out / "summary.md").read_text()


class _ColdStartBackend:
    """A backend whose first call after `configure` is slow (as a setting's first forward through new hooks is)."""

    def __init__(self) -> None:
        self.cold, self.calls = True, []

    def configure(self, method, keep, options) -> None:
        self.cold, self.method = True, method

    def predict(self, samples, max_new_tokens):
        ms = 1000.0 if self.cold else 1.0
        self.cold = False
        self.calls.append((self.method, len(samples)))
        return [{"prediction": "red", "tokens": 16, "encode_ms": ms, "compress_ms": ms, "prefill_ms": ms,
                 "decode_ms": ms, "peak_mem_mb": 0.0} for _ in samples]


def test_every_setting_is_warmed_up_before_it_is_timed(tiny_dir, tmp_path, monkeypatch):
    import mmcompress.evals.backends as backends

    fake = _ColdStartBackend()
    monkeypatch.setattr(backends, "load_backend", lambda *a, **k: fake)
    res = run(BenchConfig(model=str(tiny_dir), tasks=[TASK], methods=["tome"], keeps=[0.5], batch_size=8,
                          out=tmp_path / "w", progress=False))
    recs = [json.loads(x) for x in (tmp_path / "w" / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 4 * 23 and {r["prefill_ms"] for r in recs} == {1.0}  # no cold call was recorded
    assert {r["prefill_ratio"] for r in res["summary"]} == {1.0}
    # one untimed call of one sample before each setting (besides the warm-up batch at load)
    assert [c for c in fake.calls if c[1] == 1][-4:] == [("none", 1), ("random", 1), ("resize", 1), ("tome", 1)]


def test_out_pointing_at_a_file_is_one_line(tiny_dir, tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file; --out takes a folder"):
        run(BenchConfig(model=str(tiny_dir), tasks=[TASK], methods=["tome"], out=f, progress=False))
    with pytest.raises(ValueError, match="is a file, so .* cannot be created"):
        run(BenchConfig(model=str(tiny_dir), tasks=[TASK], methods=["tome"], out=f / "sub", progress=False))
