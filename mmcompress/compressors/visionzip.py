"""`visionzip`: dominant + contextual tokens (VisionZip, Yang et al., CVPR'25), clean-room from the paper.

VisionZip keeps the tokens that receive the most attention ("dominant" tokens, ranked by `scores`, e.g. the CLS
attention row) and summarises the remaining ones into a few "contextual" tokens:

1. dominant: the k_d = round(dominant * k) tokens with the highest `scores` (ties: lower index first);
2. contextual targets: k_c = k - k_d tokens chosen evenly (centred stride) among the remaining tokens, in order;
3. every other remaining token joins its most similar target (cosine on `metric`, e.g. the keys, else x;
   ties: lower target first); each contextual token is the size-weighted mean of its group.

The paper's default split for a 64-token budget is 54 dominant : 10 contextual, so `dominant` = 54/64 by default.
When dominant < 1 and k >= 2, at least one contextual token is kept (k_d <= k - 1); with k = 1 the single slot is
the top-scored token and the others are dropped (dominant = 0 makes it one global mean instead). With
dominant = 1 the method is pure top-`scores` selection. Cost: O(N log N) for the ranking plus O(N·k_c·d) for the
assignment.

Letters: B batch, N tokens (prefix removed), k budget, d similarity features.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, Inputs, Plan
from mmcompress.compressors.merge_ops import cosine_normalize, gather_tokens
from mmcompress.registry import register


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """[B, N] -> [B, N] indices sorted by descending score, ties broken by the lower index (stable)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def nearest_target(sim: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Most similar target (cosine) of every token.

    Args:
        sim: [B, N, d] features.
        targets: [B, T] target token indices.
        chunk: tokens per chunk (peak memory B * chunk * T floats).

    Returns:
        [B, N] int64 position in [0, T) of the best target (ties: the first).
    """
    u = cosine_normalize(sim.float())  # [B, N, d]
    t = gather_tokens(u, targets)  # [B, T, d]
    out = []
    for i in range(0, u.shape[1], chunk):
        out.append(torch.matmul(u[:, i : i + chunk], t.transpose(1, 2)).argmax(dim=2))  # [B, c]
    return torch.cat(out, dim=1)


@register("visionzip")
class VisionZip(Compressor):
    """Top-`scores` dominant tokens plus contextual tokens merged from the rest by similarity.

    Args:
        keep: budget (see `Compressor`).
        dominant: fraction of the budget given to dominant tokens, in [0, 1] (paper: 54/64).
        epsilon: target error for keep="auto" (the `adaptive` estimator picks the per-sample budget).
    """

    family, modality, needs = "attention", "image/video", ("scores",)

    def __init__(self, keep: int | float | str = 0.5, *, dominant: float = 54 / 64, epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if isinstance(dominant, bool) or not isinstance(dominant, (int, float)) or not 0.0 <= dominant <= 1.0:
            raise ValueError(f"dominant: expected a fraction in [0, 1], got {dominant!r}")
        self.dominant = float(dominant)

    def split(self, k: int) -> tuple[int, int]:
        """(k_d, k_c): dominant and contextual token counts for budget k."""
        kd = round(self.dominant * k)
        if self.dominant < 1.0 and k >= 2:
            kd = min(kd, k - 1)
        return kd, k - kd

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, _ = inp.x.shape
        dev = inp.x.device
        kd, kc = self.split(k)
        order = rank_desc(inp.scores)  # [B, N]
        dom = order[:, :kd]  # [B, kd]
        assign = torch.full((B, N), -1, dtype=torch.long, device=dev)
        assign.scatter_(1, dom, torch.arange(kd, device=dev).expand(B, kd))
        if kc == 0:
            return Plan(assign=assign, rep=dom)
        rest = order[:, kd:].sort(dim=1).values  # [B, R] remaining tokens in original order, R = N - kd >= kc
        R = rest.shape[1]
        pick = ((torch.arange(kc, device=dev, dtype=torch.float64) + 0.5) * R / kc).floor().long().clamp(max=R - 1)
        targets = rest[:, pick]  # [B, kc] evenly spread among the remaining tokens
        near = nearest_target(gather_tokens(inp.sim, rest), pick.expand(B, kc))  # [B, R] in [0, kc)
        # a target always heads its own group (duplicates of it could otherwise tie to an earlier target)
        slot_of_target = torch.full((B, N), -1, dtype=torch.long, device=dev)
        slot_of_target.scatter_(1, targets, torch.arange(kc, device=dev).expand(B, kc))
        own = slot_of_target.gather(1, rest)  # [B, R]
        near = torch.where(own >= 0, own, near)
        assign.scatter_(1, rest, near + kd)
        return Plan(assign=assign, rep=torch.cat([dom, targets], dim=1))
