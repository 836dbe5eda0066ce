"""adaptive: one Ward merge hierarchy per sample, cut at the error target epsilon or at a fixed budget."""

from __future__ import annotations

import time

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.adaptive import HEAD_PATH, build_hierarchy, cut_hierarchy, estimate_keep, relative_error
from mmcompress.compressors.base import Inputs
from mmcompress.compressors.merge_ops import segment_mean


def clustered(B, N, C, n_centres, noise, seed):
    g = torch.Generator().manual_seed(seed)
    cent = torch.randn(B, n_centres, C, generator=g)
    lab = torch.randint(0, n_centres, (B, N), generator=g)
    return cent.gather(1, lab.unsqueeze(-1).expand(B, N, C)) + noise * torch.randn(B, N, C, generator=g)


def naive_ward_heights(x: torch.Tensor) -> list[float]:
    """Independent O(N^3) greedy Ward in plain Python: merge the cheapest pair until one cluster; the costs in order."""
    cl = [(row, 1.0) for row in x.double().tolist()]
    out = []
    while len(cl) > 1:
        best = None
        for i in range(len(cl)):
            for j in range(i + 1, len(cl)):
                (a, na), (b, nb) = cl[i], cl[j]
                c = na * nb / (na + nb) * sum((p - q) ** 2 for p, q in zip(a, b, strict=True))
                if best is None or c < best[0]:
                    best = (c, i, j)
        c, i, j = best
        (a, na), (b, nb) = cl[i], cl[j]
        cl[i] = ([(na * p + nb * q) / (na + nb) for p, q in zip(a, b, strict=True)], na + nb)
        del cl[j]
        out.append(c)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_hierarchy_is_greedy_ward(seed):
    x = torch.randn(25, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    h = build_hierarchy(x)
    assert h.left.numel() == 24
    torch.testing.assert_close(h.cost, torch.tensor(naive_ward_heights(x), dtype=torch.float64), rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5])
def test_auto_meets_epsilon_and_is_minimal_for_its_hierarchy(eps):
    x = clustered(3, 120, 16, 8, 0.3, seed=int(eps * 100))
    out = mmc.create("adaptive", keep="auto", epsilon=eps)(x)
    err = relative_error(x, out.assign)
    assert (err <= eps * (1 + 1e-6)).all(), err
    # the error measured on out.unmerge() (DESIGN's definition) agrees
    xh = out.unmerge()
    direct = ((x - xh).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1))
    torch.testing.assert_close(direct.double(), err, rtol=1e-4, atol=1e-6)
    for b in range(3):  # one merge fewer (one token more) than needed would not be the smallest cut
        h = build_hierarchy(x[b], epsilon=eps)
        k = h.keep_for(eps)
        assert int(out.counts[b]) == k
        assert k == 1 or h.errors()[x.shape[1] - k + 1] > eps


def test_meets_epsilon_on_held_out_inputs_at_claimed_rate():
    """Claim: 100% of samples meet epsilon (the cut's error is computed exactly, not predicted)."""
    met = total = 0
    for seed in range(6):
        x = clustered(2, 200, 32, 4 + 5 * seed, 0.1 + 0.2 * seed, seed=100 + seed)
        for eps in (0.1, 0.3):
            out = mmc.create("adaptive", keep="auto", epsilon=eps)(x)
            met += int((relative_error(x, out.assign) <= eps * (1 + 1e-6)).sum())
            total += 2
    assert met == total


def test_ragged_outputs_and_redundant_sample_gets_fewer_tokens():
    x = torch.cat([torch.randn(1, 60, 8), torch.randn(1, 1, 8).expand(1, 60, 8) + 0.01 * torch.randn(1, 60, 8)])
    out = mmc.create("adaptive", keep="auto", epsilon=0.2)(x, prefix=1)
    assert out.mask is not None
    c = out.mask.sum(1)
    assert c[1] < c[0]
    assert torch.equal(out.x[:, 0], x[:, 0])


def test_size_weighted_error():
    x = clustered(1, 50, 8, 3, 0.2, seed=7)
    size = torch.rand(1, 50, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    out = mmc.create("adaptive", keep="auto", epsilon=0.15)(x, size=size)
    assert float(relative_error(x, out.assign, size)) <= 0.15 * (1 + 1e-6)
    torch.testing.assert_close(out.x, segment_mean(x, size, out.assign, out.x.shape[1]))


def test_fixed_keep_cuts_the_same_hierarchy():
    x = clustered(2, 90, 12, 5, 0.2, seed=3)
    for k in (1, 5, 30, 89):
        out = mmc.create("adaptive", keep=k)(x)
        assert out.x.shape == (2, k, 12)
        for b in range(2):
            h = build_hierarchy(x[b], min_clusters=k)
            torch.testing.assert_close(relative_error(x[b : b + 1], out.assign[b : b + 1]),
                                       h.errors()[90 - k : 90 - k + 1], rtol=1e-6, atol=1e-9)
    # estimate_keep and the fixed-k cut agree: cutting at the estimated k meets epsilon
    ks = estimate_keep(Inputs(x=x), 0.25)
    for b in range(2):
        a = cut_hierarchy(build_hierarchy(x[b], min_clusters=int(ks[b])), int(ks[b]))
        assert float(relative_error(x[b : b + 1], a[None])) <= 0.25 * (1 + 1e-6)


def test_search_subspace_keeps_errors_exact():
    x = clustered(2, 150, 64, 10, 0.3, seed=11)
    out = mmc.create("adaptive", keep="auto", epsilon=0.2, search_dim=8)(x)
    assert (relative_error(x, out.assign) <= 0.2 * (1 + 1e-6)).all()
    exact = mmc.create("adaptive", keep="auto", epsilon=0.2)(x).counts
    assert (out.counts >= exact - 2).all() and (out.counts <= 2 * exact).all()  # an approximation, not far off


def test_other_compressors_use_the_estimator_for_auto():
    x = clustered(2, 64, 8, 3, 0.05, seed=1)
    want = estimate_keep(Inputs(x=x), 0.1)
    out = mmc.create("tome" if "tome" in mmc.available() else "uniform", keep="auto", epsilon=0.1)(x)
    assert out.counts.tolist() == want.tolist()


def test_speed_llava_sizes():
    """N = 576 and 2880 tokens of width 1024 (LLaVA-1.5 / LLaVA-NeXT) on CPU; bounds are loose (shared CPUs)."""
    for N, bound in ((576, 10.0), (2880, 60.0)):
        x = clustered(1, N, 1024, 64, 0.5, seed=N)
        t = time.perf_counter()
        k = estimate_keep(Inputs(x=x), 0.3)
        assert time.perf_counter() - t < bound
        assert 1 <= int(k) <= N


def test_bad_arguments():
    with pytest.raises(ValueError, match="epsilon"):
        mmc.create("adaptive", keep="auto", epsilon=0.0)
    with pytest.raises(TypeError, match="head"):
        mmc.create("adaptive", keep="auto", head="yes")
    with pytest.raises(ValueError, match="epsilon"):
        estimate_keep(Inputs(x=torch.randn(1, 4, 2)), 1.5)


@pytest.mark.skipif(not HEAD_PATH.is_file(), reason="budget head not trained (scripts/train_budget_head.py)")
def test_learned_head_predicts_valid_budgets():
    x = clustered(3, 256, 384, 16, 0.5, seed=5)
    out = mmc.create("adaptive", keep="auto", epsilon=0.3, head=True)(x, prefix=1)
    c = out.counts - 1
    assert ((c >= 1) & (c <= 255)).all()
    lo = mmc.create("adaptive", keep="auto", epsilon=0.5, head=True)(x, prefix=1).counts
    assert (lo <= out.counts).all()  # a looser target never asks for more tokens (monotone in epsilon)
