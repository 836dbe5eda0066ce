"""`holov`: the budget spread over crops of the token sequence (HoloV, Zou et al., NeurIPS'25), clean-room.

"Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context Retention". Instead of one
global top-k, the tokens are cut into P crops and every crop gets a share of the budget by how much it holds:

1. crops: P consecutive runs of the token sequence (raster order), the first N mod P one token longer;
   P = `crops`, or by default max(1, floor((1024 / 576) * N / k)) (16 crops for LLaVA's 576 tokens at k = 64);
2. token score within a crop of n >= 2 tokens: a = 1000 * `scores` (the [CLS] attention row), v = the variance
   of the token's cosine similarities (on `metric` if given, else x) to the crop, taken over the n entries of its
   similarity row with the diagonal zeroed and divided by n - 1; score = a + beta * v * mean|a| / (mean|v| + 1e-6)
   (beta = 0.09); a crop's score is the mean of its token scores (a crop of one token: its raw `scores` entry);
3. shares: w = score / (sum of scores + 1e-6); crop c gets floor(w_c * k) tokens, and the k - sum left over go one
   each to the crops with the largest w;
4. within a crop, its share of tokens with the highest `scores` are kept (all of them when the share reaches
   the crop's size).

The kept tokens pass on unchanged (`select_only`); `order` is the release's output sequence (below).

Differences from the authors' release (measured in docs/fidelity_frontier.md): (a) when a crop's share exceeds its
size, the release drops the excess and pads the output with zero vectors up to k; here the excess goes, in
descending w, to crops that still have tokens left (their next highest-`scores` tokens), so k real tokens are
kept; without overflow the kept set is the release's. (b) None in the order: `x` holds the kept tokens in source
order like every compressor, and `order` gives the release's sequence (crop by crop; within a crop by descending
`scores`, or in source order when the whole crop is kept), which `apply` hands to the LLM on 1-D placeholder runs.

Letters: B batch, N tokens (prefix removed), k budget, P crops, n tokens in a crop, d similarity features.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.compressors.baselines import selection_plan
from mmcompress.registry import register

#: the release's constants: attention scale, variance weight, the eps of the normalisations.
ATTN_SCALE, BETA, EPS = 1e3, 0.09, 1e-6


def default_crops(n: int, k: int) -> int:
    """Crops for n tokens and budget k: the release's rule max(1, floor((1024 / 576) * n / k))."""
    return max(1, int(((1024 / 576) * n) / k))


def crop_bounds(n: int, p: int) -> list[tuple[int, int]]:
    """[start, end) of the min(p, n) non-empty consecutive crops of n tokens (the first n mod p one longer)."""
    base, rem = divmod(n, p)
    out, start = [], 0
    for c in range(p):
        size = base + (1 if c < rem else 0)
        if size > 0:
            out.append((start, start + size))
        start += size
    return out


def crop_scores(f: torch.Tensor, a: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """Score of each crop of n tokens.

    Args:
        f: [..., n, d] features of the crop's tokens (leading dims: batch, and crops of equal size).
        a: [..., n] float32 attention scores of the crop's tokens.
        beta: weight of the similarity-variance term.

    Returns:
        [...] float32 crop scores.
    """
    n = f.shape[-2]
    if n <= 1:
        return a.mean(dim=-1)
    u = f.float() / (f.float().norm(dim=-1, keepdim=True) + EPS)  # [..., n, d]
    s = torch.matmul(u, u.transpose(-1, -2))  # [..., n, n]
    s.diagonal(dim1=-2, dim2=-1).zero_()  # the release multiplies by 1 - eye: the same values
    mean = s.sum(dim=-1) / (n - 1)  # [..., n]
    var = (s - mean.unsqueeze(-1)).square().sum(dim=-1) / (n - 1)  # [..., n]
    a = a * ATTN_SCALE
    scale = a.abs().mean(dim=-1, keepdim=True) / (var.abs().mean(dim=-1, keepdim=True) + EPS)  # [..., 1]
    return (a + beta * var * scale).mean(dim=-1)


def crop_groups(bounds: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """Runs of consecutive crops of equal size: (first crop, crops, first token, crop size), at most two runs."""
    out: list[tuple[int, int, int, int]] = []
    for c, (s, e) in enumerate(bounds):
        if out and out[-1][3] == e - s:
            first, count, start, size = out[-1]
            out[-1] = (first, count + 1, start, size)
        else:
            out.append((c, 1, s, e - s))
    return out


def allocate(w: torch.Tensor, k: int, cap: torch.Tensor) -> torch.Tensor:
    """Tokens per crop from the crop weights.

    Args:
        w: [B, P] float32 crop weights (summing to about 1).
        k: budget.
        cap: [P] int64 crop sizes (sum >= k).

    Returns:
        [B, P] int64 shares, each <= its crop's size, summing to k.
    """
    B, P = w.shape
    share = (w * k).floor().long()  # [B, P]
    left = k - share.sum(dim=1)  # [B]
    top = w.argsort(dim=1, descending=True)  # [B, P] (the release: torch.topk of w)
    rank = top.argsort(dim=1)  # [B, P] rank of each crop by w
    share = share + (rank < left.unsqueeze(1)).long()
    # overflow (the release pads with zeros): hand the excess to crops with room, in descending w
    over = (share - cap).clamp(min=0).sum(dim=1)  # [B]
    share = torch.minimum(share, cap.expand(B, P))
    if bool((over > 0).any()):
        room = (cap.expand(B, P) - share).gather(1, top)  # [B, P] room in descending-w order
        before = room.cumsum(dim=1) - room  # room of the crops ranked before
        extra = (over.unsqueeze(1) - before).clamp(min=0)
        extra = torch.minimum(extra, room)
        share = share.scatter_add(1, top, extra)
    return share


@register("holov")
class HoloV(Compressor):
    """Spread the budget over consecutive crops by crop score, keep the top-`scores` tokens within each crop.

    Args:
        keep: budget (see `Compressor`).
        crops: number of crops P, or None for the release's rule max(1, floor(1.78 N / k)).
        beta: weight of the similarity-variance term in the token score (release: 0.09).
        epsilon: target error for keep="auto" (the `adaptive` estimator picks the per-sample budget).
    """

    family, modality, needs = "attention, coverage", "image", ("scores",)
    select_only = True
    # the release scores crops on the projector's output, with the [CLS] row of the feature layer, heads averaged
    encoder_needs = EncoderNeeds(layer="feature", heads="mean", stage="projector")

    def __init__(self, keep: int | float | str = 0.5, *, crops: int | None = None, beta: float = BETA,
                 epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if crops is not None and (isinstance(crops, bool) or not isinstance(crops, int) or crops < 1):
            raise ValueError(f"crops: expected None or an int >= 1, got {crops!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
            raise ValueError(f"beta: expected a float >= 0, got {beta!r}")
        self.crops = crops
        self.beta = float(beta)

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, _ = inp.x.shape
        dev = inp.x.device
        a = inp.scores.float()  # [B, N]
        bounds = crop_bounds(N, self.crops or default_crops(N, k))
        f = inp.sim
        groups = crop_groups(bounds)  # crops of equal size are scored and ranked together
        score = torch.cat([crop_scores(f[:, s : s + P * n].reshape(B, P, n, -1), a[:, s : s + P * n].view(B, P, n),
                                       self.beta) for _, P, s, n in groups], dim=1)  # [B, P]
        w = score / (score.sum(dim=1, keepdim=True) + EPS)
        cap = torch.tensor([e - s for s, e in bounds], device=dev)
        share = allocate(w, k, cap)  # [B, P]
        keep, key = [], []
        for c0, P, s, n in groups:
            rank = a[:, s : s + P * n].view(B, P, n).argsort(dim=2, descending=True).argsort(dim=2)  # [B, P, n]
            sc = share[:, c0 : c0 + P].unsqueeze(2)  # [B, P, 1]
            keep.append((rank < sc).view(B, P * n))
            # the release's sequence: crop by crop; a crop kept whole in source order, else by descending scores
            within = torch.where(sc >= n, torch.arange(n, device=dev).expand(B, P, n), rank)
            crop = torch.arange(c0, c0 + P, device=dev).view(1, P, 1)
            key.append((crop * N + within).view(B, P * n))
        keep = torch.cat(keep, dim=1)  # [B, N], k True per row
        idx = keep.nonzero()[:, 1].view(B, k)  # [B, k] kept tokens in source order (= slot ids 0..k-1)
        plan = selection_plan(idx, N)
        plan.order = torch.cat(key, dim=1).gather(1, idx).argsort(dim=1)  # [B, k] slots in the release's sequence
        return plan
