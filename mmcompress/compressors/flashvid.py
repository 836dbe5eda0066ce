"""`flashvid`: FlashVID's compression before the LLM (Fan et al., ICLR'26), as its authors' release computes it.

"FlashVID: Efficient Video Large Language Models via Training-free Tree-based Spatiotemporal Token Merging". The
release (Fanziyang-v/FlashVID, `flashvid/utils.py`, `flashvid_compression`) runs on LLaVA-OneVision's projected,
2x-pooled frame tokens x [T, S, C] with the tower's mean attention received a [T, S] (heads and query rows
averaged, pooled like the features). Per video, at a per-frame budget b (the release's
`ceil(S * retention_ratio * expansion)`), with `n_sel = ceil(b * alpha)` and `n_sttm = b - n_sel`:

1. Segments (DySeg): cosine similarity of consecutive frame means; a cut after frame t where it is below
   `segment_threshold`; while there are fewer than `min_segments` segments, the most dissimilar remaining
   transitions are cut as well.
2. Selection (ADTS, the release's default "attn_div_v2"): per frame, D[i, j] = (1 - cos(x_i, x_j)) * a_j * 1e6 *
   r_j with r_j = the mean over the segment's frames c of x_j . mean(frame c); the first token maximises the second
   smallest entry of its column, then greedily the token maximising its smallest D to the selected ones (max-min);
   `n_sel` tokens per frame.
3. Tree merging (TSTM) within a segment over the other tokens: each token of frame t + 1 finds its most similar
   unselected token of frame t; it merges into it when the similarity exceeds `temporal_threshold` (lowered to the
   largest value that still leaves `b` tokens per frame when too many would merge); a retained token stands for
   its whole tree (the tokens merged into it, transitively, from later frames): the release's value is the tree's
   SUM over 1 + the number of tokens merged straight into the root (a merged token passes its subtree's sum on but
   counts as one), so chains longer than one step weigh more than a mean; `merge="mean"` takes the tree's mean.
4. Spatial merging: per frame, its retained trees are clustered by DPC-kNN (knn = min(clusters, 7)) into
   ceil(n_t * n_sttm * frames / trees in segment) clusters; a cluster outputs the mean of its trees' values, at its
   centre's place. With n_sttm = 0 the unselected tokens are dropped.

Outputs are in source order (the release sorts by the representative's index: a selected token's own, a cluster's
centre); each slot's `assign` members are the tokens of its trees.

Budget: keep=k asks for exactly k tokens, the release for a retention ratio. Its count at per-frame budget b lies in
[T * b, T * b + T - 1] (the clusters' ceilings), so b = k // T, or one less when that count exceeds k, is the
release's own budget whenever the release produces k tokens; then the result is the release's. The few slots left
go to the dropped tokens with the highest `scores`, then to tokens taken out of merged slots (highest `scores`
first, each its own slot; the slot it left loses that token's term: its tree keeps its divisor, or, with
merge="mean", becomes the mean of its remaining tokens). keep="auto" is the
release's rule at `retention * expansion` (defaults 0.25 and 1.25; the count depends on the content, so a batch is
ragged). Below one token per frame (k < T) the k tokens with the highest `scores` are kept.

Differences from the release (docs/fidelity_frontier.md): it takes one video per batch (here any batch); it writes
the tree sums into the caller's features in place (here inputs are left untouched); a one-frame segment clusters
ALL its tokens, the selected ones included, so a selected token can be output twice (here, as in longer segments,
only the unselected ones); its "attn_div_v2" greedy step does not exclude selected tokens, so a column of
calibrated distances all below a selected token's own (about 0) re-selects it and repeats it for the rest of the
budget (here the best unselected token is taken); its DPC adds uniform noise of 1e-6 to the densities (here no
noise, ties by index: a frame with ONE cluster has knn = 1, so every density is exp(0) = 1 and the release's
centre is drawn by the noise, here the first root); duplicate complementary cuts (empty segments, no output) are
merged. Similarities use x
(the release has no `metric`); `size` does not enter the values; `out.size` counts members as usual.

FlashVID's in-LLM stage (FastV at LLM layer 20 keeping ceil(30%) of the video tokens) is not part of this pure
compressor: `mmc.apply(model, "flashvid", ...)` runs it on the shared in-LLM stage (`inllm_stage`, built by
`mmcompress.inllm.declared`).

Letters: B batch, N = T * S tokens (prefix removed), T frames, S tokens per frame, k budget, C channels.
"""

from __future__ import annotations

import math

import torch

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.compressors.holitom import density_peaks
from mmcompress.compressors.merge_ops import accum_dtype, by_score
from mmcompress.registry import register

__all__ = ["FlashVID", "flashvid_segments"]


def flashvid_segments(x: torch.Tensor, threshold: float, min_segments: int) -> list[tuple[int, int]]:
    """DySeg: the segments [(start, end)) of a video x [T, S, C] (frame means compared, see the module doc)."""
    T = x.shape[0]
    fm = x.mean(1)  # [T, C]
    u = fm / fm.norm(p=2, dim=-1, keepdim=True)
    sim = (u[:-1] * u[1:]).sum(-1)  # [T - 1] transition similarities
    cut = sim < threshold
    n_seg = int(cut.sum()) + 1
    if n_seg < min_segments and T > 1:
        s2 = sim.masked_fill(cut, 1.0)
        extra = torch.topk(s2, k=min(min_segments - n_seg, T - 1), largest=False).indices
        cut[extra] = True
    ends = (cut.nonzero()[:, 0] + 1).tolist() + [T]
    starts = [0] + ends[:-1]
    return list(zip(starts, ends, strict=True))


class _Video:
    """One video's segments, selection order and merge candidates, shared by the budgets tried on it."""

    def __init__(self, x: torch.Tensor, a: torch.Tensor, seg_th: float, min_seg: int, tau: float, merge: str):
        self.x, self.a, self.tau, self.merge = x, a, tau, merge  # [T, S, C], [T, S]
        self.T, self.S, self.C = x.shape
        self.segs = flashvid_segments(x.float(), seg_th, min_seg)
        f = x.detach().float()
        self.u = f / f.norm(p=2, dim=-1, keepdim=True)  # [T, S, C]
        self._order: torch.Tensor | None = None

    def selection(self, n: int) -> torch.Tensor:
        """[T, n] the first n tokens of each frame's ADTS (max-min) order, in pick order (a prefix of any longer)."""
        if self._order is None or self._order.shape[1] < n:
            self._order = self._adts(n)
        return self._order[:, :n]

    def _adts(self, n: int) -> torch.Tensor:
        T, S = self.T, self.S
        f = self.x.detach().float()
        d = 1.0 - torch.bmm(self.u, self.u.transpose(1, 2))  # [T, S, S]
        rel = torch.empty(T, S)
        for s, e in self.segs:  # event relevance: mean over the segment's frames c of x_j . mean(frame c)
            fs = f[s:e]
            rel[s:e] = torch.einsum("b n d, c d -> b c n", fs, fs.mean(1)).mean(1)
        d = d * (self.a.float() * 1e6).unsqueeze(1) * rel.unsqueeze(1)
        order = torch.empty(T, n, dtype=torch.long)
        if n == 0:
            return order
        ar = torch.arange(T)
        first = torch.topk(d, k=2, dim=1, largest=False).values[:, 1, :].argmax(-1)  # [T]
        order[:, 0] = first
        md = d[ar, first]  # [T, S] smallest distance to the selected, per column
        taken = torch.zeros(T, S, dtype=torch.bool)
        taken[ar, first] = True
        for i in range(1, n):
            nxt = md.masked_fill(taken, -math.inf).argmax(-1)
            order[:, i] = nxt
            taken[ar, nxt] = True
            md = torch.minimum(md, d[ar, nxt])
        return order

    def rule(self, b: int, alpha: float, knn: int) -> tuple[torch.Tensor, ...]:
        """The release's slots at per-frame budget b.

        Returns:
            slot [N] int64 (-1 dropped), grp [N] int64 tree (group) id of each token (its root's index), rep [M]
            int64 flat index of each slot's representative (slots numbered in representative order), and div [N]
            float32 the divisor of each token's tree (its tree's value is the sum of its tokens / div).
        """
        T, S = self.T, self.S
        N = T * S
        n_sel = math.ceil(b * alpha)
        n_sttm = b - n_sel
        sel = torch.zeros(T, S, dtype=torch.bool)
        sel.scatter_(1, self.selection(n_sel), True)
        ids = torch.arange(N).view(T, S)
        grp = torch.where(sel, ids, torch.full_like(ids, -1))  # [T, S] tree root of each token, -1: dropped
        slot_rep = torch.full((T, S), -1, dtype=torch.long)  # [T, S] representative of each token's slot
        slot_rep[sel] = ids[sel]
        div = torch.ones(T, S)
        if n_sttm > 0:
            for s, e in self.segs:
                self._merge(s, e, b, n_sttm, sel, grp, slot_rep, div, knn)
        grp, slot_rep = grp.view(N), slot_rep.view(N)
        rep = slot_rep[slot_rep >= 0].unique()  # [M] sorted
        slot = torch.full((N,), -1, dtype=torch.long)
        alive = slot_rep >= 0
        slot[alive] = torch.searchsorted(rep, slot_rep[alive])
        return slot, grp, rep, div.view(N)

    def _merge(self, s: int, e: int, b: int, n_sttm: int, sel: torch.Tensor, grp: torch.Tensor,
               slot_rep: torch.Tensor, div: torch.Tensor, knn: int) -> None:
        """TSTM + DPC-kNN on segment [s, e): fills grp, slot_rep and div [T, S] of its unselected tokens in place."""
        S, L = self.S, e - s
        loc = torch.arange(L * S).view(L, S)  # local ids t * S + p
        free = ~sel[s:e]  # [L, S]
        root = loc.clone()  # [L, S] local id of each token's tree root
        direct = torch.zeros(L * S)  # [L*S] tokens merged straight into each token (its children)
        if L > 1:
            cos = torch.bmm(self.u[s + 1:e], self.u[s:e - 1].transpose(1, 2))  # [L-1, S, S] frame t+1 vs t
            cos = cos.masked_fill(sel[s + 1:e].unsqueeze(-1), -1.0).masked_fill(sel[s:e - 1].unsqueeze(1), -1.0)
            mx, arg = cos.max(-1)  # [L-1, S] best similarity to the previous frame, and where
            mx = torch.cat([mx.new_full((1, S), -1.0), mx])  # [L, S]; the first frame never merges
            merged = mx > self.tau
            lower = b * L
            if int((~merged).sum()) < lower:  # too many merges: the largest threshold leaving b per frame
                soft = mx.view(-1).topk(k=L * S - lower).values[-1]
                merged = mx > max(soft, -1.0 + 1e-6)
            for t in range(1, L):  # a merged token joins the tree of its anchor in the previous frame
                root[t] = torch.where(merged[t], root[t - 1][arg[t - 1]], root[t])
                direct.index_add_(0, loc[t - 1][arg[t - 1][merged[t]]], torch.ones(int(merged[t].sum())))
            roots = free & ~merged  # [L, S] retained unselected tokens: the trees' roots
        else:
            roots = free
        fr = root[free]  # [F] root of each unselected token
        n_f = roots.sum(1).tolist()
        ratio = n_sttm * L / sum(n_f)
        rep_of = loc.view(-1).clone()  # [L*S] slot representative (local) of each root
        # a tree's value: the sum of its tokens over 1 + its root's children (the release's counts: a merged token
        # adds its whole subtree's sum but a count of one), or over its size (merge="mean")
        dv = torch.bincount(fr, minlength=L * S).float() if self.merge == "mean" else 1.0 + direct  # [L*S]
        if ratio < 1.0:
            xs = self.x.detach()[s:e].reshape(L * S, self.C).float()
            mean = torch.zeros(L * S, self.C).index_add_(0, fr, xs[loc[free]])
            mean = mean / dv.clamp(min=1).unsqueeze(1)  # [L*S, C] tree values (at the roots)
            for t in range(L):
                nc = math.ceil(n_f[t] * ratio)
                if nc == 0:
                    continue
                r_ids = loc[t][roots[t]]  # [n_t]
                centres, d = density_peaks(mean[r_ids], nc, min(nc, knn))
                near = d[:, centres].argmin(dim=1)  # [n_t] nearest centre
                near[centres] = torch.arange(nc)
                rep_of[r_ids] = r_ids[centres][near]
        off = s * S
        g = grp[s:e]
        g[free] = fr + off
        sr = slot_rep[s:e]
        sr[free] = rep_of[fr] + off
        dd = div[s:e]
        dd[free] = dv[fr]


@register("flashvid")
class FlashVID(Compressor):
    """Video: segments, attention+diversity selection per frame, tree merging across frames, DPC-kNN per frame.

    Args:
        keep: budget (exact; see the module doc for how the release's per-frame budget is matched), or "auto": the
            release's rule at `retention * expansion` per frame.
        retention: the release's `retention_ratio` (average share of video tokens over the LLM's layers; default
            0.25), used by keep="auto" and by the in-LLM stage of `mmc.apply`.
        expansion: the release's `expansion` (default 1.25): before the LLM each frame keeps ceil(S * retention *
            expansion) tokens (keep="auto").
        alpha: share of a frame's budget selected by ADTS (default 0.7); the rest are merged tokens.
        temporal_threshold: similarity above which a token merges into its match in the previous frame (0.8).
        segment_threshold: frame-mean similarity below which a segment is cut (0.9).
        min_segments: fewer segments than this are completed by the most dissimilar transitions (8).
        knn: largest DPC-kNN neighbourhood (the release's min(clusters, 7)).
        merge: a tree's value: "release" (default; the sum of its tokens over 1 + the tokens merged straight into
            its root, as the release counts) or "mean" (the mean of its tokens).
        llm_layer: decoder layer at which `mmc.apply` prunes the video tokens by last-token attention; "auto"
            (default): the release's `pruning_layer` 20 (on LLaVA-OneVision-7B's 28-layer LLM), or on an LLM of
            L <= 20 layers the same depth fraction, round(20 * L / 28); None: no in-LLM stage.
        llm_keep: share of the video tokens kept there, rounded up (the release's `llm_retention_ratio`, 0.3).
        epsilon: unused (kept for a uniform signature).
    """

    family, modality, needs = "attention, similarity", "video", ("grid", "scores")
    exact_mean = False
    # the release runs on the projected, 2x-pooled frame tokens, scored by the last block's mean attention received
    encoder_needs = EncoderNeeds(layer="feature", heads="mean", stage="projector")

    def __init__(self, keep: int | float | str = "auto", *, retention: float = 0.25, expansion: float = 1.25,
                 alpha: float = 0.7, temporal_threshold: float = 0.8, segment_threshold: float = 0.9,
                 min_segments: int = 8, knn: int = 7, merge: str = "release", llm_layer: int | str | None = "auto",
                 llm_keep: float = 0.3, epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        for nm, v, lo, hi, lo_open in (("retention", retention, 0.0, 1.0, True), ("alpha", alpha, 0.0, 1.0, False),
                                       ("llm_keep", llm_keep, 0.0, 1.0, True)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi or (lo_open and v == lo):
                raise ValueError(f"{nm}: expected a float in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
        if isinstance(expansion, bool) or not isinstance(expansion, (int, float)) or not expansion >= 1.0:
            raise ValueError(f"expansion: expected a float >= 1, got {expansion!r}")
        for nm, v in (("temporal_threshold", temporal_threshold), ("segment_threshold", segment_threshold)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -1.0 <= v < 1.0:
                raise ValueError(f"{nm}: expected a float in [-1, 1), got {v!r}")
        for nm, v in (("min_segments", min_segments), ("knn", knn)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm}: expected an int >= 1, got {v!r}")
        if merge not in ("release", "mean"):
            raise ValueError(f"merge: expected 'release' or 'mean', got {merge!r}")
        if llm_layer not in (None, "auto") and (isinstance(llm_layer, bool) or not isinstance(llm_layer, int)
                                                 or llm_layer < 1):
            raise ValueError(f"llm_layer: expected 'auto', None or an int layer index >= 1, got {llm_layer!r}")
        self.retention, self.expansion, self.alpha = float(retention), float(expansion), float(alpha)
        self.tau, self.seg_th = float(temporal_threshold), float(segment_threshold)
        self.min_segments, self.knn, self.merge = min_segments, knn, merge
        self.llm_layer, self.llm_keep = llm_layer, float(llm_keep)

    # ---- the in-LLM stage (run by mmc.apply) ------------------------------------------------------------
    def inllm_stage(self, model=None) -> dict | None:
        """None, or the description of FlashVID's in-LLM stage for `mmc.apply` (`mmcompress.inllm.declared`).

        Layer `llm_layer` keeps ceil(n * llm_keep) of the n video tokens by the last token's attention in layer
        `llm_layer - 1`; on LLaVA-OneVision (`model.config.model_type`) the video's trailing newline is no
        candidate, as in the release (which prunes the range of the compressed frame tokens only).
        """
        if self.llm_layer is None:
            return None
        newline = getattr(getattr(model, "config", None), "model_type", None) == "llava_onevision"
        return {"rule": "fastv", "option": "llm_layer", "k": self.llm_layer, "depth_ref": (20, 28),
                "r": 1.0 - self.llm_keep, "ceil_keep": self.llm_keep, "skip_last": newline}

    # ---- before the LLM ---------------------------------------------------------------------------------
    @staticmethod
    def _frames(inp: Inputs) -> tuple[int, int]:
        N = inp.x.shape[1]
        if len(inp.grid) == 3:
            return inp.grid[0], inp.grid[1] * inp.grid[2]
        return 1, N

    def frame_budget(self, S: int) -> int:
        """The release's per-frame budget before the LLM, ceil(S * retention * expansion), at most S."""
        return min(S, math.ceil(S * self.retention * self.expansion))

    def __call__(self, x: torch.Tensor, **kwargs):
        """See `Compressor.__call__`; keep="auto" plans each video once (its count, then its slots)."""
        self._memo: list = []  # (video x, scores, b, rule result) of this call's keep="auto" counts
        try:
            return super().__call__(x, **kwargs)
        finally:
            self._memo = []

    def auto_keep(self, inp: Inputs) -> torch.Tensor:
        T, S = self._frames(inp)
        b = self.frame_budget(S)
        out = []
        for i in range(inp.x.shape[0]):
            if b >= S:
                out.append(T * S)
                continue
            xv, sv = inp.x[i].detach().cpu().reshape(T, S, -1), inp.scores[i].detach().cpu().float()
            res = self._video(xv, sv.view(T, S)).rule(b, self.alpha, self.knn)
            self._memo.append((xv, sv, b, res))
            out.append(len(res[2]))
        return torch.tensor(out, dtype=torch.long, device=inp.x.device)

    def _video(self, x: torch.Tensor, a: torch.Tensor) -> _Video:
        return _Video(x, a, self.seg_th, self.min_segments, self.tau, self.merge)

    def _rule(self, vid: _Video | None, x: torch.Tensor, score: torch.Tensor, b: int):
        """(video, its rule at budget b): this call's keep="auto" result when it planned the same video at b."""
        for xm, sm, bm, res in getattr(self, "_memo", []):
            if bm == b and xm.shape == x.shape and torch.equal(xm, x) and torch.equal(sm, score):
                return vid, tuple(t.clone() for t in res)
        vid = vid or self._video(x, score.view(x.shape[0], x.shape[1]))
        return vid, vid.rule(b, self.alpha, self.knn)

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, C = inp.x.shape
        T, S = self._frames(inp)
        dev = inp.x.device
        assign = torch.empty(B, N, dtype=torch.long)
        rep = torch.empty(B, k, dtype=torch.long)
        w = torch.empty(B, N)
        for i in range(B):
            assign[i], rep[i], w[i] = self._one(inp.x[i].detach().cpu().reshape(T, S, C),
                                                inp.scores[i].detach().cpu().float(), T, S, k)
        assign, rep, w = assign.to(dev), rep.to(dev), w.to(dev)
        # values: each slot is the mean over its trees of the trees' means: sum of w * x
        acc = accum_dtype(inp.x.dtype)
        out = torch.zeros(B * k + 1, C, dtype=acc, device=dev)
        rows = torch.where(assign >= 0, assign + torch.arange(B, device=dev).unsqueeze(1) * k, B * k).view(-1)
        out.index_add_(0, rows, (inp.x.to(acc) * w.to(acc).unsqueeze(-1)).reshape(B * N, C))
        return Plan(assign=assign, rep=rep, x=out[:-1].view(B, k, C).to(inp.x.dtype))

    def _one(self, x: torch.Tensor, score: torch.Tensor, T: int, S: int, k: int):
        """One video x [T, S, C], scores [N] -> (assign [N], rep [k], weight [N] of each token in its slot)."""
        N = T * S
        b = k // T
        slot = grp = None
        if b >= 1:
            vid, (slot, grp, rep, div) = self._rule(None, x, score, b)
            if len(rep) > k:
                b -= 1
                slot, grp, rep, div = self._rule(vid, x, score, b)[1] if b >= 1 else (None,) * 4
        if slot is None:  # below one token per frame: the k highest scores
            rep = by_score(torch.arange(N), score)[:k].sort().values
            slot = torch.full((N,), -1, dtype=torch.long)
            slot[rep] = torch.arange(k)
            return slot, rep, torch.ones(N)
        M = len(rep)
        if M < k:  # fill: dropped tokens, then members taken out of merged slots, by score
            is_rep = torch.zeros(N, dtype=torch.bool)
            is_rep[rep] = True
            dropped = by_score((slot < 0).nonzero()[:, 0], score)
            inner = by_score(((slot >= 0) & ~is_rep).nonzero()[:, 0], score)
            extra = torch.cat([dropped, inner])[: k - M]
            slot[extra] = M + torch.arange(len(extra))
            grp[extra] = extra
            div[extra] = 1.0
            rep = torch.cat([rep, extra])
            order = rep.argsort()
            rep = rep[order]
            slot = torch.where(slot >= 0, order.argsort()[slot.clamp(min=0)], slot)
        # weight of a token: 1 / (its tree's divisor x the number of trees in its slot)
        alive = slot >= 0
        key = slot[alive] * N + grp[alive]
        _, tree = torch.unique(key, return_inverse=True)  # [A] tree of each live token
        tsize = torch.bincount(tree).float()
        tslot = torch.zeros(len(tsize), dtype=torch.long).scatter_(0, tree, slot[alive])
        ntrees = torch.bincount(tslot, minlength=k).float()
        dv = tsize[tree] if self.merge == "mean" else div[alive]  # a filled slot's trees: what is left of them
        w = torch.zeros(N)
        w[alive] = 1.0 / (dv * ntrees[slot[alive]])
        return slot, rep, w
