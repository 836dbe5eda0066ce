"""Grid-aware pooling to a target grid (LLaVA-OneVision / TokenFLEX style), 1D, 2D or 3D.

The target grid is chosen from `keep`: among grids (t_1, ..., t_d) with t_i <= G_i and prod(t) == k, the one closest
(in log scale) to scaling every axis by the same factor; when k has no such factorisation, the largest such grid
with prod(t) < k (so the budget is an upper bound for `pool`, exact whenever a factorisation exists). Video grids
(T, H, W) keep all T frames and pool each frame spatially when k/T factorises (LLaVA-OneVision). An explicit
`target=` overrides. Each input token belongs to exactly one cell: cell index floor(coord * t / G) per axis, so
grids that do not divide evenly give cells whose sizes differ by at most one row/column. `avg` outputs the
size-weighted mean of each cell; `bilinear` resamples with (bi/tri)linear interpolation (antialiased where torch
supports it) and keeps the cell partition as provenance.

Letters: B batch, N' tokens, C channels, G input grid, t target grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmcompress.compressors.base import Compressor, Inputs, Plan
from mmcompress.compressors.merge_ops import accum_dtype
from mmcompress.registry import register


def choose_target_grid(grid: tuple[int, ...], k: int) -> tuple[int, ...]:
    """Target grid with prod <= k, t_i <= grid_i, exact product when possible, aspect as close as possible."""
    if len(grid) == 3 and k % grid[0] == 0:  # video: keep every frame, pool each spatially (LLaVA-OneVision)
        hw = choose_target_grid(grid[1:], k // grid[0])
        if math.prod(hw) == k // grid[0]:
            return (grid[0], *hw)
    d = len(grid)
    n = math.prod(grid)
    s = (k / n) ** (1.0 / d)
    best, best_key = None, None

    def visit(prefix: tuple[int, ...]):
        nonlocal best, best_key
        i = len(prefix)
        rest = math.prod(prefix) if prefix else 1
        if i == d - 1:
            last = min(grid[-1], k // rest)
            if last < 1:
                return
            t = (*prefix, last)
            p = math.prod(t)
            cost = sum((math.log(ti) - math.log(gi * s)) ** 2 for ti, gi in zip(t, grid, strict=True))
            key = (p != k, -p, cost)
            if best_key is None or key < best_key:
                best, best_key = t, key
            return
        for ti in range(1, grid[i] + 1):
            if rest * ti > k:
                break
            visit((*prefix, ti))

    visit(())
    assert best is not None
    return best


def cell_partition(grid: tuple[int, ...], target: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell of every grid token and each cell's representative token.

    Returns:
        cell [N'] int64 row-major cell index of each token; rep [prod(target)] int64 the token at the centre of each
        cell (per axis the middle row of the cell), increasing in cell order.
    """
    cell_axes, rep_axes = [], []
    for g, t in zip(grid, target, strict=True):
        coord = torch.arange(g, device=device)
        c = coord * t // g  # [g] cell of each row along this axis
        lo = torch.searchsorted(c, torch.arange(t, device=device))  # first row of each cell
        hi = torch.searchsorted(c, torch.arange(t, device=device), right=True)
        cell_axes.append(c)
        rep_axes.append((lo + hi - 1) // 2)
    cell = torch.zeros((), dtype=torch.long, device=device)
    rep = torch.zeros((), dtype=torch.long, device=device)
    for c, r, g, t in zip(cell_axes, rep_axes, grid, target, strict=True):
        cell = (cell.unsqueeze(-1) * t + c).reshape(-1)
        rep = (rep.unsqueeze(-1) * g + r).reshape(-1)
    return cell, rep


@register("pool")
class GridPool(Compressor):
    """Average or bilinear pooling of grid tokens to a smaller grid.

    Args:
        keep: budget; the target grid has prod <= k (== k when k factorises within the grid).
        mode: "avg" (size-weighted mean per cell) or "bilinear" (interpolation; linear in 1D, trilinear in 3D).
        target: explicit target grid (same rank as `grid`), overriding `keep`'s choice.
        epsilon: target error for keep="auto".

    Without `grid`, tokens are treated as a 1D sequence.
    """

    family, modality = "transformation", "1D/2D/3D"

    def __init__(self, keep: int | float | str = 0.5, *, mode: str = "avg", target: tuple[int, ...] | None = None,
                 epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if mode not in ("avg", "bilinear"):
            raise ValueError(f"mode: expected 'avg' or 'bilinear', got {mode!r}")
        if target is not None and (not isinstance(target, (tuple, list)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in target)):
            raise ValueError(f"target: expected a tuple of positive ints, got {target!r}")
        self.mode = mode
        self.target = None if target is None else tuple(target)
        self.exact_mean = mode == "avg"

    def plan(self, inp: Inputs, k: int) -> Plan:
        x = inp.x
        B, N, C = x.shape
        grid = inp.grid or (N,)
        if self.target is not None:
            if len(self.target) != len(grid) or any(t > g for t, g in zip(self.target, grid, strict=True)):
                raise ValueError(f"target: {self.target} must have the rank of grid {grid} and fit inside it")
            target = self.target
        else:
            target = choose_target_grid(grid, k)
        cell, rep = cell_partition(grid, target, x.device)
        M = rep.shape[0]
        assign = cell.expand(B, N)
        plan = Plan(assign=assign, rep=rep.expand(B, M))
        if self.mode == "bilinear":
            plan.x = self._interpolate(x, grid, target)
        else:
            plan.x, plan.size = self._separable_mean(x, inp.size, grid, target)
        return plan

    @staticmethod
    def _separable_mean(x: torch.Tensor, size: torch.Tensor | None, grid: tuple[int, ...], target: tuple[int, ...]):
        """Cell means computed one axis at a time, each as a small [t, g] 0/1 matrix product.

        Cells are products of per-axis row ranges, so the sums separate. Measured on 2 CPU cores, [4, 2880, 1024]:
        ~2.5x faster than index_add along the axis and ~10x faster than one index_add over all N' tokens.
        Returns x [B, M, C] in x's dtype and size [B, M] float32.
        """
        B, N, C = x.shape
        acc = accum_dtype(x.dtype)
        v = x.to(acc).reshape(B, *grid, C)
        w = None if size is None else size.to(acc).reshape(B, *grid, 1)
        if w is not None:
            v = v * w
        cells = torch.ones((), dtype=acc, device=x.device)
        for axis, (g, t) in enumerate(zip(grid, target, strict=True)):
            if g == t:
                continue
            part = torch.zeros(t, g, dtype=acc, device=x.device)  # [t, g] row-range membership
            part[torch.arange(g, device=x.device) * t // g, torch.arange(g, device=x.device)] = 1
            cells = cells * part.sum(1).view(*([1] * axis), t, *([1] * (len(grid) - axis - 1)))
            pre, post = math.prod(v.shape[: 1 + axis]), math.prod(v.shape[2 + axis:])
            v = (part @ v.reshape(pre, g, post)).reshape(*v.shape[: 1 + axis], t, *v.shape[2 + axis:])
            if w is not None:
                wpost = math.prod(w.shape[2 + axis:])
                w = (part @ w.reshape(pre, g, wpost)).reshape(*w.shape[: 1 + axis], t, *w.shape[2 + axis:])
        M = math.prod(target)
        den = cells.expand(*target).reshape(1, M, 1).expand(B, M, 1) if w is None else w.reshape(B, M, 1)
        return (v.reshape(B, M, C) / den).to(x.dtype), den.reshape(B, M).float().contiguous()

    @staticmethod
    def _interpolate(x: torch.Tensor, grid: tuple[int, ...], target: tuple[int, ...]) -> torch.Tensor:
        B, N, C = x.shape
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(grid)]
        dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        v = x.to(dt).transpose(1, 2).reshape(B, C, *grid)  # [B, C, *G]
        kw = {"antialias": True} if mode == "bilinear" else {}
        y = F.interpolate(v, size=target, mode=mode, align_corners=False, **kw)  # [B, C, *t]
        return y.reshape(B, C, -1).transpose(1, 2).to(x.dtype).contiguous()  # [B, M, C]
