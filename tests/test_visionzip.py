"""visionzip: dominant tokens by scores + contextual tokens merged from the rest (Yang et al., CVPR'25)."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.merge_ops import segment_mean


def test_keeps_top_scores_as_dominant_tokens():
    g = torch.Generator().manual_seed(0)
    B, N, C, k = 2, 64, 8, 16
    x = torch.randn(B, N, C, generator=g)
    scores = torch.rand(B, N, generator=g)
    comp = mmc.create("visionzip", keep=k)
    kd, kc = comp.split(k)
    assert (kd, kc) == (round(54 / 64 * 16), 16 - round(54 / 64 * 16))
    out = comp(x, scores=scores)
    for b in range(B):
        top = scores[b].topk(kd).indices
        # every dominant token sits alone in its slot and is copied exactly
        slots = out.assign[b, top]
        assert len(set(slots.tolist())) == kd
        members = torch.bincount(out.assign[b], minlength=k)
        assert (members[slots] == 1).all()
        torch.testing.assert_close(out.x[b, slots], x[b, top])
    assert (out.assign >= 0).all()  # nothing dropped: the rest is merged into contextual tokens
    torch.testing.assert_close(out.x, segment_mean(x, None, out.assign, k))


def test_contextual_tokens_group_similar_tokens():
    # remaining tokens come from 2 well separated directions: each contextual token averages one direction only
    g = torch.Generator().manual_seed(1)
    N, C = 40, 6
    d = torch.zeros(2, C)
    d[0, 0], d[1, 1] = 1, 1
    lab = (torch.arange(N) >= 22).long()  # two regions; the evenly spread targets fall one in each
    x = (d[lab] + 0.05 * torch.randn(N, C, generator=g))[None]
    scores = torch.zeros(1, N)
    scores[0, :4] = 1.0  # 4 dominant tokens
    out = mmc.create("visionzip", keep=6, dominant=4 / 6)(x, scores=scores)
    ctx = [s for s in range(6) if (out.assign[0] == s).sum() > 1]
    assert len(ctx) == 2
    for s in ctx:
        assert lab[out.assign[0] == s].unique().numel() == 1


def test_dominant_one_is_top_k_selection_and_k1():
    x = torch.randn(1, 10, 4)
    scores = torch.arange(10.0)[None]
    out = mmc.create("visionzip", keep=3, dominant=1.0)(x, scores=scores)
    assert out.rep[0].tolist() == [7, 8, 9] and (out.assign[0, :7] == -1).all()
    one = mmc.create("visionzip", keep=1)(x, scores=scores)
    assert one.rep[0].tolist() == [9]
    glob = mmc.create("visionzip", keep=1, dominant=0.0)(x, scores=scores)
    torch.testing.assert_close(glob.x[0, 0], x[0].mean(0))


def test_ties_and_bad_inputs():
    x = torch.randn(1, 12, 4)
    out = mmc.create("visionzip", keep=4, dominant=0.5)(x, scores=torch.ones(1, 12))
    assert out.assign[0, 0] >= 0 and out.assign[0, 1] >= 0
    assert out.size[0, 0] == 1 and out.size[0, 1] == 1  # equal scores: the lowest indices are dominant
    with pytest.raises(ValueError, match="scores"):
        mmc.create("visionzip", keep=4)(x)
    with pytest.raises(ValueError, match="dominant"):
        mmc.create("visionzip", keep=4, dominant=1.5)
