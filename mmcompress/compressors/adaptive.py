"""`adaptive`: cut one Ward merge hierarchy per sample at a target reconstruction error epsilon (keep="auto") or
at a fixed budget; the hierarchy, the `estimate_keep` estimator and the learned budget head live in
`mmcompress.compressors.budget` (re-exported here).

Outputs are size-weighted slot means; each slot's representative is its member closest to that mean.

Letters: B batch, N tokens (prefix removed), k budget, C channels.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from mmcompress.compressors.base import Compressor, Inputs, Plan
from mmcompress.compressors.budget import (
    HEAD_PATH,
    BudgetHead,
    Hierarchy,
    build_hierarchy,
    cut_hierarchy,
    estimate_keep,
    load_head,
    relative_error,
    token_features,
)
from mmcompress.compressors.merge_ops import segment_mean
from mmcompress.registry import register
from mmcompress.types import CompressOutput

__all__ = ["Hierarchy", "build_hierarchy", "cut_hierarchy", "estimate_keep", "relative_error", "BudgetHead",
           "token_features", "load_head", "HEAD_PATH", "Adaptive", "representatives"]


# ---- the compressor ----------------------------------------------------------------------------------------------
@register("adaptive")
class Adaptive(Compressor):
    """Cut one Ward merge hierarchy per sample: at the error target epsilon (keep="auto") or at a fixed budget.

    Outputs are size-weighted slot means; with keep="auto" samples get different budgets (ragged, `mask` set) and
    each meets `epsilon`. With `head=True`, keep="auto" budgets come from the learned head instead (one cheap
    forward, no hierarchy search; the meet rate is what `scripts/train_budget_head.py` reports).

    Args:
        keep: budget (see `Compressor`).
        epsilon: target relative reconstruction error in (0, 1) for keep="auto".
        head: use the learned budget head for keep="auto".
        head_path: optional path of head weights (default: the committed asset).
        chunk: rows per block of the partner search.
        search_dim: search partners in this many principal directions (faster for wide tokens, approximate
            hierarchy, exact errors); None: exact Ward.
    """

    family, modality = "budget", "any"

    def __init__(self, keep: int | float | str = "auto", *, epsilon: float = 0.1, head: bool = False,
                 head_path: str | Path | None = None, chunk: int = 1024, search_dim: int | None = None):
        super().__init__(keep, epsilon=epsilon)
        if not isinstance(head, bool):
            raise TypeError(f"head: expected a bool, got {type(head).__name__}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
        if search_dim is not None and (isinstance(search_dim, bool) or not isinstance(search_dim, int)
                                       or search_dim < 1):
            raise ValueError(f"search_dim: expected None or an int >= 1, got {search_dim!r}")
        self.head, self.head_path, self.chunk, self.search_dim = head, head_path, chunk, search_dim
        self._local = threading.local()  # hierarchies built by auto_keep, reused by plan within ONE call

    def __call__(self, x: torch.Tensor, **kwargs) -> CompressOutput:
        self._local.stash = []
        try:
            return super().__call__(x, **kwargs)
        finally:
            self._local.stash = []

    def auto_keep(self, inp: Inputs) -> torch.Tensor:
        if self.head:
            return load_head(self.head_path).predict_keep(inp.x, self.epsilon, inp.size)
        B = inp.x.shape[0]
        ks = torch.empty(B, dtype=torch.long)
        stash = getattr(self._local, "stash", None)
        for b in range(B):
            w = None if inp.size is None else inp.size[b]
            h = build_hierarchy(inp.x[b], w, epsilon=self.epsilon, chunk=self.chunk, search_dim=self.search_dim)
            ks[b] = h.keep_for(self.epsilon)
            if stash is not None:
                stash.append((inp.x[b], w, h))
        return ks.to(inp.x.device)

    def _hierarchy(self, x: torch.Tensor, w: torch.Tensor | None, k: int) -> Hierarchy:
        for sx, sw, h in getattr(self._local, "stash", None) or []:
            same_w = (sw is None and w is None) or (sw is not None and w is not None and torch.equal(sw, w))
            if same_w and sx.shape == x.shape and torch.equal(sx, x) and h.left.numel() >= h.n - k:
                return h
        return build_hierarchy(x, w, min_clusters=k, chunk=self.chunk, search_dim=self.search_dim)

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, C = inp.x.shape
        dev = inp.x.device
        assign = torch.empty(B, N, dtype=torch.long, device=dev)
        for b in range(B):
            w = None if inp.size is None else inp.size[b]
            assign[b] = cut_hierarchy(self._hierarchy(inp.x[b], w, k), k)
        return Plan(assign=assign, rep=representatives(inp.x, inp.size, assign, k))


def representatives(x: torch.Tensor, size: torch.Tensor | None, assign: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] member of each slot closest to the slot's size-weighted mean (ties: lowest index)."""
    B, N, C = x.shape
    xf = x.float()
    mean = segment_mean(xf, None if size is None else size.float(), assign, k)  # [B, k, C]
    d = (xf - mean.gather(1, assign.unsqueeze(-1).expand(B, N, C))).pow(2).sum(-1)  # [B, N]
    best = torch.full((B, k), float("inf"), device=x.device).scatter_reduce(1, assign, d, "amin")
    is_best = d <= best.gather(1, assign)
    idx = torch.arange(N, device=x.device).expand(B, N)
    cand = torch.where(is_best, idx, N)
    return torch.full((B, k), N, dtype=torch.long, device=x.device).scatter_reduce(1, assign, cand, "amin")
