"""Attention-row scorer kernel vs its PyTorch reference, Triton path run under TRITON_INTERPRET=1 on CPU."""

import math
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
pytest.importorskip("triton")

from mmcompress.kernels.attention_rows import attention_rows_reference, attention_rows_triton  # noqa: E402

needs_interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="CPU run needs TRITON_INTERPRET=1 before triton import")


def _qk(B, H, Hk, N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H * D, generator=g).to(dtype).view(B, N, H, D).transpose(1, 2)  # [B, H, N, D] strided
    k = (2 * torch.randn(B, Hk, N, D, generator=g)).to(dtype)  # [B, Hk, N, D]: peaky softmax rows
    return q, k


def _poison(B, H, R, N, block_r=16):
    return torch.full((B, H, math.ceil(R / block_r), N), float("nan"))


@needs_interp
@pytest.mark.parametrize("N", [1, 2, 7, 577])
@pytest.mark.parametrize("R", [1, 3, 20])  # 20 > the 16-row block: two row blocks
def test_fp32_matches_reference(N, R):
    B, H, Hk, D = 2, 4, 2, 24  # grouped-query heads, D not a power of two
    q, k = _qk(B, H, Hk, N, D, torch.float32, seed=N + R)
    rows = torch.randint(0, N, (B, R), generator=torch.Generator().manual_seed(R))
    scale = 1 / math.sqrt(D)
    ref = attention_rows_reference(q, k, rows, scale)
    got = attention_rows_triton(q, k, rows, scale, out=_poison(B, H, R, N))
    assert not got.isnan().any()  # every element written over the poison
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.full((B, H), float(R)))  # every row is a distribution


@needs_interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_reference_error(dtype):
    B, H, N, D = 2, 2, 577, 40
    q, k = _qk(B, H, H, N, D, dtype, seed=5)
    rows = torch.tensor([[0, 9], [3, 576]])
    exact = attention_rows_reference(q.double(), k.double(), rows, 1 / math.sqrt(D)).double()  # same rounded inputs
    ref = attention_rows_reference(q, k, rows, 1 / math.sqrt(D))
    got = attention_rows_triton(q, k, rows, 1 / math.sqrt(D), out=_poison(B, H, 2, N))
    tol = 2 * (ref.double() - exact).abs().max() + 1e-6
    assert (got.double() - exact).abs().max() <= tol


@needs_interp
def test_key_mask_gives_zero_and_renormalises():
    B, H, N, D = 2, 2, 70, 20
    q, k = _qk(B, H, H, N, D, torch.float32, seed=7)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :65] = False  # the first tile of sample 0 is fully masked: no NaN from an all -inf tile
    mask[1, 10:20] = False
    rows = torch.tensor([[0], [5]])
    ref = attention_rows_reference(q, k, rows, 0.3, key_mask=mask)
    got = attention_rows_triton(q, k, rows, 0.3, key_mask=mask, out=_poison(B, H, 1, N))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (got[~mask[:, None, :].expand(B, H, N)] == 0).all()
