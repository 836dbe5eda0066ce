"""`holitom`: holistic temporal + spatial token merging for video (HoliTom, Shao et al., NeurIPS'25), clean-room.

"HoliTom: Holistic Token Merging for Fast Video Large Language Models": the merging that runs before the LLM
(the paper's "HoliTom (w/o M)"; its in-LLM merging is not part of this pure compressor: `mmc.apply(model,
"holitom", llm_layer=K)` runs it on the shared in-LLM stage, `mmcompress.inllm.holitom`). Per video of T frames of
S = H·W tokens (`grid` (T, H, W); an (H, W) or (N,) grid is one frame):

1. frame similarity: f[t, p] = cos(m[t, p], m[t + 1, p]) on the similarity features m (`metric`, else x);
2. global temporal segmentation: the frames are cut into consecutive windows maximising the tokens removed,
   where a window [s, e] removes (e - s) tokens at each "static" position (f > tau between every pair of
   consecutive frames of the window), by dynamic programming over all windows of at most `max_window` frames
   (ties keep the shorter window, scanned from 2 frames up);
3. retain ratio: the video's budget as a ratio r' of the tokens left after step 2 (see "Budget");
4. per window of w >= 2 frames, its static positions are averaged over the window (one token each), then
   clustered by DPC-kNN (density from the `knn` nearest neighbours incl. itself on Euclidean distances / sqrt(C),
   centres = top round(S_static · r') by density x distance to the nearest denser token), every other static
   token joins its nearest centre, and a cluster outputs beta · centre + (1 - beta) · mean of its other members
   (the centre alone when it has none);
5. per frame, its dynamic (non-static) tokens keep the top ceil(S_dynamic · r') by `scores` (the tower's mean
   attention received, heads averaged), the rest are dropped.

Outputs: a cluster's slot holds every frame's token at its positions (its representative: the centre in the
window's first frame); a kept dynamic token is its own slot. `x` is in source order (by representative); `order`
is the release's sequence for a video with one trailing newline token (LLaVA-OneVision): per window, its static
clusters by centre position, then frame by frame its kept dynamic tokens by position.

Budget: keep=k asks for k tokens exactly, the release for a retain ratio whose token count follows from rounding.
The count at r', sum over windows of round(S_static · r') + w · ceil(S_dynamic · r'), is monotone in r': we run the
release's rule at the largest r' whose count is <= k (bisection), which is exactly the release's output whenever
the release itself produces k tokens at some retain ratio; the few slots left (< one window's frames) go to the
dropped dynamic tokens with the highest `scores`, then, if k exceeds what any r' gives, to the non-representative
members of static clusters (highest `scores` first, each taken out of its cluster as its own slot). When even the
smallest r' keeps more than k, the k slots with the highest representative `scores` are kept.

Differences from the release (docs/fidelity_frontier.md): its DPC adds uniform noise of 1e-6 to the densities
(random, so its kept set is not reproducible when densities are that close); here no noise and ties go to the
lower index. `size` does not enter the values (the release has none); `out.size` counts members as usual.

Letters: B batch, N = T·S tokens (prefix removed), T frames, S tokens per frame, k budget, C channels.
"""

from __future__ import annotations

import math

import torch

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.compressors.merge_ops import accum_dtype, by_score, cosine_normalize
from mmcompress.registry import register


def frame_similarity(m: torch.Tensor) -> torch.Tensor:
    """[T, S, d] features -> [T - 1, S] cosine similarity of each token with the same position in the next frame."""
    u = cosine_normalize(m.float())
    return (u[:-1] * u[1:]).sum(-1)


def static_windows(f: torch.Tensor, tau: float, max_window: int = 1024) -> tuple[list[tuple[int, int]], float]:
    """Segment the frames into windows that maximise the tokens removed by temporal merging.

    Args:
        f: [T - 1, S] similarity of consecutive frames at each position.
        tau: a position is static over [s, e] when f > tau between all its consecutive frames.
        max_window: longest window, in frames.

    Returns:
        The windows [(s, e)] (inclusive, in order, covering 0..T-1) and the number of tokens they remove.
    """
    T = f.shape[0] + 1
    above = (f > tau).to(torch.float64)  # [T - 1, S]
    removed = torch.zeros(T, T, dtype=torch.float64)  # removed[s, e] = static positions of [s, e] x (e - s)
    for s in range(T - 1):
        static = torch.cumprod(above[s:], dim=0).sum(dim=1)  # [T - 1 - s] static positions of [s, s + 1 + i]
        removed[s, s + 1 :] = static * torch.arange(1, T - s, dtype=torch.float64)
    rem = removed.tolist()
    best = [0.0] * T
    start = [0] * T
    for i in range(T):
        val, s_best = (best[i - 1] if i > 0 else 0.0), i
        for w in range(2, min(i + 1, max_window) + 1):
            j = i - w
            cur = (best[j] if j >= 0 else 0.0) + rem[j + 1][i]
            if cur > val:
                val, s_best = cur, j + 1
        best[i], start[i] = val, s_best
    out, i = [], T - 1
    while i >= 0:
        out.append((start[i], i))
        i = start[i] - 1
    return out[::-1], best[-1]


def density_peaks(f: torch.Tensor, n: int, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN cluster centres.

    Args:
        f: [S, C] features.
        n: centres to pick, 1 <= n <= S.
        knn: neighbours (self included) of the local density.

    Returns:
        centres [n] int64 sorted by index, and the [S, S] float32 distance matrix (Euclidean / sqrt(C)).
    """
    S, C = f.shape
    d = torch.cdist(f.float().unsqueeze(0), f.float().unsqueeze(0))[0] / C**0.5  # [S, S]
    near = torch.topk(d, min(knn, S), dim=1, largest=False).values  # [S, knn]
    density = torch.exp(-near.square().mean(dim=1))  # [S]
    denser = density.unsqueeze(0) > density.unsqueeze(1)  # [S, S] j denser than i
    delta = torch.where(denser, d, d.max()).min(dim=1).values  # [S] distance to the nearest denser token
    score = delta * density
    centres = torch.sort(score, descending=True, stable=True).indices[:n]
    return centres.sort().values, d


class _Video:
    """The release's rule on one video, with the bookkeeping to fill or trim to an exact budget.

    Slots are numbered in the release's sequence; every per-slot quantity is a tensor (no per-token Python).
    """

    def __init__(self, m: torch.Tensor, a: torch.Tensor, tau: float, max_window: int):
        self.T, self.S = a.shape
        self.a = a  # [T, S] scores
        self.m = m  # [T, S, d] similarity features
        f = frame_similarity(m) if self.T > 1 else None
        self.windows, _ = static_windows(f, tau, max_window) if self.T > 1 else ([(0, 0)], 0.0)
        self.static = []  # per window: [S] bool static positions (all False for one frame)
        for s, e in self.windows:
            st = torch.zeros(self.S, dtype=torch.bool)
            if e > s:
                st = (f[s:e] > tau).all(dim=0)
            self.static.append(st)
        # per window: (frames, static positions, dynamic positions), plain ints for the budget search
        self._sizes = [(e - s + 1, int(st.sum()), self.S - int(st.sum()))
                       for (s, e), st in zip(self.windows, self.static, strict=True)]

    def count(self, r: float) -> int:
        """Tokens the release keeps at retain ratio r (after temporal merging)."""
        return sum(round(n_st * r) + w * math.ceil(n_dy * r) for w, n_st, n_dy in self._sizes)

    def ratio(self, k: int) -> float:
        """The largest retain ratio in (0, 1] whose count is <= k (the smallest positive one when none is)."""
        if self.count(1.0) <= k:
            return 1.0
        lo, hi = 0.0, 1.0  # count(lo) <= k (lo = 0 by convention) < count(hi)
        for _ in range(60):
            mid = (lo + hi) / 2
            if self.count(mid) <= k:
                lo = mid
            else:
                hi = mid
        return lo if lo > 0 else hi

    def slots(self, r: float, knn: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
        """The release's slots at ratio r, numbered in its sequence.

        Returns:
            assign [T, S] int64 slot of every token (-1 dropped), rep [M] int64 flat index t * S + p of each slot's
            representative (a cluster's centre in its window's first frame), and per window with clusters
            (slot of its first cluster, s, e, static positions [S_st], cluster of each static position [S_st],
            centre index into the static positions [n_st]).
        """
        T, S = self.T, self.S
        assign = torch.full((T, S), -1, dtype=torch.long)
        reps: list[torch.Tensor] = []
        clusters: list[tuple] = []
        M = 0
        for (s, e), st in zip(self.windows, self.static, strict=True):
            pos_st = st.nonzero()[:, 0]
            pos_dy = (~st).nonzero()[:, 0]
            n_st = round(len(pos_st) * r) if e > s else 0
            if n_st > 0:
                mean = self.m[s : e + 1, pos_st].float().mean(dim=0)  # [S_st, d] window mean per static position
                centres, d = density_peaks(mean, n_st, min(knn, n_st))
                near = d[:, centres].argmin(dim=1)  # [S_st] nearest centre
                near[centres] = torch.arange(n_st)
                assign[s : e + 1, pos_st] = M + near  # every frame of the window at its positions
                reps.append(s * S + pos_st[centres])
                clusters.append((M, s, e, pos_st, near, centres))
                M += n_st
            n_dy = math.ceil(len(pos_dy) * r)
            if n_dy > 0:
                w = e - s + 1
                top = torch.topk(self.a[s : e + 1, pos_dy], n_dy, dim=1).indices  # [w, n_dy] per frame
                p = pos_dy[top].sort(dim=1).values  # [w, n_dy] kept positions, by position
                ids = M + torch.arange(w * n_dy).view(w, n_dy)  # frame by frame
                assign[s : e + 1].scatter_(1, p, ids)
                reps.append((torch.arange(s, e + 1).unsqueeze(1) * S + p).reshape(-1))
                M += w * n_dy
        rep = torch.cat(reps) if reps else torch.zeros(0, dtype=torch.long)
        return assign, rep, clusters


@register("holitom")
class HoliTom(Compressor):
    """Video: temporal merging over globally chosen windows, DPC-kNN merging of static tokens, top dynamic tokens.

    Args:
        keep: budget (see `Compressor`; exact, see the module docstring for how the release's ratio is matched).
        tau: similarity above which a position is static between consecutive frames (release default 0.8; its
            scripts use 0.65 at a 10% budget).
        beta: weight of a cluster's centre in its merged token (release default 0.6).
        knn: neighbours of the DPC density (release default 7).
        max_window: longest temporal window in frames (release default 1024).
        llm_layer: None (default: the release without `HOLITOM_k`, "HoliTom (w/o M)"), or the decoder layer K at
            which `mmc.apply` also runs HoliTom's in-LLM merging (`mmcompress.inllm.holitom`; its scripts use 18).
        llm_prune: fraction of the video tokens merged away there (`HOLITOM_r`, 0.5).
        epsilon: target error for keep="auto" (the `adaptive` estimator picks the per-sample budget).
    """

    family, modality, needs = "similarity", "video", ("grid", "scores")
    exact_mean = False
    # the release merges the projected (and 2x-pooled) frame tokens, scored by the last block's attention received
    encoder_needs = EncoderNeeds(layer="feature", heads="mean", stage="projector")

    def __init__(self, keep: int | float | str = 0.5, *, tau: float = 0.8, beta: float = 0.6, knn: int = 7,
                 max_window: int = 1024, llm_layer: int | None = None, llm_prune: float = 0.5,
                 epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        for nm, v, lo, hi in (("tau", tau, -1.0, 1.0), ("beta", beta, 0.0, 1.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise ValueError(f"{nm}: expected a float in [{lo}, {hi}], got {v!r}")
        for nm, v in (("knn", knn), ("max_window", max_window)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm}: expected an int >= 1, got {v!r}")
        self.tau, self.beta, self.knn, self.max_window = float(tau), float(beta), knn, max_window
        if llm_layer is not None and (isinstance(llm_layer, bool) or not isinstance(llm_layer, int) or llm_layer < 1):
            raise ValueError(f"llm_layer: expected None or an int layer index >= 1, got {llm_layer!r}")
        if isinstance(llm_prune, bool) or not isinstance(llm_prune, (int, float)) or not 0.0 <= llm_prune < 1.0:
            raise ValueError(f"llm_prune: expected a fraction in [0, 1), got {llm_prune!r}")
        self.llm_layer, self.llm_prune = llm_layer, float(llm_prune)

    def inllm_stage(self, model=None) -> dict | None:
        """None, or the description of HoliTom's in-LLM stage at layer `llm_layer` for `mmc.apply`
        (`mmcompress.inllm.declared`)."""
        if self.llm_layer is None:
            return None
        return {"rule": "holitom", "option": "llm_layer", "k": self.llm_layer, "r": self.llm_prune}

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, C = inp.x.shape
        T = inp.grid[0] if len(inp.grid) == 3 else 1
        S = N // T
        plans = [self._one(inp.x[b].reshape(T, S, C), inp.sim[b].detach().reshape(T, S, -1),
                           inp.scores[b].reshape(T, S), k) for b in range(B)]
        return Plan(assign=torch.stack([p[0] for p in plans]), rep=torch.stack([p[1] for p in plans]),
                    x=torch.stack([p[2] for p in plans]), order=torch.stack([p[3] for p in plans]))

    def _one(self, x: torch.Tensor, m: torch.Tensor, a: torch.Tensor, k: int):
        """One video x [T, S, C] -> (assign [N], rep [k], out [k, C], order [k])."""
        T, S, C = x.shape
        N = T * S
        dev = x.device
        score = a.float().cpu().reshape(N)  # [N]
        vid = _Video(m.cpu(), score.view(T, S), self.tau, self.max_window)
        assign, rep, clusters = vid.slots(vid.ratio(k), self.knn)
        assign = assign.view(N)
        M = rep.shape[0]
        is_static = torch.zeros(M, dtype=torch.bool)
        for first, *_, centres in clusters:
            is_static[first : first + len(centres)] = True
        new_id = torch.arange(M)  # [M] slot id of each of the release's slots after a trim (-1: trimmed)
        if M > k:  # even the smallest ratio keeps too many: the k best representatives (ties by position)
            by_rep = rep.argsort()
            best = by_rep[torch.sort(score[rep[by_rep]], descending=True, stable=True).indices[:k]]
            kept = torch.zeros(M, dtype=torch.bool)
            kept[best] = True
            new_id = torch.where(kept, kept.long().cumsum(0) - 1, -1)  # the release's order kept
            assign = torch.where(assign >= 0, new_id[assign.clamp(min=0)], assign)
            rep, is_static = rep[kept], is_static[kept]
            M = k
        stolen = torch.zeros(N, dtype=torch.bool)  # static members taken out of their cluster to fill the budget
        if M < k:  # fill: dropped dynamic tokens, then non-representative static members, by score
            is_rep = torch.zeros(N, dtype=torch.bool)
            is_rep[rep] = True
            member_static = (assign >= 0) & is_static[assign.clamp(min=0)]
            dropped = by_score((assign < 0).nonzero()[:, 0], score)
            inner = by_score((member_static & ~is_rep).nonzero()[:, 0], score)
            extra = torch.cat([dropped, inner])[: k - M]
            stolen[extra] = assign[extra] >= 0
            assign[extra] = M + torch.arange(len(extra))
            rep = torch.cat([rep, extra])
            is_static = torch.cat([is_static, torch.zeros(len(extra), dtype=torch.bool)])
            M = k
        # values: dynamic tokens as they are; a cluster: beta * centre + (1 - beta) * mean of its other positions,
        # each position being the mean of its (remaining) frames in the window
        xs = x.reshape(N, C).to(accum_dtype(x.dtype))
        out = xs.index_select(0, rep.to(dev))  # [k, C]; static slots overwritten below
        xt = xs.view(T, S, C)
        for first, s, e, pos_st, near, centres in clusters:
            val = xt[s : e + 1, pos_st.to(dev)].mean(dim=0)  # [S_st, C] window mean per static position
            present = torch.ones(len(pos_st), dtype=torch.bool)
            st_frames = stolen.view(T, S)[s : e + 1, pos_st]  # [w, S_st]
            if bool(st_frames.any()):  # positions with frames taken out: the mean of the frames left
                for j in st_frames.any(dim=0).nonzero()[:, 0].tolist():
                    left = (~st_frames[:, j]).nonzero()[:, 0] + s
                    present[j] = len(left) > 0
                    if len(left) > 0:
                        idx = (left * S + int(pos_st[j])).to(dev)
                        val[j] = xs[idx].mean(dim=0) if len(idx) > 1 else xs[idx[0]]
            is_centre = torch.zeros(len(pos_st), dtype=torch.bool)
            is_centre[centres] = True
            n_c = len(centres)
            member = present & ~is_centre  # [S_st] positions averaged into their cluster's "other members"
            grp = torch.where(member, near, n_c)  # [S_st] cluster, n_c for none
            perm = torch.sort(grp, stable=True).indices[: int(member.sum())]  # members by cluster, by position
            cnt_t = torch.bincount(grp, minlength=n_c + 1)[:n_c]  # [n_c] other members per cluster
            cnt, has = cnt_t.tolist(), (cnt_t > 0).to(dev)
            # one mean per cluster over a contiguous run (bit-identical to averaging its masked rows)
            part = [chunk.mean(dim=0) for chunk in torch.split(val[perm.to(dev)], [c for c in cnt if c], dim=0)]
            centre_val = val[centres.to(dev)]  # [n_c, C]
            merged = centre_val.clone()
            if part:
                merged[has] = self.beta * centre_val[has] + (1 - self.beta) * torch.stack(part)
            slot = new_id[first : first + n_c]  # [n_c]
            ok = slot >= 0
            out[slot[ok].to(dev)] = merged[ok.to(dev)]
        # the release's sequence: windows in time order; in a window its clusters, then frame by frame the rest
        win = torch.empty(T, dtype=torch.long)
        for wi, (s, e) in enumerate(vid.windows):
            win[s : e + 1] = wi
        t_rep, p_rep = rep // S, rep % S
        kind = (~is_static).long()
        key = ((win[t_rep] * 2 + kind) * T + t_rep * kind) * S + p_rep
        order = key.argsort()
        return assign.to(dev), rep.to(dev), out.to(x.dtype), order.to(dev)
