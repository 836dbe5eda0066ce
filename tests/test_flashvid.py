"""flashvid: segments, ADTS selection, tree merging across frames, DPC-kNN (before the LLM); FastV at layer K inside."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.flashvid import _Video, flashvid_segments
from mmcompress.inllm.fastv import FastVRule


def _frames(*rows):
    """[T, S, C] from per-frame lists of token vectors."""
    return torch.tensor(rows, dtype=torch.float32)


# ---- segments ------------------------------------------------------------------------------------------------------
def test_segments_cut_below_threshold_then_complete_the_most_dissimilar():
    e = torch.eye(3)
    # frame means: 0, 1 equal; 2 orthogonal to 1 (a cut); 3 close to 2 (cos 0.995), 4 less close to 3 (cos 0.98)
    m = torch.stack([e[0], e[0], e[1], e[1] + 0.1 * e[2], e[1] + 0.3 * e[2]])
    x = m.unsqueeze(1).repeat(1, 2, 1)  # [5, 2, 3]
    assert flashvid_segments(x, 0.9, 1) == [(0, 2), (2, 5)]
    # min 3 segments: one more cut at the lowest similarity left (between frames 3 and 4: 0.98 < 0.995 < 1)
    assert flashvid_segments(x, 0.9, 3) == [(0, 2), (2, 4), (4, 5)]
    # more segments asked than transitions: every frame its own (the release's duplicate cuts give empty segments)
    assert flashvid_segments(x, 0.9, 8) == [(i, i + 1) for i in range(5)]
    assert flashvid_segments(x[:1], 0.9, 8) == [(0, 1)]


# ---- ADTS ----------------------------------------------------------------------------------------------------------
def test_selection_is_calibrated_max_min():
    """Orthogonal tokens: every cosine distance is 1, so D[i, j] = a_j * 1e6 * r_j with r_j = x_j . mean = 1/3:
    the first pick is the highest attention, then the max-min order is the attention order."""
    x = torch.eye(3).unsqueeze(0)  # [1, 3, 3]
    a = torch.tensor([[0.1, 0.3, 0.2]])
    v = _Video(x, a, 0.9, 1, 0.8, "release")
    assert v.selection(3).tolist() == [[1, 2, 0]]
    assert v.selection(1).tolist() == [[1]]  # a prefix of the longer order


def test_selection_never_repeats_a_token():
    """The release's attn_div_v2 can re-pick a selected token once every other calibrated distance is below its own
    (about 0; here negative relevances make them negative); here each pick is a new token."""
    g = torch.Generator().manual_seed(0)
    x = -torch.rand(1, 6, 4, generator=g) - 1.0  # all dots with the mean positive ...
    x[0, 3:] *= -1  # ... except for tokens 3..5 (negative relevance: negative distances)
    v = _Video(x, torch.rand(1, 6, generator=g), 0.9, 1, 0.8, "release")
    order = v.selection(6)[0].tolist()
    assert sorted(order) == list(range(6))


# ---- tree merging --------------------------------------------------------------------------------------------------
def _chain_video():
    """3 frames x 3 tokens: token 0 is the same vector in every frame (a chain 2 -> 1 -> 0), the others flip sign
    frame to frame (no merge). One segment (threshold -1), no selection (alpha 0)."""
    e = torch.eye(4)
    x = _frames([e[0].tolist(), e[1].tolist(), e[2].tolist()],
                [e[0].tolist(), (-e[1]).tolist(), (-e[2]).tolist()],
                [e[0].tolist(), e[1].tolist(), e[2].tolist()])
    return x.reshape(1, 9, 4), torch.full((1, 9), 1 / 9)


@pytest.mark.parametrize("merge,value", [("release", 1.5), ("mean", 1.0)])
def test_tree_merging_counts_as_the_release(merge, value):
    """b = 7 // 3 = 2 per frame: frame 2's token 0 merges into frame 1's, which merges into frame 0's; the root
    stands for the 3 tokens, its value their sum over 1 + its direct children (2: the release's counts) = 1.5 e0,
    or their mean (merge='mean'). The 7 trees (6 + 1 chain) fit ceil(n_t * 6/7) clusters per frame: no clustering."""
    x, a = _chain_video()
    out = mmc.create("flashvid", keep=7, alpha=0.0, segment_threshold=-1.0, min_segments=1, merge=merge)(
        x, grid=(3, 1, 3), scores=a)
    assert out.assign[0].tolist() == [0, 1, 2, 0, 3, 4, 0, 5, 6]
    torch.testing.assert_close(out.x[0, 0], value * torch.eye(4)[0])
    torch.testing.assert_close(out.x[0, 1:], x[0, [1, 2, 4, 5, 7, 8]])
    assert out.size[0].tolist() == [3, 1, 1, 1, 1, 1, 1]


def test_dpc_clusters_are_means_of_their_trees_at_the_centre():
    """One frame (no trees), alpha 0: 9 tokens into ceil(9 * 3/9) = 3 DPC-kNN clusters (knn = 3: self + 2 nearest).
    Three separated triples on a line; each triple's middle token is its densest, so the centres are the middles
    (far from every denser token), and each output is the mean of its triple at its middle's place."""
    pts = [[0.0, 0.0], [0.1, 0.0], [0.3, 0.0], [5.0, 5.0], [5.15, 5.0], [5.45, 5.0], [0.0, 5.0], [0.2, 5.0],
           [0.6, 5.0]]
    x = torch.tensor([pts])
    out = mmc.create("flashvid", keep=3, alpha=0.0, min_segments=1)(x, grid=(1, 1, 9), scores=torch.ones(1, 9))
    assert out.assign[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert out.rep[0].tolist() == [1, 4, 7]
    torch.testing.assert_close(out.x[0], x[0].view(3, 3, 2).mean(1))


# ---- budget --------------------------------------------------------------------------------------------------------
def test_fill_and_floor_rules():
    x, a = _chain_video()
    a = torch.arange(9.0).unsqueeze(0)  # the highest scores last
    # keep 8: the release's count at b = 2 is 7; one slot left -> the merged token with the highest score (index 6)
    out = mmc.create("flashvid", keep=8, alpha=0.0, segment_threshold=-1.0, min_segments=1)(x, grid=(3, 1, 3),
                                                                                             scores=a)
    assert out.assign[0].tolist() == [0, 1, 2, 0, 3, 4, 5, 6, 7]
    torch.testing.assert_close(out.x[0, 0], torch.eye(4)[0])  # (e0 + e0) / 2: what is left of the tree
    # keep 2 < T = 3 frames: the 2 highest scores
    out = mmc.create("flashvid", keep=2)(x, grid=(3, 1, 3), scores=a)
    assert out.assign[0].tolist() == [-1] * 7 + [0, 1]


def test_auto_is_the_release_budget_and_batches_equal_single_runs():
    g = torch.Generator().manual_seed(1)
    T, S, C = 6, 16, 8
    base = torch.randn(1, S, C, generator=g)
    x = torch.stack([(2 * base + torch.randn(T, S, C, generator=g)).reshape(T * S, C) for _ in range(2)])
    a = torch.rand(2, T * S, generator=g)
    comp = mmc.create("flashvid", keep="auto", retention=0.25, min_segments=2)
    out = comp(x, grid=(T, 4, 4), scores=a)
    b = math.ceil(S * 0.25 * 1.25)  # 5 per frame
    counts = (out.mask.sum(1) if out.mask is not None else torch.full((2,), out.x.shape[1])).tolist()
    for i in range(2):
        one = comp(x[i:i + 1], grid=(T, 4, 4), scores=a[i:i + 1])
        assert T * b <= one.x.shape[1] == counts[i] < T * (b + 1)
        torch.testing.assert_close(out.x[i, :counts[i]], one.x[0])
        assert torch.equal(out.assign[i], one.assign[0])
        fixed = mmc.create("flashvid", keep=counts[i], min_segments=2)(x[i:i + 1], grid=(T, 4, 4),
                                                                        scores=a[i:i + 1])
        assert torch.equal(fixed.assign, one.assign)  # keep = the release's count gives the release's result


def test_bad_options():
    for bad in (dict(retention=0.0), dict(alpha=1.5), dict(expansion=0.5), dict(temporal_threshold=1.0),
                dict(segment_threshold=2), dict(min_segments=0), dict(knn=0), dict(merge="sum"),
                dict(llm_layer=0), dict(llm_keep=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            mmc.create("flashvid", **bad)
    with pytest.raises(ValueError, match="scores"):
        mmc.create("flashvid", keep=2)(torch.randn(1, 8, 4), grid=(2, 2, 2))


# ---- in-LLM rule ---------------------------------------------------------------------------------------------------
def test_fastv_ceil_count_and_trailing_newline():
    """FlashVID's FastV: ceil(n * 0.3) of the n video tokens kept, the sample's last media column (the newline)
    neither a candidate nor counted."""
    img = torch.tensor([[False, True, True, True, True, True, True, True, False]])  # 6 tokens + newline at 7
    s = torch.tensor([[9.0, 0.1, 0.5, 0.2, 0.9, 0.3, 0.4, 0.0, 9.0]])
    ctx = SimpleNamespace(img=img, last_token_attention=lambda: s)
    drop = FastVRule(k=1, r=0.7, ceil_keep=0.3, skip_last=True).drop(ctx)
    assert drop.nonzero()[:, 1].tolist() == [1, 3, 5, 6]  # keeps ceil(1.8) = 2: columns 4 and 2; 7 stays
    plain = FastVRule(k=1, r=0.7).drop(ctx)  # FastV's round(7 * 0.3) = 2 over all 7 media columns
    assert plain.nonzero()[:, 1].tolist() == [1, 3, 5, 6, 7]


# ---- through apply -------------------------------------------------------------------------------------------------
def test_apply_onevision_video_runs_both_stages():
    """LLaVA-OneVision video: the tokens handed to the LLM are flashvid's on the projected, 2x-pooled frame tokens and
    the pooled mean attention received in the tower's last block; at layer `llm_layer` the stage keeps
    ceil(0.3 * n) of the n video tokens, and the newline."""
    from llava_tiny import build, prompt

    m = build("llava_onevision", seed=2, attn="eager")
    T = 4
    g = torch.Generator().manual_seed(3)
    pvv = torch.randn(1, T, 3, 32, 32, generator=g)
    ids = torch.tensor([prompt([], [11], [12, 13], video_tokens=T * 2 * 2 + 1)])
    with torch.no_grad():
        vt = m.model.vision_tower(pvv[0], output_hidden_states=True, output_attentions=True)
        feats = m.model.apply_pooling(m.model.multi_modal_projector(vt.hidden_states[-1]))  # [T, 4, C]
        att = vt.attentions[-1].mean(1).mean(1)  # [T, 16]
        scores = m.model.apply_pooling(att.unsqueeze(-1))[..., 0]  # [T, 4]
        direct = mmc.create("flashvid", keep=8, min_segments=2)(feats.reshape(1, -1, feats.shape[-1]),
                                                                grid=(T, 2, 2), scores=scores.reshape(1, -1))
        mmc.apply(m, "flashvid", keep=8, min_segments=2, llm_layer=2)
        try:
            out = m(input_ids=ids, pixel_values_videos=pvv)
            st = mmc.stats(m)
        finally:
            mmc.remove(m)
    assert torch.isfinite(out.logits).all()
    assert st["tokens_out"] == [9]  # 8 + the video's newline
    assert torch.equal(st["assign"][0][2], direct.assign[0])
    assert st["inllm_removed"] == [8 - math.ceil(8 * 0.3)]
    assert st["inllm_layer_tokens"][0][-1] == math.ceil(8 * 0.3) + 1  # the newline stays
    with pytest.raises(ValueError, match="llm_layer"):  # the release's layer 20 asked for on a 4-layer LLM
        mmc.apply(m, "flashvid", keep=8, llm_layer=20)
    from mmcompress.inllm.declared import resolve_layer

    assert [resolve_layer("auto", (20, 28), n) for n in (4, 8, 20, 21, 28, 32)] == [3, 6, 14, 20, 20, 20]
    mmc.remove(m)
