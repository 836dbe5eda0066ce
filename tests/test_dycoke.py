"""dycoke: DyCoke's token temporal merging on hand-computed cases (pairing, fixed per-frame quota, least-similar
tokens by ascending similarity, drop), its fixed-budget extension, the release defects not reproduced."""

from __future__ import annotations

import math

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.dycoke import dycoke_pairs


def test_pairing_schedule():
    assert dycoke_pairs(8) == {1: 0, 3: 2, 5: 4, 7: 6, 2: 0}
    p16 = dycoke_pairs(16)
    assert {f: p16[f] for f in (2, 6, 10)} == {2: 0, 6: 4, 10: 8}
    assert all(f % 2 == 1 or f in (2, 6, 10) for f in p16) and 14 not in p16 and 12 not in p16  # T - 2 never
    assert dycoke_pairs(4) == {1: 0, 3: 2} and dycoke_pairs(1) == {}
    assert dycoke_pairs(5) == {1: 0, 3: 2, 2: 0}  # odd T: the last frame has no partner


def _rotated(cos: list[float]) -> torch.Tensor:
    """[P, P] frame whose token j is at angle acos(cos[j]) from the basis vector e_j, towards e_{j+1}."""
    P = len(cos)
    f = torch.zeros(P, P)
    for j, c in enumerate(cos):
        f[j, j], f[j, (j + 1) % P] = c, math.sqrt(1 - c * c)
    return f


def test_fixed_quota_keeps_least_similar_in_ascending_order():
    # T = 4 frames of P = 4 tokens, prune 0.5: frames 1 and 3 keep int(0.5 * 4) = 2 tokens each; 12 out
    eye = torch.eye(4)
    f1 = _rotated([0.9, 0.1, 0.5, 0.3])  # similarity to frame 0 at each place
    f3 = _rotated([0.2, 0.8, 0.05, 0.6])  # similarity to frame 2 (= frame 0) at each place
    x = torch.cat([eye, f1, eye, f3])[None]  # [1, 16, 4]
    out = mmc.create("dycoke", keep="auto", prune=0.5)(x, grid=(4, 2, 2))
    seq = out.rep[0].gather(0, out.order[0]).tolist()
    assert seq == [0, 1, 2, 3, 4 + 1, 4 + 3, 8, 9, 10, 11, 12 + 2, 12 + 0]  # ascending similarity within a frame
    torch.testing.assert_close(out.ordered()[0], x[0, seq])  # dropped, not averaged
    assert (out.assign[0] == -1).sum() == 4
    assert out.size[0].sum() == 12
    # the release's default quota: int((1 - 0.7) * 196) = 58 per pruned frame
    video = torch.randn(1, 8 * 196, 4)
    n = mmc.create("dycoke", keep="auto")(video, grid=(8, 14, 14)).x.shape[1]
    assert n == 3 * 196 + 5 * 58  # frames 0, 4, 6 whole; 1, 2, 3, 5, 7 pruned


def test_release_defects_not_reproduced():
    # odd T: the last frame stays whole (the release loses it); T = 4 (no second stage) and T = 1 do not crash
    x = torch.randn(2, 5 * 4, 8)
    assert mmc.create("dycoke", keep="auto", prune=0.5)(x[:, :16], grid=(4, 2, 2)).x.shape[1] == 2 * 4 + 2 * 2
    out = mmc.create("dycoke", keep="auto", prune=0.5)(x, grid=(5, 2, 2))
    assert out.x.shape[1] == 2 * 4 + 3 * 2  # frames 0 and 4 whole, 1, 2, 3 pruned to 2
    assert (out.assign[:, 16:] >= 0).all()
    one = mmc.create("dycoke", keep="auto")(x[:, :4], grid=(1, 2, 2))
    assert torch.equal(one.x, x[:, :4])


def test_fixed_budget_shares():
    x = torch.randn(1, 4 * 9, 6)  # T = 4, P = 9: frames 0, 2 whole (18), frames 1, 3 share the rest
    out = mmc.create("dycoke", keep=23)(x, grid=(4, 3, 3))
    frames = (out.rep[0] // 9).tolist()
    assert [frames.count(f) for f in range(4)] == [9, 3, 9, 2]
    low = mmc.create("dycoke", keep=7)(x, grid=(4, 3, 3))  # below the whole frames: they are thinned
    frames = (low.rep[0] // 9).tolist()
    assert [frames.count(f) for f in range(4)] == [4, 0, 3, 0]


def test_bad_input():
    with pytest.raises(ValueError, match="grid"):
        mmc.create("dycoke")(torch.randn(1, 8, 4))
    with pytest.raises(ValueError, match="prune"):
        mmc.create("dycoke", prune=1.0)


def _release_ttm(x: torch.Tensor, T: int, prune: float) -> torch.Tensor:
    """Plain reference of the release's rule on one clip: x [T * P, C] -> kept tokens in the release's order.

    As the release computes it: the first stage compares `F.normalize`d frames, the second the frames themselves,
    by `F.cosine_similarity`; `topk(largest=False)` picks and orders.
    """
    P = x.shape[0] // T
    q = int((1 - prune) * P)
    frames = list(x.view(T, P, -1))
    out = list(frames)
    F = torch.nn.functional
    for i in range(0, T - 1, 2):  # stage 1: frame i + 1 against frame i
        sim = F.cosine_similarity(F.normalize(frames[i], p=2, dim=1), F.normalize(frames[i + 1], p=2, dim=1), dim=1)
        out[i + 1] = frames[i + 1][sim.topk(q, largest=False).indices]
    for i in range(0, T - 4, 4):  # stage 2: frame i + 2 against frame i
        sim = F.cosine_similarity(frames[i], frames[i + 2], dim=1)
        out[i + 2] = frames[i + 2][sim.topk(q, largest=False).indices]
    return torch.cat(out)


@pytest.mark.parametrize("T", [8, 12, 16])
@pytest.mark.parametrize("prune", [0.3, 0.5, 0.7])
def test_near_ties_order_as_the_release(T, prune):
    """Nearly static clips (frames = one frame + noise of 1e-3 .. 1e-6: similarities equal up to their last bits)
    with a quarter of the places copied exactly (equal similarities): the kept tokens and their order are the
    release's, bit for bit, in every clip of a batch. (A similarity rounded otherwise, dot / (|x| |y|), or a stable
    sort instead of topk, hands the LLM another order here.)"""
    g = torch.Generator().manual_seed(T)
    P, C = 49, 96
    base = torch.randn(1, P, C, generator=g)  # [1, P, C]
    clips = []
    for eps in (1e-3, 1e-4, 1e-5, 1e-6):
        clip = base + eps * torch.randn(T, P, C, generator=g)  # [T, P, C]
        clip[:, : P // 4] = base[:, : P // 4]  # exact ties
        clips.append(clip.reshape(T * P, C))
    x = torch.stack(clips)  # [4, T * P, C]
    got = mmc.create("dycoke", keep="auto", prune=prune)(x, grid=(T, 7, 7)).ordered()  # [4, M, C]
    for b in range(len(clips)):
        want = _release_ttm(x[b], T, prune)
        assert got.shape[1] == want.shape[0]
        assert torch.equal(got[b], want), f"clip {b}: not the release's tokens in the release's order"


def test_through_apply_on_onevision_video_equals_the_release_rule():
    """`mmc.apply` on a tiny LLaVA-OneVision runs dycoke after the projector on the frames' pooled tokens (as the
    release does) and hands the LLM the release's tokens in the release's order, then the newline token."""
    import llava_tiny as lt

    model = lt.build("llava_onevision", seed=5)
    T = 8  # 8 frames of 4 x 4 patches, pooled to 2 x 2 = 4 tokens each: 33 placeholders with the newline
    pvv = torch.randn(1, T, 3, lt.SIDE, lt.SIDE, generator=torch.Generator().manual_seed(5))
    n = T * 4 + 1
    ids = torch.tensor([lt.prompt([], [11], [12, 13], video_tokens=n)])
    got = []
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: got.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values_videos=pvv)  # unwrapped: the release's input, the frames' tokens
            mmc.apply(model, "dycoke", keep="auto", prune=0.5)
            model(input_ids=ids, pixel_values_videos=pvv)
    finally:
        hook.remove()
        mmc.remove(model)
    full, emb = got[0][0], got[1][0]  # [L, C], [L', C]: bos, 1 word, the video's tokens, newline, 2 words
    frames, newline = full[2:2 + n - 1], full[2 + n - 1]
    want = _release_ttm(frames, T, 0.5)
    M = want.shape[0]
    assert M == 3 * 4 + 5 * 2  # frames 0, 4, 6 whole; 1, 2, 3, 5, 7 keep int(0.5 * 4) = 2
    assert emb.shape[0] == 2 + M + 1 + 2
    torch.testing.assert_close(emb[2:2 + M], want, rtol=0, atol=0)
    torch.testing.assert_close(emb[2 + M], newline, rtol=0, atol=0)


@pytest.mark.parametrize("where", [0, 5, 16 + 3, 6 * 4 + 2, 7 * 4 + 3])  # prefix, frames 1, 4, 6 (never compared), 7
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("with_metric", [False, True])
def test_non_finite_x_raises_whatever_the_frame(where, bad, with_metric):
    """The finiteness check reads the similarity pass's per-token norms (`check_in_plan`): a NaN/inf anywhere in x,
    prefix and frames that are never compared included, still raises; with a metric, x itself is checked."""
    x = torch.randn(2, 1 + 8 * 4, 6)
    x[1, where, 2] = bad
    kw = {"metric": torch.randn(2, 1 + 8 * 4, 3)} if with_metric else {}
    for keep in ("auto", 20, 2):  # the release's quota, a shared budget, whole frames thinned (nothing compared)
        with pytest.raises(ValueError, match="x: contains NaN or inf"):
            mmc.create("dycoke", keep=keep, prune=0.5)(x, grid=(8, 2, 2), prefix=1, **kw)


def test_finite_x_whose_norms_overflow_passes():
    big = torch.full((1, 8 * 4, 4), 3e38)  # finite, but its norms overflow float32: the exact check on x decides
    out = mmc.create("dycoke", keep="auto", prune=0.5)(big, grid=(8, 2, 2))
    assert out.x.shape == (1, 3 * 4 + 5 * 2, 4)


def test_gradients_reach_the_kept_tokens():
    """The selection takes no gradient; x's gradient is the output's at each kept token and 0 at the dropped ones."""
    x = torch.randn(2, 1 + 8 * 4, 6, dtype=torch.float64, requires_grad=True)
    out = mmc.create("dycoke", keep="auto", prune=0.5)(x, grid=(8, 2, 2), prefix=1)
    w = torch.randn_like(out.x)
    (g,) = torch.autograd.grad((out.x * w).sum(), x)
    want = torch.zeros_like(x)
    for b in range(2):
        kept = out.assign[b] >= 0
        want[b, kept] = w[b, out.assign[b, kept]]
    torch.testing.assert_close(g, want, rtol=0, atol=0)
