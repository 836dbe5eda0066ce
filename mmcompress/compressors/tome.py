"""ToMe: bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023), from the paper.

One round on n tokens: split them alternately into A (even positions) and B (odd positions); every token of A
keeps its most similar token of B (cosine on `metric`); the r most similar of those edges merge (A token into its
B partner, size-weighted average); at most |A| = ceil(n/2) tokens merge per round. Rounds repeat until `keep`
tokens remain. Merged tokens' metrics are size-weighted averages for the next round, as in the paper's proportional
bookkeeping. Ties: an A token picks the lowest-index B among equal maxima (torch.max), and edges of equal
similarity are taken in A order (stable sort), so results are deterministic.

Letters: B batch, n current tokens, N' input tokens (prefix removed), C channels, d metric channels.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, Inputs, Plan
from mmcompress.compressors.merge_ops import accum_dtype, gather_tokens, segment_sum
from mmcompress.kernels.bipartite_match import best_match_triton
from mmcompress.kernels.dispatch import use_triton
from mmcompress.registry import register


def bipartite_round(metric: torch.Tensor, r: int, match_dtype: torch.dtype | None = None):
    """One ToMe matching round.

    Args:
        metric: [B, n, d] similarity features of the current tokens (unnormalised).
        r: number of A tokens to merge, 0 <= r <= ceil(n/2).
        match_dtype: dtype of the similarity product (None: metric's own, in float32 for half types).

    Returns:
        keep_pos [B, n - r] current positions of the surviving tokens in increasing order,
        src [B, r] current positions of merged A tokens, dst [B, r] current positions of their B partners.
    """
    B, n, _ = metric.shape
    dev = metric.device
    a, b = metric[:, ::2], metric[:, 1::2]  # [B, ceil(n/2), d], [B, floor(n/2), d]
    if match_dtype is None and b.shape[1] > 0 and use_triton(metric):
        node_max, node_idx = best_match_triton(a, b)  # fused, tiled: no [B, na, nb] matrix (kernels/)
    else:
        dt = match_dtype or accum_dtype(metric.dtype)
        b_n = b.to(torch.float32)
        b_n = (b_n / b_n.norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(dt)
        sim = a.to(dt) @ b_n.transpose(1, 2)  # [B, na, nb] = a . b / |b|
        node_max, node_idx = sim.float().max(dim=-1)  # [B, na]: best B for every A
        node_max = node_max / a.float().norm(dim=-1).clamp_min(1e-6)  # cosine
    order = node_max.argsort(dim=-1, descending=True, stable=True)  # [B, na]
    src_a = order[:, :r]
    unm_a = order[:, r:]
    src = src_a * 2
    dst = node_idx.gather(1, src_a) * 2 + 1
    nb = b.shape[1]
    keep_pos = torch.cat([unm_a * 2, (torch.arange(nb, device=dev) * 2 + 1).expand(B, nb)], dim=1)
    keep_pos = keep_pos.sort(dim=1).values  # original order
    return keep_pos, src, dst


@register("tome")
class ToMe(Compressor):
    """ToMe bipartite soft matching with size-weighted merging, repeated until `keep` tokens remain.

    Args:
        keep: budget (see `Compressor`).
        match_dtype: dtype for the similarity product only (e.g. torch.bfloat16: ~3x faster matching on CPUs with
            AVX512-BF16; merge values stay exact in x's precision). None: x's dtype (float32 for half inputs).
        epsilon: target error for keep="auto".
    """

    family, modality = "similarity", "any"

    def __init__(self, keep: int | float | str = 0.5, *, match_dtype: torch.dtype | None = None,
                 epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if match_dtype is not None and (not isinstance(match_dtype, torch.dtype) or not match_dtype.is_floating_point):
            raise TypeError(f"match_dtype: expected a floating torch.dtype or None, got {match_dtype!r}")
        self.match_dtype = match_dtype

    def plan(self, inp: Inputs, k: int) -> Plan:
        x = inp.x
        B, N, C = x.shape
        dev = x.device
        metric = inp.sim
        size = inp.size
        if (N + 1) // 2 >= N - k:  # one round suffices: gather survivors, add merged A tokens into partners
            keep_pos, src, dst = bipartite_round(metric, N - k, self.match_dtype)
            return self._single_round(x, size, keep_pos, src, dst)
        assign = torch.arange(N, device=dev).expand(B, N)  # input token -> current position
        rep = assign
        s = inp.sizes()
        n = N
        m = metric
        while n > k:
            r = min(n - k, (n + 1) // 2)
            keep_pos, src, dst = bipartite_round(m, r, self.match_dtype)
            slot = torch.full((B, n), -1, dtype=torch.long, device=dev)
            slot.scatter_(1, keep_pos, torch.arange(n - r, device=dev).expand(B, n - r))
            slot.scatter_(1, src, slot.gather(1, dst))  # merged A tokens follow their partner
            assign = slot.gather(1, assign)
            rep = rep.gather(1, keep_pos)
            w = s.to(accum_dtype(m.dtype))
            m = segment_sum(m.to(w.dtype) * w.unsqueeze(-1), slot, n - r)
            s = segment_sum(s, slot, n - r)
            m = m / s.unsqueeze(-1).to(m.dtype)
            n -= r
        return Plan(assign=assign, rep=rep)

    @staticmethod
    def _single_round(x, size, keep_pos, src, dst) -> Plan:
        """Fast path (one round): the output is a gather of survivors plus sparse adds, no full segment sum."""
        B, N, C = x.shape
        M = keep_pos.shape[1]
        dev = x.device
        slot = torch.full((B, N), -1, dtype=torch.long, device=dev)
        slot.scatter_(1, keep_pos, torch.arange(M, device=dev).expand(B, M))
        dst_slot = slot.gather(1, dst)  # [B, r]
        slot.scatter_(1, src, dst_slot)
        acc = accum_dtype(x.dtype)
        rows = (dst_slot + torch.arange(B, device=dev).unsqueeze(1) * M).reshape(-1)  # [B*r] rows of out
        src_x = gather_tokens(x, src).to(acc)  # [B, r, C]
        out = gather_tokens(x, keep_pos).to(acc)  # [B, M, C]
        if size is None:
            w_keep = torch.ones(B, M, dtype=acc, device=dev)
            w_src = torch.ones(src.shape, dtype=acc, device=dev)
        else:
            w_keep = size.gather(1, keep_pos).to(acc)
            w_src = size.gather(1, src).to(acc)
            out.mul_(w_keep.unsqueeze(-1))
            src_x.mul_(w_src.unsqueeze(-1))
        out.view(B * M, C).index_add_(0, rows, src_x.reshape(-1, C))
        den = w_keep.reshape(-1).index_add(0, rows, w_src.reshape(-1)).view(B, M)
        out.div_(den.unsqueeze(-1))
        return Plan(assign=slot, rep=keep_pos, x=out.to(x.dtype), size=den.float())
