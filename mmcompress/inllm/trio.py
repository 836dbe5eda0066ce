"""TRIO (Zhang et al., arXiv 2602.04657): gradient saliency of a decoder layer's input + NMS, inside the LLM.

At its prune point P (default: half the decoder's depth, 16 of LLaVA-1.5's 32 layers) the hidden states entering
layer P are scored, as the release (`layer_prune` in llava/model/modeling_llama_x.py) scores them:

1. layer P is re-run on the detached hidden states (the shared stage's backward capability,
   `PruneContext.layer_grad`), then the final norm and the output head;
2. the loss is the cross-entropy of those logits against their own argmax at the 4 positions before each sample's
   last token (the release's shifted logits drop the last position: columns last-1 .. last-4);
3. each token's saliency is the L2 norm of the loss's gradient with respect to its hidden state entering layer P;
4. NMS: image tokens in decreasing saliency; a token is taken unless a taken token's hidden state has cosine >= 0.8
   with it; when fewer than `keep` survive, the best suppressed ones fill the budget. The kept tokens stay in
   their original order, and later layers see positions renumbered without the dropped tokens (as the release).

The stage owns the rest (masks, caches, `generate()`, ragged batches, no autograd state left behind).

Letters: B batch, L tokens entering the prune point, C channels, N image tokens of one sample, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcompress.inllm.saliency import detached
from mmcompress.inllm.stage import PruneContext

__all__ = ["TRIORule", "nms_select", "trio_loss_positions"]


def trio_loss_positions(valid: torch.Tensor, n_pos: int = 4) -> torch.Tensor:
    """[B, L] bool: the `n_pos` columns before each row's last live column (clamped to its first live column).

    The release marks, in its shifted logits (positions 0 .. L-2), indices `valid - 1 - t` for t < 4, i.e. columns
    last-1 .. last-4 of the logits; clamping at the start can merge positions, as its `max(0, ...)` does.

    Args:
        valid: [B, L] bool live columns (left or right padding).
        n_pos: how many positions (release: K_pos = 4).
    """
    B, L = valid.shape
    ar = torch.arange(L, device=valid.device)
    last = torch.where(valid, ar, torch.full_like(ar, -1)).max(1).values  # [B]
    first = torch.where(valid, ar, torch.full_like(ar, L)).min(1).values  # [B]
    t = torch.arange(1, n_pos + 1, device=valid.device)  # [n_pos]
    cols = torch.maximum(last[:, None] - t[None], first[:, None]).clamp(min=0)  # [B, n_pos]
    out = torch.zeros(B, L, dtype=torch.bool, device=valid.device)
    return out.scatter_(1, cols, True) & valid


def nms_select(scores: torch.Tensor, feats: torch.Tensor, k: int, tau: float = 0.8) -> torch.Tensor:
    """[k'] int64 increasing indices kept by TRIO's NMS (k' = min(k, N)).

    Greedy over `scores` in decreasing order (ties: lower index first): take a token unless it is suppressed, then
    suppress every token whose cosine with it is >= tau (itself included); stop at k. If fewer than k were taken,
    the untaken tokens fill the budget in the same order. Same result as the release's loop over every token, but
    iterating once per TAKEN token.

    Args:
        scores: [N] saliency.
        feats: [N, C] features compared by cosine (the hidden states, normalised in float32 as the release does).
        k: budget.
        tau: cosine threshold (release: 0.8).
    """
    N = scores.shape[0]
    k = min(int(k), N)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    order = torch.sort(scores, descending=True, stable=True).indices  # [N]
    f = F.normalize(feats.float(), dim=-1)  # [N, C]
    near = (f @ f.T >= tau)[order][:, order].cpu()  # [N, N] in rank order
    free = torch.ones(N, dtype=torch.bool)  # in rank order
    taken = torch.zeros(N, dtype=torch.bool)
    n = 0
    while n < k:
        nz = free.nonzero()
        if nz.numel() == 0:
            break
        r = int(nz[0])
        taken[r] = True
        free &= ~near[r]
        n += 1
    if n < k:  # fill from the best untaken
        rest = (~taken).nonzero().squeeze(1)[: k - n]
        taken[rest] = True
    return order[taken.to(order.device)].sort().values


class TRIORule:
    """TRIO on the shared stage: one prune point, scored by the gradient of a re-run layer's loss, NMS.

    Args:
        point: first layer that sees the pruned sequence (release: 16 of 32 for LLaVA, 14 of 28 for Qwen2.5-VL).
        keep: image tokens kept per sample (int: the release's `image_token_list` entry, min(keep, n)) or the
            fraction kept (float in (0, 1]: int(keep * n), the Qwen2.5-VL release's floor).
        tau: NMS cosine threshold (release 0.8).
        n_pos: loss positions before the last token (release 4).
        rerun: "next" re-runs layer `point` on its input (the LLaVA release); "prev" re-runs layer `point - 1` on its
            own output (the Qwen2.5-VL release's `self.layers[rank_layer - 1]`).
    """

    name = "trio"
    compact_positions = True
    needs_grad = True

    def __init__(self, point: int, keep: int | float, *, tau: float = 0.8, n_pos: int = 4, rerun: str = "next"):
        if rerun not in ("next", "prev"):
            raise ValueError(f"trio_rerun: expected 'next' or 'prev', got {rerun!r}")
        self.point, self.keep, self.tau, self.n_pos, self.rerun = point, keep, float(tau), int(n_pos), rerun
        self.points = (point,)
        self.last_scores: torch.Tensor | None = None  # [B, L] saliency of the last prefill (inspection, tests)

    @property
    def active(self) -> bool:
        return not (isinstance(self.keep, float) and self.keep >= 1.0)

    def score_layer(self, point: int) -> int:
        return point

    def kept_count(self, n: torch.Tensor) -> torch.Tensor:
        """[B] image tokens kept from [B] live image tokens."""
        if isinstance(self.keep, float):
            return torch.floor(n.double() * self.keep).long().clamp(max=n)
        return n.clamp(max=int(self.keep))

    def saliency(self, ctx: PruneContext) -> torch.Tensor:
        """[B, L] gradient norm of the loss at each column's hidden state entering the prune point."""
        pos = trio_loss_positions(ctx.valid, self.n_pos)  # [B, L]
        counts = pos.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
        w = (pos / counts)[pos]  # [P] each sample's positions weigh 1 / its count: per-sample mean, summed

        def loss(out: torch.Tensor) -> torch.Tensor:  # out [B, L, C]; runs in the capability's grad scope
            p, wp = detached((pos, w))  # an inference-mode caller's tensors are cloned before autograd saves them
            logits = ctx.logits(out[p]).float()  # [P, V]
            target = logits.detach().argmax(-1)  # [P] the model's own argmax
            return (F.cross_entropy(logits, target, reduction="none") * wp.to(logits.device)).sum()

        dt = ctx.h.dtype
        ac = dt if ctx.h.device.type == "cuda" and dt in (torch.float16, torch.bfloat16) else None
        layer = self.point if self.rerun == "next" else self.point - 1
        g = ctx.layer_grad(layer, loss, autocast_dtype=ac)  # [B, L, C]
        return g.to(dt).norm(p=2, dim=-1)

    def drop(self, ctx: PruneContext) -> torch.Tensor:
        img = ctx.img  # [B, L]
        n = img.sum(1)
        k = self.kept_count(n)
        drop = torch.zeros_like(img)
        if not bool((k < n).any()):  # nothing to prune: no backward (the release's `needs_pruning`)
            return drop
        s = self.saliency(ctx)  # [B, L]
        self.last_scores = s
        for b in range(img.shape[0]):
            if int(k[b]) >= int(n[b]):
                continue
            cols = img[b].nonzero().squeeze(1)  # [N]
            kept = nms_select(s[b, cols].float(), ctx.h[b, cols], int(k[b]), self.tau)
            drop[b, cols] = True
            drop[b, cols[kept]] = False
        return drop
