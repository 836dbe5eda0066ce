"""The stage BEFORE the vision encoder: a method picks patches from the processor's pixels and the ViT runs on those
only (PixelPrune; any later pre-encoder method reuses it by declaring `EncoderNeeds(stage="pixels")` and a
`select(pixel_values, grid_thw, merge=, channels=, temporal=, mean=, std=)` method returning per image the kept
merge groups).

Served for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (their families set `pixel_norm`, the processor's mean/std): their
towers take packed, variable patch sets, and transformers (>= 5.x `vision_utils`) lets the caller hand the
per-patch tensors precomputed, so the tower runs unmodified on the kept rows with:

* `position_ids`: the kept patches' ORIGINAL (h, w) rotary positions (from the full grid, subset);
* `cu_seqlens`: one attention segment per image, over its kept patches;
* Qwen2.5-VL `window_index` / `cu_window_seqlens`: the windows of the FULL grid (112 px squares), each holding its
  kept groups in the full grid's window order; empty windows vanish (the release, Qwen3-VL / Qwen3.5 only, has no
  windowed tower: this is the direct extension, each kept patch attends to the kept patches of its own window);
* Qwen3-VL `interp_indices` / `interp_weights`: the learned position embedding of each kept patch's original place;
  its DeepStack features come out for the kept groups, like the main ones.

Merge groups (2 x 2 patches -> one LLM token) are kept or dropped whole (the rule decides per group, as the
release), so the merger sees complete groups. The encoder output handed on keeps the model's layout (per image its
full [h/2 * w/2, C] features, in placeholder order) with zeros at the dropped groups, plus the kept indices in each
item's `ItemMeta.kept`; the adapter then removes the dropped groups' placeholder columns exactly as for any pruning
method (original M-RoPE ids of the kept ones).

Letters: N patches, G merge groups (all images), M kept groups, u = merge**2 patches per group, C hidden size.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mmcompress.compressors.pixelprune import patch_rows
from mmcompress.hf.family import META_ATTR, ItemMeta

if TYPE_CHECKING:
    from mmcompress.hf.placeholder import PlaceholderAdapter

__all__ = ["check_pixel_stage", "encode_pixels", "encode_kept"]

_GRID_ARG = {"image": "image_grid_thw"}


def check_pixel_stage(adapter: PlaceholderAdapter) -> None:
    """Refuse, with the reason, a model whose vision tower cannot run on a subset of its patches."""
    fam, name = adapter.family, getattr(adapter.compressor, "name", "")
    if getattr(fam, "pixel_norm", None) is None:
        raise ValueError(f"name: {name!r} drops patches BEFORE the vision encoder, which needs a tower that takes a "
                         f"variable patch set with their original positions (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); "
                         f"{type(fam).__name__.removesuffix('Family')} ({adapter.model.config.model_type}) is not "
                         f"served")
    try:
        from transformers import vision_utils  # noqa: F401  (the precomputed-argument helpers, transformers >= 5)
    except ImportError as e:
        raise ValueError(f"name: {name!r} needs transformers' vision_utils (transformers >= 5.x) to run the vision "
                         f"tower on a patch subset") from e
    if not hasattr(adapter.compressor, "select"):
        raise TypeError(f"name: {name!r} declares stage 'pixels' but has no select(pixel_values, grid_thw, ...)")


def encode_kept(visual: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                kept: list[torch.Tensor]) -> Any:
    """Run the unmodified tower on the kept groups' patches only, at their original positions.

    Args:
        visual: a Qwen2/2.5/3-VL vision tower.
        pixel_values: [N, D] all patches (processor order).
        grid_thw: [I, 3] per image.
        kept: per image [M_i] kept group indices (raster order of its group grid).

    Returns:
        The tower's output: `pooler_output` [sum M_i, C] (kept groups, in image then raster order), and Qwen3-VL's
        `deepstack_features` as a list of [sum M_i, C].
    """
    from transformers.vision_utils import (
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
        get_vision_window_index,
    )

    m = visual.spatial_merge_size
    u = m * m
    dev = pixel_values.device
    grid_thw = grid_thw.to(dev)
    rows = patch_rows(kept, grid_thw, m).to(dev)  # [sum M_i * u]
    kw: dict[str, Any] = {"position_ids": get_vision_position_ids(grid_thw, m)[rows]}  # [M u, 2] original (h, w)
    counts = torch.tensor([len(k) * u for k in kept], device=dev)
    kw["cu_seqlens"] = F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))  # one segment per image
    if hasattr(visual, "window_size"):  # Qwen2.5-VL: windows of the full grid, restricted to the kept groups
        widx, cuw = get_vision_window_index(grid_thw, spatial_merge_size=m, window_size=visual.window_size,
                                            patch_size=visual.patch_size)
        widx, cuw = widx.to(dev), cuw.to(dev)
        G = widx.numel()
        offs = torch.cumsum(F.pad(grid_thw.prod(-1) // u, (1, 0)), 0)[:-1]
        mask = torch.zeros(G, dtype=torch.bool, device=dev)  # [G] kept groups (global index)
        mask[torch.cat([o + k.to(dev) for o, k in zip(offs, kept, strict=True)])] = True
        rank = mask.cumsum(0) - 1  # [G] compact index of each kept group
        sel = mask[widx]  # [G] window-order positions that are kept
        win = torch.searchsorted(cuw[1:] // u, torch.arange(G, device=dev), right=True)  # [G] window of position
        per_win = torch.bincount(win[sel], minlength=cuw.numel() - 1)
        kw["window_index"] = rank[widx[sel]]
        kw["cu_window_seqlens"] = torch.unique_consecutive(F.pad((per_win * u).cumsum(0, dtype=torch.int32), (1, 0)))
    if hasattr(visual, "num_grid_per_side"):  # Qwen3-VL: learned position embedding of the original places
        ii, ww = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=m)
        kw["interp_indices"], kw["interp_weights"] = ii[rows], ww[rows]
    return visual(pixel_values[rows].type(visual.dtype), grid_thw=grid_thw, return_dict=True, **kw)


def _scatter(x: torch.Tensor, gidx: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """[M, C] kept-group rows -> per image [G_i, C] with zeros at the dropped groups."""
    full = x.new_zeros(sum(sizes), x.shape[-1])
    full[gidx] = x
    return torch.split(full, sizes)


def encode_pixels(adapter: PlaceholderAdapter, mod: Any, fn: Any, args: dict[str, Any], call: tuple) -> Any:
    """The patched `get_image_features` under a pixel-stage method: select, encode the kept patches, describe.

    Args:
        adapter: the placeholder adapter.
        mod: the image modality.
        fn: the model's own `get_image_features` (used unchanged when the rule keeps every group).
        args: its bound arguments.
        call: (args, kwargs) of the original call.

    Returns:
        An output in the model's own layout (per image full-length features, zeros at dropped groups) with the
        per-item `ItemMeta` (grid, `kept`) on it.
    """
    fam, core = adapter.family, adapter.core
    visual = core.visual
    pv, grid = args[mod.input], args.get(_GRID_ARG[mod.name])
    if grid is None:
        raise ValueError("image_grid_thw: the pixel stage needs each image's (t, h, w) patch grid")
    m = visual.spatial_merge_size
    mean, std = fam.pixel_norm
    cfg = visual.config
    t0 = time.perf_counter()
    kept = adapter.compressor.select(pv, grid, merge=m, channels=getattr(cfg, "in_channels", 3),
                                     temporal=getattr(cfg, "temporal_patch_size", 2), mean=mean, std=std)
    select_ms = (time.perf_counter() - t0) * 1e3
    sizes = (grid.prod(-1) // (m * m)).tolist()
    n_in, n_out = int(pv.shape[0]), sum(len(k) for k in kept) * m * m
    adapter.pixel_stats = {"encoder_patches_in": n_in, "encoder_patches_out": n_out, "select_ms": select_ms}
    grids = [(int(t), int(h) // m, int(w) // m) for t, h, w in grid.tolist()]
    if n_out == n_in:  # nothing removable: the model's own call, bit for bit
        out = fn(*call[0], **call[1])
        object.__setattr__(out, META_ATTR, [ItemMeta(grid=g, kept=k) for g, k in zip(grids, kept, strict=True)])
        return out
    out = encode_kept(visual, pv, grid, kept)
    dev = out.pooler_output.device
    offs = torch.cumsum(torch.tensor([0, *sizes[:-1]]), 0).tolist()
    gidx = torch.cat([o + k.to(dev) for o, k in zip(offs, kept, strict=True)])  # [M] global group index
    out.pooler_output = _scatter(out.pooler_output, gidx, sizes)
    deep = getattr(out, "deepstack_features", None)
    if deep:
        out.deepstack_features = [_scatter(d, gidx, sizes) for d in deep]
    meta = [ItemMeta(grid=g, kept=k.to(dev)) for g, k in zip(grids, kept, strict=True)]
    object.__setattr__(out, META_ATTR, meta)
    return out
