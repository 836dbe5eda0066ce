"""`prunesid`: PCA groups + NMS within each group (PruneSID, Fang et al., ICLR'26), as its authors' release computes.

"Prune Redundancy, Preserve Essence: Vision Token Compression in VLMs via Synergistic Importance-Diversity",
clean-room from the paper and from running the release beside this module (docs/fidelity_frontier.md). With
K = keep tokens out in all (the prefix, LLaVA's CLS, counts in K: `prefix_in_budget`) and k = K - P patches:

1. Groups ("principal semantic components"): a randomized PCA (Halko et al.'s range finder, 2 power iterations,
   what `torch.pca_lowrank` runs) of the matrix sigmoid(x)^T [C, N] whose N columns (the tokens) are centred over
   the C channels, at rank G = floor(K / 4) components; each token joins the component on which its loading |V| is
   largest. The range finder starts from a Gaussian test matrix: the release draws it from the global RNG (so its
   kept set changes from run to run); here it is drawn from a generator seeded with `seed` for every sample, so a
   result is reproducible and a sample's result does not depend on its batch mates (the release draws one matrix
   per call and shares it over the batch).
2. Importance: `scores` (the CLS attention row of the feature layer). Within each group, NMS in descending score
   order: a token is kept unless an already kept token of its group has cosine similarity (on x) above
   t = (K / 32) * mean_{i<j} cos(x_i, x_j). With K >= 32 / mean cosine the threshold is >= 1 and nothing is ever
   suppressed (e.g. from K = 128 on DINOv2-S/14's 384-d features, whose mean cosine is above 0.25); the budget rule
   below then follows the group sizes alone.
3. Budget per group: one token for every non-empty group, the remaining k - (non-empty groups) shared in
   proportion to the groups' NMS counts (rounded cumulative shares), each capped at an upper bound: the smallest
   u_g = min(min(c, n_g, s_g) + t, s_g) (c = 5 * ceil(K / 64), n_g the NMS count, s_g the group size, t >= 0 the
   smallest shift) whose sum reaches K. Whatever the caps cut off is filled back group by group, in descending NMS
   count, up to each cap.
4. Within a group the first d_g tokens of its ranking are kept: its NMS survivors in NMS order, then the rest by
   descending score.

The kept tokens pass on unchanged (`select_only`); `order` is the release's sequence (the prefix, then group by
group in ranking order), which `apply` hands to the LLM. Cost: the randomized PCA (O(N·C·G)), similarities within
each group only (sum over groups of n_g²·C, about N²·C / G; the release computes the whole [N, N] matrix and a
masked copy of it per group), the mean cosine from the sum of the unit tokens (O(N·C)), and NMS as a fixed-point
iteration over the block-diagonal conflicts (exact greedy NMS; a few [N, N] matrix-vector products).

Differences from the release (docs/fidelity_frontier.md): the seeded draw (above); G is clamped to
[1, min(k, C, N)] (the release fails for K < 4 and for K / 4 above C or N); every group member is an NMS candidate
(the release marks suppressed tokens by a zero score, so a token whose score is exactly 0 could never be kept
there); similarities in float32 (the release: in the features' dtype); NMS order ties go to the lower index.
The release's Qwen2-VL path is a different rule; `variant="qwen2vl"` computes it (see `PruneSID`).

Letters: B batch, N tokens (prefix removed), P prefix tokens, K budget with the prefix, k without, C channels,
G groups.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.compressors.baselines import selection_plan
from mmcompress.registry import register


def pca_loadings(a: torch.Tensor, q: int, seed: int = 0, niter: int = 2) -> torch.Tensor:
    """Loadings V of a randomized rank-q PCA of each matrix a[b] [m, n] (columns centred over the m rows).

    Halko, Martinsson & Tropp (2009), Algorithm 4.4 (range finder with `niter` power iterations, QR after every
    product) and 5.1 (SVD of the small projected matrix); the test matrix is drawn on the CPU from a generator
    seeded with `seed` (one draw, the same for every matrix of the batch) and then moved to a's device.

    Args:
        a: [B, m, n] float32 matrices.
        q: rank, 1 <= q <= min(m, n).
        seed: seed of the test matrix.
        niter: power iterations.

    Returns:
        [B, n, q] right singular vectors of the centred matrices (approximate, in decreasing singular value).
    """
    m, n = a.shape[-2:]
    a = a - a.mean(dim=-2, keepdim=True)  # [B, m, n] each column centred
    wide = m < n
    if wide:  # work on the tall orientation [B, n, m]
        a = a.transpose(-2, -1)
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(a.shape[-1], q, generator=g, dtype=a.dtype).to(a.device)  # [n', q] test matrix
    at = a.transpose(-2, -1)
    basis = torch.linalg.qr(torch.matmul(a, r)).Q  # [B, m', q]
    for _ in range(niter):
        basis = torch.linalg.qr(torch.matmul(at, basis)).Q
        basis = torch.linalg.qr(torch.matmul(a, basis)).Q
    small = torch.matmul(basis.transpose(-2, -1), a)  # [B, q, n']
    u, _, vh = torch.linalg.svd(small, full_matrices=False)
    if wide:  # the loadings of the original columns are the left factor of the transposed problem
        return torch.matmul(basis, u)  # [B, n, q]
    return vh.transpose(-2, -1)  # [B, n, q]


def group_nms(u: torch.Tensor, perm: torch.Tensor, sizes: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """Greedy NMS within each group.

    A token survives unless an earlier survivor (in NMS order) of its own group has cosine similarity above its
    sample's threshold. Only within-group similarities are computed (one [n_g, C] x [C, n_g] product per group:
    about 1/G of the full [N, N] matrix). The survivors are the fixed point of "survive iff no earlier surviving
    conflicting token" (Cluster-NMS): after t rounds the first t tokens of the order are final and the fixed point
    is unique, so it is exactly the sequential greedy result; rounds stop when nothing changes. Rounds are bounded
    by the longest chain of suppressions (2-8 on real DINOv2 features at K = 8 ... 64, none when nothing
    conflicts), each one [N, N] matrix-vector product over the block-diagonal conflicts.

    Args:
        u: [B, N, C] unit-norm tokens (float32).
        perm: [B, N] int64 tokens in NMS order: group by group (groups 0, 1, ...), within a group first to last.
        sizes: [B, G] int64 group sizes (perm's runs).
        thr: [B] thresholds.

    Returns:
        [B, N] bool survivors, indexed by token.
    """
    B, N, _ = u.shape
    alive = torch.ones(B, N, dtype=torch.bool, device=u.device)
    for b, row in enumerate(sizes.tolist()):
        up = u[b].index_select(0, perm[b])  # [N, C] in NMS order
        conflict = None  # [N, N] block-diagonal: row j before column i in one group, similarity above thr
        start = 0
        for n in row:
            if n > 1:
                blk = up[start : start + n]  # [n, C]
                c = torch.triu(torch.mm(blk, blk.t()) > thr[b], diagonal=1)  # [n, n]
                if bool(c.any()):
                    if conflict is None:
                        conflict = torch.zeros(N, N, dtype=torch.bool, device=u.device)
                    conflict[start : start + n, start : start + n] = c
            start += n
        if conflict is None:
            continue
        ct = conflict.t().float()  # [N(i), N(j)]
        keep = torch.ones(N, device=u.device)
        while True:
            new = (torch.mv(ct, keep) == 0).float()  # [N] no surviving earlier conflict
            if torch.equal(new, keep):
                break
            keep = new
        alive[b, perm[b]] = keep.bool()
    return alive


def group_budgets(sizes: torch.Tensor, nms: torch.Tensor, K: int, k: int) -> torch.Tensor:
    """Tokens kept per group (the release's allocation rule, batched).

    Args:
        sizes: [B, G] int64 group sizes.
        nms: [B, G] int64 NMS survivors per group.
        K: budget with the prefix (sets the caps' target and base).
        k: patches to keep, G' <= k <= N where G' = non-empty groups.

    Returns:
        [B, G] int64 budgets d_g <= sizes, summing to k.
    """
    B, G = sizes.shape
    dev = sizes.device
    lower = sizes.clamp(max=1)  # [B, G] one per non-empty group
    base = torch.minimum(sizes.clamp(max=5 * math.ceil(K / 64)), nms)  # [B, G]
    # caps u = min(base + t, sizes) for the smallest t >= 0 whose sum reaches min(K, N)
    target = torch.minimum(torch.full((B,), K, device=dev), sizes.sum(1))  # [B]
    t = torch.arange(int(sizes.max()) + 1, device=dev)  # [T]
    sums = torch.minimum(base.unsqueeze(1) + t.view(1, -1, 1), sizes.unsqueeze(1)).sum(2)  # [B, T]
    shift = (sums < target.unsqueeze(1)).sum(1)  # [B] first t reaching the target
    upper = torch.minimum(base + shift.unsqueeze(1), sizes)  # [B, G]
    # proportional shares of the rest by rounded cumulative NMS fractions (float32, as the release rounds them)
    other = (k - lower.sum(1)).clamp(min=0)  # [B]
    frac = nms / nms.sum(1, keepdim=True).clamp(min=1)  # [B, G] float32
    cum = (frac.cumsum(1) * other.unsqueeze(1)).round().long()  # [B, G]
    share = cum - torch.nn.functional.pad(cum[:, :-1], (1, 0))
    d = torch.minimum(share + lower, upper)  # [B, G]
    # fill what the caps cut off, group by group in descending NMS count, up to each cap
    fill_order = torch.argsort(nms, dim=-1, descending=True)  # [B, G] (the release's sort)
    room = (upper - d).gather(1, fill_order)  # [B, G]
    missing = (other + lower.sum(1) - d.sum(1)).clamp(min=0)  # [B]
    before = room.cumsum(1) - room  # [B, G] room of the groups filled earlier
    add = torch.minimum(room, (missing.unsqueeze(1) - before).clamp(min=0))  # [B, G]
    return d.scatter_add(1, fill_order, add)


def prunesid_select(x: torch.Tensor, scores: torch.Tensor | None, K: int, k: int, seed: int = 0,
                    variant: str = "llava") -> torch.Tensor:
    """The kept tokens in the release's sequence.

    Args:
        x: [B, N, C] tokens (the prefix removed).
        scores: [B, N] importance (unused by the "qwen2vl" variant, whose importance is the PCA loading).
        K: budget with the prefix (groups, threshold and caps follow it).
        k: tokens to keep, 1 <= k < N.
        seed: seed of the PCA's test matrix.
        variant: "llava" (the release's LLaVA path) or "qwen2vl" (its Qwen2-VL path, see `PruneSID`).

    Returns:
        [B, k] int64 kept token indices, group by group, within a group in ranking order.
    """
    B, N, C = x.shape
    dev = x.device
    xf = x.detach().float()
    qwen = variant == "qwen2vl"
    G = max(1, min(max(K // 4, 4) if qwen else K // 4, k, C, N))
    loads = pca_loadings(torch.sigmoid(xf).transpose(1, 2), G, seed).abs()  # [B, N, G]
    top = loads.max(dim=2)  # [B, N] each token's largest loading and its component
    group = top.indices  # [B, N]
    if qwen:  # the importance is the token's loading on its own component
        scores = top.values
    u = F.normalize(xf, p=2, dim=-1)  # [B, N, C]
    # sum over the pairs i < j of the cosine, from |sum_i u_i|^2 = sum_ij u_i . u_j (no [N, N] matrix needed)
    diag = torch.linalg.vector_norm(u, dim=2).square().sum(1)  # [B] sum_i |u_i|^2
    pairs = (u.sum(1).square().sum(1) - diag) / 2  # [B]
    if qwen:  # the mean over the whole upper triangle, diagonal included, of the N x N matrix
        thr = max(K / (N / 18), 1.0) * (pairs + diag) / (N * N)  # [B]
    else:  # the mean over the pairs i < j
        thr = (K / 32) * pairs / (N * (N - 1) / 2)  # [B]
    # NMS order: by group, then descending score, ties to the lower index
    by_score = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices  # [B, N]
    perm = by_score.gather(1, torch.sort(group.gather(1, by_score), dim=1, stable=True).indices)  # [B, N]
    sizes = torch.zeros(B, G, dtype=torch.long, device=dev).scatter_add_(1, group, torch.ones_like(group))
    alive = group_nms(u, perm, sizes, thr)  # [B, N]
    nms = torch.zeros(B, G, dtype=torch.long, device=dev).scatter_add_(1, group, alive.long())
    d = group_budgets(sizes, nms, K, k)  # [B, G]
    # each group's ranking: survivors in NMS order, then the rest by score
    key = group.gather(1, perm) * 2 + (~alive.gather(1, perm)).long()  # [B, N] along perm
    seq = perm.gather(1, torch.sort(key, dim=1, stable=True).indices)  # [B, N] group by group, ranked
    start = sizes.cumsum(1) - sizes  # [B, G] first position of each group in seq
    g_seq = group.gather(1, seq)  # [B, N]
    pos = torch.arange(N, device=dev).expand(B, N) - start.gather(1, g_seq)  # [B, N] rank within the group
    take = pos < d.gather(1, g_seq)  # [B, N]
    idx = seq[take].view(B, k)
    return idx.sort(dim=1).values if qwen and k > 150 else idx  # the Qwen2-VL path sorts above 150 tokens


@register("prunesid")
class PruneSID(Compressor):
    """Keep tokens by NMS on `scores` within PCA groups, with budgets shared by the groups' NMS counts.

    Args:
        keep: budget (see `Compressor`); the prefix (LLaVA's CLS) counts in it, as in the release.
        seed: seed of the randomized PCA's Gaussian test matrix (the release draws it from the global RNG).
        variant: "llava" (default: the release's LLaVA path, the paper's headline, described in this module) or
            "qwen2vl" (the release's Qwen2-VL path, a different rule on the merger's output: no `scores`, each
            token's importance is its loading on its own component; G = max(floor(K / 4), 4) groups; threshold
            max(K / (N / 18), 1) x the mean of the N x N cosine matrix's upper triangle, diagonal included; no
            prefix in the budget; the sequence group by group, sorted back to source order above 150 tokens).
            The release's `--need_token_num n` is keep = max(round(N n / 576), 16) there.
        epsilon: target error for keep="auto" (the `adaptive` estimator picks the per-sample budget).
    """

    family, modality, needs = "attention, diversity", "image", ("scores",)
    select_only = True
    #: the release hands the LLM the CLS plus K - 1 patches of the feature layer
    prefix_in_budget = True
    # the release: CLS row of the feature layer's attention (heads summed: the same ranking as the mean), groups and
    # similarity on the feature layer's hidden state before the projector, the CLS handed on first
    encoder_needs = EncoderNeeds(layer="feature", heads="mean", cls_prefix=True)

    def __init__(self, keep: int | float | str = 0.5, *, seed: int = 0, variant: str = "llava", epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        if variant not in ("llava", "qwen2vl"):
            raise ValueError(f"variant: expected 'llava' or 'qwen2vl', got {variant!r}")
        self.seed, self.variant = seed, variant
        if variant == "qwen2vl":  # no attention, no CLS: `apply` then reads nothing off the encoder
            self.needs, self.prefix_in_budget, self.encoder_needs = (), False, EncoderNeeds()

    def plan(self, inp: Inputs, k: int) -> Plan:
        N = inp.x.shape[1]
        P = 0 if inp.head is None else inp.head.shape[1]
        K = k + P if self.prefix_in_budget else k
        idx = prunesid_select(inp.x, inp.scores, K, k, self.seed, self.variant)  # [B, k] in the release's sequence
        plan = selection_plan(idx, N)
        plan.order = idx.argsort(dim=1).argsort(dim=1)  # [B, k] slot (source-order rank) of each pick, in sequence
        return plan
