"""text_recovery: keep by scores, recover text-aligned pruned tokens, merge the rest (Chen et al., AAAI'25)."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.merge_ops import segment_mean


def make(seed=0, B=1, N=48, C=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g)
    scores = torch.linspace(1, 0, N).expand(B, N).clone()  # importance falls with the index
    return x, scores, g


def test_recovers_tokens_aligned_with_text():
    x, scores, g = make()
    target = [40, 45]  # low visual importance: pruned by scores alone
    text = x[:, target] + 0.05 * torch.randn(1, 2, 16, generator=g)  # a 2-token "question" about them
    comp = mmc.create("text_recovery", keep=12)
    out = comp(x, scores=scores, text=text)
    kept = set(out.rep[0].tolist())
    assert set(target) <= kept
    assert set(range(12 - 3)) <= kept  # k_v = 12 - floor(0.25 * 12) = 9 visual tokens always kept
    _, rec = comp.select(comp._inputs(x, None, 0, None, text, scores, None)[0], 12)
    assert set(rec[0].nonzero().squeeze(1).tolist()) == set(target)
    # nothing is dropped and outputs are size-weighted group means
    assert (out.assign >= 0).all()
    torch.testing.assert_close(out.x, segment_mean(x, None, out.assign, 12))


def test_output_changes_with_text_and_budget_is_exact():
    x, scores, g = make(1, B=2)
    t1 = x[:, [30]] * 3
    t2 = x[:, [44]] * 3
    comp = mmc.create("text_recovery", keep=10)
    o1 = comp(x, scores=scores, text=t1)
    o2 = comp(x, scores=scores, text=t2)
    assert 30 in o1.rep[0].tolist() and 44 in o2.rep[0].tolist()
    assert not torch.equal(o1.x, o2.x)
    assert o1.x.shape == o2.x.shape == (2, 10, 16)


def test_unused_recovery_slots_go_to_visual_importance():
    x, scores, _ = make(2)
    x[..., -1] = 0
    text = torch.zeros(1, 1, 16)
    text[..., -1] = 1  # orthogonal to every token: relevance all 0, no outlier, nothing recovered
    out = mmc.create("text_recovery", keep=8)(x, scores=scores, text=text)
    assert out.rep[0].tolist() == list(range(8))  # plain top-8 by scores


def test_text_reduce_mean_and_2d_text():
    x, scores, g = make(3)
    out = mmc.create("text_recovery", keep=8, text_reduce="mean")(x, scores=scores, text=x[:, 40])
    assert 40 in out.rep[0].tolist()


def test_missing_inputs_name_the_argument():
    x, scores, _ = make()
    with pytest.raises(ValueError, match="text"):
        mmc.create("text_recovery", keep=4)(x, scores=scores)
    with pytest.raises(ValueError, match="scores"):
        mmc.create("text_recovery", keep=4)(x, text=x[:, :2])
    with pytest.raises(ValueError, match="recover"):
        mmc.create("text_recovery", keep=4, recover=1.0)
    with pytest.raises(ValueError, match="text_reduce"):
        mmc.create("text_recovery", keep=4, text_reduce="sum")
