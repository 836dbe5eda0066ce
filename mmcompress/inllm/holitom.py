"""HoliTom's merging inside the LLM (Shao et al., NeurIPS'25): FastV's selection, then the rest merged into it.

At decoder layer K (the release's `HOLITOM_k`; its scripts use 18 with `HOLITOM_r` = 0.5), the attention row of the
last prompt token in layer K - 1 (softmax over keys, averaged over heads) ranks the n image (video) tokens; the
round(n * (1 - r)) highest are kept (Python round, half to even). Before the others are dropped, each of them is
merged into the kept token its hidden state (entering layer K) is most cosine-similar to (dot / (|a| |b|), ties to
the kept token of higher attention): the release walks the dropped tokens in position order and replaces the kept
token's state by (kept + dropped) / 2 each time, so a kept token with members m_1 < ... < m_j ends as
h / 2^j + sum_i m_i / 2^(j - i + 1). Kept tokens keep their original positions.

Release: cokeshao/HoliTom @ e9b2972f, `holitom/modeling_qwen2.py` `Qwen2Model_holitom.forward` (docs/fidelity_inllm.md).
It runs batch 1 (`image_token_posi[0]`); here every sample of a batch gets its own selection and merges. On
LLaVA-OneVision video the release counts the trailing newline among the n tokens (its one_token layout appends it
before recording the count), as the shared stage does.

Letters: B batch, L tokens entering layer K, C channels.
"""

from __future__ import annotations

import torch

from mmcompress.inllm.fastv import fastv_keep_count
from mmcompress.inllm.stage import PruneContext, drop_lowest

__all__ = ["HoliTomRule"]


class HoliTomRule:
    """HoliTom's in-LLM merging on the shared stage: one prune point K, FastV's kept set, the rest averaged in.

    Args:
        k: first layer that sees the merged sequence (>= 1); scores from layer k - 1 (the release's `HOLITOM_k`).
        r: fraction of each sample's image tokens merged away, in [0, 1) (the release's `HOLITOM_r`).
    """

    name = "holitom"
    compact_positions = False

    def __init__(self, k: int = 18, r: float = 0.5):
        self.k, self.r = k, float(r)
        self.points = (k,)

    @property
    def active(self) -> bool:
        return self.r > 0.0

    def score_layer(self, point: int) -> int:
        return point - 1

    def drop(self, ctx: PruneContext) -> tuple[torch.Tensor, torch.Tensor]:
        s = ctx.last_token_attention()  # [B, L]
        img = ctx.img
        n = img.sum(1)
        drop = drop_lowest(s, img, n - fastv_keep_count(n, self.r))  # [B, L]
        h = ctx.h.clone()  # [B, L, C]
        for b in range(h.shape[0]):
            kept = (img[b] & ~drop[b]).nonzero()[:, 0]
            gone = drop[b].nonzero()[:, 0]  # in position order, as the release walks them
            if len(kept) == 0 or len(gone) == 0:
                continue
            kept = kept[torch.sort(s[b, kept], descending=True, stable=True).indices]  # the release's topk order
            hk, hg = h[b, kept], h[b, gone]  # [K, C], [G, C]
            sim = (hg @ hk.T) / (hg.norm(dim=-1, keepdim=True) * hk.norm(dim=-1, keepdim=True).T)  # [G, K]
            target = kept[sim.argmax(dim=1)]  # [G] column each dropped token merges into
            # the release's sequential halving, one round per member rank: round i merges every kept token's i-th
            # member (same operations, in the same order, per kept token)
            rank = torch.zeros_like(target)
            seen: dict[int, int] = {}
            for i, t in enumerate(target.tolist()):
                rank[i] = seen.get(t, 0)
                seen[t] = rank[i].item() + 1
            for rd in range(int(rank.max()) + 1):
                sel = rank == rd
                tt = target[sel]
                h[b, tt] = (h[b, tt] + h[b, gone[sel]]) / 2
        return drop, h
