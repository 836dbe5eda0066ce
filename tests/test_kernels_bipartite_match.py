"""Fused bipartite matching kernel vs its PyTorch reference, Triton path run under TRITON_INTERPRET=1 on CPU."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
pytest.importorskip("triton")

from mmcompress.kernels.bipartite_match import best_match_reference, best_match_triton  # noqa: E402


def _split(N: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(2, N, d, generator=g).to(dtype)  # [B, N, d]
    return m[:, ::2], m[:, 1::2]


@pytest.mark.parametrize("N", [2, 7, 577])
@pytest.mark.parametrize("d", [24, 40])
def test_fp32_indices_and_values_match_reference(N, d):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU run needs TRITON_INTERPRET=1 before triton import")
    a, b = _split(N, d, torch.float32)
    poison = (torch.full((2, a.shape[1]), float("nan")), torch.full((2, a.shape[1]), -7, dtype=torch.long))
    ref_v, ref_i = best_match_reference(a, b)
    got_v, got_i = best_match_triton(a, b, out=poison)
    assert not got_v.isnan().any() and (got_i >= 0).all()  # every row written over the poison
    # random Gaussian fp32 inputs are tie-free: the argmax must agree exactly
    assert torch.equal(got_i, ref_i)
    assert (got_v - ref_v).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_objective_within_reference_error(dtype):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU run needs TRITON_INTERPRET=1 before triton import")
    a, b = _split(577, 40, dtype, seed=1)
    exact_v, _ = best_match_reference(a.double(), b.double())  # float64 truth of the same rounded inputs
    ref_v, _ = best_match_reference(a, b)
    poison = (torch.full(ref_v.shape, float("nan")), torch.full(ref_v.shape, -7, dtype=torch.long))
    got_v, got_i = best_match_triton(a, b, out=poison)
    assert not got_v.isnan().any() and (got_i >= 0).all()
    tol = 2 * (ref_v.double() - exact_v).abs().max() + 1e-6
    assert (got_v.double() - exact_v).abs().max() <= tol
    # the chosen partner achieves the reported objective (checked in float64)
    an = a.double() / a.double().norm(dim=-1, keepdim=True)
    bn = b.double() / b.double().norm(dim=-1, keepdim=True)
    chosen = (an * bn.gather(1, got_i.unsqueeze(-1).expand(-1, -1, a.shape[2]))).sum(-1)
    assert (chosen - exact_v).abs().max() <= tol


def test_n1_single_b_row_and_ties_take_lowest_index():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU run needs TRITON_INTERPRET=1 before triton import")
    a = torch.tensor([[[1.0, 0.0, 0.0]]])  # [1, 1, 3]
    b = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [3.0, 0.0, 0.0]] + [[0.0, 0.0, 1.0]] * 40])  # ties at 1, 2
    v, i = best_match_triton(a, b)
    assert i.item() == 1 and abs(v.item() - 1.0) < 1e-6
    v1, i1 = best_match_triton(a, b[:, :1])
    assert i1.item() == 0 and abs(v1.item()) < 1e-6
