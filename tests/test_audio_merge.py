"""`audio_merge`: outputs are contiguous spans in time order; repeated frames collapse; the budget is exact."""

from __future__ import annotations

import torch

import mmcompress as mmc
from mmcompress.compressors.audio_merge import spans


def test_spans_are_contiguous_ordered_and_cover_everything():
    x = torch.randn(3, 97, 16, generator=torch.Generator().manual_seed(0))
    for keep in (1, 2, 10, 48, 96):
        out = mmc.create("audio_merge", keep=keep)(x)
        sp = spans(out)
        assert out.x.shape == (3, keep, 16)
        assert (sp[:, 0, 0] == 0).all() and (sp[:, -1, 1] == 96).all()
        assert (sp[:, 1:, 0] == sp[:, :-1, 1] + 1).all()  # next span starts right after the previous one
        assert (out.size == (sp[..., 1] - sp[..., 0] + 1)).all()
        assert (out.assign.diff(dim=1) >= 0).all()  # monotonic: order is kept


def test_repeated_frames_collapse_and_cuts_fall_between_different_sounds():
    g = torch.Generator().manual_seed(1)
    a, b, c = torch.randn(3, 8, generator=g)
    # 5 frames of "a", 7 of "b", 4 of "c" (tiny noise): with keep=3 the spans are exactly the three sounds
    x = torch.cat([a.expand(5, 8), b.expand(7, 8), c.expand(4, 8)]) + 1e-4 * torch.randn(16, 8, generator=g)
    out = mmc.create("audio_merge", keep=3)(x[None])
    assert spans(out)[0].tolist() == [[0, 4], [5, 11], [12, 15]]
    assert torch.allclose(out.x[0], torch.stack([a, b, c]), atol=1e-3)


def test_prefix_and_grid_pos():
    x = torch.randn(2, 1 + 30, 4)
    out = mmc.create("audio_merge", keep=6)(x, prefix=1, grid=(30,))
    assert out.x.shape == (2, 7, 4) and torch.equal(out.x[:, 0], x[:, 0])
    assert out.pos.shape == (2, 7, 1)
    sp = spans(out)[:, 1:]  # first frame of every span (indices include the prefix)
    assert torch.equal(out.pos[:, 1:, 0], sp[..., 0] - 1)
