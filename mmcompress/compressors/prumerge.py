"""`prumerge` and `prumerge+`: IQR-outlier selection + score-weighted kNN merging (Shang et al., LLaVA-PruMerge).

Clean-room from the paper. Given importance `scores` (the CLS attention row of the vision encoder):

* Budget (keep="auto"): the tokens whose score is an outlier by the interquartile-range rule,
  score > Q3 + 1.5 * (Q3 - Q1) (quartiles by linear interpolation, `torch.quantile`), at least 1. This is PruMerge's
  adaptive count (about 32 of 576 tokens on LLaVA-1.5 in the paper). For a fixed int/float keep the top-k tokens by
  score are kept instead (ties: lower index first), so the method also works at a set budget.
* Merge: every pruned token joins the kept token it is most similar to (cosine on `metric`, e.g. the keys, else x;
  ties: the kept token with the lower index). With `knn` set, a kept token only absorbs pruned tokens that are among
  its `knn` nearest pruned tokens, as in the paper's k-nearest-neighbour clustering; pruned tokens that no kept
  token reaches are dropped (assign = -1). The default `knn=None` absorbs every pruned token (nothing dropped).
* Weighting (so `exact_mean = False`): a kept token becomes the score-weighted mean of its group,
  out_j = sum_i w_i x_i / sum_i w_i over the members i of j (itself included) with w_i = size_i * max(score_i, 0);
  a group whose weights sum to 0 falls back to the size-weighted mean. `size` is the plain sum of member sizes.

`prumerge+` adds spatially uniform samples to the outliers so that regions without an attention outlier keep a
token: of a budget k, k_u = round(uniform * k) slots (default 3/4, as PruMerge+ adds about three uniform tokens per
outlier: 32 -> 144 of 576) go to an evenly spaced lattice over `grid` when a 2-D (H, W) grid is given (rows and
columns at centred strides, k_u of them taken evenly in raster order), else to an even stride over the sequence; the
other k - k_u slots go to the top-scored tokens that are not on the lattice. keep="auto" gives
k = min(N, ceil(n_outliers / (1 - uniform))). Merging is as in `prumerge`.

Cost: O(N log N) selection, O(N·k·d) assignment (in chunks), no N x N matrix unless knn is set (then O(N·k) scores).

Letters: B batch, N tokens (prefix removed), k budget, d similarity features.
"""

from __future__ import annotations

import math

import torch

from mmcompress.compressors.base import Compressor, Inputs, Plan
from mmcompress.compressors.merge_ops import accum_dtype, cosine_normalize, gather_tokens, segment_sum
from mmcompress.registry import register


def iqr_outlier_count(scores: torch.Tensor, whisker: float = 1.5) -> torch.Tensor:
    """[B, N] scores -> [B] int64 number of tokens with score > Q3 + whisker * IQR (at least 1)."""
    s = scores.float()
    q = torch.quantile(s, torch.tensor([0.25, 0.75], device=s.device), dim=1)  # [2, B]
    thr = q[1] + whisker * (q[1] - q[0])  # [B]
    return (s > thr.unsqueeze(1)).sum(1).clamp(min=1)


def lattice_indices(n: int, k: int, grid: tuple[int, ...] | None, device: torch.device) -> torch.Tensor:
    """[k] int64 distinct token indices spread evenly over a 2-D grid (or over the sequence), 1 <= k <= n."""
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


def knn_merge_plan(inp: Inputs, kept: torch.Tensor, knn: int | None, chunk: int = 2048) -> Plan:
    """Plan keeping tokens `kept` [B, k] and merging the others into them, score-weighted (see module doc)."""
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
        kk = min(knn, N - k)
        # rank of each pruned token among each kept token's neighbours: reachable when inside the top kk
        top = sim.topk(kk, dim=1).indices  # [B, kk, k]
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


class _PruMergeBase(Compressor):
    family, modality, needs = "attention, adaptive", "image", ("scores",)
    exact_mean = False

    def __init__(self, keep: int | float | str = 0.5, *, knn: int | None = None, whisker: float = 1.5,
                 epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if knn is not None and (isinstance(knn, bool) or not isinstance(knn, int) or knn < 1):
            raise ValueError(f"knn: expected None or an int >= 1, got {knn!r}")
        if isinstance(whisker, bool) or not isinstance(whisker, (int, float)) or not whisker >= 0:
            raise ValueError(f"whisker: expected a float >= 0, got {whisker!r}")
        self.knn = knn
        self.whisker = float(whisker)


@register("prumerge")
class PruMerge(_PruMergeBase):
    """Keep the attention outliers (keep="auto") or the top-k by `scores`; merge the rest in, score-weighted.

    Args:
        keep: budget (see `Compressor`); "auto" uses the IQR outlier count of `scores`.
        knn: neighbourhood size of the kNN merge (None: every pruned token joins its nearest kept token).
        whisker: IQR multiplier of the outlier rule (1.5 in the paper).
        epsilon: unused by this method (kept for a uniform signature).
    """

    def auto_keep(self, inp: Inputs) -> torch.Tensor:
        return iqr_outlier_count(inp.scores, self.whisker)

    def plan(self, inp: Inputs, k: int) -> Plan:
        kept = torch.sort(inp.scores, dim=1, descending=True, stable=True).indices[:, :k]  # [B, k]
        return knn_merge_plan(inp, kept, self.knn)


@register("prumerge+")
class PruMergePlus(_PruMergeBase):
    """`prumerge` plus spatially uniform samples (PruMerge+).

    Args:
        keep: budget (see `Compressor`); "auto": ceil(IQR outlier count / (1 - uniform)).
        uniform: fraction of the budget given to the spatially uniform lattice, in [0, 1).
        knn: neighbourhood size of the kNN merge (None: every pruned token joins its nearest kept token).
        whisker: IQR multiplier of the outlier rule (1.5 in the paper).
        epsilon: unused by this method (kept for a uniform signature).
    """

    def __init__(self, keep: int | float | str = 0.5, *, uniform: float = 0.75, knn: int | None = None,
                 whisker: float = 1.5, epsilon: float = 0.1):
        super().__init__(keep, knn=knn, whisker=whisker, epsilon=epsilon)
        if isinstance(uniform, bool) or not isinstance(uniform, (int, float)) or not 0.0 <= uniform < 1.0:
            raise ValueError(f"uniform: expected a fraction in [0, 1), got {uniform!r}")
        self.uniform = float(uniform)

    def auto_keep(self, inp: Inputs) -> torch.Tensor:
        n = iqr_outlier_count(inp.scores, self.whisker).double()
        return torch.ceil(n / (1.0 - self.uniform)).long().clamp(max=inp.x.shape[1])

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, _ = inp.x.shape
        ku = min(k - 1, round(self.uniform * k)) if k >= 2 else 0  # at least one outlier slot
        lat = lattice_indices(N, ku, inp.grid, inp.x.device) if ku else inp.x.new_zeros(0, dtype=torch.long)
        s = inp.scores.float().clone()
        s[:, lat] = float("-inf")  # lattice tokens are taken already
        top = torch.sort(s, dim=1, descending=True, stable=True).indices[:, : k - ku]  # [B, k - ku]
        kept = torch.cat([lat.expand(B, ku), top], dim=1)
        return knn_merge_plan(inp, kept, self.knn)
