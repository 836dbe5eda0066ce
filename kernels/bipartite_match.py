"""Fused bipartite matching: best cosine partner in B for every row of A, never forming the |A| x |B| matrix.

Triton kernel (tiled over B with a running row max/argmax) beside its PyTorch reference. Ties: the lowest B index
among equal maxima, as torch.max.

Letters: B batch, na rows of A, nb rows of B, d metric channels.
"""

from __future__ import annotations

import functools

import torch
from mmcompress.kernels.dispatch import use_triton


def best_match_reference(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: cosine of every A row to every B row (in float32), then the row max.

    Args:
        a: [B, na, d] metric rows of A.
        b: [B, nb, d] metric rows of B, nb >= 1.

    Returns:
        value [B, na] float32 best cosine, index [B, na] int64 its B row.
    """
    an = a.float() / a.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    bn = b.float() / b.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return (an @ bn.transpose(1, 2)).max(dim=-1)  # [B, na, nb] -> [B, na]


@functools.cache
def _kernel():
    """Define the kernel on first use, so importing mmcompress never imports triton and TRITON_INTERPRET is read
    when a Triton path is first taken."""
    import triton
    import triton.language as tl

    @triton.jit
    def _best_match_kernel(a_ptr, b_ptr, val_ptr, idx_ptr, na, nb, d,
                           sab, san, sad, sbb, sbn, sbd,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_b = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        ch = tl.arange(0, BLOCK_D)  # [BD]
        rmask = rows < na
        dmask = ch < d
        a = tl.load(a_ptr + pid_b * sab + rows[:, None] * san + ch[None, :] * sad,
                    mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [BM, BD]
        a = a / tl.maximum(tl.sqrt(tl.sum(a * a, axis=1)), 1e-6)[:, None]
        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        arg = tl.zeros((BLOCK_M,), tl.int32)
        for start in range(0, nb, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)  # [BN]
            cmask = cols < nb
            b = tl.load(b_ptr + pid_b * sbb + cols[:, None] * sbn + ch[None, :] * sbd,
                        mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [BN, BD]
            b = b / tl.maximum(tl.sqrt(tl.sum(b * b, axis=1)), 1e-6)[:, None]
            s = tl.dot(a, tl.trans(b), input_precision="ieee")  # [BM, BN]
            s = tl.where(cmask[None, :], s, float("-inf"))
            tmax = tl.max(s, axis=1)
            targ = tl.argmax(s, axis=1).to(tl.int32) + start
            better = tmax > best  # strict: an earlier tile keeps ties
            best = tl.where(better, tmax, best)
            arg = tl.where(better, targ, arg)
        tl.store(val_ptr + pid_b * na + rows, best, mask=rmask)
        tl.store(idx_ptr + pid_b * na + rows, arg.to(tl.int64), mask=rmask)

    return triton, _best_match_kernel


def best_match_triton(a: torch.Tensor, b: torch.Tensor, block_m: int = 16, block_n: int = 32,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Triton path of `best_match_reference` (same arguments and returns); `out` = (value, index) buffers to fill."""
    triton, kernel = _kernel()
    B, na, d = a.shape
    nb = b.shape[1]
    if out is None:
        val = torch.empty(B, na, dtype=torch.float32, device=a.device)
        idx = torch.empty(B, na, dtype=torch.int64, device=a.device)
    else:
        val, idx = out
    if na == 0:
        return val, idx
    block_d = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(na, block_m), B)
    kernel[grid](a, b, val, idx, na, nb, d, *a.stride(), *b.stride(),
                             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    return val, idx


def best_match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine partner in b for every row of a, dispatched by MMCOMPRESS_KERNELS.

    Args:
        a: [B, na, d]; b: [B, nb, d] with nb >= 1, same dtype and device.

    Returns:
        value [B, na] float32, index [B, na] int64.
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"a, b: expected [B, na, d] and [B, nb, d], got {tuple(a.shape)} and {tuple(b.shape)}")
    if b.shape[1] == 0:
        raise ValueError("b: needs at least one row")
    if use_triton(a):
        return best_match_triton(a, b)
    return best_match_reference(a, b)
