"""divprune: greedy max-min diversity selection (Alvar et al., CVPR'25)."""

from __future__ import annotations

import itertools

import pytest
import torch

import mmcompress as mmc
import mmcompress.compressors.divprune as divprune_module
from mmcompress.compressors.divprune import greedy_maxmin


def reference_greedy(m: torch.Tensor, k: int) -> list[int]:
    """Independent plain-Python greedy on the full cosine-distance matrix of one sample m [N, d]."""
    u = m.double() / m.double().norm(dim=1, keepdim=True)
    D = (1 - u @ u.T).tolist()
    N = len(D)
    first = max(range(N), key=lambda i: (min(D[i][j] for j in range(N) if j != i), -i))
    chosen = [first]
    while len(chosen) < k:
        rest = [i for i in range(N) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(D[i][s] for s in chosen), -i)))
    return chosen


def min_chord(u: torch.Tensor, idx) -> float:
    """Smallest pairwise chord distance |u_i - u_j| among unit rows u[idx] (a metric, monotone in 1 - cos)."""
    sub = u[list(idx)]
    d = torch.cdist(sub, sub)
    d.fill_diagonal_(float("inf"))
    return float(d.min())


@pytest.mark.parametrize("matrix_max", [4096, 8], ids=["matrix", "products"])  # N <= 8: the [N, N] matrix path
@pytest.mark.parametrize("N,k,d,seed", [(9, 4, 3, 0), (12, 5, 4, 1), (40, 10, 8, 2), (100, 30, 16, 3)])
def test_equals_independent_greedy(N, k, d, seed, matrix_max, monkeypatch):
    monkeypatch.setattr(divprune_module, "MATRIX_MAX", matrix_max)
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(2, N, d, generator=g, dtype=torch.float64)
    got = greedy_maxmin(m, k)
    for b in range(2):
        assert got[b].tolist() == reference_greedy(m[b], k)


@pytest.mark.parametrize("seed", range(6))
def test_factor_two_bound_on_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    N, k = 10, 4
    m = torch.randn(N, 3, generator=g, dtype=torch.float64)
    u = m / m.norm(dim=1, keepdim=True)
    greedy = min_chord(u, greedy_maxmin(m[None], k)[0].tolist())
    best = max(min_chord(u, c) for c in itertools.combinations(range(N), k))
    assert greedy <= best + 1e-12
    assert greedy >= best / 2 - 1e-12  # farthest-point insertion is a 2-approximation in any metric


def test_compressor_keeps_diverse_tokens_and_uses_metric():
    # two tight clusters of 10 plus 3 isolated outliers: k = 5 must take the 3 outliers and one per cluster
    g = torch.Generator().manual_seed(0)
    base = torch.eye(8)
    x = torch.cat([base[0] + 0.01 * torch.randn(10, 8, generator=g), base[1] + 0.01 * torch.randn(10, 8, generator=g),
                   base[2:5]])[None]
    out = mmc.create("divprune", keep=5)(x)
    kept = out.rep[0].tolist()
    assert {20, 21, 22} <= set(kept)
    assert sum(i < 10 for i in kept) == 1 and sum(10 <= i < 20 for i in kept) == 1
    assert torch.equal(out.x, x[:, kept])
    # the choice follows `metric` when given (here: the metric reverses which tokens are isolated)
    metric = torch.cat([torch.randn(20, 8, generator=g), torch.ones(3, 8) + 1e-3 * torch.randn(3, 8, generator=g)])
    kept_m = set(mmc.create("divprune", keep=5)(x, metric=metric[None]).rep[0].tolist())
    assert len(kept_m & {20, 21, 22}) <= 1  # near-duplicates under the metric: at most one is diverse


def test_duplicates_and_half_precision():
    x = torch.ones(1, 6, 4)
    x[0, 3] = -1
    out = mmc.create("divprune", keep=3)(x)
    assert out.rep[0].tolist() == [0, 1, 3]  # ties go to the lowest index; all kept tokens distinct
    xb = torch.randn(2, 30, 8).bfloat16()
    a = mmc.create("divprune", keep=7)(xb)
    b = mmc.create("divprune", keep=7)(xb.float())
    assert a.x.dtype == torch.bfloat16 and torch.equal(a.assign, b.assign)


def _release_picks(v: torch.Tensor, k: int) -> list[int]:
    """Plain reference of the release's rule on one sample v [N, C]: the full cosine-distance matrix 1 - mm(u, u^T),
    first the token whose column has the largest second-smallest entry (topk(2, dim=0); the smallest is its own),
    then the farthest from the chosen set (min over the chosen rows); picks in selection order."""
    u = v / v.norm(dim=1, keepdim=True)
    dist = 1.0 - torch.mm(u, u.t())  # [N, N]
    picks = [int(dist.topk(2, dim=0, largest=False).values[1].argmax())]
    for _ in range(1, k):
        picks.append(int(dist[picks].min(0).values.argmax()))
    return picks


def _release_divprune(v: torch.Tensor, ratio: float) -> torch.Tensor:
    """The release's int(round(ratio * N)) picks on one image's LLM input embeddings v [N, C], in source order."""
    return v[sorted(_release_picks(v, int(round(ratio * v.shape[0]))))]


def _near_ties(kind: str, seed: int) -> torch.Tensor:
    """[97, 48] tokens whose distances tie or nearly tie: near-duplicates of 8 centres (distances within rounding of
    each other and of a token's own distance), or integer lattice points (many equal cosines in exact arithmetic)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "clusters":
        centres = torch.randn(8, 48, generator=g)
        return centres[torch.randint(0, 8, (97,), generator=g)] + 1e-4 * torch.randn(97, 48, generator=g)
    return torch.randint(-2, 3, (97, 48), generator=g).float()


@pytest.mark.parametrize(("kind", "k"), [("clusters", 8), ("lattice", 8), ("lattice", 16), ("lattice", 32)])
def test_near_ties_pick_as_the_release(kind, k):
    """On ties and near-ties the picks are the release's, in its order: the same distance matrix bit for bit (one
    mm of the same unit rows, where a matrix-vector product per step rounds otherwise) and the same first step
    (a column's second-smallest entry). Cases where the release picks a token twice (fewer distinct directions
    than k: its defect, ours never repeats) are not among these."""
    xs = torch.stack([_near_ties(kind, seed) for seed in range(6)])  # [6, 97, 48]
    got = greedy_maxmin(xs, k)  # [6, k] in selection order
    for b in range(xs.shape[0]):
        want = _release_picks(xs[b], k)
        assert len(set(want)) == k
        assert got[b].tolist() == want, f"sample {b}"


def test_through_apply_equals_the_release_rule_on_the_llm_inputs():
    """`mmc.apply` runs divprune after the projector (the release selects among the image's LLM input embeddings)
    and the LLM receives the release's picks in source order."""
    import llava_tiny as lt

    model = lt.build("llava", seed=2)
    pv = lt.images(2, seed=2)
    n = lt.image_tokens(model, pv, None)[0]
    ids = torch.tensor([lt.prompt([n], [11, 12], [13, 14])] * 2)
    got = []
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: got.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pv)  # unwrapped: the release's input, the image's embeddings
            mmc.apply(model, "divprune", keep=6)
            model(input_ids=ids, pixel_values=pv)
    finally:
        hook.remove()
        mmc.remove(model)
    full, emb = got
    assert emb.shape[1] == ids.shape[1] - (n - 6)
    for b in range(2):
        want = _release_divprune(full[b, 3:3 + n], 6 / n)
        torch.testing.assert_close(emb[b, 3:9], want, rtol=0, atol=0)
        torch.testing.assert_close(emb[b, 9:], full[b, 3 + n:], rtol=0, atol=0)
