"""Grid pooling: exact against torch pooling when the grid divides, partitions when it does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmcompress as mmc
from mmcompress.compressors.pool import choose_target_grid


def test_avg_equals_avg_pool2d_when_divisible():
    x = torch.randn(2, 1 + 64, 5)
    out = mmc.create("pool", keep=16)(x, grid=(8, 8), prefix=1)
    ref = F.avg_pool2d(x[:, 1:].transpose(1, 2).reshape(2, 5, 8, 8), 2).reshape(2, 5, 16).transpose(1, 2)
    torch.testing.assert_close(out.x[:, 1:], ref)
    assert out.size[:, 1:].eq(4).all()
    assert out.pos[0, 1].tolist() == [0, 0] and out.pos[0, -1].tolist() == [6, 6]


def test_avg_3d_equals_avg_pool3d():
    x = torch.randn(1, 4 * 6 * 6, 3)
    out = mmc.create("pool", keep=2 * 3 * 3)(x, grid=(4, 6, 6))
    ref = F.avg_pool3d(x.transpose(1, 2).reshape(1, 3, 4, 6, 6), 2).reshape(1, 3, 18).transpose(1, 2)
    torch.testing.assert_close(out.x, ref)


def test_bilinear_equals_interpolate():
    x = torch.randn(2, 24 * 24, 4)
    out = mmc.create("pool", keep=144, mode="bilinear")(x, grid=(24, 24))
    v = x.transpose(1, 2).reshape(2, 4, 24, 24)
    ref = F.interpolate(v, size=(12, 12), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out.x, ref.reshape(2, 4, 144).transpose(1, 2))
    assert out.size.sum(1).eq(576).all()


def test_uneven_grid_partition_sizes_differ_by_one_row():
    x = torch.randn(1, 7 * 5, 2)
    out = mmc.create("pool", keep=6, target=(3, 2))(x, grid=(7, 5))
    sizes = out.size[0].tolist()
    # rows split 7 -> (3, 2, 2) or similar, cols 5 -> (3, 2): cell sizes in {2*2, 2*3, 3*2, 3*3}
    assert sorted(set(sizes)) <= [4.0, 6.0, 9.0] and sum(sizes) == 35


@pytest.mark.parametrize("grid,k,expect", [((24, 24), 144, (12, 12)), ((24, 24), 64, (8, 8)), ((16,), 5, (5,)),
                                           ((4, 24, 24), 576, (4, 12, 12)), ((3, 5), 15, (3, 5))])
def test_target_grid_choice(grid, k, expect):
    assert choose_target_grid(grid, k) == expect


def test_prime_budget_is_an_upper_bound():
    t = choose_target_grid((8, 8), 13)
    assert t[0] * t[1] <= 13 and t[0] <= 8 and t[1] <= 8


def test_target_must_fit():
    with pytest.raises(ValueError, match="target"):
        mmc.create("pool", keep=4, target=(9, 1))(torch.randn(1, 64, 2), grid=(8, 8))
