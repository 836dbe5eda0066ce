"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and MoE) on the generic placeholder adapter (`placeholder.py`).

What differs from the other families:

* Items: each image or video is one compressor sample with grid (t, h / merge, w / merge), the tokens after the 2x2
  patch merger (what enters the LLM).
* Positions: M-RoPE (t, h, w) ids of the uncompressed sequence, subset (see `placeholder`, step 4): the LLM sees the
  same geometry, only with holes, as FastV, VisionZip and SparseVLM do on Qwen.
* Scores (attention-based methods): mean attention each patch receives in the last vision block, recomputed from its
  q/k with their rotary embedding (`vision_scores`), so SDPA/FlashAttention models need no eager attention.
* Qwen3-VL's DeepStack features (vision features added to early LLM layers at the same positions) are subset with
  the same indices as the main features.
* Before the encoder (`pixel_norm`: the processor's mean/std): pixel-stage methods (PixelPrune) pick patches from
  `pixel_values` and the tower runs on those only (`mmcompress.hf.pixels`).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmcompress.compressors.attention_scores import attention_row_scores
from mmcompress.compressors.pixelprune import QWEN2_MEAN, QWEN2_STD, QWEN3_MEAN, QWEN3_STD
from mmcompress.hf.placeholder import META_ATTR, Family, ItemMeta, Modality, register_family

__all__ = ["Qwen2VLFamily", "Qwen3VLFamily", "Glm4vFamily", "vision_scores"]

_GRID_ARG = {"image": "image_grid_thw", "video": "video_grid_thw"}


class _Capture:
    """Context: records the inputs of the last vision block's attention call (what `vision_scores` needs)."""

    def __init__(self, attn: torch.nn.Module):
        self.attn, self.got = attn, {}

    def __enter__(self) -> _Capture:
        def hook(_m: Any, a: tuple, kw: dict) -> None:
            names = ("hidden_states", "cu_seqlens", "position_embeddings")
            self.got.update({n: a[j] if len(a) > j else kw.get(n) for j, n in enumerate(names)})

        self.handle = self.attn.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


@register_family
class Qwen2VLFamily(Family):
    """Qwen2-VL / Qwen2.5-VL: images and videos after the patch merger, M-RoPE positions."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    modalities = (Modality("image", "pixel_values", ("image_token_id",), type_id=1),
                  Modality("video", "pixel_values_videos", ("video_token_id",), type_id=2))
    positions = "mrope"
    structural = ("vision_start_token_id", "vision_end_token_id")
    pixel_norm = (QWEN2_MEAN, QWEN2_STD)  # the processor's normalisation (pixel stage; OpenAI CLIP statistics)

    def core(self, model: torch.nn.Module) -> torch.nn.Module:
        inner = model.model if hasattr(getattr(model, "model", None), "visual") else model
        if not hasattr(inner, "visual") or not hasattr(inner, "get_rope_index"):
            raise TypeError(f"model: {type(model).__name__} has no Qwen-VL vision tower (`.visual`)")
        return inner

    def describe(self, adapter: Any, mod: Modality, args: dict[str, Any], out: Any, cap: Any) -> list[ItemMeta]:
        grid_thw = args.get(_GRID_ARG[mod.name])
        if grid_thw is None:  # positional call: the grid is the encoder's second argument
            grid_thw = list(args.values())[1]
        m = adapter.core.visual.spatial_merge_size
        grids = [(int(t), int(h) // m, int(w) // m) for t, h, w in grid_thw.tolist()]
        scores = [None] * len(grids)
        if cap is not None and cap.got:
            scores = vision_scores(adapter.core.visual, cap.attn, cap.got, grid_thw)
        return [ItemMeta(grid=g, scores=s) for g, s in zip(grids, scores, strict=True)]

    def score_capture(self, adapter: Any, mod: Modality, args: dict[str, Any]) -> _Capture:
        return _Capture(adapter.core.visual.blocks[-1].attn)

    def features(self, mod: Modality, out: Any) -> list[torch.Tensor]:
        p = out.pooler_output
        if isinstance(p, torch.Tensor):  # one flat [S, C] tensor: split by the item grids
            meta = getattr(out, META_ATTR, None)
            if meta is not None:
                return list(torch.split(p, [int(torch.tensor(mt.grid).prod()) for mt in meta]))
        return super().features(mod, out)

    def stats(self, adapter: Any) -> dict[str, Any]:
        """Pixel stage: patches the vision tower got / would have got, and the selection time."""
        return dict(getattr(adapter, "pixel_stats", {}))

    def rope_index(self, adapter: Any, kw: dict[str, Any], mm: torch.Tensor) -> torch.Tensor:
        core = adapter.core
        rope_kw = {"image_grid_thw": kw.get("image_grid_thw"), "video_grid_thw": kw.get("video_grid_thw"),
                   "attention_mask": kw.get("attention_mask")}
        if rope_kw["image_grid_thw"] is None and rope_kw["video_grid_thw"] is None:
            raise ValueError("image_grid_thw: M-RoPE positions need the grids (or position_ids from generate())")
        if "second_per_grid_ts" in inspect.signature(core.get_rope_index).parameters:
            rope_kw["second_per_grid_ts"] = kw.get("second_per_grid_ts")
        pos, _ = core.get_rope_index(kw["input_ids"], mm_token_type_ids=mm, **rope_kw)
        return pos  # [3, B, L]


@register_family
class Qwen3VLFamily(Qwen2VLFamily):
    """Qwen3-VL / Qwen3-VL-MoE: as Qwen2-VL, plus DeepStack features subset with the same indices."""

    model_types = ("qwen3_vl", "qwen3_vl_moe")
    pixel_norm = (QWEN3_MEAN, QWEN3_STD)  # Qwen3-VL's processor: mean = std = 0.5 (what the release undoes)

    def pack(self, mod: Modality, out: Any, feats: list[torch.Tensor], kept: list[torch.Tensor | None]) -> Any:
        new = type(out)(pooler_output=tuple(feats)) if isinstance(out, BaseModelOutputWithPooling) else None
        deep = getattr(out, "deepstack_features", None)
        if deep is not None:
            new.deepstack_features = [tuple(f if k is None else f[k.to(f.device)] for f, k in zip(layer, kept,
                                                                                                   strict=True))
                                      for layer in deep]
        return new


@register_family
class Glm4vFamily(Qwen2VLFamily):
    """GLM-4.1V / GLM-4.5V: the Qwen2-VL plumbing with GLM's own M-RoPE index; images only (GLM's videos
    interleave frame timestamps with image tokens, which this description does not map)."""

    model_types = ("glm4v", "glm4v_moe")
    modalities = Qwen2VLFamily.modalities[:1]
    structural = ("image_start_token_id", "image_end_token_id")
    pixel_norm = None  # pixel stage not served: its tower's embeddings/downsample were not checked on patch subsets


@torch.no_grad()
def vision_scores(visual: torch.nn.Module, attn: torch.nn.Module, cap: dict[str, Any],
                  grid: torch.Tensor) -> list[torch.Tensor]:
    """Per-item [N_i] importance of the tokens entering the LLM: mean attention each patch receives in the last
    vision block (over heads and all queries of its attention segment), averaged over the patches of each merged
    token. Recomputed from the block's q/k with their rotary embedding, so SDPA/FlashAttention models need no eager
    attention. Qwen2.5-VL's window permutation is undone.

    Args:
        visual: the vision tower.
        attn: its last block's attention module.
        cap: the attention call's `hidden_states` [S, C], `cu_seqlens` [segments + 1], `position_embeddings` (cos, sin).
        grid: [items, 3] (t, h, w) patch grids.
    """
    x = cap["hidden_states"]
    S = x.shape[0]
    q, k, _ = attn.qkv(x).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # each [S, H, D]
    host = sys.modules[type(attn).__module__]
    if cap.get("position_embeddings") is not None:
        cos, sin = cap["position_embeddings"]
        q, k = host.apply_rotary_pos_emb_vision(q, k, cos, sin)
    cu = cap["cu_seqlens"].tolist()
    parts = []
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        qs, ks = q[s:e].transpose(0, 1).unsqueeze(0), k[s:e].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        parts.append(attention_row_scores(qs, ks, torch.arange(e - s, device=x.device), scale=attn.scaling)[0])
    m = visual.spatial_merge_size
    u = torch.cat(parts).view(-1, m * m).mean(1)  # [S / m^2] per merged token, in the blocks' order
    if hasattr(visual, "window_size"):  # Qwen2.5-VL: blocks run in a window-permuted order of merged tokens
        vmod = sys.modules[type(visual).__module__]
        window_index, _ = vmod.get_vision_window_index(grid, spatial_merge_size=m, window_size=visual.window_size,
                                                       patch_size=visual.patch_size)
        u = u[torch.argsort(window_index.to(u.device))]
    return list(torch.split(u, (grid.prod(-1) // m**2).tolist()))


