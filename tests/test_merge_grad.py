"""Gradients through the CPU merge paths and the public `tome` call equal those of the size-weighted mean written out
(prefix rows and sizes included), and the Triton kernels (no backward) are never taken under autograd."""

from __future__ import annotations

import os

import pytest
import torch
from mmcompress.kernels import dispatch
from mmcompress.kernels import merge as merge_mod
from mmcompress.kernels.merge import merge_bags, merge_reference

import mmcompress as mmc
from mmcompress.compressors.tome import match_round


def _inputs(n: int, r: int, seed: int, P: int = 1, B: int = 2, C: int = 3):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, P + n, C, dtype=torch.float64, generator=g, requires_grad=True)
    size = (torch.rand(B, n, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    node_idx, src_a = match_round(torch.randn(B, n, 4, generator=g), r)
    return full, size, node_idx, src_a


def _mean_by_assign(x: torch.Tensor, size: torch.Tensor, assign: torch.Tensor, M: int):
    """The definition, in float64: out[j] = sum of size_i x_i over the tokens i assigned to slot j / their sizes."""
    B, n, C = x.shape
    bi = torch.arange(B).unsqueeze(1).expand(B, n)
    num = torch.zeros(B, M, C, dtype=x.dtype).index_put((bi, assign), x * size.unsqueeze(-1), accumulate=True)
    den = torch.zeros(B, M, dtype=x.dtype).index_put((bi, assign), size, accumulate=True)
    return num / den.unsqueeze(-1), den


def _grads(out, osize, inputs, seed):
    """Gradients of a random linear function of (out, osize) with respect to `inputs`."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(out.shape, dtype=torch.float64, generator=g)
    w2 = torch.randn(osize.shape, dtype=torch.float64, generator=g)
    return torch.autograd.grad((out.double() * w1).sum() + (osize.double() * w2).sum(), inputs, retain_graph=True)


@pytest.mark.parametrize("fn", [merge_reference, merge_bags])
@pytest.mark.parametrize("n,r", [(9, 4), (41, 2), (41, 20)])  # the reference's in-place (4 r >= M) and sparse paths
def test_merge_gradients_equal_the_definitions(fn, n, r):
    """Gradients to x, to the head (a view of the same tensor, as the base class slices a prefix) and to the sizes
    equal those of the size-weighted mean written out in float64 (the sizes pass through float32 inside: 1e-6)."""
    full, size, node_idx, src_a = _inputs(n, r, seed=n + r)
    out, osize, assign, _ = fn(full[:, 1:], size, node_idx, src_a, full[:, :1])
    want_out, want_size = _mean_by_assign(full[:, 1:], size, assign, n - r)
    want_out = torch.cat([full[:, :1], want_out], 1)
    torch.testing.assert_close(out, want_out)
    for seed in (0, 1):
        got = _grads(out, osize, (full, size), seed)
        want = _grads(want_out, want_size, (full, size), seed)
        assert got[0][:, 0].abs().sum() > 0  # the head rows get gradients
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_public_tome_call_gradients_equal_the_definition():
    """Through `tome` with a prefix, one round and several: the output is the size-weighted mean over `assign`."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1 + 12, 3, dtype=torch.float64, generator=g, requires_grad=True)
    size = (torch.rand(2, 13, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    metric = torch.randn(2, 13, 4, generator=g)
    for keep in (8, 3):
        out = mmc.create("tome", keep=keep)(x, prefix=1, size=size, metric=metric)
        want_out, want_size = _mean_by_assign(x, size, out.assign, 1 + keep)
        torch.testing.assert_close(out.x, want_out)
        got, want = _grads(out.x, out.size, (x, size), keep), _grads(want_out, want_size, (x, size), keep)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_no_triton_under_autograd(monkeypatch):
    """auto: the PyTorch path when an input requires grad; triton: a clear error, not outputs without gradients."""
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    cuda_like = torch.zeros(1)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")), raising=False)
    x = torch.zeros(1, 4, 3, requires_grad=True)
    monkeypatch.setenv("MMCOMPRESS_KERNELS", "auto")
    assert dispatch.use_triton(cuda_like, x) is False
    with torch.no_grad():
        assert dispatch.use_triton(cuda_like, x) is True
    assert dispatch.use_triton(cuda_like, x.detach()) is True
    monkeypatch.setenv("MMCOMPRESS_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="no backward"):
        dispatch.use_triton(cuda_like, x)


def test_merge_tokens_passes_its_differentiable_inputs(monkeypatch):
    seen = []
    monkeypatch.setattr(merge_mod, "use_triton", lambda t, *g: seen.append(g) or False)
    full, size, node_idx, src_a = _inputs(9, 4, seed=1)
    full, size = full.float(), size.float()  # float64 tokens never take the kernel
    merge_mod.merge_tokens(full[:, 1:], size, node_idx, src_a, full[:, :1])
    assert len(seen) == 1 and len(seen[0]) == 3 and seen[0][1] is size


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_triton_flag_with_grad_raises_through_the_public_call(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("MMCOMPRESS_KERNELS", "triton")
    x = torch.randn(2, 10, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        mmc.create("tome", keep=6)(x)
    with torch.no_grad():
        assert mmc.create("tome", keep=6)(x).x.shape == (2, 6, 4)
