"""`visionzip`: dominant + contextual tokens (VisionZip, Yang et al., CVPR'25), as its authors' release computes them.

VisionZip keeps the tokens that receive the most attention ("dominant" tokens, ranked by `scores`, the CLS attention
row of the feature layer) and summarises the remaining ones into a few "contextual" tokens. By default this module
computes what the release (dvlab-research/VisionZip, `CLIPVisionTower_VisionZip.forward`) computes on the same
inputs (docs/fidelity.md lists the agreement measured and every difference):

1. Budget: the prefix (the CLS token) counts in `keep` as one of the dominant tokens (`prefix_in_budget`): of
   k_tot = keep tokens out, k_dom = round(dominant * k_tot) are dominant (prefix included: k_d = k_dom - P patches)
   and k_c = k_tot - k_dom are contextual. The paper's 64 / 128 / 192 budgets split 54:10 / 108:20 / 162:30, so
   `dominant` = 54/64 by default; `contextual=` sets k_c directly instead.
2. Dominant: the k_d tokens with the highest `scores` (ties: lower index first).
3. Contextual targets: among the R remaining tokens in source order, positions 0, s, 2s, ... (the first k_c of
   them) with stride s = max(1, R // k_c).
4. Every other remaining token joins its most similar target (cosine on `metric`, the head-averaged keys of the
   scoring layer through `apply`, else x; ties: the first target). A contextual token is its target PLUS the
   (size-weighted) mean of the tokens that joined it (the target alone when none did). So outputs are not means of
   their members (`exact_mean` False); `size` is still the sum of member sizes.
5. Order (`CompressOutput.order`): prefix and dominant tokens in source order, then the contextual ones in target
   order, as the release hands them to the LLM. `x` itself is in source order, as for every compressor.

When dominant < 1 and k >= 2, at least one contextual token is kept; with k = 1 the single slot is the top-scored
token. Our former behaviour stays reachable through options: ``targets="centred"`` (targets at floor((i + 0.5) R /
k_c)), ``merge="mean"`` (each contextual token the size-weighted mean of its whole group), ``order="source"`` and
``prefix_in_budget=False`` (the prefix on top of keep). Cost: O(N log N) ranking plus O(N·k_c·d) assignment.

Letters: B batch, N tokens (prefix removed), P prefix tokens, k budget (prefix removed), d similarity features.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.compressors.merge_ops import accum_dtype, cosine_normalize, gather_tokens, segment_sum
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


def stride_targets(R: int, kc: int, how: str, device: torch.device) -> torch.Tensor:
    """[kc] positions among R remaining tokens: the release's stride (0, s, 2s, ..., s = max(1, R // kc)) or centred
    (floor((i + 0.5) * R / kc)); 1 <= kc <= R."""
    if how == "stride":
        return torch.arange(0, R, max(1, R // kc), device=device)[:kc]
    return ((torch.arange(kc, device=device, dtype=torch.float64) + 0.5) * R / kc).floor().long().clamp(max=R - 1)


@register("visionzip")
class VisionZip(Compressor):
    """Top-`scores` dominant tokens plus contextual tokens (target + mean of the similar rest), as released.

    Args:
        keep: budget (see `Compressor`); the prefix (CLS) counts in it unless `prefix_in_budget=False`.
        dominant: fraction of the budget (prefix included) given to dominant tokens, in [0, 1] (paper: 54/64).
        contextual: number of contextual tokens (overrides `dominant`; the release's `contextual` argument).
        targets: "stride" (release: every (R // k_c)-th remaining token from the first) or "centred" (former).
        merge: "target_plus_mean" (release: target + mean of the tokens that joined it) or "mean" (former: the
            size-weighted mean of the whole group, target included).
        order: "release" (dominant tokens, then contextual ones: `CompressOutput.order`) or "source".
        prefix_in_budget: True (release: the CLS is one of the dominant tokens) or False (prefix on top of keep).
        epsilon: target error for keep="auto" (the `adaptive` estimator picks the per-sample budget).
    """

    family, modality, needs = "attention", "image/video", ("scores",)
    exact_mean = False
    prefix_in_budget = True
    #: the release ranks by the CLS row of the feature layer (heads summed: the mean's ranking) and compares the
    #: remaining tokens by that layer's keys averaged over heads; its CLS is one of the dominant tokens.
    encoder_needs = EncoderNeeds(layer="feature", heads="mean", metric="keys_mean", cls_prefix=True)

    def __init__(self, keep: int | float | str = 0.5, *, dominant: float = 54 / 64, contextual: int | None = None,
                 targets: str = "stride", merge: str = "target_plus_mean", order: str = "release",
                 prefix_in_budget: bool = True, epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if isinstance(dominant, bool) or not isinstance(dominant, (int, float)) or not 0.0 <= dominant <= 1.0:
            raise ValueError(f"dominant: expected a fraction in [0, 1], got {dominant!r}")
        if contextual is not None and (isinstance(contextual, bool) or not isinstance(contextual, int)
                                       or contextual < 0):
            raise ValueError(f"contextual: expected None or an int >= 0, got {contextual!r}")
        for nm, v, ok in (("targets", targets, ("stride", "centred")), ("merge", merge, ("target_plus_mean", "mean")),
                          ("order", order, ("release", "source"))):
            if v not in ok:
                raise ValueError(f"{nm}: expected one of {ok}, got {v!r}")
        if not isinstance(prefix_in_budget, bool):
            raise TypeError(f"prefix_in_budget: expected a bool, got {type(prefix_in_budget).__name__}")
        self.dominant, self.contextual = float(dominant), contextual
        self.targets, self.merge, self.order = targets, merge, order
        self.prefix_in_budget = prefix_in_budget

    def split(self, k: int, P: int = 0) -> tuple[int, int]:
        """(k_d, k_c): dominant (prefix excluded) and contextual token counts for k non-prefix tokens."""
        P = P if self.prefix_in_budget else 0
        if self.contextual is not None:
            kc = min(self.contextual, k - 1) if k >= 2 else 0
            return k - kc, kc
        kd = max(0, round(self.dominant * (k + P)) - P)
        if self.dominant < 1.0 and k >= 2:
            kd = min(kd, k - 1)
        return min(kd, k), k - min(kd, k)

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, C = inp.x.shape
        dev = inp.x.device
        P = 0 if inp.head is None else inp.head.shape[1]
        kd, kc = self.split(k, P)
        order = rank_desc(inp.scores)  # [B, N]
        dom = order[:, :kd].sort(dim=1).values  # [B, kd] in source order
        assign = torch.full((B, N), -1, dtype=torch.long, device=dev)
        assign.scatter_(1, dom, torch.arange(kd, device=dev).expand(B, kd))
        if kc == 0:
            return Plan(assign=assign, rep=dom)
        rest = order[:, kd:].sort(dim=1).values  # [B, R] remaining tokens in source order, R = N - kd > kc
        R = rest.shape[1]
        pick = stride_targets(R, kc, self.targets, dev)  # [kc]
        targets = rest[:, pick]  # [B, kc]
        near = nearest_target(gather_tokens(inp.sim, rest), pick.expand(B, kc))  # [B, R] in [0, kc)
        is_target = torch.zeros(R, dtype=torch.bool, device=dev)
        is_target[pick] = True
        # a target heads its own group (a duplicate of it could otherwise tie to an earlier target)
        near = torch.where(is_target, torch.full_like(near, -1), near)
        near[:, pick] = torch.arange(kc, device=dev).expand(B, kc)
        assign.scatter_(1, rest, near + kd)
        seq = None if self.order == "source" else torch.arange(k, device=dev).expand(B, k)
        if self.merge == "mean":
            return Plan(assign=assign, rep=torch.cat([dom, targets], dim=1), order=seq)
        # release: dominant tokens as they are; contextual = target + mean of the others that joined it
        acc = accum_dtype(inp.x.dtype)
        xr = gather_tokens(inp.x, rest).to(acc)  # [B, R, C]
        w = gather_tokens(inp.sizes().unsqueeze(-1), rest).squeeze(-1).to(acc)  # [B, R]
        others = torch.where(is_target, torch.full_like(near, -1), near)  # [B, R] slot of each non-target, -1
        num = segment_sum(xr * w.unsqueeze(-1), others, kc)  # [B, kc, C]
        den = segment_sum(w, others, kc)  # [B, kc]
        mean = num / den.clamp(min=torch.finfo(acc).tiny).unsqueeze(-1)  # 0 where no token joined
        ctx = xr[:, pick] + mean  # [B, kc, C]
        out = torch.cat([gather_tokens(inp.x, dom).to(acc), ctx], dim=1).to(inp.x.dtype)  # [B, k, C]
        return Plan(assign=assign, rep=torch.cat([dom, targets], dim=1), x=out, order=seq)
