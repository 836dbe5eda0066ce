"""holov: the budget spread over consecutive crops by crop score, top-`scores` tokens within each crop."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.holov import allocate, crop_bounds, crop_scores, default_crops


def test_crops_and_default_count():
    assert crop_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]  # the first N mod P crops one longer
    assert crop_bounds(2, 4) == [(0, 1), (1, 2)]  # empty crops skipped
    assert default_crops(576, 64) == 16 and default_crops(576, 192) == 5 and default_crops(10, 9) == 1


def test_crop_score_by_hand():
    # features e1, e1, e2: zero-diagonal similarity rows [0,1,0], [1,0,0], [0,0,0]; row means 1/2, 1/2, 0;
    # variances (n - 1 = 2): 0.375, 0.375, 0. a * 1000 = 1, 2, 3 (mean 2); mean var 0.25 -> scale 2 / (0.25 + 1e-6)
    f = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    a = torch.tensor([[0.001, 0.002, 0.003]])
    scale = 2 / (0.25 + 1e-6)
    want = torch.tensor([(1 + 2 + 3 + 0.09 * scale * (0.375 + 0.375)) / 3])
    torch.testing.assert_close(crop_scores(f, a), want)
    assert torch.equal(crop_scores(f[:, :1], a[:, :1]), a[:, 0])  # a one-token crop: its raw score


def test_shares_leftover_and_order_by_hand():
    # beta = 0: crop scores are 1000 * mean attention: 250 and 125 -> w = 2/3, 1/3 -> floor 2, 1, leftover to crop 0
    x = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(0))
    a = torch.tensor([[0.1, 0.2, 0.4, 0.3, 0.25, 0.05, 0.15, 0.05]])
    out = mmc.create("holov", keep=4, crops=2, beta=0.0)(x, scores=a)
    assert out.rep.tolist() == [[1, 2, 3, 4]]
    assert torch.equal(out.x, x[:, [1, 2, 3, 4]])
    # the release's sequence: crop 0 by descending attention (2, 3, 1), then crop 1 (4)
    assert torch.equal(out.ordered(), x[:, [2, 3, 1, 4]])


def test_overflow_goes_to_crops_with_room():
    w = torch.tensor([[0.95, 0.05]])
    share = allocate(w, 6, torch.tensor([4, 4]))  # floor: 5, 0; leftover 1 -> crop 0: 6 > 4 -> 2 to crop 1
    assert share.tolist() == [[4, 2]]
    x = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(1))
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1e-4, 3e-4, 2e-4, 0.0]])
    out = mmc.create("holov", keep=6, crops=2, beta=0.0)(x, scores=a)
    assert out.rep.tolist() == [[0, 1, 2, 3, 5, 6]]
    assert torch.equal(out.ordered(), x[:, [0, 1, 2, 3, 5, 6]])  # crop 0 kept whole: source order


def test_bad_options_and_missing_scores():
    with pytest.raises(ValueError, match="crops"):
        mmc.create("holov", crops=0)
    with pytest.raises(ValueError, match="beta"):
        mmc.create("holov", beta=-1)
    with pytest.raises(ValueError, match="scores"):
        mmc.create("holov", keep=2)(torch.randn(1, 6, 4))


def test_apply_llava_projector_stage_and_order():
    from test_vispruner import apply_matches_direct_call

    # explicit stage: apply's default stage does not read EncoderNeeds.stage yet (only text-guided methods move)
    apply_matches_direct_call("holov", keep=6, stage="projector", stage_option=True)


def test_apply_qwen2_vl():
    from test_vispruner import apply_runs_on_qwen2_vl

    apply_runs_on_qwen2_vl("holov", keep=5)
