"""`temporal`: static clips collapse along time, a scene cut starts a new segment, budgets are exact, pos is (t,h,w)."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.temporal import _share


def clip(T: int, H: int, W: int, C: int = 16, seed: int = 0, noise: float = 0.01) -> torch.Tensor:
    """A static clip: one random frame repeated T times with small noise. [T*H*W, C]."""
    g = torch.Generator().manual_seed(seed)
    frame = torch.randn(H * W, C, generator=g)
    return (frame.expand(T, H * W, C) + noise * torch.randn(T, H * W, C, generator=g)).reshape(T * H * W, C)


def test_static_clip_is_one_segment_and_collapses_to_one_frame():
    x = clip(6, 3, 4)
    comp = mmc.create("temporal", keep="auto")
    assert comp.segments(x, (6, 3, 4)) == [0]
    out = comp(x[None], grid=(6, 3, 4))
    assert out.x.shape[1] == 12  # one token per place
    assert (out.size == 6).all()  # each stands for its place in all 6 frames
    assert (out.pos[0, :, 0] == 0).all()  # represented by the first frame
    assert torch.allclose(out.x[0], x.view(6, 12, 16).mean(0), atol=1e-6)


def test_scene_cut_starts_a_new_segment():
    x = torch.cat([clip(4, 3, 3, seed=1), clip(3, 3, 3, seed=2)])  # frames 0-3 one scene, 4-6 another
    comp = mmc.create("temporal", keep="auto")
    assert comp.segments(x, (7, 3, 3)) == [0, 4]
    out = comp(x[None], grid=(7, 3, 3))
    assert out.x.shape[1] == 18  # 9 places x 2 scenes: nothing merges across the cut
    assert sorted(out.pos[0, :, 0].unique().tolist()) == [0, 4]


@pytest.mark.parametrize("keep", [1, 5, 9, 18, 30, 63])
def test_budget_is_exact_and_merges_stay_at_one_place(keep):
    x = torch.cat([clip(4, 3, 3, seed=1, noise=0.05), clip(3, 3, 3, seed=2, noise=0.05)])[None]
    out = mmc.create("temporal", keep=keep)(x, grid=(7, 3, 3))
    assert out.x.shape == (1, keep, 16)
    if keep >= 18:  # temporal merging alone reaches the budget: every group is one place
        place = torch.arange(63) % 9
        for slot in range(keep):
            assert place[out.assign[0] == slot].unique().numel() == 1


def test_inner_compressor_and_bad_options():
    x = clip(4, 4, 4, noise=0.5)[None]
    out = mmc.create("temporal", keep=8, inner="pool")(x, grid=(4, 4, 4))
    assert out.x.shape == (1, 8, 16)
    with pytest.raises(ValueError, match="inner"):
        mmc.create("temporal", keep=8, inner="visionzip")
    with pytest.raises(ValueError, match="tau"):
        mmc.create("temporal", keep=8, tau=2.0)
    with pytest.raises(ValueError, match="grid"):
        mmc.create("temporal", keep=8)(x)


def test_share_is_proportional_and_sums_to_k():
    assert _share(10, [30, 10, 0, 10]) == [6, 2, 0, 2]
    assert sum(_share(7, [5, 1, 9])) == 7 and _share(7, [5, 1, 9])[1] == 1
    with pytest.raises(ValueError, match="keep"):
        _share(1, [3, 3])
