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
