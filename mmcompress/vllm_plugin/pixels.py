"""vLLM plugin: the stage BEFORE the vision encoder (PixelPrune) on Qwen2-VL, Qwen2.5-VL and Qwen3-VL images.

Imported by vLLM only (through `models` and `qwen3`). The split is the plugin's usual one (count in the processor,
the rest in the model), and each half is what `mmc.apply` does in transformers (`mmcompress.hf.pixels`):

* Processor (`PixelPlan`): vLLM's multimodal processor has each image's `pixel_values` [N, D] and grid; the
  compressor's own `select` (`pixelprune_select`, with the request's options, e.g. tau, and the family's processor
  mean/std, `pixel_norm`; raw pixels when vLLM normalises on the device: times the processor's rescale factor)
  picks the kept 2 x 2 merge groups, the placeholder run is shortened to their count M (one
  LLM token per kept group), and a per-group mask rides with the item (`mmcompress_image_groups`, [G] bool, one flat
  field over the images) next to the usual plan row (M, compressor, M). An image whose groups are all kept gets no
  plan (vLLM's own path, bit for bit). Videos are served uncompressed, as `mmc.apply` leaves them.
* Model (`encode_split`, from `embed_multimodal`): the vision tower runs on the kept groups' patches only, through its
  own forward with precomputed `encoder_metadata` (vLLM's own per-patch tensors of the FULL grid, subset): the
  ORIGINAL rotary (h, w) positions of the kept patches (Qwen3-VL: also their interpolated learned position
  embeddings), one attention segment per image over its kept patches, and on Qwen2.5-VL the windows of the full grid,
  each holding its kept groups in the full grid's window order (empty windows vanish), as `mmc.apply` runs the HF
  tower. The tower's output rows are the kept groups' tokens (Qwen3-VL: with their DeepStack features); their M-RoPE
  (t, h, w) ids are the original ones (the kept group indices are the representatives, as for any pruning method).
  Images of the same batch under other methods (or none) run through vLLM's own encoder call, apart.

Nothing is patched: the tower instance is called as vLLM calls it, with metadata it accepts as an argument; the
attention backend is vLLM's (its backend-specific segment tensors come from vLLM's `MMEncoderAttention` helpers).

Letters: N patches of the batch's images, G merge groups, M kept groups, u = merge**2 patches per group, D values per
patch, C the tower's output width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from vllm.multimodal.inputs import MultiModalFieldConfig

import mmcompress as mmc
from mmcompress.compressors.pixelprune import patch_rows
from mmcompress.vllm_plugin import Setting, method_code, pixel_stage

GROUPS_KEY = "mmcompress_image_groups"

__all__ = ["GROUPS_KEY", "PixelPlan", "select_groups", "encoder_metadata", "encode_kept", "encode_split"]


# ---- processor ----------------------------------------------------------------------------------------------------
def select_groups(setting: Setting, pixel_values: torch.Tensor, grid_thw: torch.Tensor, vision_config: Any,
                  norm: tuple[Sequence[float], Sequence[float]], rescale: float = 1 / 255) -> list[torch.Tensor]:
    """Per image [M_i] kept merge-group indices (raster order of its group grid), as `mmc.apply` selects them.

    Args:
        setting: a pixel-stage setting (method and its options).
        pixel_values: [N, D] the processor's patches of the request's images: normalised floats, or raw uint8 when
            vLLM normalises on the device (`mm_device_do_normalize`, its default on the Qwen families).
        grid_thw: [I, 3] (t, h, w) patch grid per image.
        vision_config: the HF vision config (spatial_merge_size, in_channels, temporal_patch_size).
        norm: the family's processor (mean, std), undone before comparing normalised pixels (as `mmc.apply`).
        rescale: the processor's rescale factor, applied to raw pixels instead: the same [0, 1] values, so at
            tau = 0 the same groups are kept (equal pixels stay equal, unequal ones differ by a pixel step); for
            tau > 0 only a distance within float rounding of tau can compare differently.
    """
    comp = mmc.create(setting.method, **dict(setting.options))
    channels = getattr(vision_config, "in_channels", 3)
    kw = dict(merge=vision_config.spatial_merge_size, channels=channels,
              temporal=getattr(vision_config, "temporal_patch_size", 2))
    if pixel_values.dtype == torch.uint8:  # raw: normalised in the model, so nothing to undo here
        comp.mean = comp.std = None
        return comp.select(pixel_values.float() * rescale, grid_thw, mean=(0.0,) * channels, std=(1.0,) * channels,
                           **kw)
    return comp.select(pixel_values, grid_thw, mean=norm[0], std=norm[1], **kw)


class PixelPlan:
    """Mixin over a Qwen plan processor (before `_PlanProcessor`): under a pixel-stage setting, each image's plan
    row and placeholder count come from the kept groups, and the group mask rides with the item (module
    docstring). `mmc_pixel_norm`: the family's processor (mean, std), as the HF family's `pixel_norm`."""

    mmc_pixel_norm: tuple[Sequence[float], Sequence[float]] | None = None

    def _mmc_groups(self, grid: torch.Tensor) -> list[int]:
        return (grid.prod(-1) // self.info.get_hf_config().vision_config.spatial_merge_size ** 2).tolist()

    def _mmc_rescale(self) -> float:
        """The rescale factor vLLM's device-side normalisation applies to raw pixels (the processor's)."""
        try:
            from vllm.model_executor.layers.fusion.mm_input_norm import _load_norm_params

            return float(_load_norm_params(self.info.ctx.model_config).rescale_factor)
        except (ImportError, AttributeError, OSError):
            return 1 / 255

    def _add_plans(self, out: Any, setting: Any, hf_kwargs: Mapping[str, object]) -> Any:
        grid = out.get("image_grid_thw")
        if not (setting.active and pixel_stage(setting.method)):
            out = super()._add_plans(out, setting, hf_kwargs)
            if grid is not None:
                out[GROUPS_KEY] = torch.ones(sum(self._mmc_groups(grid)), dtype=torch.bool)
            return out
        out = super()._add_plans(out, Setting(), hf_kwargs)  # every item uncompressed; videos stay so
        if grid is None:
            return out
        kept = select_groups(setting, out["pixel_values"], grid, self.info.get_hf_config().vision_config,
                             self.mmc_pixel_norm, self._mmc_rescale())
        code, rows, masks = method_code(setting.method), [], []
        for k, g in zip(kept, self._mmc_groups(grid), strict=True):
            m = len(k)
            rows.append([m, code, m] if m < g else [g, -1, g])  # all kept: vLLM's own path
            mask = torch.zeros(g, dtype=torch.bool)
            mask[k] = True
            masks.append(mask)
        out["mmcompress_image_plan"] = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
        out[GROUPS_KEY] = torch.cat(masks)
        return out

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> dict:
        cfg = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        grid = hf_inputs.get("image_grid_thw")
        if grid is not None:
            cfg[GROUPS_KEY] = MultiModalFieldConfig.flat_from_sizes(
                "image", torch.tensor(self._mmc_groups(grid), dtype=torch.long), keep_on_cpu=True)
        return cfg


# ---- model --------------------------------------------------------------------------------------------------------
def _segments(visual: torch.nn.Module, cu: torch.Tensor, helpers: bool, cu_key: str = "cu_seqlens",
              suffix: str = "") -> dict[str, Any]:
    """The segment entries of `encoder_metadata` for cumulative lengths cu [S + 1] int32, derived as the tower's own
    `prepare_encoder_metadata` derives them: Qwen2-VL with its `compute_attn_mask_seqlen`; Qwen2.5-VL / Qwen3-VL
    (`helpers`) with vLLM's `MMEncoderAttention` helpers (backend-specific lengths and offsets). `cu_key`, `suffix`:
    Qwen2.5-VL's names ("cu_window_seqlens", "_window" / "_full")."""
    dev = visual.device
    if not helpers:
        cu = cu.to(dev)
        return {cu_key: cu, f"max_seqlen{suffix}": visual.compute_attn_mask_seqlen(cu)}
    from vllm.model_executor.layers.attention import MMEncoderAttention as A

    cu_np = cu.cpu().numpy().astype(np.int32)
    return {f"sequence_lengths{suffix}": A.maybe_compute_seq_lens(visual.attn_backend, cu_np, dev),
            f"max_seqlen{suffix}": torch.tensor(A.compute_max_seqlen(visual.attn_backend, cu_np), dtype=torch.int32),
            cu_key: A.maybe_recompute_cu_seqlens(visual.attn_backend, cu_np, visual.hidden_size, visual.tp_size, dev,
                                                 fp8_padded_hidden_size=visual.fp8_padded_hidden_size)}


def encoder_metadata(visual: torch.nn.Module, grid: list[list[int]], kept: list[torch.Tensor]
                     ) -> tuple[torch.Tensor, dict[str, Any]]:
    """(rows [M u] of the packed patches the kept groups cover, the tower's `encoder_metadata` for them).

    Args:
        visual: vLLM's Qwen2-VL, Qwen2.5-VL or Qwen3-VL vision tower.
        grid: per image [t, h, w] patch grid (t = 1).
        kept: per image [M_i] kept group indices (raster order of its group grid).
    """
    m = visual.spatial_merge_size
    u = m * m
    full = visual.prepare_encoder_metadata(grid)  # vLLM's per-patch tensors of the full grid
    rows = patch_rows([k.cpu() for k in kept], torch.tensor(grid, dtype=torch.long), m)  # [M u] processor order
    counts = torch.tensor([len(k) * u for k in kept], dtype=torch.int32)
    cu = F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))  # one segment per image
    if "window_index" not in full:  # Qwen2-VL, Qwen3-VL: patches in processor order
        md = {k: full[k][rows.to(full[k].device)] for k in ("rotary_pos_emb_cos", "rotary_pos_emb_sin", "pos_embeds")
              if k in full}
        return rows, {**md, **_segments(visual, cu, "sequence_lengths" in full)}
    # Qwen2.5-VL: the blocks see the groups in window order, and so are `full`'s per-patch tensors
    order, slots, ends, offs, goff = [], [], [torch.zeros(1, dtype=torch.int32)], 0, 0
    for (t, h, w), k in zip(grid, kept, strict=True):
        wi, cw = visual.get_window_index_thw(t, h, w)  # [G_i] window-order slot -> group; [windows] end patches
        G = wi.numel()
        mask = torch.zeros(G, dtype=torch.bool)
        mask[k.cpu()] = True
        sel = mask[wi]  # [G_i] which slots hold a kept group
        rank = mask.cumsum(0) - 1  # [G_i] compact index of each kept group
        win = torch.searchsorted(cw.long() // u, torch.arange(G), right=True)  # [G_i] window of each slot
        per_win = torch.bincount(win[sel], minlength=cw.numel())
        order.append(rank[wi[sel]] + offs)
        slots.append(sel.nonzero().flatten() + goff)
        ends.append((per_win * u).cumsum(0).to(torch.int32) + ends[-1][-1])
        offs, goff = offs + len(k), goff + G
    window_index = torch.cat(order)  # [M] compact kept group in each kept slot, window order
    prow = (torch.cat(slots).unsqueeze(1) * u + torch.arange(u)).flatten()  # [M u] their rows in `full`
    dev = full["rotary_pos_emb_cos"].device
    md = {k: full[k][prow.to(dev)] for k in ("rotary_pos_emb_cos", "rotary_pos_emb_sin")}
    inv = torch.empty_like(window_index)
    inv[window_index] = torch.arange(window_index.numel())
    md["window_index"], md["reverse_indices"] = window_index.to(visual.device), inv.to(visual.device)
    cuw = torch.unique_consecutive(torch.cat(ends))  # empty windows vanish
    return rows, {**md, **_segments(visual, cu, True, suffix="_full"),
                  **_segments(visual, cuw, True, "cu_window_seqlens", "_window")}


@torch.no_grad()
def encode_kept(visual: torch.nn.Module, pixel_values: torch.Tensor, grid: list[list[int]],
                kept: list[torch.Tensor]) -> torch.Tensor:
    """[sum M_i, C] the tower's output for the kept groups only (image then raster order), from the unmodified
    tower at their original positions. pixel_values: [N, D] the images' patches (processor order)."""
    rows, md = encoder_metadata(visual, grid, kept)
    return visual(pixel_values[rows.to(pixel_values.device)], grid_thw=grid, encoder_metadata=md)


def encode_split(visual: torch.nn.Module, inp: Any, plan: list[tuple[int, int, int]], groups: Any,
                 pixel_items: list[int], own: Any) -> tuple[list[torch.Tensor], list[Any], list[Any]]:
    """One image batch of which `pixel_items` run the pixel stage -> per image (features, scores, kept).

    Args:
        visual: the vision tower.
        inp: vLLM's parsed image input (pixel_values [N, D], image_grid_thw [I, 3]).
        plan: per image (m, code, k).
        groups: the batch's group masks ([G] bool, flat over the images, or a list of per-image masks).
        pixel_items: indices of the images whose method runs before the encoder.
        own: `own(sub_input, sub_plan) -> (features, scores)`, vLLM's encoder call for the other images.

    Returns:
        features: per image [N_i, C] (the tower's full output) or, for a pixel item, [M_i, C] (kept groups only);
        scores: per image what `own` recorded (None for pixel items); kept: per pixel item its [M_i] kept group
        indices (None for the others).
    """
    if inp["type"] != "pixel_values":
        raise ValueError("mmcompress: a pixel-stage method needs the images' pixels, not precomputed embeddings")
    grid = inp["image_grid_thw"]  # [I, 3]
    m2 = visual.spatial_merge_size ** 2
    sizes = grid.prod(-1).tolist()
    pv = inp["pixel_values"].split(sizes)
    if isinstance(groups, (list, tuple)):
        groups = torch.cat([torch.as_tensor(g).reshape(-1) for g in groups])
    masks = groups.reshape(-1).bool().split([s // m2 for s in sizes])
    n = len(sizes)
    feats, scores, kept = [None] * n, [None] * n, [None] * n
    rest = [i for i in range(n) if i not in pixel_items]
    if rest:
        sub = type(inp)(type="pixel_values", pixel_values=torch.cat([pv[i] for i in rest]),
                        image_grid_thw=grid[rest])
        f, s = own(sub, [plan[i] for i in rest])
        for j, i in enumerate(rest):
            feats[i], scores[i] = f[j], s[j]
    kp = [masks[i].nonzero().flatten() for i in pixel_items]
    y = encode_kept(visual, torch.cat([pv[i] for i in pixel_items]), grid[pixel_items].tolist(), kp)
    for i, t, k in zip(pixel_items, y.split([len(k) for k in kp]), kp, strict=True):
        feats[i], kept[i] = t, k.to(t.device)
    return feats, scores, kept
