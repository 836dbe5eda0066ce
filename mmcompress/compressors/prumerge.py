"""`prumerge` and `prumerge+` (Shang et al., LLaVA-PruMerge), as the authors' release computes them.

By default this module computes what the release (42Shawn/LLaVA-PruMerge, `clip_encoder.py`,
`CLIPVisionTower.token_prune_merge_advanced` and `..._plus`) computes on the same inputs; docs/fidelity.md lists the
agreement measured and every difference. Given `scores` (through `apply`: the CLS row of the LAST vision layer's
attention computed as ONE head over all channels, softmax(q . k / sqrt(C)), CLS column dropped) and `metric` (that
layer's keys, all channels):

* Budget. keep="auto": K = int(N * (n_out / N)) kept tokens per sample, n_out the number of scores above
  Q3 + 1.5 * (Q3 - Q1) (quartiles by linear interpolation, in float64 as numpy's `percentile`); the output has K + 1
  tokens. A fixed keep k gives K = k - 1 kept tokens plus the summary token (k outputs).
* Kept tokens: the K highest scores (ties: lower index first), in descending score order.
* Merge. Each kept token i becomes x_i + sum_j s_j x_j over its `knn` (32) nearest tokens j by cosine of `metric`,
  searched among ALL other tokens (other kept tokens included; neighbourhoods overlap), weighted by the raw,
  unnormalised scores s_j. One extra token, the score-weighted sum of all pruned tokens, follows (K + 1 outputs).
  So outputs are not means of their members (`exact_mean` False). Provenance: a kept token's slot holds itself,
  every pruned token is assigned to the summary slot (its representative: the first pruned token); `size` counts
  those members. With `size=` every weight s_j becomes s_j * size_j.
* Order (`CompressOutput.order`): kept tokens by descending score, then the summary token, as the release hands
  them to the LLM (`x` itself stays in source order).

`prumerge+` adds spatially uniform samples: keep="auto" takes the release's raster stride over the patch indices,
positions 0, t, 2t, ... < N - 1 with t = int(int(1 / r) / 3), r = n_out / N, those not already kept (per sample), after
the K top tokens, then the summary token: K + U + 1 outputs. A fixed keep k (not defined by the release, whose
fixed-ratio path duplicates tokens) takes k_u = round(uniform * (k - 1)) raster positions 0, t, 2t, ... with
t = max(1, (N - 1) // k_u) and the k - 1 - k_u top-scored tokens not among them.

Release defects NOT reproduced (docs/fidelity.md): its IQR statistics pool every sample of a batch (`.flatten()`)
and PruMerge+ crashes at batch 2 (its uniform list is built once per batch); here both are per sample. Its stride
t = 0 (K > N / 3) crashes; here t >= 1. A neighbourhood needs 32 other tokens in the release; here it takes at most
N - 1. Former behaviours stay reachable: ``merge="nearest"`` (each pruned token joins its nearest kept token and
every kept token is the score-weighted mean of its group; ``knn=None`` there means no neighbourhood limit),
``order="source"``, ``lattice="2d"`` (prumerge+: a centred 2-D lattice over `grid` for k_u of the budget).

Cost: O(N log N) selection, O(K·N·d) neighbour search, O(K·N·C) sums (one dense matmul).
Letters: B batch, N tokens (prefix removed), K kept, k budget, d similarity features, C channels.
"""

from __future__ import annotations

import math

import torch

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.compressors.merge_ops import accum_dtype, cosine_normalize, gather_tokens, segment_sum
from mmcompress.registry import register


def iqr_outlier_count(scores: torch.Tensor, whisker: float = 1.5) -> torch.Tensor:
    """[B, N] scores -> [B] int64 number of tokens with score > Q3 + whisker * IQR, per sample (may be 0).

    Quartiles by linear interpolation in float64 (numpy's `percentile`, as the release computes them)."""
    s = scores.double()
    q = torch.quantile(s, torch.tensor([0.25, 0.75], device=s.device, dtype=torch.float64), dim=1)  # [2, B]
    thr = q[1] + whisker * (q[1] - q[0])  # [B]
    return (s > thr.unsqueeze(1)).sum(1)


def release_keep_count(n_out: torch.Tensor, N: int) -> torch.Tensor:
    """[B] outlier counts -> [B] K = int(N * (n_out / N)) in float64, the release's top-k size (may be n_out - 1)."""
    return torch.floor(N * (n_out.double() / N)).long()


def lattice_indices(n: int, k: int, grid: tuple[int, ...] | None, device: torch.device) -> torch.Tensor:
    """[k] int64 distinct token indices spread evenly over a 2-D grid (or over the sequence), 1 <= k <= n
    (the former `lattice="2d"` of prumerge+)."""
    if grid is not None and len(grid) == 2:
        H, W = grid
        h = max(1, min(H, round(math.sqrt(k * H / W))))
        w = min(W, math.ceil(k / h))
        while h * w < k:  # enlarge the lattice until it has k points (k <= H * W)
            if h < H:
                h += 1
            w = min(W, math.ceil(k / h))
        rows = ((torch.arange(h, device=device, dtype=torch.float64) + 0.5) * H / h).floor().long()
        cols = ((torch.arange(w, device=device, dtype=torch.float64) + 0.5) * W / w).floor().long()
        pts = (rows[:, None] * W + cols[None, :]).reshape(-1)  # [h*w] raster order
        pick = ((torch.arange(k, device=device, dtype=torch.float64) + 0.5) * pts.numel() / k).floor().long()
        return pts[pick]
    return ((torch.arange(k, device=device, dtype=torch.float64) + 0.5) * n / k).floor().long().clamp(max=n - 1)


def neighbour_merge_plan(inp: Inputs, kept: torch.Tensor, knn: int) -> Plan:
    """The release's merge: kept tokens `kept` [B, K] (in output order, K <= N - 1) plus one summary token.

    Output slot i < K: x_i + sum over the knn most similar other tokens j (cosine on `inp.sim`) of w_j x_j; slot K:
    sum over the pruned tokens of w_j x_j; w = scores * size (raw, not normalised). Slots keep `kept`'s order, then
    the summary (`Plan.order`).
    """
    B, N, C = inp.x.shape
    K = kept.shape[1]
    dev = inp.x.device
    acc = accum_dtype(inp.x.dtype)
    slot = torch.full((B, N), K, dtype=torch.long, device=dev)  # pruned tokens -> the summary slot K
    slot.scatter_(1, kept, torch.arange(K, device=dev).expand(B, K))
    w = inp.scores.to(acc) * inp.sizes().to(acc)  # [B, N]
    xf = inp.x.to(acc)
    pruned = (slot == K).to(acc)  # [B, N]
    kk = min(knn, N - 1)
    if K:
        u = cosine_normalize(inp.sim.float())  # [B, N, d]
        sim = torch.matmul(gather_tokens(u, kept), u.transpose(1, 2))  # [B, K, N]
        sim.scatter_(2, kept.unsqueeze(2), float("-inf"))  # a token is not its own neighbour
        nb = sim.topk(kk, dim=2).indices  # [B, K, kk]
        wn = w.gather(1, nb.reshape(B, -1)).view(*nb.shape)  # [B, K, kk]
    # every output is one row of a [K + 1, N] weight matrix (neighbours' weights and 1 for the kept token itself;
    # the summary row: the pruned tokens' weights), applied in one matmul: on CPU 1.2-4x faster than gathering and
    # weighting the K * knn neighbour rows (N = 576-2880, C = 384-1024, K = 64-300), on par at N = 2880, K = 64
    wm = torch.zeros(B, K + 1, N, dtype=acc, device=dev)
    if K:
        wm[:, :K].scatter_(2, nb, wn).scatter_(2, kept.unsqueeze(2), 1.0)
    wm[:, K] = w * pruned
    out = torch.matmul(wm, xf)  # [B, K + 1, C]
    first_pruned = (slot == K).to(torch.int8).argmax(1, keepdim=True)  # [B, 1]
    rep = torch.cat([kept, first_pruned], dim=1)  # [B, K + 1]
    seq = torch.arange(K + 1, device=dev).expand(B, K + 1)
    return Plan(assign=slot, rep=rep, x=out.to(inp.x.dtype), order=seq)


def nearest_merge_plan(inp: Inputs, kept: torch.Tensor, knn: int | None, chunk: int = 2048) -> Plan:
    """The former merge (`merge="nearest"`): every pruned token joins its most similar kept token (within each kept
    token's `knn` nearest pruned tokens when knn is set; unreached ones are dropped); each slot is the
    (scores * size)-weighted mean of its members (size-weighted when those weights sum to 0)."""
    B, N, C = inp.x.shape
    k = kept.shape[1]
    dev = inp.x.device
    kept = kept.sort(dim=1).values  # lower index first on ties
    slot = torch.full((B, N), -1, dtype=torch.long, device=dev)
    slot.scatter_(1, kept, torch.arange(k, device=dev).expand(B, k))
    u = cosine_normalize(inp.sim.float())  # [B, N, d]
    uk = gather_tokens(u, kept)  # [B, k, d]
    if knn is None:
        near = torch.cat([torch.matmul(u[:, i : i + chunk], uk.transpose(1, 2)).argmax(2)  # [B, c]
                          for i in range(0, N, chunk)], dim=1)
    else:
        sim = torch.matmul(u, uk.transpose(1, 2))  # [B, N, k]
        sim = sim.masked_fill((slot >= 0).unsqueeze(2), float("-inf"))  # kept tokens are not neighbours
        top = sim.topk(min(knn, N - k), dim=1).indices  # [B, kk, k]
        reach = torch.zeros(B, N, k, dtype=torch.bool, device=dev)
        reach.scatter_(1, top, True)
        reach &= torch.isfinite(sim)
        best = sim.masked_fill(~reach, float("-inf"))
        near = torch.where(reach.any(2), best.argmax(2), -1)  # [B, N]
    assign = torch.where(slot >= 0, slot, near)  # [B, N]
    acc = accum_dtype(inp.x.dtype)
    size = inp.sizes().to(acc)
    w = size * inp.scores.to(acc).clamp(min=0)  # [B, N]
    xf = inp.x.to(acc)
    num = segment_sum(xf * w.unsqueeze(-1), assign, k)  # [B, k, C]
    den = segment_sum(w, assign, k)  # [B, k]
    mean = segment_sum(xf * size.unsqueeze(-1), assign, k) / segment_sum(size, assign, k).unsqueeze(-1)
    ok = (den > 0).unsqueeze(-1)
    out = torch.where(ok, num / den.clamp(min=1e-30).unsqueeze(-1), mean)
    return Plan(assign=assign, rep=kept, x=out.to(inp.x.dtype))


def top_desc(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N] -> [B, k] indices of the k highest scores, descending (ties: lower index first)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


class _PruMergeBase(Compressor):
    family, modality, needs = "attention, adaptive", "image", ("scores",)
    exact_mean = False
    #: the release scores with the last layer's CLS row as one all-channel head and compares tokens by its keys
    encoder_needs = EncoderNeeds(layer="last", heads="single", metric="keys")

    def __init__(self, keep: int | float | str = 0.5, *, knn: int | None = 32, whisker: float = 1.5,
                 merge: str = "neighbours", order: str = "release", epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if knn is not None and (isinstance(knn, bool) or not isinstance(knn, int) or knn < 1):
            raise ValueError(f"knn: expected None or an int >= 1, got {knn!r}")
        if isinstance(whisker, bool) or not isinstance(whisker, (int, float)) or not whisker >= 0:
            raise ValueError(f"whisker: expected a float >= 0, got {whisker!r}")
        if merge not in ("neighbours", "nearest"):
            raise ValueError(f"merge: expected 'neighbours' (release) or 'nearest' (former), got {merge!r}")
        if merge == "neighbours" and knn is None:
            raise ValueError("knn: merge='neighbours' needs an int neighbourhood size (release: 32)")
        if order not in ("release", "source"):
            raise ValueError(f"order: expected 'release' or 'source', got {order!r}")
        self.knn, self.whisker, self.merge, self.order = knn, float(whisker), merge, order

    def _merge(self, inp: Inputs, kept: torch.Tensor) -> Plan:
        """Plan for kept tokens `kept` [B, K] in release order (K = k - 1 with the summary, k with merge="nearest")."""
        if self.merge == "nearest":
            return nearest_merge_plan(inp, kept, self.knn)
        plan = neighbour_merge_plan(inp, kept, self.knn)
        if self.order == "source":
            plan.order = None
        return plan

    def _n_kept(self, k: int) -> int:
        """Top/kept tokens for budget k: k - 1 beside the summary token (release), k with merge="nearest"."""
        return k if self.merge == "nearest" else k - 1


@register("prumerge")
class PruMerge(_PruMergeBase):
    """Keep the attention outliers (keep="auto") or the top k - 1 by `scores`; each becomes itself plus the
    score-weighted sum of its nearest tokens; one summary token of the pruned ones follows (release default).

    Args:
        keep: budget (see `Compressor`); "auto": the IQR outlier count K of `scores`, K + 1 outputs.
        knn: neighbourhood size of the merge (release: 32); with merge="nearest", None means unlimited.
        whisker: IQR multiplier of the outlier rule (1.5 in the release).
        merge: "neighbours" (release: K + 1 outputs, overlapping unnormalised neighbour sums) or "nearest" (former:
            each pruned token joins its nearest kept token, score-weighted group means, K outputs).
        order: "release" (descending score, then the summary: `CompressOutput.order`) or "source".
        epsilon: unused by this method (kept for a uniform signature).
    """

    def auto_keep(self, inp: Inputs) -> torch.Tensor:
        K = release_keep_count(iqr_outlier_count(inp.scores, self.whisker), inp.x.shape[1])
        return K + 1 if self.merge == "neighbours" else K.clamp(min=1)

    def plan(self, inp: Inputs, k: int) -> Plan:
        return self._merge(inp, top_desc(inp.scores, self._n_kept(k)))


@register("prumerge+")
class PruMergePlus(_PruMergeBase):
    """`prumerge` plus spatially uniform samples (PruMerge+): the release's raster stride by default.

    Args:
        keep: budget (see `Compressor`); "auto": the IQR outliers K plus the stride samples U not among them, then
            the summary token (K + U + 1 outputs).
        uniform: fraction of a fixed budget given to the stride samples, in [0, 1) (about 3 per outlier: 3/4).
        lattice: "stride" (release: raster positions 0, t, 2t, ...) or "2d" (former: centred lattice over `grid`).
        knn, whisker, merge, order: as in `prumerge`.
        epsilon: unused by this method (kept for a uniform signature).
    """

    def __init__(self, keep: int | float | str = 0.5, *, uniform: float = 0.75, lattice: str = "stride",
                 knn: int | None = 32, whisker: float = 1.5, merge: str = "neighbours", order: str = "release",
                 epsilon: float = 0.1):
        super().__init__(keep, knn=knn, whisker=whisker, merge=merge, order=order, epsilon=epsilon)
        if isinstance(uniform, bool) or not isinstance(uniform, (int, float)) or not 0.0 <= uniform < 1.0:
            raise ValueError(f"uniform: expected a fraction in [0, 1), got {uniform!r}")
        if lattice not in ("stride", "2d"):
            raise ValueError(f"lattice: expected 'stride' (release) or '2d' (former), got {lattice!r}")
        self.uniform, self.lattice = float(uniform), lattice

    def _auto_sets(self, inp: Inputs) -> list[torch.Tensor]:
        """Per sample, the release's kept indices for keep="auto": top K (descending), then the stride samples."""
        N = inp.x.shape[1]
        n_out = iqr_outlier_count(inp.scores, self.whisker)
        K = release_keep_count(n_out, N).tolist()
        out = []
        for b, (kb, nb) in enumerate(zip(K, n_out.tolist(), strict=True)):
            top = top_desc(inp.scores[b : b + 1], kb)[0]
            step = int(1 / (nb / N)) if nb else N  # release: int(1 / reduction_ratio); no outlier: one stride of N
            seq = torch.arange(0, N - 1, max(1, int(step / 3)), device=inp.x.device)  # release: arange(0, 575, .)
            out.append(torch.cat([top, seq[~torch.isin(seq, top)]]))
        return out

    def auto_keep(self, inp: Inputs) -> torch.Tensor:
        n = torch.tensor([len(s) for s in self._auto_sets(inp)], device=inp.x.device)
        return n + 1 if self.merge == "neighbours" else n.clamp(min=1)

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, _ = inp.x.shape
        kk = self._n_kept(k)
        if self.keep == "auto":
            sets = self._auto_sets(inp)
            if all(len(s) == kk for s in sets):
                return self._merge(inp, torch.stack(sets))
        ku = min(kk - 1, round(self.uniform * kk)) if kk >= 2 else 0  # at least one top-scored token
        if self.lattice == "2d":
            lat = lattice_indices(N, ku, inp.grid, inp.x.device) if ku else inp.x.new_zeros(0, dtype=torch.long)
        else:
            lat = torch.arange(0, N - 1, max(1, (N - 1) // ku), device=inp.x.device)[:ku] if ku else \
                inp.x.new_zeros(0, dtype=torch.long)
        s = inp.scores.float().clone()
        s[:, lat] = float("-inf")  # stride tokens are taken already
        top = top_desc(s, kk - ku)  # [B, kk - ku]
        return self._merge(inp, torch.cat([top, lat.expand(B, ku)], dim=1))
