"""idpruner: maximal marginal relevance of importance against similarity (IDPruner, arXiv 2602.13315)."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.idpruner import mmr_select, uniqueness


def _reference_mmr(x: torch.Tensor, s: torch.Tensor, k: int, lam: float, step: int) -> set[int]:
    """Plain MMR on one sample x [N, C] (float64): min-max importance, cosine, `step` picks per round."""
    x, s = x.double(), s.double()
    imp = (s - s.min()) / (s.max() - s.min() + 1e-6)
    u = x / (x.norm(dim=1, keepdim=True) + 1e-8)
    sim = (u @ u.T).tolist()
    chosen: list[int] = []
    while len(chosen) < k:
        rest = [i for i in range(len(s)) if i not in chosen]
        if chosen:
            val = {i: lam * float(imp[i]) - (1 - lam) * max(sim[i][j] for j in chosen) for i in rest}
        else:
            val = {i: float(imp[i]) for i in rest}
        chosen += sorted(rest, key=lambda i: (-val[i], i))[: min(step, k - len(chosen))]
    return set(chosen)


def test_mmr_by_hand():
    # x1 is a near copy of x0 (cos 1/sqrt(1.01) = 0.995), x2 is orthogonal; importance 1, 0.9, 0
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]])
    s = torch.tensor([[1.0, 0.9, 0.0]])
    assert mmc.create("idpruner", keep=1)(x, scores=s).rep.tolist() == [[0]]  # the most important first
    # lambda 0.5: x1 scores 0.45 - 0.4975 < 0 = x2's 0 - 0: diversity wins
    assert mmc.create("idpruner", keep=2)(x, scores=s).rep.tolist() == [[0, 2]]
    # lambda 0.9: x1 scores 0.81 - 0.0995 = 0.71 > x2's 0: importance wins
    assert mmc.create("idpruner", keep=2, mmr_lambda=0.9)(x, scores=s).rep.tolist() == [[0, 1]]
    # two per step: the first step takes the two most important
    assert mmc.create("idpruner", keep=2, parallel_k=2)(x, scores=s).rep.tolist() == [[0, 1]]


@pytest.mark.parametrize("lam,step,seed", [(0.5, 1, 0), (0.2, 1, 1), (0.9, 1, 2), (0.5, 3, 3), (0.0, 1, 4),
                                           (1.0, 2, 5)])
def test_equals_an_independent_mmr(lam, step, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 40, 6, generator=g, dtype=torch.float64)
    s = torch.randn(2, 40, generator=g, dtype=torch.float64)
    got = mmr_select(x, s, 11, lam, step)
    for b in range(2):
        assert set(got[b].tolist()) == _reference_mmr(x[b], s[b], 11, lam, step)


def test_default_importance_is_uniqueness():
    # unit tokens (1, 0), (1, 0), (0, 1): mean (2/3, 1/3); uniqueness = -(2/3, 2/3, 1/3): token 2 first, then the
    # first of the two tied copies (importance 0 and similarity 0 to token 2 for both)
    x = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]]])
    torch.testing.assert_close(uniqueness(x), torch.tensor([[-2 / 3, -2 / 3, -1 / 3]]))
    assert mmc.create("idpruner", keep=1)(x).rep.tolist() == [[2]]
    assert mmc.create("idpruner", keep=2)(x).rep.tolist() == [[0, 2]]
    # given scores replace it (the release's Vision Selector scores go here)
    assert mmc.create("idpruner", keep=1)(x, scores=torch.tensor([[0.0, 1.0, 0.0]])).rep.tolist() == [[1]]


def test_kept_tokens_in_source_order_and_bad_options():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 8, generator=g)
    out = mmc.create("idpruner", keep=7)(x)
    for b in range(2):
        assert torch.equal(out.x[b], x[b, out.rep[b]]) and out.order is None
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="mmr_lambda"):
            mmc.create("idpruner", mmr_lambda=bad)
    for bad in (0, 1.0, False):
        with pytest.raises(ValueError, match="parallel_k"):
            mmc.create("idpruner", parallel_k=bad)


def test_apply_llava_after_the_projector():
    from test_vispruner import apply_matches_direct_call

    apply_matches_direct_call("idpruner", keep=6, stage="projector")


def test_apply_qwen2_vl():
    from test_vispruner import apply_runs_on_qwen2_vl

    apply_runs_on_qwen2_vl("idpruner", keep=5)
