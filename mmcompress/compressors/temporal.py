"""`temporal`: merge video tokens across consecutive frames at the same place, then compress inside each segment.

After DyCoke (Tao et al., CVPR'25: temporal merging of tokens that stay similar across adjacent frames) and FastVID
(Shen et al., 2025: segment the clip at scene changes, then compress each segment). For tokens on a grid
(T, H, W):

1. **Segments.** Consecutive frames t-1, t are compared by the mean cosine similarity of their tokens at the same
   place; a frame whose similarity to the previous one is below ``cut`` starts a new segment (a scene cut).
2. **Temporal merging.** Inside a segment, the token at (t, h, w) joins the token at (t-1, h, w) when their cosine
   similarity is at least ``tau``: static regions collapse along time into one token per place (chains of merges
   form one group; a group is contiguous in time at one place).
3. **Budget.** If the groups are fewer than ``keep``, only the most similar temporal merges are made, so the budget
   is met exactly. If they are more, an inner compressor (``inner``, default ``tome``) merges the groups of each
   segment spatially (size-weighted), each segment getting a share of the budget proportional to its group count
   (at least one; one step over the whole clip when the budget is below the segment count).
   ``keep="auto"`` keeps every group of step 2: the budget follows how static the clip is.

Outputs are size-weighted means of their members; ``pos`` is the (t, h, w) of each output's earliest member.
Letters: B batch, N' = T·H·W tokens, k outputs, C channels.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, Inputs, Plan
from mmcompress.registry import register

__all__ = ["TemporalMerge"]


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the earliest token stays the root (representative)


@register("temporal")
class TemporalMerge(Compressor):
    """Temporal merging at each place inside scene segments, then per-segment spatial compression.

    Args:
        keep: Budget (tokens out per sample) or "auto" (all temporal groups; see the module docstring).
        tau: Cosine similarity at or above which a token merges with the same place in the previous frame.
        cut: Mean same-place similarity of two consecutive frames below which a new segment starts.
        inner: Compressor name for the spatial step inside a segment (must need nothing but x).
        epsilon: Unused by this method's auto rule (kept for the common signature).
    """

    family, modality, needs = "similarity", "video", ("grid",)

    def __init__(self, keep: int | float | str = 0.5, *, tau: float = 0.9, cut: float = 0.5, inner: str = "tome",
                 epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        for name, v in (("tau", tau), ("cut", cut)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -1.0 <= v <= 1.0:
                raise ValueError(f"{name}: expected a cosine similarity in [-1, 1], got {v!r}")
        from mmcompress.registry import get

        inner_cls = get(inner)
        if inner == "temporal" or set(getattr(inner_cls, "needs", ())) - {"grid"}:
            raise ValueError(f"inner: expected a compressor that needs only x (e.g. tome, pool, divprune), "
                             f"got {inner!r}")
        self.tau, self.cut, self.inner = float(tau), float(cut), inner

    # ---- steps 1 + 2 ---------------------------------------------------------------------------------------------
    def _grid(self, inp: Inputs) -> tuple[int, int, int]:
        """(T, H, W); a 1-D grid (T,) is T frames of one token, a 2-D grid (H, W) one frame."""
        g = inp.grid
        if g is None:
            raise ValueError("grid: temporal needs grid=(T, H, W) of the video tokens")
        return (g[0], 1, 1) if len(g) == 1 else (1, *g) if len(g) == 2 else tuple(g)

    @staticmethod
    def _same_place_sim(x: torch.Tensor, T: int, P: int) -> torch.Tensor:
        """[T-1, P] cosine of each token of one sample x [N', C] with the same place in the previous frame."""
        f = torch.nn.functional.normalize(x.float(), dim=-1).view(T, P, -1)  # [T, H*W, C]
        return (f[1:] * f[:-1]).sum(-1)

    def _edges(self, x: torch.Tensor, T: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate temporal merges of one sample x [N', C]: (similarity [E], token pair [E, 2]) inside segments."""
        if T < 2:
            return torch.empty(0), torch.empty(0, 2, dtype=torch.long)
        sim = self._same_place_sim(x, T, P)  # [T-1, P]
        new_segment = sim.mean(1) < self.cut  # [T-1] frame t+1 starts a segment
        ok = (sim >= self.tau) & ~new_segment[:, None]
        t, p = ok.nonzero(as_tuple=True)
        pairs = torch.stack([t * P + p, (t + 1) * P + p], 1)  # [E, 2] earlier, later token
        return sim[t, p], pairs

    def segments(self, x: torch.Tensor, grid: tuple[int, int, int]) -> list[int]:
        """First frame of every segment of one sample x [N', C] (0 first)."""
        T, H, W = grid
        if T < 2:
            return [0]
        frame_sim = self._same_place_sim(x, T, H * W).mean(1)  # [T-1]
        return [0] + [t + 1 for t in (frame_sim < self.cut).nonzero().flatten().tolist()]

    def _groups(self, x: torch.Tensor, grid: tuple[int, int, int], max_merges: int | None) -> list[int]:
        """Group root (earliest member) of each token after at most `max_merges` most similar temporal merges."""
        T, H, W = grid
        N = T * H * W
        sim, pairs = self._edges(x, T, H * W)
        order = sim.argsort(descending=True, stable=True)
        if max_merges is not None:
            order = order[:max_merges]  # each candidate joins two different chains: every merge removes one group
        uf = _UnionFind(N)
        for a, b in pairs[order].tolist():
            uf.union(a, b)
        return [uf.find(i) for i in range(N)]

    def auto_keep(self, inp: Inputs) -> torch.Tensor:
        grid = self._grid(inp)
        return torch.tensor([len(set(self._groups(inp.x[b], grid, None))) for b in range(inp.x.shape[0])])

    # ---- step 3 --------------------------------------------------------------------------------------------------
    def plan(self, inp: Inputs, k: int) -> Plan:
        import mmcompress as mmc

        grid = self._grid(inp)
        T, H, W = grid
        B, N, C = inp.x.shape
        dev = inp.x.device
        size = inp.sizes()
        assigns, reps = [], []
        for b in range(B):
            x = inp.x[b]
            roots = self._groups(x, grid, max(N - k, 0))
            uniq = sorted(set(roots))  # group roots in token order
            gid = {r: i for i, r in enumerate(uniq)}
            group = torch.tensor([gid[r] for r in roots], device=dev)  # [N'] group of each token
            G = len(uniq)
            if G <= k:  # (G == k unless the candidates ran out: then every group is its own slot)
                assigns.append(group)
                reps.append(torch.tensor(uniq, device=dev))
                continue
            # spatial step: inner compressor on each segment's group means, budgets proportional to group counts
            gsize = torch.zeros(G, device=dev).index_add_(0, group, size[b])
            gx = torch.zeros(G, C, device=dev, dtype=torch.float32).index_add_(0, group, x.float() * size[b, :, None])
            gx = (gx / gsize[:, None]).to(x.dtype)
            starts = self.segments(x, grid) + [T]
            seg_of_group = torch.tensor([r // (H * W) for r in uniq], device=dev)
            seg_of_group = torch.bucketize(seg_of_group, torch.tensor(starts[1:], device=dev), right=True)
            counts = torch.bincount(seg_of_group, minlength=len(starts) - 1).tolist()
            if k < sum(c > 0 for c in counts):  # fewer tokens than segments: one spatial step over the whole clip
                seg_of_group.zero_()
                counts = [G]
            budgets = _share(k, counts)
            slot_of_group = torch.empty(G, dtype=torch.long, device=dev)
            rep_groups: list[int] = []
            offset = 0
            for s, (cnt, kb) in enumerate(zip(counts, budgets, strict=True)):
                if cnt == 0:
                    continue
                members = (seg_of_group == s).nonzero().flatten()  # [cnt] groups of segment s, token order
                out = mmc.create(self.inner, keep=int(kb))(gx[members][None], size=gsize[members][None])
                slot_of_group[members] = out.assign[0] + offset
                rep_groups += members[out.rep[0]].tolist()
                offset += int(kb)
            assigns.append(slot_of_group[group])
            reps.append(torch.tensor([uniq[g] for g in rep_groups], device=dev))
        M = max(int(r.numel()) for r in reps)
        if any(int(r.numel()) != M for r in reps):  # candidates ran out differently per sample: pad to the budget
            raise ValueError(f"keep: {k} tokens asked but some samples have fewer distinct tokens than that")
        return Plan(assign=torch.stack(assigns), rep=torch.stack(reps))


def _share(k: int, counts: list[int]) -> list[int]:
    """Split budget k over segments proportionally to their group counts (>= 1 each, <= count), summing to k."""
    live = [i for i, c in enumerate(counts) if c > 0]
    if k < len(live):
        raise ValueError(f"keep: {k} tokens cannot cover {len(live)} scene segments (at least one each)")
    total = sum(counts)
    raw = {i: k * counts[i] / total for i in live}
    out = {i: max(1, min(counts[i], int(raw[i]))) for i in live}
    while sum(out.values()) < k:  # largest remainders first, within each segment's count
        i = max((i for i in live if out[i] < counts[i]), key=lambda j: raw[j] - out[j])
        out[i] += 1
    while sum(out.values()) > k:
        i = max((i for i in live if out[i] > 1), key=lambda j: out[j] - raw[j])
        out[i] -= 1
    return [out.get(i, 0) for i in range(len(counts))]
