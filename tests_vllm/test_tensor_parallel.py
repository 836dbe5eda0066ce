"""The plugin under tensor parallel on vLLM's CPU build: a tiny random Qwen2-VL with tensor_parallel_size=2 (two CPU
workers, one core each) gives the same prompts and greedy ids as tensor_parallel_size=1 with the plugin (log-probs
within fp32 noise: the TP all-reduce sums in another order), and no setting / keep=1 at TP 2 equal plain vLLM at TP 2
bit for bit. Three engines (plugin TP 2, plain TP 2, plugin TP 1).

vLLM's CPU workers bind their OpenMP threads per NUMA node by default, and refuse TP 2 on a one-node machine ("Not
enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"); `VLLM_CPU_OMP_THREADS_BIND` names a core per rank.
"""

from __future__ import annotations

import math
import os

import pytest
import tiny
from conftest import run_engine

A = {"prompt": tiny.prompt(seed=0), "images": [[0, 112, 112]]}  # 16 tokens
B = {"prompt": tiny.prompt(seed=1, n_words=9), "images": [[1, 168, 112]]}  # 24 tokens
V = {"prompt": tiny.prompt(seed=3, placeholder=tiny.VIDEO), "videos": [[5, 4, 112, 112]]}  # 32 tokens


kw = tiny.request_kw


CALLS = {
    "none": [A, V],
    "keep1": [dict(A, **kw("tome", 1.0)), dict(V, **kw("tome", 1.0))],
    "compressed": [dict(A, **kw("tome", 0.25)), dict(B, **kw("divprune", 6)), dict(V, **kw("tome", 0.25))],
    # scores from the vision tower (heads gathered over the ranks), the question, a video method
    "scored": [dict(A, **kw("visionzip", 0.5)), dict(B, **kw("cdpruner", 0.5)), dict(V, **kw("holitom", 0.5))],
}
NAMES = list(CALLS)
KEPT = [(16, 4), (24, 6), (32, 8)]  # (N, M) of each compressed request


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    cores = _cores()
    if len(cores) < 2:
        reason = f"tensor parallel 2 needs 2 CPU cores (one per worker); this process may use {cores}"
        print(reason)
        pytest.skip(reason)
    tp2 = {"tensor_parallel_size": 2}
    bind = {"VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}"}
    model = models["qwen2_vl"]
    plug2 = run_engine(tmp_path_factory.mktemp("tp2"), model, [CALLS[n] for n in NAMES], env=bind, engine=tp2)
    plain2 = run_engine(tmp_path_factory.mktemp("plain2"), model, [CALLS["none"]], env=dict(bind, MMCOMPRESS_VLLM="0"),
                        engine=tp2)
    plug1 = run_engine(tmp_path_factory.mktemp("tp1"), model, [CALLS["compressed"], CALLS["scored"]])
    return dict(zip(NAMES, plug2["results"], strict=True)), plain2["results"][0], plug1["results"]


@pytest.mark.parametrize("name", ["none", "keep1"])
def test_tp2_keep1_and_no_setting_equal_plain_vllm_tp2(runs, name):
    got, plain, _ = runs
    assert got[name] == plain  # prompt ids, generated ids, first-step log-probs: bit for bit


@pytest.mark.parametrize("name,call", [("compressed", 0), ("scored", 1)])
def test_tp2_compressed_equals_tp1(runs, name, call):
    got, _, tp1 = runs
    kept = KEPT if name == "compressed" else [(16, 8), (24, 12), (32, 16)]
    for r, s, (n, m), p in zip(got[name], tp1[call], kept, [got["none"][0], None, got["none"][1]], strict=True):
        assert r["prompt_token_ids"] == s["prompt_token_ids"]
        assert r["token_ids"] == s["token_ids"] and len(r["token_ids"]) == 5
        for k, v in s["first_logprobs"].items():
            assert math.isclose(r["first_logprobs"][k], v, abs_tol=1e-4)
        if p is not None:  # the same prompt uncompressed is in the run: shorter by exactly N - M
            assert len(r["prompt_token_ids"]) == len(p["prompt_token_ids"]) - (n - m)
