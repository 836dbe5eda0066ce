"""Fused size-weighted merge kernel vs its PyTorch reference, Triton path run under TRITON_INTERPRET=1 on CPU."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
pytest.importorskip("triton")

from mmcompress.kernels.bipartite_match import best_match_reference  # noqa: E402
from mmcompress.kernels.merge import merge_indices, merge_reference, merge_triton  # noqa: E402

needs_interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="CPU run needs TRITON_INTERPRET=1 before triton import")


def _round(N: int, r: int, C: int, dtype: torch.dtype, weighted: bool, seed: int = 0, B: int = 2):
    """Tokens (a prefix-sliced, strided view), sizes and a real matching of a tie-free fp32 metric."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N + 1, C, generator=g).to(dtype)[:, 1:]  # [B, N, C] row-contiguous view, like x[:, prefix:]
    size = torch.rand(B, N, generator=g) + 0.5 if weighted else None
    metric = torch.randn(B, N, 24, generator=g)  # fp32 Gaussian: no ties
    a, b = metric[:, ::2], metric[:, 1::2]
    if b.shape[1] == 0:
        node_idx = torch.zeros(B, a.shape[1], dtype=torch.long)
        return x, size, node_idx, node_idx[:, :0]
    val, node_idx = best_match_reference(a, b)
    return x, size, node_idx, val.argsort(dim=-1, descending=True, stable=True)[:, :r]


def _poison(B: int, N: int, M: int, C: int, dtype: torch.dtype):
    return (torch.full((B, M, C), float("nan"), dtype=dtype), torch.full((B, M), float("nan")),
            torch.full((B, N), -7, dtype=torch.long))


def _exact(x, size, assign, M):
    """float64 size-weighted mean of the same (rounded) inputs per slot, and the summed sizes."""
    B, N, C = x.shape
    w = torch.ones(B, N, dtype=torch.float64) if size is None else size.double()
    num = torch.zeros(B, M, C, dtype=torch.float64).scatter_add_(1, assign[..., None].expand(B, N, C),
                                                                x.double() * w[..., None])
    den = torch.zeros(B, M, dtype=torch.float64).scatter_add_(1, assign, w)
    return num / den[..., None], den


CASES = [(1, 0), (2, 1), (7, 2), (7, 4), (577, 16), (577, 289)]  # (N, r): r = N - keep, at most ceil(N/2)


@needs_interp
@pytest.mark.parametrize("N,r", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_fp32_matches_reference_exactly(N, r, weighted):
    C = 40  # not a power of two
    B = 1 if N > 100 else 2  # the interpreter runs one Python program per output row: keep the big case small
    x, size, node_idx, src_a = _round(N, r, C, torch.float32, weighted, seed=N + r, B=B)
    out, osize, assign, keep_pos = merge_reference(x, size, node_idx, src_a)
    got = merge_triton(x, size, node_idx, src_a, out=_poison(B, N, N - r, C, torch.float32), block_c=16)
    assert not got[0].isnan().any() and not got[1].isnan().any() and (got[2] >= 0).all()  # all written
    assert torch.equal(got[2], assign) and torch.equal(got[3], keep_pos)  # indices: exact on tie-free input
    torch.testing.assert_close(got[0], out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], osize, rtol=1e-6, atol=1e-6)
    want, den = _exact(x, size, assign, N - r)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(osize.double(), den, rtol=1e-6, atol=1e-6)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,r", [(7, 4), (577, 289)])
def test_low_precision_within_reference_error(dtype, N, r):
    C = 40
    x, size, node_idx, src_a = _round(N, r, C, dtype, weighted=True, seed=3)
    out, osize, assign, _ = merge_reference(x, size, node_idx, src_a)
    got, gsize, gassign, _ = merge_triton(x, size, node_idx, src_a, out=_poison(2, N, N - r, C, dtype))
    assert not got.isnan().any() and (gassign >= 0).all()
    assert torch.equal(gassign, assign)  # indices come from the (exact) matching, not from x's precision
    want, den = _exact(x, size, assign, N - r)
    ref_err = (out.double() - want).abs().max()  # the reference's own rounding at this dtype (half an ulp)
    # Triton 3.7's interpreter casts float32 -> bfloat16 by truncation whatever the rounding asked (cast_impl), up to
    # one ulp, i.e. twice the reference's round-to-nearest error; compiled kernels round to nearest even
    slack = 4 if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" else 2
    assert (got.double() - want).abs().max() <= slack * ref_err + 1e-6
    torch.testing.assert_close(gsize, osize)


@needs_interp
def test_many_into_one_and_unmerged_rows_exact():
    """Every A token merges into B row 0: one slot sums 4 contributors; other rows are bit-exact copies."""
    N, C = 8, 20
    x = torch.randn(1, N, C)
    size = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    node_idx = torch.zeros(1, 4, dtype=torch.long)
    src_a = torch.tensor([[3, 0, 2, 1]])
    for fn in (merge_reference, merge_triton):
        out, osize, assign, keep_pos = fn(x, size, node_idx, src_a)
        assert keep_pos.tolist() == [[1, 3, 5, 7]] and assign.tolist() == [[0, 0, 0, 1, 0, 2, 0, 3]]
        assert osize.tolist() == [[2.0 + 1 + 3 + 5 + 7, 4.0, 6.0, 8.0]]
        want = (x[0, ::2] * size[0, ::2, None]).sum(0) + 2 * x[0, 1]
        torch.testing.assert_close(out[0, 0], want / 18)
        assert torch.equal(out[0, 1:], x[0, 3::2])


def test_indices_contract():
    node_idx = torch.tensor([[2, 0, 1, 1]])  # n = 7: A = 0, 2, 4, 6; B = 1, 3, 5
    keep_pos, assign, dst_slot, src_pos = merge_indices(node_idx, torch.tensor([[3, 1]]), 7)
    assert keep_pos.tolist() == [[0, 1, 3, 4, 5]]
    assert src_pos.tolist() == [[6, 2]] and dst_slot.tolist() == [[2, 1]]
    assert assign.tolist() == [[0, 1, 1, 2, 3, 4, 2]]


@pytest.mark.parametrize("N,r", [(7, 2), (577, 16), (577, 289)])  # few and many receiving rows
@pytest.mark.parametrize("weighted", [False, True])
def test_head_written_in_front_equals_concatenation(N, r, weighted):
    """`head=`: the prefix rows come first, bit-exact, and the rest equals the head-less merge, whether the head
    sits right before x in one storage (one gather) or elsewhere."""
    C, P = 40, 2
    g = torch.Generator().manual_seed(N + r)
    full = torch.randn(2, P + N, C, generator=g)
    x, head = full[:, P:], full[:, :P]  # adjacent, as the base class slices the prefix
    _, size, node_idx, src_a = _round(N, r, C, torch.float32, weighted, seed=N + r)
    plain, psize, passign, pkeep = merge_reference(x, size, node_idx, src_a)
    for h in (head, head.clone()):  # adjacent view, then a separate tensor
        out, osize, assign, keep_pos = merge_reference(x, size, node_idx, src_a, head=h)
        assert out.shape == (2, P + N - r, C)
        assert torch.equal(out[:, :P], head) and torch.equal(out[:, P:], plain)
        assert torch.equal(osize, psize) and torch.equal(assign, passign) and torch.equal(keep_pos, pkeep)


@needs_interp
def test_triton_head_matches_reference():
    N, r, C, P = 7, 3, 40, 1
    full = torch.randn(2, P + N, C)
    x, head = full[:, P:], full[:, :P]
    _, size, node_idx, src_a = _round(N, r, C, torch.float32, True, seed=5)
    want = merge_reference(x, size, node_idx, src_a, head=head)
    poison = _poison(2, N, P + N - r, C, torch.float32)
    got = merge_triton(x, size, node_idx, src_a, head=head, out=poison)
    assert not got[0].isnan().any()
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(got[2], want[2])
