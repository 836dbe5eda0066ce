"""PixelPrune (Wang et al., arXiv 2604.00886): drop image patch blocks that a 2-D predictor reproduces, BEFORE the
vision encoder, so the ViT itself runs on fewer patches.

The rule (`pixelprune_select`) works on the blocks the Qwen-VL patch merger turns into one LLM token (2 x 2
patches, "groups"): on the group grid, in raster order, each group is predicted from its causal neighbours
A (left), B (above), C (above-left) with the LOCO-I edge rule of JPEG-LS:

    C B        C ~ B and not C ~ A  -> a horizontal edge: predict A
    A X        C ~ A and not C ~ B  -> a vertical edge:   predict B
               otherwise            -> predict A (first row: A; first column: B)

and X is kept when it differs from its prediction (`~`: distance <= tau, the distance over the group's pixels in
[0, 1] after undoing the processor's normalisation, first temporal frame). Group (0, 0) is always kept. At tau = 0
with the "max" metric a dropped group equals, pixel for pixel, a kept group: lossless. With tau > 0 the release's
default "anchored" scan compares with the reconstructed values (each dropped group takes its prediction's value),
so errors never accumulate beyond tau.

A 2 x 2 merge group is kept or dropped whole (the release decides per group, never per patch), so the encoder's
merger sees only complete groups and the LLM gets one token per kept group.

Release: OPPO-Mente-Lab/PixelPrune @ a870e31, `pixelprune/methods/pred_2d.py` (`Pred2DSelector`, default metric
"max", tau 0, anchored) with `normalize_pixel_values_for_selector` of `pixelprune/patches/qwen3_vl_hf.py`
(x * 0.5 + 0.5: Qwen3-VL's mean = std = 0.5; here the processor's own mean/std are options).

Letters: N patches (rows of Qwen's `pixel_values`), D values per patch, G groups of one image (h/2 * w/2),
gh, gw its group grid, B batch, C channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.compressors.baselines import selection_plan
from mmcompress.registry import register

__all__ = ["PixelPrune", "pixelprune_select", "group_pixels", "patch_rows", "METRICS", "QWEN2_MEAN", "QWEN2_STD",
           "QWEN3_MEAN", "QWEN3_STD"]

METRICS = ("max", "mae", "rmse", "exact")
QWEN2_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL / Qwen2.5-VL processors (OpenAI CLIP statistics)
QWEN2_STD = (0.26862954, 0.26130258, 0.27577711)
QWEN3_MEAN = (0.5, 0.5, 0.5)  # Qwen3-VL processor (what the release undoes: x * 0.5 + 0.5)
QWEN3_STD = (0.5, 0.5, 0.5)


def _dist(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """[...] distance of [..., D] vectors, as the release's `_sim2d` computes it."""
    d = x - y
    if metric in ("max", "exact"):
        return d.abs().amax(dim=-1)
    if metric == "mae":
        return d.abs().mean(dim=-1)
    return d.pow(2).mean(dim=-1).sqrt()


def group_pixels(pixel_values: torch.Tensor, grid_thw: torch.Tensor, *, merge: int = 2, channels: int = 3,
                 temporal: int = 2, mean: Sequence[float] = QWEN3_MEAN,
                 std: Sequence[float] = QWEN3_STD) -> list[torch.Tensor]:
    """Per image, its merge groups' pixels in [0, 1] as the rule compares them.

    Args:
        pixel_values: [N, C * T * P * P] Qwen's flattened patches (processor order: each run of merge**2 rows is one
            merge group, groups in raster order).
        grid_thw: [I, 3] (t, h, w) patch grid of each image (t = 1).
        merge: the spatial merge size (2 on Qwen-VL).
        channels, temporal: C and T of a patch row.
        mean, std: the processor's normalisation, undone per channel (x * std + mean) on the first frame.

    Returns:
        Per image [gh, gw, merge**2 * C * P * P] float32 group vectors.
    """
    if pixel_values.dim() != 2:
        raise ValueError(f"pixel_values: expected [N, C*T*P*P] flattened patches, got {tuple(pixel_values.shape)}")
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw: expected [images, 3] (t, h, w), got {tuple(grid_thw.shape)}")
    N, D = pixel_values.shape
    grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
    if sum(t * h * w for t, h, w in grids) != N:
        raise ValueError(f"grid_thw: its patches sum to {sum(t * h * w for t, h, w in grids)}, but pixel_values has "
                         f"{N} rows")
    pp = D // (channels * temporal)
    if pp * channels * temporal != D:
        raise ValueError(f"pixel_values: row length {D} is not channels * temporal * P * P = {channels} * {temporal}"
                         f" * P * P")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std: expected {channels} values each, got {len(mean)} and {len(std)}")
    u = merge * merge
    x = pixel_values.float().view(N, channels, temporal, pp)[:, :, 0]  # [N, C, P*P] first frame
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, channels, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, channels, 1)
    x = (x * s + m).reshape(N // u, u * channels * pp)  # [N / u, u * C * P*P] one row per group
    out, off = [], 0
    for t, h, w in grids:
        if t != 1 or h % merge or w % merge:
            raise ValueError(f"grid_thw: PixelPrune takes images (t = 1, h and w multiples of {merge}), got "
                             f"{(t, h, w)}")
        gh, gw = h // merge, w // merge
        out.append(x[off : off + gh * gw].view(gh, gw, -1))
        off += gh * gw
    return out


def _loco_fast(g: torch.Tensor, metric: str, tau: float) -> torch.Tensor:
    """[gh, gw] bool kept, every comparison against the ORIGINAL neighbours (the release's vectorised path; equal to
    the anchored scan when `~` is transitive, i.e. tau = 0 with max/exact)."""
    gh, gw, _ = g.shape

    def sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _dist(a, b, metric) <= tau

    keep = torch.zeros(gh, gw, dtype=torch.bool, device=g.device)
    keep[0, 0] = True
    if gw > 1:
        keep[0, 1:] = ~sim(g[0, 1:], g[0, :-1])
    if gh > 1:
        keep[1:, 0] = ~sim(g[1:, 0], g[:-1, 0])
    if gh > 1 and gw > 1:
        X, A, B, C = g[1:, 1:], g[1:, :-1], g[:-1, 1:], g[:-1, :-1]
        use_b = sim(C, A) & ~sim(C, B)
        keep[1:, 1:] = ~sim(X, torch.where(use_b.unsqueeze(-1), B, A))
    return keep


def _loco_anchored(g: torch.Tensor, metric: str, tau: float) -> torch.Tensor:
    """[gh, gw] bool kept, comparisons against the RECONSTRUCTED neighbours (the release's anchored scan).

    Every reconstructed group is a copy of one kept group, so the scan tracks indices (`src`) and memoises the
    distances between groups; same comparisons, same float arithmetic as the release, far fewer tensor ops."""
    gh, gw, _ = g.shape
    flat = g.reshape(gh * gw, -1)
    src = [0] * (gh * gw)  # index of the kept group whose value each position reconstructs to
    keep = torch.zeros(gh * gw, dtype=torch.bool)
    keep[0] = True
    memo: dict[tuple[int, int], bool] = {}

    def sim(i: int, j: int) -> bool:
        if i == j:
            return True
        key = (i, j) if i < j else (j, i)
        v = memo.get(key)
        if v is None:
            v = bool(_dist(flat[i], flat[j], metric) <= tau)
            memo[key] = v
        return v

    for r in range(gh):
        for c in range(gw):
            if r == 0 and c == 0:
                continue
            p = r * gw + c
            if r > 0 and c > 0:
                a, b, cc = src[p - 1], src[p - gw], src[p - gw - 1]
                pred = b if (sim(cc, a) and not sim(cc, b)) else a
            else:
                pred = src[p - 1] if c > 0 else src[p - gw]
            if sim(p, pred):
                src[p] = pred
            else:
                keep[p] = True
                src[p] = p
    return keep.view(gh, gw).to(g.device)


def pixelprune_select(pixel_values: torch.Tensor, grid_thw: torch.Tensor, *, tau: float = 0.0, metric: str = "max",
                      anchored: bool = True, merge: int = 2, channels: int = 3, temporal: int = 2,
                      mean: Sequence[float] = QWEN3_MEAN, std: Sequence[float] = QWEN3_STD) -> list[torch.Tensor]:
    """The kept merge groups of each image (the release's `compute_merged_keep_indices`, method pred_2d).

    Args:
        pixel_values: [N, C * T * P * P] Qwen's flattened patches.
        grid_thw: [I, 3] (t, h, w) per image.
        tau: distance threshold in [0, 1] pixel units (0: lossless).
        metric: "max" (largest pixel difference; the release's default), "mae", "rmse", or "exact" (max, tau = 0).
        anchored: compare with reconstructed values (the release's default; only matters for tau > 0).
        merge, channels, temporal, mean, std: see `group_pixels`.

    Returns:
        Per image [M_i] int64 sorted indices of its kept groups in raster order of its (h / merge, w / merge) grid
        (the order of its tokens after Qwen's merger); M_i >= 1 depends on the pixels and tau.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0:
        raise ValueError(f"tau: expected a float >= 0, got {tau!r}")
    tau = 0.0 if metric == "exact" else float(tau)
    fast = tau == 0 and metric in ("max", "exact") or not anchored
    out = []
    for g in group_pixels(pixel_values, grid_thw, merge=merge, channels=channels, temporal=temporal, mean=mean,
                          std=std):
        keep = _loco_fast(g, metric, tau) if fast else _loco_anchored(g, metric, tau)
        out.append(keep.flatten().nonzero().squeeze(1))
    return out


def patch_rows(kept: Sequence[torch.Tensor], grid_thw: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """[sum M_i * merge**2] rows of the packed `pixel_values` that the kept groups cover (image offsets added),
    each group's merge**2 patches in their processor order (what the release's `merged_indices_to_patch_indices`
    gives per image)."""
    u = merge * merge
    dev = kept[0].device if len(kept) else grid_thw.device
    offs = torch.cumsum(torch.cat([grid_thw.new_zeros(1), grid_thw.prod(-1)[:-1]]), 0).tolist()
    rows = [(off + k.to(dev).unsqueeze(1) * u + torch.arange(u, device=dev)).flatten()
            for off, k in zip(offs, kept, strict=True)]
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=dev)


@register("pixelprune")
class PixelPrune(Compressor):
    """PixelPrune: keep the patch groups a 2-D (LOCO-I) predictor does not reproduce within `tau`.

    Under `mmc.apply` on Qwen2/2.5/3-VL it runs BEFORE the vision encoder (`EncoderNeeds(stage="pixels")`): the
    rule (`pixelprune_select`) reads the processor's `pixel_values`, the ViT runs on the kept patches only (their
    original rotary positions; Qwen2.5-VL's windows from the full grid, each holding its kept patches) and the LLM
    gets one token per kept 2 x 2 group at its original M-RoPE position. The count then depends on the pixels and
    tau; `keep` is not used there.

    Called on tokens (`mmc.create("pixelprune")(x, grid=(H, W))`), the same predictor runs on the token grid (sliding
    form): keep="auto" keeps the tokens whose prediction error exceeds tau (per-sample counts); a fixed budget keeps
    the k largest prediction errors (token (0, 0) first, ties in raster order).

    Args:
        keep: budget of the token-level call; "auto" (default) = the rule's own count.
        tau: distance threshold (pixel units in [0, 1] before the encoder; token units on tokens). 0 = lossless.
        metric: "max" (default, the release's), "mae", "rmse" or "exact".
        anchored: compare with reconstructed values (release default; only matters for tau > 0, pixel stage).
        mean, std: the processor normalisation to undo before comparing pixels; None = the family's processor
            default (Qwen2/2.5-VL: OpenAI CLIP statistics; Qwen3-VL: 0.5 / 0.5, as the release).
    """

    name = "pixelprune"
    family = "before the encoder"
    modality = "image"
    needs = ()
    encoder_needs = EncoderNeeds(stage="pixels")

    def __init__(self, keep: int | float | str = "auto", *, tau: float = 0.0, metric: str = "max",
                 anchored: bool = True, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__(keep)
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0:
            raise ValueError(f"tau: expected a float >= 0, got {tau!r}")
        if not isinstance(anchored, bool):
            raise TypeError(f"anchored: expected a bool, got {type(anchored).__name__}")
        for nm, v in (("mean", mean), ("std", std)):
            if v is not None and (len(v) != 3 or not all(isinstance(e, (int, float)) for e in v)):
                raise ValueError(f"{nm}: expected 3 floats (one per channel) or None, got {v!r}")
        if std is not None and any(e <= 0 for e in std):
            raise ValueError(f"std: expected positive values, got {std!r}")
        self.tau, self.metric, self.anchored = (0.0 if metric == "exact" else float(tau)), metric, anchored
        self.mean, self.std = mean, std

    def select(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, *, merge: int = 2, channels: int = 3,
               temporal: int = 2, mean: Sequence[float] = QWEN3_MEAN,
               std: Sequence[float] = QWEN3_STD) -> list[torch.Tensor]:
        """`pixelprune_select` with this instance's tau / metric / anchored (its own mean/std win when set)."""
        return pixelprune_select(pixel_values, grid_thw, tau=self.tau, metric=self.metric, anchored=self.anchored,
                                 merge=merge, channels=channels, temporal=temporal,
                                 mean=self.mean if self.mean is not None else mean,
                                 std=self.std if self.std is not None else std)

    # ---- token-level call ---------------------------------------------------------------------------------------
    def _errors(self, inp: Inputs) -> torch.Tensor:
        """[B, N'] prediction error of each token on its grid (sliding form); token (0, 0) gets +inf."""
        x = inp.x.float()
        B, N, C = x.shape
        gh, gw = (inp.grid[-2], inp.grid[-1]) if inp.grid is not None and len(inp.grid) >= 2 else (1, N)
        if gh * gw != N:
            gh, gw = 1, N  # a (T, H, W) grid: frames stacked as rows of one raster
        g = x.view(B, gh, gw, C)
        err = torch.full((B, gh, gw), float("inf"), device=x.device)
        m = self.metric
        if gw > 1:
            err[:, 0, 1:] = _dist(g[:, 0, 1:], g[:, 0, :-1], m)
        if gh > 1:
            err[:, 1:, 0] = _dist(g[:, 1:, 0], g[:, :-1, 0], m)
        if gh > 1 and gw > 1:
            X, A, Bv, Cv = g[:, 1:, 1:], g[:, 1:, :-1], g[:, :-1, 1:], g[:, :-1, :-1]
            use_b = (_dist(Cv, A, m) <= self.tau) & (_dist(Cv, Bv, m) > self.tau)
            err[:, 1:, 1:] = _dist(X, torch.where(use_b.unsqueeze(-1), Bv, A), m)
        return err.view(B, N)

    def auto_keep(self, inp: Inputs) -> torch.Tensor:
        """[B] tokens the predictor does not reproduce within tau."""
        return (self._errors(inp) > self.tau).sum(1).clamp(min=1)

    def plan(self, inp: Inputs, k: int) -> Plan:
        """The k tokens with the largest prediction error (stable: raster order among ties)."""
        err = self._errors(inp)  # [B, N']
        idx = torch.sort(err, dim=1, descending=True, stable=True).indices[:, :k]
        return selection_plan(idx, err.shape[1])
