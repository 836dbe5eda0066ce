"""Fused size-weighted merge for ToMe (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

One bipartite round has split n tokens into A (even positions) and B (odd positions), found every A row's best B
partner (`node_idx`) and chosen the r A rows to merge (`src_a`). This module turns that matching into the merged
tokens, their sizes and `assign` in one pass over x: every output row is its surviving token plus the A tokens merged
into it, size-weighted, written once; unmerged rows are copied exactly. No `scatter_reduce`/segment-sum round trip
over all n rows.

Triton kernel (one program per output row, contributors read from a CSR list sorted by output slot, so the sum order
is fixed and the result deterministic: no atomics) beside its plain-PyTorch reference, which is also the CPU path.

Letters: B batch, n tokens in, M = n - r tokens out, r merged A tokens, na = ceil(n/2) A tokens, C channels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from mmcompress.kernels.dispatch import needs_grad, use_triton


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def merge_indices(node_idx: torch.Tensor, src_a: torch.Tensor, n: int):
    """Index bookkeeping of one round (shared by both paths; [B, n] integers only, no pass over x).

    Args:
        node_idx: [B, na] int64 best B row (B numbering) of every A row, na = ceil(n/2).
        src_a: [B, r] int64 distinct A rows that merge, in the order their contributions are summed.
        n: tokens in.

    Returns:
        keep_pos [B, M] positions of the surviving tokens, increasing (output slot j holds keep_pos[:, j]);
        assign [B, n] output slot of every input position; dst_slot [B, r] slot each merged A row goes to;
        src_pos [B, r] positions of the merged A rows.
    """
    B, r = src_a.shape
    M = n - r
    dev = src_a.device
    kept = torch.ones(B, n, dtype=torch.bool, device=dev)
    kept[:, ::2].scatter_(1, src_a, False)  # [B, n]: merged A positions dropped
    slot = kept.cumsum(1) - 1  # [B, n] int64: output slot of every kept position
    pos = torch.arange(n, device=dev).expand(B, n)
    keep_pos = torch.empty(B, M + 1, dtype=torch.long, device=dev)
    keep_pos.scatter_(1, torch.where(kept, slot, M), pos)  # merged positions land in the spare column M
    keep_pos = keep_pos[:, :M]
    src_pos = src_a * 2  # [B, r]
    dst_slot = slot.gather(1, node_idx.gather(1, src_a) * 2 + 1)  # [B, r]
    assign = slot.scatter_(1, src_pos, dst_slot)  # [B, n]
    return keep_pos, assign, dst_slot, src_pos


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, n, C], idx [B, M] -> [B, M, C] row copies through one index_select.

    Works on row-contiguous views too (e.g. x = full[:, prefix:]): the rows are addressed in the parent storage,
    ~4x faster on CPU than advanced indexing of the strided view (8.1 vs 1.9 ms at [16, 560, 768], 1 thread).
    """
    B, n, C = x.shape
    if x.stride(2) == 1 and x.stride(1) == C and x.stride(0) % C == 0 and B * n > 0:
        per = x.stride(0) // C  # rows of storage per sample (n, or n + prefix for a sliced view)
        rows = x.as_strided(((B - 1) * per + n, C), (C, 1), x.storage_offset())  # [rows, C] view, no copy
        flat = (idx + torch.arange(B, device=idx.device).unsqueeze(1) * per).reshape(-1)
        return rows.index_select(0, flat).view(B, idx.shape[1], C)
    return x[torch.arange(B, device=idx.device).unsqueeze(1), idx]


def _adjacent(head: torch.Tensor, x: torch.Tensor) -> bool:
    """True when `head` [B, P, C] sits right before `x` [B, n, C] in one storage (x = full[:, P:], head =
    full[:, :P], as the base class slices the prefix off), so both can be read through one view of the storage.
    False under autograd: a view that reaches beyond x would carry no gradient to the head rows."""
    return (
        not needs_grad(head, x)
        and head.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        and head.stride() == x.stride()
        and head.storage_offset() + head.shape[1] * x.stride(1) == x.storage_offset()
    )


def gather_rows_after(x: torch.Tensor, head: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
    """[B, P + M, C]: the P rows of `head` [B, P, C], then `gather_rows(x, idx)` for idx [B, M], in one output.

    When `head` sits right before `x` in one storage (x = full[:, P:], head = full[:, :P], as the base class
    slices the prefix off), both come from a single gather over the parent rows: no second copy of the output.
    """
    if head is None:
        return gather_rows(x, idx)
    B, P, C = head.shape
    n = x.shape[1]
    if _adjacent(head, x):
        parent = x.as_strided((B, P + n, C), x.stride(), head.storage_offset())  # [B, P + n, C] view
        full_idx = torch.cat([torch.arange(P, device=idx.device).expand(B, P), idx + P], 1)  # [B, P + M]
        return gather_rows(parent, full_idx)
    return torch.cat([head, gather_rows(x, idx)], 1)


def merge_reference(x: torch.Tensor, size: torch.Tensor | None, node_idx: torch.Tensor, src_a: torch.Tensor,
                    head: torch.Tensor | None = None):
    """Plain PyTorch: gather the survivors, then add the merged tokens into their rows and divide by the new sizes
    (only those rows when few receive, in place over the output when many do).

    Args:
        x: [B, n, C] tokens (any float dtype; row-contiguous views are gathered without a copy of x).
        size: [B, n] float sizes, or None for all ones.
        node_idx: [B, na] int64 best B row of every A row.
        src_a: [B, r] int64 A rows that merge.
        head: optional [B, P, C] tokens copied unchanged in front of the output (a compressor's prefix).

    Returns:
        out [B, P + M, C] in x's dtype (sums in float32 for half types; unmerged rows and head are exact copies),
        out_size [B, M] float32, assign [B, n] int64, keep_pos [B, M] int64 (P = 0 without `head`).
    """
    B, n, C = x.shape
    r = src_a.shape[1]
    M = n - r
    P = 0 if head is None else head.shape[1]
    Mt = P + M  # output rows per sample
    keep_pos, assign, dst_slot, src_pos = merge_indices(node_idx, src_a, n)
    out = gather_rows_after(x, head, keep_pos)  # [B, P + M, C]
    if size is None:
        out_size = torch.ones(B, M, dtype=torch.float32, device=x.device)
    else:
        out_size = size.gather(1, keep_pos).float()  # [B, M]
    if r == 0:
        return out, out_size, assign, keep_pos
    acc = _acc(x.dtype)
    rows = (dst_slot + P + torch.arange(B, device=x.device).unsqueeze(1) * Mt).reshape(-1)  # [B*r] rows of out
    flat = out.view(B * Mt, C)
    src_x = gather_rows(x, src_pos).reshape(B * r, C).to(acc)  # [B*r, C]
    w_src = None if size is None else size.gather(1, src_pos).reshape(-1).to(acc)  # [B*r]
    if w_src is not None:
        src_x.mul_(w_src.unsqueeze(1))
    if acc == x.dtype and 4 * r >= M and not needs_grad(x, size, head):
        # many receiving rows: sum in place in out (no [rows, C] temporaries, each a fresh allocation on CPU);
        # unmerged rows and the head are scaled by exactly 1, so they stay bit-exact copies (not under autograd:
        # the in-place updates of out and out_size would give wrong size gradients)
        w_all = torch.ones(B, Mt, dtype=acc, device=x.device)
        w_all[:, P:] = out_size  # surviving token's own size
        w_all = w_all.view(-1)  # [B*Mt]
        ones = torch.ones(B * Mt, dtype=acc, device=x.device)
        den = w_all.index_add(0, rows, torch.ones_like(src_x[:, 0]) if w_src is None else w_src)  # [B*Mt]
        if w_src is not None:
            flat.mul_(ones.index_copy(0, rows, w_all.index_select(0, rows)).unsqueeze(1))  # w_d x_d on merged rows
        flat.index_add_(0, rows, src_x)  # edges summed in src_a order
        flat.div_(ones.index_copy_(0, rows, den.index_select(0, rows)).unsqueeze(1))
        out_size.copy_(den.view(B, Mt)[:, P:])
        return out, out_size, assign, keep_pos
    uniq, inv = torch.unique(rows, return_inverse=True)  # [U] receiving rows, [B*r] edge -> receiving row
    num = flat.index_select(0, uniq).to(acc)  # [U, C]
    slots = (uniq // Mt) * M + uniq % Mt - P  # [U] the receiving rows' entries in out_size
    if w_src is None:
        w_src = torch.ones(B * r, dtype=acc, device=x.device)
        den = torch.ones(uniq.shape[0], dtype=acc, device=x.device)
    else:
        den = out_size.view(-1).index_select(0, slots).to(acc)  # [U]
        num.mul_(den.unsqueeze(1))
    num.index_add_(0, inv, src_x)  # edges summed in src_a order
    den = den.index_add(0, inv, w_src)
    flat.index_copy_(0, uniq, (num / den.unsqueeze(1)).to(x.dtype))
    out_size.view(-1).index_copy_(0, slots, den.float())
    return out, out_size, assign, keep_pos


def merge_bags(x: torch.Tensor, size: torch.Tensor | None, node_idx: torch.Tensor, src_a: torch.Tensor,
               head: torch.Tensor | None = None):
    """CPU fast path of `merge_reference` (same arguments and returns; other dtypes and layouts go to it).

    For float32/float64 x with row-contiguous tokens, every output row is a bag of x rows (its surviving token first,
    then the A tokens merged into it in src_a order) summed with weights size / new size by `F.embedding_bag`, which
    reads each x row once and writes each output row once: no gathered copy of the merged rows, no scatter, no
    division pass (both paths timed in one loop: `python benchmarks/merge_paths.py`). Unmerged rows and `head` rows
    are bags of one with weight 1: exact copies. Merged rows differ from the reference by rounding only (the weights
    are divided before the sum, not the sum after it). Sizes and weights are summed in x's dtype.
    """
    B, n, C = x.shape
    r = src_a.shape[1]
    M = n - r
    P = 0 if head is None else head.shape[1]
    dev = x.device
    if x.dtype not in (torch.float32, torch.float64) or B * n == 0:
        return merge_reference(x, size, node_idx, src_a, head)
    adjacent = head is not None and _adjacent(head, x)
    if head is not None and not adjacent:  # head elsewhere (or under autograd): merge without it, then prepend it
        out, out_size, assign, keep_pos = merge_bags(x, size, node_idx, src_a)
        return torch.cat([head, out], 1), out_size, assign, keep_pos
    Pb = P if adjacent else 0  # head rows read as bags from the same storage as x's rows
    base = x.as_strided((B, Pb + n, C), x.stride(), x.storage_offset() - Pb * x.stride(1)) if Pb else x
    if not (base.stride(2) == 1 and base.stride(1) == C and base.stride(0) % C == 0):
        return merge_reference(x, size, node_idx, src_a, head)
    keep_pos, assign, dst_slot, src_pos = merge_indices(node_idx, src_a, n)
    per = base.stride(0) // C  # storage rows per sample
    table = base.as_strided(((B - 1) * per + Pb + n, C), (C, 1), base.storage_offset())  # [rows, C] view, no copy
    # bag members sorted by key: output row t of a sample has key 2t (its own row) and 2t + 1 (rows merged into it)
    key = torch.cat([torch.arange(Pb + M, device=dev).mul(2).expand(B, Pb + M), (dst_slot + Pb) * 2 + 1], 1)
    row = torch.cat([torch.arange(Pb, device=dev).expand(B, Pb), keep_pos + Pb, src_pos + Pb], 1)  # [B, Pb + n]
    key, order = key.sort(dim=1, stable=True)  # stable: contributors stay in src_a order
    row = row.gather(1, order)  # [B, Pb + n] member rows, bag after bag
    w = torch.ones(B, Pb + n, dtype=x.dtype, device=dev)  # float32 or float64, as embedding_bag needs
    if size is not None:
        w[:, Pb:] = size
    w = w.gather(1, row)  # [B, Pb + n] member weights
    slot = key // 2  # [B, Pb + n] output row of every member
    den = torch.zeros(B, Pb + M, dtype=x.dtype, device=dev).scatter_add_(1, slot, w)  # [B, Pb + M] new sizes
    cnt = torch.zeros(B, Pb + M, dtype=torch.long, device=dev).scatter_add_(1, slot, torch.ones_like(slot))
    offsets = cnt.view(-1).cumsum(0).sub_(cnt.view(-1))  # [B * (Pb + M)] bag starts
    flat_rows = (row + torch.arange(B, device=dev).unsqueeze(1) * per).view(-1)
    w = (w / den.gather(1, slot)).view(-1)  # 1 exactly for bags of one
    out = F.embedding_bag(flat_rows, table, offsets, mode="sum", per_sample_weights=w).view(B, Pb + M, C)
    return out, den[:, Pb:].float(), assign, keep_pos


@functools.cache
def _kernel():
    """Define the kernel on first use (importing mmcompress never imports triton; TRITON_INTERPRET is read then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _merge_kernel(x_ptr, w_ptr, rep_ptr, start_ptr, cnt_ptr, contrib_ptr, out_ptr, osize_ptr, assign_ptr,
                      n, M, r, C, sxb, sxn, sxc, sob, som, soc,
                      HAS_W: tl.constexpr, BLOCK_C: tl.constexpr):
        j = tl.program_id(0)  # output slot
        b = tl.program_id(1)  # sample
        p = tl.load(rep_ptr + b * M + j)  # surviving position of slot j
        start = tl.load(start_ptr + b * M + j)
        cnt = tl.load(cnt_ptr + b * M + j)  # merged A tokens going into slot j
        tl.store(assign_ptr + b * n + p, j.to(tl.int64))
        if HAS_W:
            wp = tl.load(w_ptr + b * n + p).to(tl.float32)
        else:
            wp = tl.full((), 1.0, tl.float32)
        den = wp
        for t in range(start, start + cnt):
            q = tl.load(contrib_ptr + b * r + t)
            tl.store(assign_ptr + b * n + q, j.to(tl.int64))
            if HAS_W:
                den += tl.load(w_ptr + b * n + q).to(tl.float32)
            else:
                den += 1.0
        tl.store(osize_ptr + b * M + j, den)
        for c0 in range(0, C, BLOCK_C):
            ch = c0 + tl.arange(0, BLOCK_C)  # [BC]
            cm = ch < C
            xp = tl.load(x_ptr + b * sxb + p * sxn + ch * sxc, mask=cm, other=0.0)  # [BC]
            acc = xp.to(tl.float32) * wp
            for t in range(start, start + cnt):
                q = tl.load(contrib_ptr + b * r + t)
                if HAS_W:
                    wq = tl.load(w_ptr + b * n + q).to(tl.float32)
                else:
                    wq = tl.full((), 1.0, tl.float32)
                acc += tl.load(x_ptr + b * sxb + q * sxn + ch * sxc, mask=cm, other=0.0).to(tl.float32) * wq
            val = tl.where(cnt > 0, (acc / den).to(xp.dtype, fp_downcast_rounding="rtne"), xp)  # unmerged: exact
            tl.store(out_ptr + b * sob + j * som + ch * soc, val, mask=cm)

    return triton, _merge_kernel


def merge_triton(x: torch.Tensor, size: torch.Tensor | None, node_idx: torch.Tensor, src_a: torch.Tensor,
                 head: torch.Tensor | None = None,
                 out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, block_c: int = 1024):
    """Triton path of `merge_reference` (same arguments and returns; float16/bfloat16/float32 x).

    `out` = (tokens [B, P + M, C], sizes [B, M] float32, assign [B, n] int64) buffers to fill (tests poison them).
    """
    triton, kernel = _kernel()
    B, n, C = x.shape
    r = src_a.shape[1]
    M = n - r
    keep_pos, _, dst_slot, src_pos = merge_indices(node_idx, src_a, n)
    order = dst_slot.argsort(dim=1, stable=True)  # [B, r]: contributors grouped by slot, src_a order inside
    contrib = src_pos.gather(1, order).contiguous()
    cnt = torch.zeros(B, M, dtype=torch.long, device=x.device).scatter_add_(1, dst_slot, torch.ones_like(dst_slot))
    start = cnt.cumsum(1) - cnt  # [B, M] CSR offsets into contrib
    P = 0 if head is None else head.shape[1]
    if out is None:
        o = torch.empty(B, P + M, C, dtype=x.dtype, device=x.device)
        osize = torch.empty(B, M, dtype=torch.float32, device=x.device)
        assign = torch.empty(B, n, dtype=torch.long, device=x.device)
    else:
        o, osize, assign = out
    if P:
        o[:, :P] = head
    body = o[:, P:]  # [B, M, C] view: the kernel writes through its strides
    w = size.contiguous() if size is not None else osize  # placeholder pointer when HAS_W is False
    if M > 0:
        kernel[(M, B)](x, w, keep_pos.contiguous(), start, cnt, contrib, body, osize, assign, n, M, r, C,
                       *x.stride(), *body.stride(), HAS_W=size is not None,
                       BLOCK_C=min(block_c, max(16, triton.next_power_of_2(C))))
    return o, osize, assign, keep_pos


def merge_tokens(x: torch.Tensor, size: torch.Tensor | None, node_idx: torch.Tensor, src_a: torch.Tensor,
                 head: torch.Tensor | None = None):
    """Size-weighted merge of one matching round, dispatched by MMCOMPRESS_KERNELS (float64 x: reference only).

    Args:
        x: [B, n, C] tokens; size: [B, n] sizes or None (ones); node_idx: [B, ceil(n/2)] int64 best B row of every
            A row; src_a: [B, r] int64 distinct A rows that merge; head: optional [B, P, C] tokens put unchanged in
            front of the output (the prefix, written in the same pass instead of concatenated afterwards).

    Returns:
        out [B, P + n - r, C] (x's dtype), out_size [B, n - r] float32, assign [B, n] int64, keep_pos [B, n - r]
        int64.
    """
    if x.dtype != torch.float64 and use_triton(x, x, size, head):
        return merge_triton(x, size, node_idx, src_a, head)
    r = src_a.shape[1]
    if x.dtype == torch.float32 and x.device.type == "cpu" and 12 * r >= x.shape[1] - r:
        return merge_bags(x, size, node_idx, src_a, head)  # many merged rows: one weighted pass (embedding_bag)
    return merge_reference(x, size, node_idx, src_a, head)
