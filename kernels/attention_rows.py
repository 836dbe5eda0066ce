"""Attention-row scorer: softmax(q_rows K^T * scale) for a few query rows over all keys, per head and averaged.

Companion of the ToMe kernels (token reduction as in Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023)
for the attention-based methods (VisionZip, PruMerge, FastV), which rank tokens by a row of the attention map (the
CLS row, or text rows) that SDPA/FlashAttention never materialise; the rows are recomputed from q and k. The Triton
kernel runs one program per (head, sample, block of query rows): a first sweep over key tiles keeps each row's running
max and sum of exponentials (online softmax), a second sweep writes the probabilities summed over the block's rows;
nothing of size R x N leaves registers. Beside it the plain-PyTorch reference (chunked over query rows).

Letters: B batch, H query heads, Hk key heads (H % Hk == 0, grouped-query attention), Nq queries, N keys, R rows,
D head dim.
"""

from __future__ import annotations

import functools

import torch
from mmcompress.kernels.dispatch import use_triton


def attention_rows_reference(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float,
                             key_mask: torch.Tensor | None = None, chunk: int = 64) -> torch.Tensor:
    """Plain PyTorch, chunked over query rows (peak extra memory B * H * chunk * N floats).

    Args:
        q: [B, H, Nq, D] queries; k: [B, Hk, N, D] keys; rows: [B, R] int64 query rows in [0, Nq);
        scale: logit scale; key_mask: [B, N] bool, True where a key may be attended (every sample has one), or None.
        chunk: query rows per chunk.

    Returns:
        [B, H, N] float32 softmax rows summed over the R rows, per query head.
    """
    B, H, Nq, D = q.shape
    Hk, N = k.shape[1], k.shape[2]
    g = H // Hk
    kf = k.float()  # [B, Hk, N, D]
    out = torch.zeros(B, H, N, dtype=torch.float32, device=q.device)
    for i in range(0, rows.shape[1], chunk):
        ri = rows[:, i : i + chunk]  # [B, r]
        qi = q.gather(2, ri[:, None, :, None].expand(B, H, ri.shape[1], D)).float()  # [B, H, r, D]
        qi = qi.view(B, Hk, g * ri.shape[1], D)  # query heads grouped under their key head
        logits = torch.matmul(qi, kf.transpose(-1, -2)) * scale  # [B, Hk, g*r, N]
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        out += logits.softmax(dim=-1).view(B, H, ri.shape[1], N).sum(2)  # [B, H, N]
    return out


@functools.cache
def _kernel():
    """Define the kernel on first use (importing mmcompress never imports triton; TRITON_INTERPRET is read then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _attention_rows_kernel(q_ptr, k_ptr, rows_ptr, mask_ptr, out_ptr, R, N, D, G, scale,
                               sqb, sqh, sqn, sqd, skb, skh, skn, skd, sob, soh, sop,
                               HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr):
        h = tl.program_id(0)
        b = tl.program_id(1)
        rb = tl.program_id(2)  # block of query rows
        hk = h // G  # key head serving query head h
        ri = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
        rvalid = ri < R
        qrow = tl.load(rows_ptr + b * R + ri, mask=rvalid, other=0)  # [BR] query positions
        ch = tl.arange(0, BLOCK_D)
        dmask = ch < D
        q = tl.load(q_ptr + b * sqb + h * sqh + qrow[:, None] * sqn + ch[None, :] * sqd,
                    mask=rvalid[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [BR, BD]
        m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_R,), tl.float32)
        for n0 in range(0, N, BLOCK_N):  # sweep 1: running max and sum of exp per row
            cols = n0 + tl.arange(0, BLOCK_N)
            valid = cols < N
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + b * N + cols, mask=cols < N, other=0) != 0)
            kt = tl.load(k_ptr + b * skb + hk * skh + cols[:, None] * skn + ch[None, :] * skd,
                         mask=(cols < N)[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [BN, BD]
            lg = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale  # [BR, BN]
            lg = tl.where(valid[None, :], lg, float("-inf"))
            m_new = tl.maximum(m, tl.max(lg, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile so far: no NaN
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(lg - m_safe[:, None]), axis=1)
            m = m_new
        inv = tl.where(rvalid, 1.0 / s, 0.0)  # padded rows contribute nothing
        for n0 in range(0, N, BLOCK_N):  # sweep 2: probabilities summed over the rows of this block
            cols = n0 + tl.arange(0, BLOCK_N)
            valid = cols < N
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + b * N + cols, mask=cols < N, other=0) != 0)
            kt = tl.load(k_ptr + b * skb + hk * skh + cols[:, None] * skn + ch[None, :] * skd,
                         mask=(cols < N)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            lg = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale
            p = tl.exp(lg - m[:, None]) * inv[:, None]
            p = tl.where(valid[None, :], p, 0.0)
            tl.store(out_ptr + b * sob + h * soh + rb * sop + cols, tl.sum(p, axis=0), mask=cols < N)

    return triton, _attention_rows_kernel


def attention_rows_triton(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float,
                          key_mask: torch.Tensor | None = None, out: torch.Tensor | None = None,
                          block_r: int = 16, block_n: int = 64) -> torch.Tensor:
    """Triton path of `attention_rows_reference` (same arguments and return).

    `out`: [B, H, ceil(R / block_r), N] float32 buffer of per-row-block partial sums to fill (tests poison it).
    """
    triton, kernel = _kernel()
    B, H, Nq, D = q.shape
    Hk, N = k.shape[1], k.shape[2]
    R = rows.shape[1]
    nrb = triton.cdiv(R, block_r)
    if out is None:
        out = torch.empty(B, H, nrb, N, dtype=torch.float32, device=q.device)
    rows = rows.contiguous()
    mask = key_mask.contiguous().view(torch.uint8) if key_mask is not None else rows  # placeholder if no mask
    kernel[(H, B, nrb)](q, k, rows, mask, out, R, N, D, H // Hk, float(scale), *q.stride(), *k.stride(),
                        out.stride(0), out.stride(1), out.stride(2), HAS_MASK=key_mask is not None,
                        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)))
    return out.sum(2)  # [B, H, N]


def attention_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float,
                   key_mask: torch.Tensor | None = None, chunk: int = 64) -> torch.Tensor:
    """Softmax attention rows summed over `rows`, per query head, dispatched by MMCOMPRESS_KERNELS.

    Args: as `attention_rows_reference` (inputs already checked by `attention_row_scores`).

    Returns:
        [B, H, N] float32.
    """
    if use_triton(q, q, k):
        return attention_rows_triton(q, k, rows, scale, key_mask)
    return attention_rows_reference(q, k, rows, scale, key_mask, chunk)
