"""The plugin on vLLM's (CPU) engine with a tiny random Qwen2-VL, images and videos: identity, shortened prompts,
agreement with `mmc.apply` in transformers, mixed batches (image, video, text-only), refusals. One plugin engine and
one plain-vLLM engine for the module."""

from __future__ import annotations

import pytest
import served
import tiny
from conftest import run_engine

A = {"prompt": tiny.prompt(seed=0), "images": [[0, 112, 112]]}  # 8 x 8 patches -> 16 tokens
B = {"prompt": tiny.prompt(seed=1, n_words=9), "images": [[1, 168, 112]]}  # 12 x 8 patches -> 24 tokens
TEXT = {"prompt": "<|im_start|>user w5 w9 w13 <|im_end|> <|im_start|>assistant"}
N_A, N_B = 16, 24
# videos: 4 frames -> 2 temporal patches; 112 x 112 -> (2, 4, 4) = 32 tokens; 168 x 112 -> (2, 6, 4) = 48 tokens
V = {"prompt": tiny.prompt(seed=3, placeholder=tiny.VIDEO), "videos": [[5, 4, 112, 112]]}
W = {"prompt": tiny.prompt(seed=4, n_words=4, placeholder=tiny.VIDEO), "videos": [[6, 4, 168, 112]]}
N_V, N_W = 32, 48
# PixelPrune: pages of flat 28 px cells (one merge group each): 168 x 112 -> 24 groups, 224 x 168 -> 48 groups
P = {"prompt": tiny.prompt(seed=5), "images": [[7, 168, 112, "blocks", 28]]}
Q = {"prompt": tiny.prompt(seed=6, n_words=9), "images": [[8, 224, 168, "blocks", 28]]}
N_P, N_Q = 24, 48


kw = tiny.request_kw


CALLS = {
    "none": [A, B],
    "keep1": [dict(A, **kw("tome", 1.0)), dict(B, **kw("tome", 1.0))],
    "tome": [dict(A, **kw("tome", 0.25)), dict(B, **kw("tome", 0.25))],
    "divprune_int": [dict(A, **kw("divprune", 6)), dict(B, **kw("divprune", 6))],
    "pool": [dict(A, **kw("pool", 0.25))],
    "single_text": [TEXT],
    "single_B_div": [dict(B, **kw("divprune", 6))],
    "mixed": [dict(A, **kw("tome", 0.25)), TEXT, dict(B, **kw("divprune", 6)), A],
    "auto": [dict(A, **kw("tome", "auto"))],
    "inllm": [dict(A, **kw("fastv", 0.5))],
    "unknown": [dict(A, **kw("tomee", 0.5))],
    "video_none": [V, W],
    "video_keep1": [dict(V, **kw("tome", 1.0)), dict(W, **kw("tome", 1.0))],
    "video_tome": [dict(V, **kw("tome", 0.25)), dict(W, **kw("tome", 0.25))],
    "video_pool": [dict(V, **kw("pool", 0.25)), dict(W, **kw("pool", 0.25))],
    "video_divprune_int": [dict(V, **kw("divprune", 10)), dict(W, **kw("divprune", 10))],
    "mixed_video": [dict(W, **kw("pool", 0.25)), dict(A, **kw("tome", 0.25)), TEXT, dict(V, **kw("tome", 0.25)), V],
    **served.calls([A, B], served.IMAGE, "img"),
    **served.calls([V, W], served.VIDEO, "vid"),
    "pp_none": [P, Q],
    "pp": [dict(P, **served.PIXELPRUNE), dict(Q, **served.PIXELPRUNE), dict(A, **served.PIXELPRUNE)],
    "pp_tau": [dict(P, **served.PIXELPRUNE_TAU), dict(Q, **served.PIXELPRUNE_TAU)],
    "pp_mixed": [dict(Q, **served.PIXELPRUNE_TAU), dict(A, **kw("tome", 0.25)), TEXT, dict(P, **served.PIXELPRUNE)],
    "mixed_methods": served.mixed([(B, "cdpruner", 0.5), (A, "visionzip", 0.5), (V, "holitom", 0.5), (TEXT, None, 1.0),
                                   (A, "prumerge", 6), (W, "dycoke", 0.5)]),
}
NAMES = list(CALLS)


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    plug = run_engine(tmp_path_factory.mktemp("plug"), models["qwen2_vl"], [CALLS[n] for n in NAMES])
    plain = run_engine(tmp_path_factory.mktemp("plain"), models["qwen2_vl"], [CALLS["none"], CALLS["video_none"]],
                       env={"MMCOMPRESS_VLLM": "0"})
    return dict(zip(NAMES, plug["results"], strict=True)), plain["results"]


@pytest.mark.parametrize("name,plain_call", [("none", 0), ("keep1", 0), ("video_none", 1), ("video_keep1", 1)])
def test_keep1_and_no_setting_equal_plain_vllm(runs, name, plain_call):
    got, plain = runs
    for r, p in zip(got[name], plain[plain_call], strict=True):
        assert r["prompt_token_ids"] == p["prompt_token_ids"]
        assert r["token_ids"] == p["token_ids"], name
        assert r["first_logprobs"] == p["first_logprobs"], name  # same kernels, same inputs: bit-identical


@pytest.mark.parametrize("name,kept", [("tome", (4, 6)), ("divprune_int", (6, 6)), ("pool", (4,)),
                                       ("video_tome", (8, 12)), ("video_pool", (8, 12)),
                                       ("video_divprune_int", (10, 10))])
def test_prompt_shorter_by_removed_tokens(runs, name, kept):
    got, plain = runs
    video = name.startswith("video")
    pad = tiny.token_id("<|video_pad|>" if video else "<|image_pad|>")
    for r, p, n, m in zip(got[name], plain[int(video)], (N_V, N_W) if video else (N_A, N_B), kept, strict=False):
        assert len(r["prompt_token_ids"]) == len(p["prompt_token_ids"]) - (n - m)
        assert r["prompt_token_ids"].count(pad) == m
        assert len(r["token_ids"]) == 5


@pytest.mark.parametrize("name", ["mixed", "mixed_video"])
def test_mixed_batch_equals_single_runs(runs, name):
    got, _ = runs
    singles = {"mixed": [got["tome"][0], got["single_text"][0], got["single_B_div"][0], got["none"][0]],
               "mixed_video": [got["video_pool"][1], got["tome"][0], got["single_text"][0], got["video_tome"][0],
                               got["video_none"][0]]}[name]
    tiny.assert_same_runs(got[name], singles)


@pytest.mark.parametrize("name,words", [("auto", "data-dependent"), ("inllm", "inside the LLM"),
                                        ("unknown", "unknown compressor")])
def test_refused_with_a_clear_error(runs, name, words):
    got, _ = runs
    assert "error" in got[name] and words in got[name]["error"], got[name]


@pytest.mark.parametrize("name,method,keep", [("tome", "tome", 0.25), ("divprune_int", "divprune", 6),
                                              ("pool", "pool", 0.25), ("video_tome", "tome", 0.25),
                                              ("video_pool", "pool", 0.25), ("video_divprune_int", "divprune", 10),
                                              ("video_none", None, 1.0)])
def test_agrees_with_mmc_apply_in_transformers(runs, models, name, method, keep):
    """Same weights, same compressor, same inputs: greedy ids equal and first-token log-probs within fp32 noise."""
    got, _ = runs
    tiny.assert_apply_agrees(models["qwen2_vl"], method, keep, CALLS[name], got[name])


@pytest.mark.parametrize("name,method,keep", served.names(served.IMAGE, "img") + served.names(served.VIDEO, "vid"))
def test_scored_text_and_video_methods_shorten_and_agree_with_mmc_apply(runs, models, name, method, keep):
    """Scores from vLLM's vision tower, the request's question, video methods: the prompt is shorter by exactly
    the removed tokens, and greedy ids / first-token log-probs equal `mmc.apply` in transformers."""
    got, plain = runs
    video = name.startswith("vid")
    ns = (N_V, N_W) if video else (N_A, N_B)
    pad = tiny.token_id("<|video_pad|>" if video else "<|image_pad|>")
    served.assert_shorter(got[name], plain[int(video)], list(ns), [served.kept(n, keep) for n in ns], pad)
    tiny.assert_apply_agrees(models["qwen2_vl"], method, keep, CALLS[name], got[name])


def test_batch_of_different_methods_equals_single_runs(runs):
    got, _ = runs
    singles = [got["img:cdpruner"][1], got["img:visionzip"][0], got["vid:holitom"][0], got["single_text"][0],
               got["img:prumerge"][0], got["vid:dycoke"][1]]
    tiny.assert_same_runs(got["mixed_methods"], singles)


@pytest.mark.parametrize("name,options", [("pp", {}), ("pp_tau", {"tau": 0.05})])
def test_pixelprune_shortens_by_dropped_groups_and_agrees_with_mmc_apply(runs, models, name, options):
    """PixelPrune before the encoder: the processor drops the groups the 2-D predictor reproduces (the page images
    lose some), the ViT runs on the kept patches at their original rotary positions, and the outputs equal
    `mmc.apply(model, "pixelprune", **options)` in transformers."""
    got, _ = runs
    pad = tiny.token_id("<|image_pad|>")
    served.assert_pixelprune(models["qwen2_vl"], CALLS[name][:2], got[name][:2], got["pp_none"], [N_P, N_Q], pad,
                             **options)


def test_pixelprune_keeping_every_group_is_plain_vllm(runs):
    """A noise image: every group differs from its prediction, so nothing is dropped and vLLM's own path runs."""
    got, plain = runs
    assert got["pp"][2] == plain[0][0]


def test_pixelprune_in_a_mixed_batch_equals_single_runs(runs):
    got, _ = runs
    tiny.assert_same_runs(got["pp_mixed"], [got["pp_tau"][1], got["tome"][0], got["single_text"][0], got["pp"][0]])
