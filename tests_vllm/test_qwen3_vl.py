"""The plugin on vLLM's (CPU) engine with a tiny random Qwen3-VL (DeepStack from both vision layers; 16 px patches),
images and videos (each frame group behind its timestamp text): keep=1 and no setting equal plain vLLM, keep=0.25 /
an int keep shorten the prompt by the removed image or video tokens and agree with `mmc.apply` in transformers (the
DeepStack features subset with the same tokens; a video's kept tokens fall over its frame groups as the compressor
chose), a mixed image + video + text batch equals single runs. One plugin engine and one plain-vLLM engine."""

from __future__ import annotations

import pytest
import served
import tiny
from conftest import run_engine

A = {"prompt": tiny.prompt(seed=0), "images": [[0, 128, 128]]}  # 8 x 8 patches -> 16 tokens
B = {"prompt": tiny.prompt(seed=1, n_words=9), "images": [[1, 192, 128]]}  # 12 x 8 patches -> 24 tokens
# videos: 4 frames of 128 x 128 -> 2 frame groups of 4 x 4 = 32 tokens; 6 frames of 192 x 128 -> 3 groups of 2 x 4 = 24
# (the video processor caps the pixels of all frames together: these frames shrink to 128 x 64)
V = {"prompt": tiny.prompt(seed=3, placeholder=tiny.VIDEO), "videos": [[5, 4, 128, 128]]}
W = {"prompt": tiny.prompt(seed=4, n_words=4, placeholder=tiny.VIDEO), "videos": [[6, 6, 192, 128]]}
TEXT = {"prompt": "<|im_start|>user w5 w9 w13 <|im_end|> <|im_start|>assistant"}
N_A, N_B, N_V, N_W = 16, 24, 32, 24
# PixelPrune: pages of flat 32 px cells (one merge group of 16 px patches): 16 and 24 groups
P = {"prompt": tiny.prompt(seed=5), "images": [[7, 128, 128, "blocks", 32]]}
Q = {"prompt": tiny.prompt(seed=6, n_words=9), "images": [[8, 192, 128, "blocks", 32]]}


kw = tiny.request_kw


CALLS = {
    "none": [A, B],
    "keep1": [dict(A, **kw("tome", 1.0)), dict(B, **kw("tome", 1.0))],
    "tome": [dict(A, **kw("tome", 0.25)), dict(B, **kw("tome", 0.25))],
    "divprune_int": [dict(A, **kw("divprune", 6)), dict(B, **kw("divprune", 6))],
    "pool": [dict(A, **kw("pool", 0.25)), dict(B, **kw("pool", 0.25))],
    "text": [TEXT],
    "mixed": [dict(A, **kw("tome", 0.25)), TEXT, dict(B, **kw("divprune", 6)), A],
    "video": [V, W],
    "video_keep1": [dict(V, **kw("tome", 1.0)), dict(W, **kw("tome", 1.0))],
    "video_tome": [dict(V, **kw("tome", 0.25)), dict(W, **kw("tome", 0.25))],
    "video_divprune_int": [dict(V, **kw("divprune", 5)), dict(W, **kw("divprune", 5))],
    "video_pool": [dict(V, **kw("pool", 0.25))],
    "video_divprune_2": [dict(V, **kw("divprune", 2)), dict(W, **kw("divprune", 2))],  # W: a frame group keeps none
    "mixed_video": [dict(W, **kw("tome", 0.25)), dict(A, **kw("tome", 0.25)), TEXT, V, dict(V, **kw("divprune", 5))],
    **served.calls([A, B], served.IMAGE_SOME, "img"),
    **served.calls([V, W], served.VIDEO, "vid"),
    "mixed_methods": served.mixed([(W, "holitom", 0.5), (B, "cdpruner", 0.5), (TEXT, None, 1.0),
                                   (A, "visionzip", 0.5), (V, "dycoke", 0.5)]),
    "pp_none": [P, Q], "pp": [dict(P, **served.PIXELPRUNE), dict(Q, **served.PIXELPRUNE_TAU)],
    "pp_mixed": [dict(Q, **served.PIXELPRUNE_TAU), dict(V, **kw("tome", 0.25)), dict(P, **served.PIXELPRUNE)],
}
NAMES = list(CALLS)
PLAIN = ["none", "video"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("q3")
    model = str(tiny.build_qwen3_vl(root / "model"))
    out = run_engine(tmp_path_factory.mktemp("plug"), model, [CALLS[n] for n in NAMES])
    plain = run_engine(tmp_path_factory.mktemp("plain"), model, [CALLS[n] for n in PLAIN],
                       env={"MMCOMPRESS_VLLM": "0"})
    return model, dict(zip(NAMES, out["results"], strict=True)), dict(zip(PLAIN, plain["results"], strict=True))


@pytest.mark.parametrize("name,plain", [("none", "none"), ("keep1", "none"), ("video", "video"),
                                        ("video_keep1", "video")])
def test_keep1_and_no_setting_equal_plain_vllm(runs, name, plain):
    _, got, ref = runs
    assert got[name] == ref[plain]  # prompt ids, generated ids, first-step log-probs: bit for bit


@pytest.mark.parametrize("name,kept", [("tome", (4, 6)), ("divprune_int", (6, 6)), ("pool", (4, 6))])
def test_prompt_shorter_by_removed_tokens(runs, name, kept):
    _, got, ref = runs
    for r, p, n, m in zip(got[name], ref["none"], (N_A, N_B), kept, strict=True):
        assert len(r["prompt_token_ids"]) == len(p["prompt_token_ids"]) - (n - m)
        assert r["prompt_token_ids"].count(tiny.token_id("<|image_pad|>")) == m
        assert len(r["token_ids"]) == 5


@pytest.mark.parametrize("name,kept", [("video_tome", (8, 6)), ("video_divprune_int", (5, 5)),
                                       ("video_pool", (8,)), ("video_divprune_2", (2, 2))])
def test_video_prompt_shorter_by_removed_tokens(runs, name, kept):
    """The whole video is one item: M = budget(N, keep) over all its frame groups; every timestamp text stays."""
    _, got, ref = runs
    k = len(kept)
    for r, p, n, m in zip(got[name], ref["video"][:k], (N_V, N_W)[:k], kept, strict=True):
        assert len(r["prompt_token_ids"]) == len(p["prompt_token_ids"]) - (n - m)
        assert r["prompt_token_ids"].count(tiny.token_id("<|video_pad|>")) == m
        vs = tiny.token_id("<|vision_start|>")
        assert r["prompt_token_ids"].count(vs) == p["prompt_token_ids"].count(vs)
        assert len(r["token_ids"]) == 5


@pytest.mark.parametrize("name,singles", [
    ("mixed", [("tome", 0), ("text", 0), ("divprune_int", 1), ("none", 0)]),
    ("mixed_video", [("video_tome", 1), ("tome", 0), ("text", 0), ("video", 0), ("video_divprune_int", 0)])])
def test_mixed_batch_equals_single_runs(runs, name, singles):
    _, got, _ = runs
    tiny.assert_same_runs(got[name], [got[call][i] for call, i in singles])


@pytest.mark.parametrize("name,method,keep", [("none", None, 1.0), ("tome", "tome", 0.25),
                                              ("divprune_int", "divprune", 6), ("pool", "pool", 0.25),
                                              ("video", None, 1.0), ("video_tome", "tome", 0.25),
                                              ("video_divprune_int", "divprune", 5), ("video_pool", "pool", 0.25),
                                              ("video_divprune_2", "divprune", 2)])
def test_agrees_with_mmc_apply_in_transformers(runs, name, method, keep):
    """Same weights, same compressor, same inputs: greedy ids equal, first-token log-probs within fp32 noise."""
    model_dir, got, _ = runs
    tiny.assert_apply_agrees(model_dir, method, keep, CALLS[name], got[name])


@pytest.mark.parametrize("name,method,keep", served.names(served.IMAGE_SOME, "img") + served.names(served.VIDEO, "vid"))
def test_scored_text_and_video_methods_shorten_and_agree_with_mmc_apply(runs, name, method, keep):
    """Scores from the last vision block, the question, video methods over all frame groups (each kept token in
    its own group): the prompt is shorter by exactly the removed tokens, and outputs equal `mmc.apply`."""
    model_dir, got, ref = runs
    video = name.startswith("vid")
    ns = [N_V, N_W] if video else [N_A, N_B]
    served.assert_shorter(got[name], ref["video" if video else "none"], ns, [served.kept(n, keep) for n in ns],
                          tiny.token_id("<|video_pad|>" if video else "<|image_pad|>"))
    tiny.assert_apply_agrees(model_dir, method, keep, CALLS[name], got[name])


def test_batch_of_different_methods_equals_single_runs(runs):
    _, got, _ = runs
    singles = [got["vid:holitom"][1], got["img:cdpruner"][1], got["text"][0], got["img:visionzip"][0],
               got["vid:dycoke"][0]]
    tiny.assert_same_runs(got["mixed_methods"], singles)


@pytest.mark.parametrize("i,options", [(0, {}), (1, {"tau": 0.05})])
def test_pixelprune_shortens_by_dropped_groups_and_agrees_with_mmc_apply(runs, i, options):
    """PixelPrune: the ViT runs on the kept patches with their original rotary ids and interpolated position
    embeddings, DeepStack features of the kept groups; prompt shorter by the dropped groups, outputs equal
    `mmc.apply` in transformers."""
    served.assert_pixelprune_call(runs, CALLS, i, (16, 24)[i], **options)


def test_pixelprune_in_a_mixed_batch_equals_single_runs(runs):
    _, got, _ = runs
    tiny.assert_same_runs(got["pp_mixed"], [got["pp"][1], got["video_tome"][0], got["pp"][0]])
