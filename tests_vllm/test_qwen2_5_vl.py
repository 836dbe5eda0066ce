"""The plugin on vLLM's (CPU) engine with a tiny random Qwen2.5-VL (windowed vision attention; videos with the
temporal position scale `tokens_per_second * second_per_grid_ts`): keep=1 and no setting equal plain vLLM,
keep=0.25 shortens the prompt by the removed tokens and agrees with `mmc.apply` in transformers, for images and
videos. One plugin engine and one plain-vLLM engine for the module."""

from __future__ import annotations

import pytest
import served
import tiny
from conftest import run_engine

A = {"prompt": tiny.prompt(seed=0), "images": [[0, 112, 112]]}
B = {"prompt": tiny.prompt(seed=1, n_words=9), "images": [[1, 168, 112]]}
# 4 frames at 4 fps: 2 temporal patches of 0.5 s, temporal ids 0 and 2 (tokens_per_second 4): (2, 4, 4) = 32 tokens
V = {"prompt": tiny.prompt(seed=3, placeholder=tiny.VIDEO), "videos": [[5, 4, 112, 112, 4.0]]}
# 8 frames at 2 fps: temporal ids 0, 4, 8, 12, beyond the spatial extent: (4, 4, 4) = 64 tokens
LONG = {"prompt": tiny.prompt(seed=4, n_words=3, placeholder=tiny.VIDEO), "videos": [[6, 8, 112, 112, 2.0]]}
# PixelPrune: pages of flat 28 px cells; 224 x 168 -> 8 x 6 groups over several 2 x 2-group windows (window 56 px)
P = {"prompt": tiny.prompt(seed=5), "images": [[7, 168, 112, "blocks", 28]]}
Q = {"prompt": tiny.prompt(seed=6, n_words=9), "images": [[8, 224, 168, "blocks", 28]]}


kw = tiny.request_kw


CALLS = {"none": [A, B], "keep1": [dict(A, **kw("tome", 1.0)), dict(B, **kw("tome", 1.0))],
         "tome": [dict(A, **kw("tome", 0.25)), dict(B, **kw("tome", 0.25))],
         "video_none": [V, LONG], "video_keep1": [dict(V, **kw("tome", 1.0)), dict(LONG, **kw("tome", 1.0))],
         "video_tome": [dict(V, **kw("tome", 0.25)), dict(LONG, **kw("tome", 0.25))],
         **served.calls([A, B], served.IMAGE_SOME, "img"), **served.calls([V], served.VIDEO, "vid"),
         "mixed_methods": served.mixed([(V, "holitom", 0.5), (B, "cdpruner", 0.5), (A, "visionzip", 0.5)]),
         "pp_none": [P, Q], "pp": [dict(P, **served.PIXELPRUNE), dict(Q, **served.PIXELPRUNE_TAU)],
         "pp_mixed": [dict(Q, **served.PIXELPRUNE_TAU), dict(A, **kw("tome", 0.25)), dict(P, **served.PIXELPRUNE)]}
PLAIN = ["none", "video_none"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("q25")
    model = str(tiny.build_qwen2_vl(root / "model", family="qwen2_5_vl"))
    out = run_engine(tmp_path_factory.mktemp("plug"), model, list(CALLS.values()))
    plain = run_engine(tmp_path_factory.mktemp("plain"), model, [CALLS[n] for n in PLAIN],
                       env={"MMCOMPRESS_VLLM": "0"})
    return model, dict(zip(CALLS, out["results"], strict=True)), dict(zip(PLAIN, plain["results"], strict=True))


@pytest.mark.parametrize("name,plain", [("none", "none"), ("keep1", "none"), ("video_none", "video_none"),
                                        ("video_keep1", "video_none")])
def test_keep1_and_no_setting_equal_plain_vllm(runs, name, plain):
    _, got, ref = runs
    assert got[name] == ref[plain]  # same prompt ids, generated ids and first-step log-probs, bit for bit


@pytest.mark.parametrize("name,pad,sizes", [("tome", "<|image_pad|>", ((16, 4), (24, 6))),
                                            ("video_tome", "<|video_pad|>", ((32, 8), (64, 16)))])
def test_prompt_shorter_by_removed_tokens(runs, name, pad, sizes):
    _, got, ref = runs
    plain = ref["video_none" if name.startswith("video") else "none"]
    for r, p, (n, m) in zip(got[name], plain, sizes, strict=True):
        assert len(r["prompt_token_ids"]) == len(p["prompt_token_ids"]) - (n - m)
        assert r["prompt_token_ids"].count(tiny.token_id(pad)) == m
        assert len(r["token_ids"]) == 5


@pytest.mark.parametrize("name,method", [("none", None), ("tome", "tome"), ("video_none", None),
                                         ("video_tome", "tome")])
def test_agrees_with_mmc_apply_in_transformers(runs, name, method):
    """Videos: the short one only. After a video whose temporal ids pass its spatial extent (LONG), transformers
    5.19 starts the following text at max(h, w) while vLLM (and the original Qwen2.5-VL code) start it after the
    largest id, so the unwrapped models already differ there; the plugin follows vLLM (keep 1 is plain vLLM)."""
    model_dir, got, _ = runs
    tiny.assert_apply_agrees(model_dir, method, 0.25, CALLS[name][:1], got[name][:1])


@pytest.mark.parametrize("name,method,keep", served.names(served.IMAGE_SOME, "img") + served.names(served.VIDEO, "vid"))
def test_scored_text_and_video_methods_shorten_and_agree_with_mmc_apply(runs, name, method, keep):
    """Scores from the last (full-attention) block in vLLM's window order, undone; the question; video methods:
    the prompt is shorter by exactly the removed tokens, and outputs equal `mmc.apply` in transformers."""
    model_dir, got, ref = runs
    video = name.startswith("vid")
    ns = [32] if video else [16, 24]
    plain = ref["video_none"][:1] if video else ref["none"]
    served.assert_shorter(got[name], plain, ns, [served.kept(n, keep) for n in ns],
                          tiny.token_id("<|video_pad|>" if video else "<|image_pad|>"))
    tiny.assert_apply_agrees(model_dir, method, keep, CALLS[name], got[name])


def test_batch_of_different_methods_equals_single_runs(runs):
    _, got, _ = runs
    tiny.assert_same_runs(got["mixed_methods"], [got["vid:holitom"][0], got["img:cdpruner"][1],
                                                 got["img:visionzip"][0]])


@pytest.mark.parametrize("i,options", [(0, {}), (1, {"tau": 0.05})])
def test_pixelprune_shortens_by_dropped_groups_and_agrees_with_mmc_apply(runs, i, options):
    """PixelPrune: the ViT runs on the kept patches, each window of the full grid holding its kept groups (as
    `mmc.apply` runs the HF tower); prompt shorter by the dropped groups, outputs equal transformers'."""
    served.assert_pixelprune_call(runs, CALLS, i, (24, 48)[i], **options)


def test_pixelprune_in_a_mixed_batch_equals_single_runs(runs):
    _, got, _ = runs
    tiny.assert_same_runs(got["pp_mixed"], [got["pp"][1], got["tome"][0], got["pp"][0]])
