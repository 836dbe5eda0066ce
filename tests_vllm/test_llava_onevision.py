"""The plugin on vLLM's (CPU) engine with a tiny random LLaVA-OneVision (anyres images, videos pooled 2x2 per frame,
image_newline), server setting through `--hf-overrides`: a compressed image or video is M kept tokens + one newline,
per-request overrides, keep=1 equal to plain vLLM, agreement with `mmc.apply` in transformers, a mixed batch (image,
video, text-only). One plugin engine and one plain-vLLM engine for the module."""

from __future__ import annotations

import pytest
import served
import tiny
from conftest import run_engine

A = {"prompt": tiny.prompt(seed=0, placeholder="<image>"), "images": [[0, 112, 112]]}
B = {"prompt": tiny.prompt(seed=1, n_words=9, placeholder="<image>"), "images": [[1, 150, 120]]}
# 4 frames of 112 px: 8 x 8 patches pooled to 4 x 4 per frame -> (4, 4, 4) = 64 tokens + 1 newline
V = {"prompt": tiny.prompt(seed=3, placeholder="<|video_pad|>"), "videos": [[5, 4, 112, 112]]}
TEXT = {"prompt": "<|im_start|>user w5 w9 w13 <|im_end|> <|im_start|>assistant"}
# placeholder run uncompressed (base 64 + unpadded grid + one newline per row) and N without the newlines
RUN = {"A": 136, "B": 268, "V": 65}
N = {"A": 128, "B": 256, "V": 64}
SERVER = {"method": "tome", "keep": 0.25}
PAD = {"A": "<image>", "B": "<image>", "V": "<|video_pad|>"}


kw = tiny.request_kw


CALLS = {
    "server": [A, B, V],
    "divprune": [dict(A, **kw("divprune", 0.5)), dict(B, **kw("divprune", 0.5)), dict(V, **kw("divprune", 0.5))],
    "pool": [dict(A, **kw("pool", 0.25)), dict(V, **kw("pool", 0.25))],
    "keep1": [dict(A, **kw("tome", 1.0)), dict(B, **kw("tome", 1.0)), dict(V, **kw("tome", 1.0))],
    "mixed": [dict(V, **kw("divprune", 0.5)), TEXT, A, dict(B, **kw("tome", 1.0))],
    "text": [TEXT],
    **served.calls([A, B], served.ANYRES_SOME, "img"),
    **served.calls([V], served.VIDEO, "vid"),
    "mixed_methods": served.mixed([(V, "holitom", 0.5), (B, "cdpruner", 16), (TEXT, None, 1.0),
                                   (A, "prumerge", 6), (V, "dycoke", 0.5)]),
}
NAMES = list(CALLS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ov")
    model = str(tiny.build_llava_next(root / "model", family="llava_onevision"))
    out = run_engine(tmp_path_factory.mktemp("plug"), model, [CALLS[n] for n in NAMES],
                     engine={"hf_overrides": {"mmcompress": SERVER}})
    plain = run_engine(tmp_path_factory.mktemp("plain"), model, [[A, B, V]], env={"MMCOMPRESS_VLLM": "0"})
    return model, dict(zip(NAMES, out["results"], strict=True)), plain["results"][0]


def test_keep1_equals_plain_vllm(runs):
    _, got, plain = runs
    assert got["keep1"] == plain  # prompt ids, generated ids, first-step log-probs: bit for bit
    for r, k in zip(plain, "ABV", strict=True):
        assert r["prompt_token_ids"].count(tiny.token_id(PAD[k])) == RUN[k]


@pytest.mark.parametrize("name,keys,keep", [("server", "ABV", 0.25), ("divprune", "ABV", 0.5), ("pool", "AV", 0.25)])
def test_prompt_is_kept_tokens_plus_one_newline(runs, name, keys, keep):
    _, got, plain = runs
    ref = dict(zip("ABV", plain, strict=True))
    for r, k in zip(got[name], keys, strict=True):
        m = round(keep * N[k]) + 1
        assert r["prompt_token_ids"].count(tiny.token_id(PAD[k])) == m
        assert len(r["prompt_token_ids"]) == len(ref[k]["prompt_token_ids"]) - (RUN[k] - m)
        assert len(r["token_ids"]) == 5


def test_mixed_batch_equals_single_runs(runs):
    _, got, _ = runs
    singles = [got["divprune"][2], got["text"][0], got["server"][0], got["keep1"][1]]
    tiny.assert_same_runs(got["mixed"], singles)


@pytest.mark.parametrize("name,method,keep", [("server", "tome", 0.25), ("divprune", "divprune", 0.5),
                                              ("pool", "pool", 0.25), ("keep1", None, 1.0)])
def test_agrees_with_mmc_apply_in_transformers(runs, name, method, keep):
    model_dir, got, _ = runs
    tiny.assert_apply_agrees(model_dir, method, keep, CALLS[name], got[name])


@pytest.mark.parametrize("name,method,keep",
                         served.names(served.ANYRES_SOME, "img") + served.names(served.VIDEO, "vid"))
def test_scored_text_and_video_methods_shorten_and_agree_with_mmc_apply(runs, name, method, keep):
    """Scores packed like the image features or pooled like the video frames, the question, video methods on the
    pooled (T, h', w') grid: kept tokens + one newline, and outputs equal `mmc.apply` in transformers."""
    model_dir, got, plain = runs
    keys = "V" if name.startswith("vid") else "AB"
    ref = dict(zip("ABV", plain, strict=True))
    served.assert_shorter(got[name], [ref[k] for k in keys], [RUN[k] for k in keys],
                          [served.kept(N[k], keep) + 1 for k in keys], tiny.token_id(PAD[keys[0]]))
    tiny.assert_apply_agrees(model_dir, method, keep, CALLS[name], got[name])


def test_batch_of_different_methods_equals_single_runs(runs):
    _, got, _ = runs
    singles = [got["vid:holitom"][0], got["img:cdpruner"][1], got["text"][0], got["img:prumerge"][0],
               got["vid:dycoke"][0]]
    tiny.assert_same_runs(got["mixed_methods"], singles)
