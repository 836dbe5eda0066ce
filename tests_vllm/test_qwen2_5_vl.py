"""The plugin on vLLM's (CPU) engine with a tiny random Qwen2.5-VL (windowed vision attention): keep=0.25 shortens
the prompt by the removed tokens and agrees with `mmc.apply` in transformers; keep=1 equals no setting."""

from __future__ import annotations

import pytest
import tiny
from conftest import run_engine

A = {"prompt": tiny.prompt(seed=0), "images": [[0, 112, 112]]}
B = {"prompt": tiny.prompt(seed=1, n_words=9), "images": [[1, 168, 112]]}


def kw(method, keep):
    return {"mm_processor_kwargs": {"mmcompress_method": method, "mmcompress_keep": keep}}


CALLS = {"none": [A, B], "keep1": [dict(A, **kw("tome", 1.0)), dict(B, **kw("tome", 1.0))],
         "tome": [dict(A, **kw("tome", 0.25)), dict(B, **kw("tome", 0.25))]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("q25")
    model = str(tiny.build_qwen2_vl(root / "model", family="qwen2_5_vl"))
    out = run_engine(root, model, list(CALLS.values()))
    return model, dict(zip(CALLS, out["results"], strict=True))


def test_qwen2_5_vl_compresses_and_agrees_with_apply(runs):
    import torch
    import transformers as T

    import mmcompress as mmc

    model_dir, got = runs
    for a, b in zip(got["none"], got["keep1"], strict=True):
        assert a == b
    for r, p, (n, m) in zip(got["tome"], got["none"], ((16, 4), (24, 6)), strict=True):
        assert len(r["prompt_token_ids"]) == len(p["prompt_token_ids"]) - (n - m)
    model = T.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    proc = T.AutoProcessor.from_pretrained(model_dir)
    for name, method in (("none", None), ("tome", "tome")):
        if method:
            mmc.apply(model, method, keep=0.25)
        tiny.assert_transformers_agree(model, proc, CALLS[name], got[name])
