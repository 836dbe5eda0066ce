"""scope: greedy saliency x coverage-gain selection (facility location)."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.scope import greedy_coverage

R = 2 ** -0.5


def test_coverage_gain_by_hand():
    # e1, e1, e2, (e1 + e2)/sqrt2. Uniform saliency: gains 2.71, 2.71, 1.71, 3.12 -> token 3; then coverage
    # (0.71, 0.71, 0.71, 1): gains 0.59, 0.59, 0.29 -> token 0 (lower index on the tie with token 1)
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [R, R]]])
    u = torch.ones(1, 4)
    assert mmc.create("scope", keep=2)(x, scores=u).rep.tolist() == [[0, 3]]
    sim = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(x, dim=-1).transpose(1, 2)
    assert greedy_coverage(sim, u, 2).tolist() == [[3, 0]]
    # saliency 3 on token 2: 5.12 wins; then coverage (0, 0, 1, 0.71): gains 2, 2, -, 1.71 -> token 0
    s = torch.tensor([[1.0, 1.0, 3.0, 1.0]])
    assert greedy_coverage(sim, s, 2).tolist() == [[2, 0]]
    # "add": gain + saliency: 3.71, 3.71, 4.71, 4.12 -> token 2 first as well
    assert greedy_coverage(sim, s, 1, combine="add").tolist() == [[2]]


def cover(S: torch.Tensor, sel: list[int]) -> torch.Tensor:
    """f(sel) = sum_i max(0, max_{j in sel} S[i, j])."""
    return S[:, sel].max(1).values.clamp_min(0).sum() if sel else torch.tensor(0.0, dtype=S.dtype)


def test_greedy_equals_naive_facility_location():
    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(2, 15, 6, generator=g), torch.rand(2, 15, generator=g)
    for alpha in (1.0, 0.5):
        got = mmc.create("scope", keep=6, alpha=alpha)(x, scores=a).rep
        u = torch.nn.functional.normalize(x.double(), dim=-1)
        for b in range(2):
            S = u[b] @ u[b].T
            chosen: list[int] = []
            for _ in range(6):
                rest = [j for j in range(15) if j not in chosen]
                val = [(cover(S, chosen + [j]) - cover(S, chosen)) * a[b, j].double() ** alpha for j in rest]
                chosen.append(rest[int(torch.stack(val).argmax())])
            assert got[b].tolist() == sorted(chosen)


def test_bad_options_and_missing_scores():
    with pytest.raises(ValueError, match="combine"):
        mmc.create("scope", combine="max")
    with pytest.raises(ValueError, match="alpha"):
        mmc.create("scope", alpha=-1)
    with pytest.raises(ValueError, match="scores"):
        mmc.create("scope", keep=2)(torch.randn(1, 6, 4))


def test_apply_llava_gets_what_the_release_uses():
    from test_vispruner import apply_matches_direct_call

    apply_matches_direct_call("scope", keep=6, stage="vision")


def test_apply_qwen2_vl():
    from test_vispruner import apply_runs_on_qwen2_vl

    apply_runs_on_qwen2_vl("scope", keep=5)
