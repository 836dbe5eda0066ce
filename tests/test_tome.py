"""ToMe against an independent, loop-based reading of the paper's algorithm."""

from __future__ import annotations

import math

import pytest
import torch

import mmcompress as mmc


def reference_tome(x: torch.Tensor, k: int, size: torch.Tensor | None = None):
    """One sample x [N, C]: returns the partition (list of sorted member lists, in output order) and outputs."""
    N = x.shape[0]
    s = [1.0] * N if size is None else size.double().tolist()
    toks = [{"members": [i], "rep": i, "size": s[i], "sum": x[i].double() * s[i]} for i in range(N)]
    while len(toks) > k:
        n = len(toks)
        r = min(n - k, math.ceil(n / 2))
        A, B = toks[0::2], toks[1::2]
        best = []
        for ai, a in enumerate(A):
            ma = a["sum"] / a["size"]
            sims = [float(torch.dot(ma, b["sum"] / b["size"]) / (ma.norm() * (b["sum"] / b["size"]).norm()))
                    for b in B]
            j = max(range(len(B)), key=lambda t: (sims[t], -t))  # first maximum
            best.append((sims[j], ai, j))
        best.sort(key=lambda e: (-e[0], e[1]))
        merged = set()
        for _, ai, j in best[:r]:
            a, b = A[ai], B[j]
            b["members"] = b["members"] + a["members"]
            b["size"] += a["size"]
            b["sum"] = b["sum"] + a["sum"]
            merged.add(ai)
        toks = sorted([a for ai, a in enumerate(A) if ai not in merged] + B, key=lambda t: t["rep"])
    parts = [sorted(t["members"]) for t in toks]
    outs = torch.stack([t["sum"] / t["size"] for t in toks])
    return parts, outs


@pytest.mark.parametrize("N,k", [(10, 5), (11, 6), (12, 3), (33, 1), (40, 13), (7, 4), (2, 1)])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference(N, k, weighted):
    g = torch.Generator().manual_seed(N * 100 + k)
    x = torch.randn(2, N, 6, generator=g)  # continuous random: no ties in fp32
    size = torch.rand(2, N, generator=g) + 0.5 if weighted else None
    out = mmc.create("tome", keep=k)(x, size=size)
    for b in range(2):
        parts, ref = reference_tome(x[b], k, None if size is None else size[b])
        got = [sorted((out.assign[b] == j).nonzero().squeeze(1).tolist()) for j in range(k)]
        assert got == parts
        torch.testing.assert_close(out.x[b].double(), ref, rtol=1e-5, atol=1e-6)


def test_merges_only_a_into_b_and_at_most_half_per_round():
    x = torch.randn(1, 20, 4)
    out = mmc.create("tome", keep=12)(x)  # one round, r = 8 <= 10
    for j in range(12):
        members = (out.assign[0] == j).nonzero().squeeze(1)
        if len(members) > 1:  # one B (odd) token plus A (even) tokens
            assert (members % 2 == 1).sum() == 1


def test_metric_drives_matching():
    """Identical x but a metric that pairs token 0 with token 3: they must merge, whatever x says."""
    x = torch.randn(1, 4, 4)
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.01]]])  # A={0,2}, B={1,3}
    out = mmc.create("tome", keep=3)(x, metric=metric)
    assert out.assign[0, 0] == out.assign[0, 3]
    torch.testing.assert_close(out.x[0, out.assign[0, 0]], (x[0, 0] + x[0, 3]) / 2)


def test_bf16_matching_option_keeps_exact_values():
    x = torch.randn(2, 577, 32)
    out = mmc.create("tome", keep=288, match_dtype=torch.bfloat16)(x)
    from mmcompress.compressors.merge_ops import segment_mean

    torch.testing.assert_close(out.x, segment_mean(x, None, out.assign, 288))
    ref = mmc.create("tome", keep=288)(x)
    agree = (out.assign == ref.assign).float().mean()
    assert agree > 0.9  # bf16 similarities change only near-ties


def test_cls_prefix_never_merged():
    x = torch.randn(2, 1 + 16, 8)
    x[:, 0] = x[:, 1]  # CLS identical to a patch: still untouched
    out = mmc.create("tome", keep=4)(x, prefix=1)
    assert (out.assign[:, 0] == 0).all() and ((out.assign[:, 1:] == 0).sum() == 0)
    assert out.size[:, 0].eq(1).all()


@pytest.mark.parametrize("keep", [30, 17, 5])  # one round (few, all A merged), several rounds
def test_prefix_written_in_place_equals_prefix_free_call(keep):
    """With a prefix the one-round merge writes it into its own output (Plan.x_head): same result as merging the
    rest alone and putting the prefix in front."""
    x = torch.randn(3, 2 + 33, 16)
    size = torch.rand(3, 35) + 0.5
    got = mmc.create("tome", keep=keep)(x, prefix=2, size=size)
    ref = mmc.create("tome", keep=keep)(x[:, 2:].clone(), size=size[:, 2:].clone())
    assert torch.equal(got.x[:, :2], x[:, :2]) and torch.equal(got.x[:, 2:], ref.x)
    assert torch.equal(got.size[:, 2:], ref.size) and torch.equal(got.assign[:, 2:], ref.assign + 2)


def test_row_max_first_is_max_with_lowest_index_on_ties():
    from mmcompress.compressors.tome import row_max_first

    sim = torch.randn(4, 9, 13)
    ref = sim.max(dim=-1)
    v, i = row_max_first(sim.clone())
    assert torch.equal(v, ref.values) and torch.equal(i, ref.indices)
    ties = torch.tensor([[[0.0, 2.0, 1.0, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0], [-1.0, -5.0, -1.0, -2.0, -3.0]]])
    v, i = row_max_first(ties)
    assert i.tolist() == [[1, 0, 0]] and v.tolist() == [[2.0, 3.0, -1.0]]
    bad = torch.tensor([[1.0, float("nan"), 0.5]])
    assert 0 <= int(row_max_first(bad)[1]) < 3  # a non-finite row still gives a valid index


def test_best_partner_in_sample_blocks_equals_one_product(monkeypatch):
    from mmcompress.compressors import tome

    a, b = torch.randn(7, 9, 5), torch.randn(7, 8, 5)
    b = b / b.norm(dim=-1, keepdim=True)
    ref = (a @ b.transpose(1, 2)).max(dim=-1)
    for chunk_bytes in (1, 9 * 8 * 4 * 3, 1 << 30):  # one sample, three samples, all samples per block
        monkeypatch.setattr(tome, "SIM_CHUNK_BYTES", chunk_bytes)
        v, i = tome.best_partner(a, b)
        assert torch.equal(i, ref.indices) and torch.allclose(v, ref.values, atol=1e-6)
