"""ToMe: bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023), from the paper.

One round on n tokens: split them alternately into A (even positions) and B (odd positions); every token of A
keeps its most similar token of B (cosine on `metric`); the r most similar of those edges merge (A token into its
B partner, size-weighted average); at most |A| = ceil(n/2) tokens merge per round. Rounds repeat until `keep`
tokens remain. Merged tokens' metrics are size-weighted averages for the next round, as in the paper's proportional
bookkeeping. Ties: an A token picks the lowest-index B among equal maxima, and edges of equal
similarity are taken in A order (stable sort), so results are deterministic.

Letters: B batch, n current tokens, N' input tokens (prefix removed), C channels, d metric channels.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, Inputs, Plan
from mmcompress.compressors.merge_ops import accum_dtype
from mmcompress.kernels.bipartite_match import best_match_triton
from mmcompress.kernels.dispatch import use_triton
from mmcompress.kernels.merge import merge_tokens
from mmcompress.registry import register


def row_max_first(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sim.max(dim=-1)`` of a float32 [..., m] tensor, index = the lowest among equal maxima; 5x faster on CPU.

    ``max``/``argmax`` over the last dim run a scalar loop on CPU (1.1 ms on [16, 289, 288], 2 threads); this is
    three vectorised passes: the row max, then ``sim >= max`` (1 at the maxima, 0 elsewhere) times the reversed
    column numbers m..1, whose row max names the first maximum (0.2 ms). Rows holding NaN give index 0.
    `sim` is overwritten (it is the caller's scratch: no second [..., m] buffer).
    """
    m = sim.shape[-1]
    mx = sim.amax(dim=-1, keepdim=True)  # [..., 1]
    first = sim.ge_(mx).mul_(torch.arange(m, 0, -1, dtype=sim.dtype, device=sim.device))  # m - j at maxima j
    idx = (m - first.amax(dim=-1)).remainder_(m).long()  # [...]: no maximum (NaN row) -> m -> 0
    return mx.squeeze(-1), idx


SIM_CHUNK_BYTES = 8 << 20  # scores per block: bounds the scratch (ViT-B's 16 x 289 x 288 fit in one block)


def best_partner(a: torch.Tensor, b_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every A row's best B row: (a . b_n max [B, na] float32, its first index [B, na]) for a [B, na, d] and
    b_n [B, nb, d] (rows of unit norm; strided views are fine), over blocks of samples of at most SIM_CHUNK_BYTES of
    scores (one sample when a sample's own exceed it), so the scratch stays bounded: 8 MB instead of 66 MB of scores
    at [4, 2880, 1024]."""
    B, na, nb = a.shape[0], a.shape[1], b_n.shape[1]
    step = max(1, SIM_CHUNK_BYTES // max(1, na * nb * 4))
    if step >= B:  # one block: no copies into the outputs
        return row_max_first((a @ b_n.transpose(1, 2)).float())  # [B, na, nb] scratch
    mx = torch.empty(B, na, dtype=torch.float32, device=a.device)
    idx = torch.empty(B, na, dtype=torch.long, device=a.device)
    for s in range(0, B, step):
        blk = slice(s, s + step)
        mx[blk], idx[blk] = row_max_first((a[blk] @ b_n[blk].transpose(1, 2)).float())  # [b, na, nb] scratch
    return mx, idx


def match_round(metric: torch.Tensor, r: int, match_dtype: torch.dtype | None = None):
    """One ToMe matching round: every A token's best B partner, and the r A tokens that merge.

    Args:
        metric: [B, n, d] similarity features of the current tokens (unnormalised).
        r: number of A tokens to merge, 0 <= r <= ceil(n/2).
        match_dtype: dtype of the similarity product (None: metric's own, in float32 for half types).

    Returns:
        node_idx [B, ceil(n/2)] best B row (B numbering) of every A row, src_a [B, r] the merged A rows, most
        similar first (ties: lower A index first).
    """
    a, b = metric[:, ::2], metric[:, 1::2]  # [B, ceil(n/2), d], [B, floor(n/2), d] strided views
    if b.shape[1] == 0:  # n = 1: nothing to merge into
        return torch.zeros(a.shape[:2], dtype=torch.long, device=metric.device), a.new_zeros(a.shape[0], 0).long()
    if match_dtype is None and use_triton(metric):
        node_max, node_idx = best_match_triton(a, b)  # fused, tiled: no [B, na, nb] matrix (kernels/)
    else:
        dt = match_dtype or accum_dtype(metric.dtype)
        m = metric.to(accum_dtype(metric.dtype))
        m_n = (m / m.norm(dim=-1, keepdim=True).clamp_min_(1e-6)).to(dt)  # [B, n, d] unit rows, one buffer
        node_max, node_idx = best_partner(m_n[:, ::2], m_n[:, 1::2])  # [B, na] cosine, best B of every A
    src_a = node_max.argsort(dim=-1, descending=True, stable=True)[:, :r]  # [B, r]
    return node_idx, src_a


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
    check_output = True  # every token is kept or merged into a kept one with a positive weight

    def __init__(self, keep: int | float | str = 0.5, *, match_dtype: torch.dtype | None = None,
                 epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if match_dtype is not None and (not isinstance(match_dtype, torch.dtype) or not match_dtype.is_floating_point):
            raise TypeError(f"match_dtype: expected a floating torch.dtype or None, got {match_dtype!r}")
        self.match_dtype = match_dtype

    def plan(self, inp: Inputs, k: int) -> Plan:
        x = inp.x
        B, N, C = x.shape
        if (N + 1) // 2 >= N - k:  # one round: merged tokens, sizes and assign from one fused pass over x
            node_idx, src_a = match_round(inp.sim, N - k, self.match_dtype)
            out, size, assign, keep_pos = merge_tokens(x, inp.size, node_idx, src_a, inp.head)  # prefix included
            return Plan(assign=assign, rep=keep_pos, x=out, size=size, x_head=inp.head is not None)
        # several rounds: merge the metric (size-weighted, as the paper's proportional bookkeeping) and compose
        # assign; the base class forms the outputs from x once at the end
        m = inp.sim.detach()  # only matched (indices out): no autograd, so the merges between rounds may use Triton
        m = m.to(accum_dtype(m.dtype))
        s = None if inp.size is None else inp.size.detach()  # weights of the metric only
        assign = rep = None
        n = N
        while n > k:
            r = min(n - k, (n + 1) // 2)
            node_idx, src_a = match_round(m, r, self.match_dtype)
            m, s, step, keep_pos = merge_tokens(m, s, node_idx, src_a)  # [B, n - r, d], [B, n - r], [B, n]
            assign = step if assign is None else step.gather(1, assign)
            rep = keep_pos if rep is None else rep.gather(1, keep_pos)
            n -= r
        return Plan(assign=assign, rep=rep)
