"""The plugin on vLLM's (CPU) engine with a tiny random LLaVA-1.5 (64 image tokens), server setting through
`--hf-overrides`: shortened prompts, per-request override, agreement with `mmc.apply` in transformers."""

from __future__ import annotations

import pytest
import served
import tiny
from conftest import run_engine

A = {"prompt": tiny.prompt(seed=0, placeholder="<image>"), "images": [[0, 112, 112]]}
B = {"prompt": tiny.prompt(seed=1, n_words=9, placeholder="<image>"), "images": [[1, 150, 120]]}
TEXT = {"prompt": "<|im_start|>user w5 w9 w13 <|im_end|> <|im_start|>assistant"}
N = 64
SERVER = {"method": "divprune", "keep": 0.25}  # server-wide, through hf_overrides


kw = tiny.request_kw


CALLS = {
    "server": [A, B],
    "tome": [dict(A, **kw("tome", 0.5)), dict(B, **kw("tome", 0.5))],
    "keep1": [dict(A, **kw("tome", 1.0)), dict(B, **kw("tome", 1.0))],
    "mixed": [dict(B, **kw("tome", 0.5)), TEXT, A],
    "text": [TEXT],
    **served.calls([A, B], served.IMAGE, "img"),
    "mixed_methods": served.mixed([(B, "cdpruner", 0.5), (A, "visionzip", 0.5), (TEXT, None, 1.0),
                                   (A, "prumerge", 6)]),
}
NAMES = list(CALLS)


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    out = run_engine(tmp_path_factory.mktemp("llava"), models["llava"], [CALLS[n] for n in NAMES],
                     engine={"hf_overrides": {"mmcompress": SERVER}})
    return dict(zip(NAMES, out["results"], strict=True))


def test_server_setting_and_request_override(runs):
    img = tiny.token_id("<image>")
    for r in runs["server"]:
        assert r["prompt_token_ids"].count(img) == 16 and len(r["token_ids"]) == 5
    for r in runs["tome"]:
        assert r["prompt_token_ids"].count(img) == 32
    for r, s in zip(runs["keep1"], runs["server"], strict=True):
        assert r["prompt_token_ids"].count(img) == N
        assert len(r["prompt_token_ids"]) == len(s["prompt_token_ids"]) + N - 16


def test_mixed_batch_equals_single_runs(runs):
    tiny.assert_same_runs(runs["mixed"], [runs["tome"][1], runs["text"][0], runs["server"][0]])


@pytest.mark.parametrize("name,method,keep", [("server", "divprune", 0.25), ("tome", "tome", 0.5),
                                              ("keep1", None, 1.0)])
def test_agrees_with_mmc_apply_in_transformers(runs, models, name, method, keep):
    tiny.assert_apply_agrees(models["llava"], method, keep, CALLS[name], runs[name])


@pytest.mark.parametrize("name,method,keep", served.names(served.IMAGE, "img"))
def test_scored_and_text_methods_shorten_and_agree_with_mmc_apply(runs, models, name, method, keep):
    """CLIP's CLS row of the feature block (or PruMerge's last block, past the blocks vLLM builds), keys, the CLS
    handed to the LLM, the question: the prompt is shorter by exactly the removed tokens and outputs equal
    `mmc.apply` in transformers."""
    cls = method in served.CLS_IN_BUDGET
    served.assert_shorter(runs[name], runs["keep1"], [N, N], [served.kept(N, keep, cls)] * 2, tiny.token_id("<image>"))
    tiny.assert_apply_agrees(models["llava"], method, keep, CALLS[name], runs[name])


def test_batch_of_different_methods_equals_single_runs(runs):
    singles = [runs["img:cdpruner"][1], runs["img:visionzip"][0], runs["text"][0], runs["img:prumerge"][0]]
    tiny.assert_same_runs(runs["mixed_methods"], singles)
