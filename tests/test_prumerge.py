"""prumerge / prumerge+: IQR outliers of scores + score-weighted kNN merge (Shang et al., LLaVA-PruMerge)."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.prumerge import iqr_outlier_count, lattice_indices


def reference_iqr_count(s: torch.Tensor) -> int:
    """numpy-free reference: quartiles by linear interpolation on the sorted values."""
    v = sorted(s.tolist())
    n = len(v)

    def q(p):
        pos = p * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    thr = q(0.75) + 1.5 * (q(0.75) - q(0.25))
    return max(1, sum(x > thr for x in v))


@pytest.mark.parametrize("seed", range(4))
def test_auto_count_follows_iqr_rule(seed):
    g = torch.Generator().manual_seed(seed)
    B, N = 3, 80
    scores = torch.rand(B, N, generator=g)
    n_out = [2, 5, 0]
    for b, n in enumerate(n_out):
        scores[b, torch.randperm(N, generator=g)[:n]] += 10.0  # clear outliers
    x = torch.randn(B, N, 8, generator=g)
    counts = iqr_outlier_count(scores)
    assert counts.tolist() == [reference_iqr_count(scores[b]) for b in range(B)]
    assert counts.tolist()[:2] == [2, 5]
    out = mmc.create("prumerge", keep="auto")(x, scores=scores)
    assert out.counts.tolist() == counts.tolist()
    for b in range(B):  # the kept tokens are exactly the outliers (largest scores)
        kept = out.rep[b, : counts[b]].sort().values
        assert torch.equal(kept, scores[b].topk(int(counts[b])).indices.sort().values)


def test_score_weighted_merge():
    # token 0 is kept; tokens 1, 2 are merged into it; weights = size * score
    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [-1.0, 0.0]]])
    scores = torch.tensor([[5.0, 1.0, 2.0, 4.0]])
    out = mmc.create("prumerge", keep=2)(x, scores=scores)
    assert out.assign[0].tolist() == [0, 0, 0, 1]
    want = (5 * x[0, 0] + 1 * x[0, 1] + 2 * x[0, 2]) / 8
    torch.testing.assert_close(out.x[0, 0], want)
    torch.testing.assert_close(out.x[0, 1], x[0, 3])
    assert out.size[0].tolist() == [3.0, 1.0]
    # zero scores fall back to the size-weighted mean
    z = mmc.create("prumerge", keep=2)(x, scores=torch.tensor([[1.0, 0.0, 0.0, 1.0]]), size=torch.tensor(
        [[0.0 + 1, 1, 1, 1]]))
    torch.testing.assert_close(z.x[0, 0], x[0, 0])  # only token 0 has weight


def test_knn_neighbourhood_drops_unreached_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 30, 8, generator=g)
    scores = torch.rand(1, 30, generator=g)
    out = mmc.create("prumerge", keep=2, knn=3)(x, scores=scores)
    members = (out.assign[0] >= 0).sum()
    assert 2 < members <= 2 + 2 * 3  # each kept token absorbs at most 3 pruned tokens
    full = mmc.create("prumerge", keep=2)(x, scores=scores)
    assert (full.assign >= 0).all()


def test_prumerge_plus_adds_spatially_uniform_tokens():
    g = torch.Generator().manual_seed(0)
    H = W = 8
    x = torch.randn(1, 1 + H * W, 8, generator=g)
    scores = torch.zeros(1, 1 + H * W)
    scores[0, 1:9] = 1.0  # all attention outliers in the top row
    out = mmc.create("prumerge+", keep=16)(x, scores=scores, prefix=1, grid=(H, W))
    rows = out.pos[0, 1:, 0]
    assert len(set(rows.tolist())) >= 4  # uniform samples cover the image, not only the top row
    plain = mmc.create("prumerge", keep=16)(x, scores=scores, prefix=1, grid=(H, W))
    assert set(plain.pos[0, 1:9, 0].tolist()) == {0}  # plain prumerge keeps the top-row outliers first
    lat = lattice_indices(64, 12, (8, 8), torch.device("cpu"))
    assert lat.unique().numel() == 12
    assert set((lat // 8).tolist()) == {1, 4, 6} and set((lat % 8).tolist()) == {1, 3, 5, 7}  # 3 x 4 lattice
    auto = mmc.create("prumerge+", keep="auto")(x, scores=scores, prefix=1, grid=(H, W))
    assert int(auto.counts[0]) - 1 == 8 * 4  # 8 outliers / (1 - 0.75)


def test_missing_scores():
    with pytest.raises(ValueError, match="scores"):
        mmc.create("prumerge", keep=3)(torch.randn(1, 9, 4))
    with pytest.raises(ValueError, match="scores"):
        mmc.create("prumerge+", keep=3)(torch.randn(1, 9, 4))
    with pytest.raises(ValueError, match="knn"):
        mmc.create("prumerge", keep=3, knn=0)
