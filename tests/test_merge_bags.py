"""`merge_bags` (the CPU embedding_bag merge) against `merge_reference`, and where `merge_tokens` sends each call."""

import pytest
import torch
from mmcompress.kernels import merge as merge_mod
from mmcompress.kernels.bipartite_match import best_match_reference
from mmcompress.kernels.merge import merge_bags, merge_reference, merge_tokens


def _case(N: int, r: int, C: int, P: int, weighted: bool, seed: int, B: int = 3):
    """x [B, N, C] sliced after a P-row head in one storage (as the base class slices a prefix), the head, sizes,
    and a real matching of a tie-free float32 metric: node_idx [B, ceil(N/2)], src_a [B, r]."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, P + N, C, generator=g)
    size = torch.rand(B, N, generator=g) + 0.5 if weighted else None
    metric = torch.randn(B, N, 24, generator=g)
    a, b = metric[:, ::2], metric[:, 1::2]
    if b.shape[1] == 0:
        node_idx = torch.zeros(B, a.shape[1], dtype=torch.long)
        return full[:, P:], full[:, :P], size, node_idx, node_idx[:, :0]
    val, node_idx = best_match_reference(a, b)
    return full[:, P:], full[:, :P], size, node_idx, val.argsort(dim=-1, descending=True, stable=True)[:, :r]


CASES = [(1, 0), (2, 1), (7, 2), (7, 4), (8, 4), (577, 16), (577, 289)]  # (N, r), r <= ceil(N/2)


@pytest.mark.parametrize("N,r", CASES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("P", [0, 2])
def test_equals_reference_and_exact_mean(N, r, weighted, P):
    x, head, size, node_idx, src_a = _case(N, r, 40, P, weighted, seed=N + r + P)
    heads = [None] if P == 0 else [head, head.clone()]  # adjacent view (one table), then a separate tensor
    for h in heads:
        out, osize, assign, keep_pos = merge_reference(x, size, node_idx, src_a, h)
        got, gsize, gassign, gkeep = merge_bags(x, size, node_idx, src_a, h)
        assert got.shape == out.shape == (x.shape[0], P + N - r, 40) and got.dtype == x.dtype
        assert torch.equal(gassign, assign) and torch.equal(gkeep, keep_pos)
        torch.testing.assert_close(got, out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gsize, osize, rtol=1e-6, atol=1e-6)
        assert gsize.dtype == torch.float32
        if P:
            assert torch.equal(got[:, :P], head)  # the head: bit-exact copies
        # rows nothing merged into are bit-exact copies of their token
        received = torch.zeros(x.shape[0], N - r, dtype=torch.bool).scatter_(1, assign.gather(1, src_a * 2), True)
        kept = x.gather(1, keep_pos[..., None].expand(-1, -1, 40))
        assert torch.equal(got[:, P:][~received], kept[~received])
    exact, esize, _, _ = merge_reference(x.double(), None if size is None else size.double(), node_idx, src_a)
    torch.testing.assert_close(merge_bags(x, size, node_idx, src_a)[0].double(), exact, rtol=1e-5, atol=1e-6)


def test_many_into_one_sums_in_one_bag():
    """Every A token merges into B row 0: one bag of 5 rows, weights size / 18; the other rows are exact copies."""
    x = torch.randn(1, 8, 20)
    size = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    node_idx, src_a = torch.zeros(1, 4, dtype=torch.long), torch.tensor([[3, 0, 2, 1]])
    out, osize, assign, keep_pos = merge_bags(x, size, node_idx, src_a)
    assert keep_pos.tolist() == [[1, 3, 5, 7]] and assign.tolist() == [[0, 0, 0, 1, 0, 2, 0, 3]]
    assert osize.tolist() == [[18.0, 4.0, 6.0, 8.0]]
    torch.testing.assert_close(out[0, 0], ((x[0, ::2] * size[0, ::2, None]).sum(0) + 2 * x[0, 1]) / 18)
    assert torch.equal(out[0, 1:], x[0, 3::2])


def test_other_dtypes_and_layouts_go_to_the_reference(monkeypatch):
    calls = []
    real = merge_mod.merge_reference
    monkeypatch.setattr(merge_mod, "merge_reference", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    x, _, size, node_idx, src_a = _case(7, 4, 12, 0, True, seed=1)
    for dtype in (torch.bfloat16, torch.float16):
        got = merge_bags(x.to(dtype), size, node_idx, src_a)
        assert got[0].dtype == dtype
        assert torch.equal(got[0], real(x.to(dtype), size, node_idx, src_a)[0])
    strided = torch.randn(3, 7, 24)[..., ::2]  # rows not contiguous: no [rows, C] table without a copy
    torch.testing.assert_close(merge_bags(strided, size, node_idx, src_a)[0],
                               real(strided, size, node_idx, src_a)[0])
    assert calls == [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("N,r,want", [(577, 16, "reference"), (577, 44, "reference"), (577, 45, "bags"),
                                      (577, 289, "bags"), (196, 16, "bags"), (7, 1, "bags")])
def test_merge_tokens_takes_bags_for_many_merged_rows(monkeypatch, N, r, want):
    """float32 CPU: `merge_bags` once 12 r >= n - r (one weighted pass beats gather + scatter), else the reference."""
    monkeypatch.setenv("MMCOMPRESS_KERNELS", "torch")
    calls = []
    for name in ("merge_bags", "merge_reference"):
        real = getattr(merge_mod, name)
        monkeypatch.setattr(merge_mod, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    x, _, size, node_idx, src_a = _case(N, r, 16, 0, True, seed=2, B=1)
    merge_tokens(x, size, node_idx, src_a)
    assert calls == ["merge_" + want]
    calls.clear()
    merge_tokens(x.double(), size, node_idx, src_a)
    assert calls == ["merge_reference"]  # float64: the reference
