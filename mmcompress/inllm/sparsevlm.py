"""SparseVLM (Zhang et al., ICML'25, "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference"), v1.5 (the maintained release's default mode; SparseVLM+ / v2.0 is a separate, opt-in mode there).

Rule:

1. Text raters, chosen once from the LLM's input embeddings: with V the image tokens and T the tokens after the last
   image token, `m = mean over V of softmax over T of (V T^T)`; the raters are the text tokens with m > mean(m).
   When no token is above the mean (every m equal: a single token after the image, as on a chat template that puts
   the question before the image), every token after the image rates; the release then has no rater, its relevance
   is the mean over an empty set (NaN) and its top-k picks arbitrary tokens (docs/fidelity_inllm.md).
2. At the release's layers l = 2, 6, 15 (the output of layer l is pruned, so layers l + 1 .. see fewer tokens):
   each image token's relevance is layer l's attention from the raters (softmax over the causal keys, mean over
   heads, then over the raters); the `min(count_s, n_cur - 1)` most relevant image tokens are kept (rank-adaptive
   counts per layer; the release's table below).
3. Token recycling: of the pruned image tokens, the `int(0.3 n_pruned) + 1` most relevant are clustered by
   density-peaks kNN clustering into `int(n / 10) + 1` tokens (each the mean of its members, weights
   1 / (count + 1e-6) as released) placed right after the kept image tokens; later layers may prune them too.
   They take freed image columns after the last kept one (when too few are free, the kept tokens are moved up the
   image run first: positions are renumbered anyway, so the LLM sees the release's order; the stage's
   `last_pruned` then lists freed columns, not the original tokens).
4. Positions are renumbered 0..L'-1 after each stage (as the release truncates `position_ids`).

Per-layer image-token counts of the release (`score.py`, v1.5), by its budget (the AVERAGE image tokens over the
LLM's layers, as its own log "Equal Tokens" counts them):

    192: (300, 200, 110)   128: (303, 110, 36)   96: (238, 48, 26)   64: (66, 30, 17)

`keep` through `mmc.apply(model, "sparsevlm", keep=...)`: one of those ints uses its row (absolute counts, as the
release does); a fraction f scales the 192 row's shape (relative to 576 tokens) by the factor s whose average share
over the layers, `(l1 + (l2 - l1) r1 + (l3 - l2) r2 + (N - l3) r3) / N` with r = min(1, s row / 576), equals f
(our conversion, for budgets the release has no row for). Layers on other depths: 2/32, 6/32, 15/32 of the depth.

Release: Gumpest/SparseVLMs, `LlamaDynamicvitModel.forward` in llava/model/language_model/modelling_sparse_llama.py,
`attn_postprocess_topk` in score.py and `cluster_and_merge` in utils.py (see docs/fidelity_inllm.md).

Letters: B batch, L tokens entering a prune point, R raters, H heads, N image tokens, C channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mmcompress.inllm.pdrop import pdrop_average
from mmcompress.inllm.stage import PruneContext

__all__ = ["SparseVLMRule", "SPARSEVLM_COUNTS", "sparsevlm_default_layers", "sparsevlm_counts_for", "dpc_knn_merge",
           "text_raters"]

SPARSEVLM_COUNTS: dict[int, tuple[int, int, int]] = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26),
                                                    64: (66, 30, 17)}
RELEASE_LAYERS = (2, 6, 15)  # on 32 layers


def sparsevlm_default_layers(n_layers: int) -> tuple[int, ...]:
    """The release's (2, 6, 15) on 32 layers; the same fractions of other depths (each < n_layers - 1, distinct)."""
    if n_layers == 32:
        return RELEASE_LAYERS
    return tuple(sorted({min(n_layers - 2, (l * n_layers) // 32) for l in RELEASE_LAYERS}))


def sparsevlm_counts_for(keep: float, n: int, layers: Sequence[int], n_layers: int) -> tuple[int, ...]:
    """Per-layer image-token counts for an average share `keep` (the 192 row's shape, scaled; see the module doc)."""
    shape = [c / 576 for c in SPARSEVLM_COUNTS[192]][: len(layers)]
    shape += [shape[-1]] * (len(layers) - len(shape))

    def avg(s: float) -> float:
        return pdrop_average(layers, [min(1.0, s * r) for r in shape], n_layers)

    lo_avg = avg(0.0)
    if not lo_avg - 1e-12 <= keep <= 1.0:
        raise ValueError(f"keep: sparsevlm with prune layers {list(layers)} of {n_layers} keeps on average between "
                         f"{lo_avg:.4f} and 1, got {keep!r}")
    lo, hi = 0.0, 1.0 / min(shape)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if avg(mid) < keep else (lo, mid)
    s = (lo + hi) / 2
    return tuple(int(n * min(1.0, s * r)) for r in shape)


def text_raters(h_in: torch.Tensor, img: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[L0] bool raters of one sample: the tokens after the last image token with above-mean relevance (all of
    them when none is above the mean, i.e. when they all tie).

    Args:
        h_in: [L0, C] the LLM's input embeddings. img, valid: [L0] bool image / non-padding columns.
    """
    cols = img.nonzero().squeeze(1)
    out = torch.zeros_like(img)
    if cols.numel() == 0:
        return out
    after = valid.clone()
    after[: int(cols[-1]) + 1] = False
    tcols = after.nonzero().squeeze(1)
    if tcols.numel() == 0:
        return out
    m = (h_in[cols] @ h_in[tcols].T).softmax(1).mean(0)  # [T]
    above = m > m.mean()
    out[tcols[above] if bool(above.any()) else tcols] = True
    return out


def dpc_knn_merge(x: torch.Tensor, c: int) -> torch.Tensor:
    """[c, C] tokens merged from x [N, C] by density-peaks clustering with c nearest neighbours.

    Density of a token: exp(-mean squared distance to its c nearest tokens, itself included), distances
    ||xi - xj|| / sqrt(C); its peak distance: the distance to the nearest denser token (the largest distance for
    the densest); centres: the c largest density x peak distance (in that order); every token joins its nearest
    centre; a cluster is its members' sum times 1 / (count + 1e-6). The release adds uniform noise of 1e-6 to the
    densities to break ties (e.g. the two tokens of the closest pair always tie when c = 2); here, of two equal
    densities, the lower index counts as the denser.
    """
    N, C = x.shape
    d = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / (C ** 0.5)  # [N, N]
    knn = d.topk(c, dim=-1, largest=False).values
    density = (-(knn ** 2).mean(-1)).exp()  # [N]
    idx = torch.arange(N, device=x.device)
    tie = (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])  # equal: the lower index is denser
    denser = ((density[None, :] > density[:, None]) | tie).to(x.dtype)  # [i, j]: j denser than i
    dmax = d.max()
    delta = (d * denser + dmax * (1 - denser)).min(-1).values
    centres = (delta * density).topk(c).indices  # [c]
    assign = d[centres].argmin(0)  # [N] nearest centre
    assign[centres] = torch.arange(c, device=x.device)
    w = 1.0 / (torch.zeros(c, 1, dtype=x.dtype, device=x.device).index_add_(
        0, assign, torch.ones(N, 1, dtype=x.dtype, device=x.device)) + 1e-6)  # [c, 1]
    return torch.zeros(c, C, dtype=x.dtype, device=x.device).index_add_(0, assign, x * w[assign])


class SparseVLMRule:
    """SparseVLM v1.5 on the shared in-LLM stage.

    Args:
        layers: the layers whose OUTPUT is pruned (release: 2, 6, 15); the prune points are layers + 1.
        counts: image tokens kept after each of them, or None to derive them per sample from `keep`.
        keep: average share of image tokens over the layers (used when counts is None).
        n_layers: decoder depth (for `keep`).
        recycle: merge the most relevant pruned tokens back (release: True).
    """

    name = "sparsevlm"
    compact_positions = True
    wants_input = True

    def __init__(self, layers: Sequence[int], counts: Sequence[int] | None = None, keep: float | None = None,
                 n_layers: int = 32, recycle: bool = True):
        self.layers = tuple(layers)
        self.points = tuple(p + 1 for p in self.layers)
        if counts is not None and len(counts) != len(self.layers):
            raise ValueError(f"sparsevlm_layers: expected one count per layer, got layers {list(self.layers)} and "
                             f"counts {list(counts)}")
        self.counts = None if counts is None else tuple(int(c) for c in counts)
        self.keep, self.n_layers, self.recycle = keep, n_layers, bool(recycle)
        self._raters: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return True

    def score_layer(self, point: int) -> int:
        return point - 1

    def _count(self, stage: int, n0: int) -> int:
        if self.counts is not None:
            return self.counts[stage]
        return sparsevlm_counts_for(float(self.keep), n0, self.layers, self.n_layers)[stage]

    def drop(self, ctx: PruneContext) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx.h_in is None:
            raise RuntimeError("sparsevlm: the LLM input embeddings were not captured")
        if ctx.stage == 0:  # raters from the input embeddings, in original columns
            self._raters = torch.stack([text_raters(ctx.h_in[b], ctx.image0[b] & ctx.valid0[b], ctx.valid0[b])
                                        for b in range(ctx.h.shape[0])])
        raters = self._raters.to(ctx.h.device).gather(1, ctx.positions)  # [B, L] in the current layout
        q, k = ctx.qk()
        attn = ctx.owner._attn(ctx.point)
        scale = getattr(attn, "scaling", None) or 1.0 / math.sqrt(q.shape[-1])
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [B, H, L, D]
        h = ctx.h.clone()
        drop = torch.zeros_like(ctx.img)
        ar = torch.arange(ctx.h.shape[1], device=ctx.h.device)
        for b in range(ctx.h.shape[0]):
            cols = ctx.img[b].nonzero().squeeze(1)  # current image columns, increasing
            rows = raters[b].nonzero().squeeze(1)
            v = int(cols.numel())
            if v == 0 or rows.numel() == 0:
                continue
            logits = q[b][:, rows] @ k[b].transpose(-1, -2) * scale  # [H, R, L]
            allowed = ctx.valid[b][None, :] & (ar[None, :] <= rows[:, None])  # causal, live keys
            logits = logits.masked_fill(~allowed[None], float("-inf"))
            rel = logits.softmax(-1).mean(0)[:, cols].mean(0)  # [v] relevance of each image token
            keep_n = min(self._count(ctx.stage, int(ctx.n_img0[b])), v - 1)
            kept = torch.zeros(v, dtype=torch.bool, device=rel.device)
            kept[rel.topk(max(keep_n, 0)).indices] = True
            pruned = (~kept).nonzero().squeeze(1)
            if not self.recycle or pruned.numel() == 0:
                drop[b, cols[pruned]] = True
                continue
            n_m = int(pruned.numel() * 0.3) + 1
            pick = rel[pruned].topk(n_m).indices  # most relevant pruned tokens, in topk order
            c = int(n_m / 10) + 1
            merged = dpc_knn_merge(ctx.h[b, cols[pruned[pick]]], c)  # [c, C]
            last_kept = int(kept.nonzero().max()) if bool(kept.any()) else -1
            free_after = pruned[pruned > last_kept]
            if free_after.numel() >= c:  # the recycled tokens go to freed columns after every kept one
                slots = cols[free_after[:c]]
                h[b, slots] = merged
                drop[b, cols[pruned]] = True
                drop[b, slots] = False
            else:  # repack the run: kept tokens in order, then the recycled ones, then freed columns
                new = torch.cat([h[b, cols[kept]], merged])
                h[b, cols[: new.shape[0]]] = new
                drop[b, cols[new.shape[0]:]] = True
        return drop, h
