"""`divprune`: max-min diversity selection (DivPrune, Alvar et al., CVPR'25), clean-room from the paper.

DivPrune casts token pruning as the Max-Min Diversity Problem: choose k tokens maximising the smallest pairwise
distance among them, with the cosine distance d(i, j) = 1 - cos(m_i, m_j) on the similarity features m (`metric`
if given, else x). The exact problem is NP-hard; the paper solves it greedily:

1. first token: the most isolated one, argmax_i min_{j != i} d(i, j) (largest nearest-neighbour distance);
2. then repeatedly add argmax_{i not chosen} min_{s chosen} d(i, s) (farthest-point insertion).

As the release does, the [N, N] distance matrix 1 - mm(u, u^T) of the unit rows u is computed once per sample
(O(N²·d) time, the bulk of the cost), step 1 takes each column's second-smallest entry (its smallest is the token's
own distance, ~0), and the running vector min_{s chosen} d(i, s) is then updated from one row of the matrix per step:
O(k·N) for the steps, where the release takes the min over all chosen rows at every step (O(k²·N)). The values are
the release's bit for bit, so ties and near-ties pick as there; ties go to the lowest index (torch.argmax returns the
first maximum). Above N = `MATRIX_MAX` tokens (64 MiB of matrix) the matrix is not kept: step 1 runs in row chunks
and each step is one [N, d] matrix-vector product (O(k·N·d), O(N·d) memory).

Guarantee: the chord distance sqrt(2·d) = |m̂_i - m̂_j| is a metric and a monotone function of d, so the greedy
choice is the same under it, and farthest-point insertion is within a factor 2 of the optimal max-min value in
any metric, whatever the first point: greedy_min_chord >= optimum_min_chord / 2 (equivalently in cosine
distance: greedy >= optimum / 4). `select_only`: outputs are the chosen input tokens, the rest are dropped.

Fidelity (docs/fidelity.md): the release (vbdi/divprune, `LlavaMetaForCausalLM.DivPrune`) runs the same greedy on
the image's LLM input embeddings (so `apply` runs this method after the projector by default), keeps
int(round(ratio * N)) tokens in source order, and handles one sample per call; the kept sets agree. Where fewer
distinct directions than k remain, the release can pick a token twice (its own distance stays in the minimum): here
a chosen token is never picked again.

Letters: B batch, N tokens (prefix removed), k budget, d similarity features.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.compressors.baselines import selection_plan
from mmcompress.compressors.merge_ops import cosine_normalize
from mmcompress.registry import register


def nearest_neighbour_distance(m: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """[B, N] cosine distance of each token to its nearest other token; m: [B, N, d] unit rows (float32)."""
    B, N, _ = m.shape
    out = torch.empty(B, N, dtype=m.dtype, device=m.device)
    ar = torch.arange(N, device=m.device)
    for i in range(0, N, chunk):
        sim = torch.matmul(m[:, i : i + chunk], m.transpose(1, 2))  # [B, c, N]
        rows = ar[i : i + chunk]
        sim[:, torch.arange(rows.numel(), device=m.device), rows] = float("-inf")  # exclude self
        out[:, i : i + chunk] = 1.0 - sim.max(dim=2).values
    return out


#: largest N whose [N, N] distance matrix is kept (64 MiB in float32); above it each step is a matrix-vector product
MATRIX_MAX = 4096


def greedy_maxmin(m: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity selection.

    Args:
        m: [B, N, d] features (any float dtype; compared by cosine in float32).
        k: tokens to choose, 1 <= k <= N.

    Returns:
        [B, k] int64 chosen indices, in selection order.
    """
    B, N, _ = m.shape
    u = cosine_normalize(m.detach().float())  # [B, N, d]; the selection takes no gradient
    if N == 1:
        return torch.zeros(B, 1, dtype=torch.long, device=m.device)
    if N > MATRIX_MAX:
        return _greedy_by_products(u, k)
    chosen = torch.empty(B, k, dtype=torch.long, device=m.device)
    for b in range(B):
        # the release's matrix, bit for bit: 1 - mm(u, u^T) of the same unit rows (symmetric: the same products in
        # the same order), so its nearest-neighbour distances and every step's minima are the release's values
        dist = torch.mm(u[b], u[b].t()).neg_().add_(1.0)  # [N, N]
        # first pick: the largest second-smallest entry of a column, as the release's topk(2, dim=0) takes it (the
        # smallest is the token's own distance, ~1e-7 off 0, unless a near-duplicate lies closer than rounding)
        mind = torch.topk(dist, 2, dim=0, largest=False).values[1]  # [N]
        # a token's own distance -inf: once chosen, its row's update sets its running minimum to -inf, so the
        # argmax needs no mask and each step is one row read (O(N)), not a matrix-vector product (O(N d))
        dist.diagonal().fill_(float("-inf"))
        # mind[i] = min distance of token i to the chosen set; 1-element index tensors: no host sync on GPU
        last = mind.argmax(dim=0, keepdim=True)  # [1]
        mind = dist.index_select(0, last)[0]  # [N] (a copy)
        picks = [last]
        for _ in range(1, k):
            last = mind.argmax(dim=0, keepdim=True)
            torch.minimum(mind, dist.index_select(0, last)[0], out=mind)
            picks.append(last)
        chosen[b] = torch.cat(picks)
    return chosen


def _greedy_by_products(u: torch.Tensor, k: int) -> torch.Tensor:
    """`greedy_maxmin` on unit rows u [B, N, d] without an [N, N] matrix: O(chunk N) memory, O(k N d) steps."""
    B, N, _ = u.shape
    first = nearest_neighbour_distance(u).argmax(dim=1, keepdim=True)  # [B, 1]
    chosen = torch.empty(B, k, dtype=torch.long, device=u.device)
    # per sample, one matrix-vector product per step (u[b] @ u[b, last]); the batched einsum it replaces cost
    # 0.9-1.7 ms per step at batch 2 on CPU against ~0.07 ms for the two mv (benchmarks/compressor_speed.py).
    # a chosen token's entry is -inf (torch.minimum keeps it there), so the argmax needs no mask
    for b in range(B):
        ub = u[b]  # [N, d]
        mind = torch.full((N,), float("inf"), device=u.device)
        last = first[b]  # [1]
        picks = [last]
        for _ in range(1, k):
            mind.index_fill_(0, last, float("-inf"))
            torch.minimum(mind, 1.0 - torch.mv(ub, ub.index_select(0, last)[0]), out=mind)
            last = mind.argmax(dim=0, keepdim=True)
            picks.append(last)
        chosen[b] = torch.cat(picks)
    return chosen


@register("divprune")
class DivPrune(Compressor):
    """Keep the k most mutually diverse tokens (greedy max-min cosine distance on `metric`, else x); drop the rest.

    Args:
        keep: budget (see `Compressor`).
        epsilon: target error for keep="auto" (the `adaptive` estimator picks the per-sample budget).
    """

    family, modality = "similarity", "any"
    select_only = True
    #: the release (vbdi/divprune) selects among the LLM's input embeddings of the image, after the projector
    encoder_needs = EncoderNeeds(stage="projector")

    def plan(self, inp: Inputs, k: int) -> Plan:
        idx = greedy_maxmin(inp.sim, k)  # [B, k]
        return selection_plan(idx, inp.x.shape[1])
