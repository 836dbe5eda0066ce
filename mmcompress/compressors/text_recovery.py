"""`text_recovery`: keep by visual importance, recover by text, merge the rest (Recoverable Compression,
Chen et al., AAAI'25), clean-room from the paper.

The paper prunes vision tokens by visual importance (the CLS attention row), then "recovers" pruned tokens that the
question points at (high similarity to the text embedding), and finally merges what is left so that no token is
silently discarded. Here, for a budget of exactly k tokens per sample:

1. Split: at most k_r = floor(recover * k) slots may go to recovered tokens (default recover = 1/4); the
   k_v = k - k_r tokens with the highest `scores` are kept first (ties: lower index).
2. Text relevance of every token: cosine between the token (x; `text` lives in x's space) and the L text tokens,
   reduced by max over L (default; `text_reduce="mean"` averages instead).
3. Recovery: among the pruned tokens, those whose relevance is an outlier by the IQR rule,
   relevance > Q3 + whisker * (Q3 - Q1) with the quartiles of the *pruned* tokens' relevance (the same adaptive
   rule PruMerge uses for attention; it adapts to how peaked the text match is and recovers nothing when no token
   stands out). The most relevant outliers are recovered, up to k_r of them.
4. Unused recovery slots (fewer than k_r outliers) go back to visual importance: the next tokens by `scores`.
   Together: exactly k kept tokens.
5. Merge: every token not kept joins its most similar kept token (cosine on `metric`, else x; ties: lower index),
   and each output is the size-weighted mean of its group (`exact_mean`), so nothing is dropped.

Cost: O(N·L·C) relevance, O(N log N) ranking, O(N·k·d) merge assignment (chunked).

Letters: B batch, N tokens (prefix removed), k budget, L text tokens, C channels, d similarity features.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, Inputs, Plan
from mmcompress.compressors.merge_ops import cosine_normalize
from mmcompress.compressors.visionzip import nearest_target
from mmcompress.registry import register


def text_relevance(x: torch.Tensor, text: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """[B, N] cosine relevance of tokens x [B, N, C] to text [B, L, C], max or mean over L (float32)."""
    sim = torch.matmul(cosine_normalize(x.float()), cosine_normalize(text.float()).transpose(1, 2))  # [B, N, L]
    return sim.amax(dim=2) if reduce == "max" else sim.mean(dim=2)


def masked_iqr_threshold(v: torch.Tensor, valid: torch.Tensor, whisker: float) -> torch.Tensor:
    """[B] Q3 + whisker * IQR of v [B, N] over the entries where valid [B, N] is True (+inf when none)."""
    vv = v.masked_fill(~valid, float("nan"))
    q = torch.nanquantile(vv, torch.tensor([0.25, 0.75], device=v.device), dim=1)  # [2, B]
    thr = q[1] + whisker * (q[1] - q[0])
    return torch.nan_to_num(thr, nan=float("inf"))


@register("text_recovery")
class TextRecovery(Compressor):
    """Keep the top tokens by `scores`, recover pruned tokens that match `text`, merge the rest into the kept set.

    Args:
        keep: budget (see `Compressor`); recovered tokens count inside it.
        recover: largest fraction of the budget that recovered tokens may take, in [0, 1).
        whisker: IQR multiplier of the recovery outlier rule.
        text_reduce: "max" or "mean" over the L text tokens.
        epsilon: target error for keep="auto" (the `adaptive` estimator picks the per-sample budget).
    """

    family, modality, needs = "query", "image/video", ("scores", "text")

    def __init__(self, keep: int | float | str = 0.5, *, recover: float = 0.25, whisker: float = 1.5,
                 text_reduce: str = "max", epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if isinstance(recover, bool) or not isinstance(recover, (int, float)) or not 0.0 <= recover < 1.0:
            raise ValueError(f"recover: expected a fraction in [0, 1), got {recover!r}")
        if isinstance(whisker, bool) or not isinstance(whisker, (int, float)) or not whisker >= 0:
            raise ValueError(f"whisker: expected a float >= 0, got {whisker!r}")
        if text_reduce not in ("max", "mean"):
            raise ValueError(f"text_reduce: expected 'max' or 'mean', got {text_reduce!r}")
        self.recover, self.whisker, self.text_reduce = float(recover), float(whisker), text_reduce

    def select(self, inp: Inputs, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, k] kept token indices, [B, N] bool recovered-by-text mask) for budget k."""
        B, N, _ = inp.x.shape
        dev = inp.x.device
        kr = int(self.recover * k)
        kv = k - kr
        order = torch.sort(inp.scores, dim=1, descending=True, stable=True).indices  # [B, N]
        score_rank = torch.empty_like(order)
        score_rank.scatter_(1, order, torch.arange(N, device=dev).expand(B, N))  # 0 = most important
        visual = score_rank < kv  # [B, N]
        recovered = torch.zeros(B, N, dtype=torch.bool, device=dev)
        if kr:
            rel = text_relevance(inp.x, inp.text, self.text_reduce)  # [B, N]
            thr = masked_iqr_threshold(rel, ~visual, self.whisker)  # [B]
            cand = ~visual & (rel > thr.unsqueeze(1))
            r = rel.masked_fill(~cand, float("-inf"))
            top = torch.sort(r, dim=1, descending=True, stable=True).indices[:, :kr]  # [B, kr]
            recovered.scatter_(1, top, torch.gather(cand, 1, top))
        # priority: visual tier, then recovered tier, then the rest by score; exactly k tokens
        tier = visual.long() * 2 + recovered.long()
        prio = tier * N + (N - 1 - score_rank)  # [B, N], distinct values
        kept = prio.topk(k, dim=1).indices  # [B, k]
        return kept, recovered

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, _ = inp.x.shape
        dev = inp.x.device
        kept, _ = self.select(inp, k)
        kept = kept.sort(dim=1).values
        slot = torch.full((B, N), -1, dtype=torch.long, device=dev)
        slot.scatter_(1, kept, torch.arange(k, device=dev).expand(B, k))
        near = nearest_target(inp.sim, kept)  # [B, N] in [0, k)
        assign = torch.where(slot >= 0, slot, near)
        return Plan(assign=assign, rep=kept)
