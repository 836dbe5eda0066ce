"""Peer for the CPU speed rows: a straight PyTorch transcription of ToMe's bipartite soft matching, written from the
paper (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023, Sec. 3), not from its code (CC-BY-NC).

The paper's steps, one round, r merges:
1. alternate the tokens into two sets A and B of about equal size;
2. draw an edge from every token in A to its most similar token in B (cosine similarity of the metric, e.g. keys);
3. keep the r most similar edges;
4. merge the tokens still connected, averaging features weighted by token size (proportional bookkeeping: a token
   that stands for s patches counts s times), and add the sizes;
5. concatenate the two sets back together (unmerged A tokens, then B).

Letters: B batch, N tokens, C channels, d metric channels, Na = ceil(N/2), Nb = floor(N/2).
"""

from __future__ import annotations

import torch


def paper_tome(x: torch.Tensor, metric: torch.Tensor, r: int, size: torch.Tensor | None = None):
    """One ToMe round on x [B, N, C] with similarity features metric [B, N, d]; r <= ceil(N/2) merges.

    Returns:
        merged tokens [B, N - r, C] and their sizes [B, N - r] (unmerged A tokens first, then B).
    """
    B, N, C = x.shape
    s = torch.ones(B, N, 1, dtype=x.dtype, device=x.device) if size is None else size.unsqueeze(-1).to(x.dtype)
    # 1. two sets by alternation
    m = metric / metric.norm(dim=-1, keepdim=True)
    m_a, m_b = m[:, ::2], m[:, 1::2]  # [B, Na, d], [B, Nb, d]
    # 2. one edge per A token: its most similar B token
    sim = m_a @ m_b.transpose(1, 2)  # [B, Na, Nb] cosine similarities
    edge_sim, edge_dst = sim.max(dim=-1)  # [B, Na]
    # 3. the r most similar edges
    ranked = edge_sim.argsort(dim=-1, descending=True)  # [B, Na]
    merged, unmerged = ranked[:, :r], ranked[:, r:]
    # 4. size-weighted merge of each chosen A token into its B token
    xs = x * s  # [B, N, C] size-weighted features
    xs_a, xs_b = xs[:, ::2], xs[:, 1::2]
    s_a, s_b = s[:, ::2], s[:, 1::2]
    dst = edge_dst.gather(1, merged)  # [B, r]
    sum_b = xs_b.scatter_add(1, dst[..., None].expand(B, r, C), xs_a.gather(1, merged[..., None].expand(B, r, C)))
    size_b = s_b.scatter_add(1, dst[..., None], s_a.gather(1, merged[..., None]))
    # 5. concatenate the unmerged A tokens and the (merged) B tokens, back to means
    sum_a = xs_a.gather(1, unmerged[..., None].expand(B, unmerged.shape[1], C))
    size_a = s_a.gather(1, unmerged[..., None])
    sums = torch.cat([sum_a, sum_b], dim=1)  # [B, N - r, C]
    sizes = torch.cat([size_a, size_b], dim=1)  # [B, N - r, 1]
    return sums / sizes, sizes.squeeze(-1)
