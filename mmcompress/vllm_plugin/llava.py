"""vLLM model classes for LLaVA-NeXT and LLaVA-OneVision (anyres tiles, image_newline; OneVision videos) with
mmcompress between the encoder and the LLM.

Imported by vLLM only (through `vllm_plugin.SUPPORTED`). What `mmc.apply` does on these models in transformers
(`mmcompress/hf/llava.py`), and so what this does: an image is ONE item, its base tile then its unpadded
high-res grid in raster order, the per-row newline tokens removed (grid None: the two parts have different
geometries); its N tokens are compressed to M (before the projector by default, after it for methods that declare
`encoder_needs.stage="projector"`), projected, and followed by ONE image_newline token. The placeholder run of a
compressed image is therefore M + 1 tokens, fixed in the processor from the image size alone
(`budget(N, keep) + 1`); an image whose budget keeps all N tokens is vLLM's own embedding, bit for bit.
OneVision's high-res grid is first shrunk as vLLM shrinks it ("anyres_max_9"). A OneVision video is ONE item: its
frames' tokens after the 2x2 bilinear pooling as a (T, h', w') grid (pooled before the projector at the default
stage, as `mmc.apply` does), compressed to M and followed by one image_newline, as vLLM's own video embedding is.

Letters: N tokens of one image without newlines, M kept, C hidden size, C' vision width, h x w patches per tile.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageEmbeddingInputs,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.model_executor.models.vision import get_num_selected_vision_tokens
from vllm.multimodal import MULTIMODAL_REGISTRY

from mmcompress.vllm_plugin import resolve
from mmcompress.vllm_plugin.models import _plan_key, _PlanProcessor, _plans, _stage, _strip, compress_item


def _anyres_counts(info: Any, width: int, height: int) -> tuple[int, int]:
    """(placeholder run uncompressed, N tokens without the newlines) of one LLaVA-NeXT image."""
    cfg, vei = info.get_hf_config(), info.get_vision_encoder_info()
    base = get_num_selected_vision_tokens(vei.get_num_image_tokens(image_width=width, image_height=height),
                                          cfg.vision_feature_select_strategy)
    nph, npw = get_anyres_image_grid_shape((height, width), cfg.image_grid_pinpoints, vei.get_image_size())
    unpadded, _ = info._get_num_unpadded_features(original_height=height, original_width=width,
                                                  npatches=vei.get_patch_grid_length(), num_patch_height=nph,
                                                  num_patch_width=npw)
    return info.get_num_image_tokens(image_width=width, image_height=height), base + unpadded


class MMCLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    def get_hf_processor(self, **kwargs: object) -> Any:
        return super().get_hf_processor(**_strip(kwargs))


class MMCLlavaNextMultiModalProcessor(_PlanProcessor, LlavaNextMultiModalProcessor):
    def _item_counts(self, out: Any) -> dict[str, list[tuple[int, int, int]]]:
        sizes = out.get("image_sizes")
        if sizes is None:
            return {}
        counts = [_anyres_counts(self.info, int(w), int(h)) for h, w in sizes.tolist()]
        return {"image": [(n_run, n, 1) for n_run, n in counts]}  # compressed: M kept + one image_newline


def pack_anyres(feats: torch.Tensor, image_size: tuple[int, int], pinpoints: list, tile_px: int, side: int,
                max_tiles: int | None = None) -> torch.Tensor:
    """One image's tiles [tiles, h*w, C'] -> [N, C']: the base tile, then the unpadded high-res grid in raster
    order, without newline tokens (LLaVA-NeXT's own unpad/pack; any channel count). `max_tiles` (OneVision's
    "anyres_max_9"): a grid larger than that many tiles (by more than 10 %) is shrunk bilinearly, as the model does."""
    base = feats[0]
    if feats.shape[0] == 1:
        return base
    nph, npw = get_anyres_image_grid_shape(image_size, pinpoints, tile_px)
    hi = feats[1:1 + nph * npw].view(nph, npw, side, side, -1)
    hi = hi.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # [C', nph*h, npw*w]
    hi = unpad_image(hi, image_size)  # [C', H', W']
    if max_tiles is not None:
        _, hh, ww = hi.shape
        ratio = math.sqrt(hh * ww / (max_tiles * side**2))
        if ratio > 1.1:
            hi = torch.nn.functional.interpolate(hi[None], [int(hh // ratio), int(ww // ratio)], mode="bilinear")[0]
    return torch.cat([base, hi.flatten(1, 2).transpose(0, 1)], 0)


@MULTIMODAL_REGISTRY.register_processor(MMCLlavaNextMultiModalProcessor, info=MMCLlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class MMCLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with mmcompress on each image's packed tokens (see the module docstring)."""

    def embed_multimodal(self, **kwargs: object) -> Any:
        plans = _plans(kwargs.pop(_plan_key("image"), None))
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaNextImageEmbeddingInputs) or plans is None or all(c < 0 for _, c in plans):
            return self._process_image_input(image_input)
        pv = image_input["pixel_values"]
        tiles = [p.shape[0] for p in pv]  # per image [tiles, 3, H, W] (a stacked tensor or a list)
        stacked = self._image_pixels_to_features(self.vision_tower, torch.cat(list(pv)))  # [sum tiles, h*w, C']
        projected = self.multi_modal_projector(stacked)  # as vLLM: all tiles at once (so keep=1 is bit-exact)
        feats, proj = torch.split(stacked, tiles), torch.split(projected, tiles)
        sizes = image_input["image_sizes"].tolist()
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        out = []
        for i, (m, code) in enumerate(plans):
            own = self._merge_image_patch_embeddings(torch.tensor(sizes[i]), proj[i], strategy="spatial_unpad")
            projector_stage = _stage(code) == "projector"
            x = pack_anyres(proj[i] if projector_stage else feats[i], tuple(sizes[i]), self.config.image_grid_pinpoints,
                            vc.image_size, side)  # [N, C' or C]
            if code < 0 or m >= own.shape[0] or m - 1 >= x.shape[0]:
                out.append(own)  # nothing removed: vLLM's own embedding (with its newlines)
                continue
            grid = (side, side) if tiles[i] == 1 else None
            y, _ = compress_item(x, grid, m - 1, code, ordered=True)  # [M, C' or C]
            if not projector_stage:
                y = self.multi_modal_projector(y)
            out.append(torch.cat([y, self.image_newline[None].to(y)], 0))  # [M + 1, C]
        return tuple(out)


# ---- LLaVA-OneVision ----------------------------------------------------------------------------------------------
class MMCLlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    def get_hf_processor(self, **kwargs: object) -> Any:
        return super().get_hf_processor(**_strip(kwargs))


class MMCLlavaOnevisionMultiModalProcessor(_PlanProcessor, LlavaOnevisionMultiModalProcessor):
    mmc_modalities = ("image", "video")

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Any) -> Any:
        # OneVision calls the HF processor itself (per video), not through `_call_hf_processor`
        setting = resolve(self.info.get_hf_config(), dict(hf_kwargs))
        return self._add_plans(super()._apply_hf_processor_main(mm_items, _strip(hf_kwargs)), setting)

    def _item_counts(self, out: Any) -> dict[str, list[tuple[int, int, int]]]:
        got = {}
        sizes = out.get("image_sizes")
        if sizes is not None:
            got["image"] = [(n_run, n, 1) for n_run, n in
                            (_anyres_counts(self.info, int(w), int(h)) for h, w in sizes.tolist())]
        videos = out.get("pixel_values_videos")
        if videos is not None:
            got["video"] = []
            for v in videos:  # [frames, 3, H, W]
                n = v.shape[0] * self.info._get_num_frame_tokens(image_width=v.shape[-1], image_height=v.shape[-2])
                got["video"].append((n + 1, n, 1))  # + one image_newline, compressed or not
        return got


@MULTIMODAL_REGISTRY.register_processor(MMCLlavaOnevisionMultiModalProcessor, info=MMCLlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class MMCLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision with mmcompress on each image's packed tokens and each video's pooled frames."""

    def embed_multimodal(self, **kwargs: object) -> Any:
        plans = {m: _plans(kwargs.pop(_plan_key(m), None)) for m in ("image", "video")}
        mods = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        for modality, inp in mods.items():  # vLLM's order of modalities
            plan = plans.get(modality)
            if (plan is None or all(c < 0 for _, c in plan)
                    or isinstance(inp, LlavaOnevisionImageEmbeddingInputs)):
                own = self._process_image_input(inp) if modality == "image" else self._process_video_pixels(inp)
                out += tuple(own)
            elif modality == "image":
                out += self._mmc_images(inp, plan)
            else:
                out += self._mmc_videos(inp, plan)
        return out

    def _mmc_images(self, inp: Any, plan: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        pv = inp["pixel_values"]
        tiles = [p.shape[0] for p in pv]
        stacked = self._image_pixels_to_features(self.vision_tower, torch.cat(list(pv)))  # [sum tiles, h*w, C']
        feats = torch.split(stacked, tiles)
        if isinstance(pv, torch.Tensor):  # as vLLM projects them (so an image kept whole is bit-exact)
            proj = torch.split(self.multi_modal_projector(stacked), tiles)
        else:
            proj = [self.multi_modal_projector(f) for f in feats]
        sizes = inp["image_sizes"].tolist()
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        out = []
        for i, (m, code) in enumerate(plan):
            own = self._merge_image_patch_embeddings(torch.tensor(sizes[i]), proj[i], image_newline=self.image_newline,
                                                     strategy="spatial_unpad")
            if code < 0 or m >= own.shape[0]:
                out.append(own)
                continue
            projector_stage = _stage(code) == "projector"
            x = pack_anyres(proj[i] if projector_stage else feats[i], tuple(sizes[i]), self.config.image_grid_pinpoints,
                            vc.image_size, side, max_tiles=9)  # vLLM's fixed "anyres_max_9"
            y, _ = compress_item(x, (side, side) if tiles[i] == 1 else None, m - 1, code, ordered=True)
            if not projector_stage:
                y = self.multi_modal_projector(y)
            out.append(torch.cat([y, self.image_newline[None].to(y)], 0))  # [M + 1, C]
        return tuple(out)

    def _mmc_videos(self, inp: Any, plan: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        pv = inp["pixel_values_videos"]
        frames = [v.shape[0] for v in pv]
        flat = self._image_pixels_to_features(self.vision_tower, torch.cat(list(pv)))  # [sum frames, h*w, C']
        own = None
        vc = self.config.vision_config
        hp = wp = math.ceil(vc.image_size // vc.patch_size / 2)
        out = []
        for v, (f, (m, code)) in enumerate(zip(torch.split(flat, frames), plan, strict=True)):
            n = f.shape[0] * hp * wp
            if code < 0 or m >= n + 1:
                if own is None:  # vLLM's own: projector, then pooling, over all frames at once
                    pooled = self.apply_pooling(self.multi_modal_projector(flat))
                    own = [torch.cat([p.reshape(-1, p.shape[-1]), self.image_newline[None]], 0)
                           for p in torch.split(pooled, frames)]
                out.append(own[v])
                continue
            projector_stage = _stage(code) == "projector"
            x = self.apply_pooling(self.multi_modal_projector(f) if projector_stage else f)  # [T, h'*w', C' or C]
            y, _ = compress_item(x.reshape(n, -1), (f.shape[0], hp, wp), m - 1, code, ordered=True)
            if not projector_stage:
                y = self.multi_modal_projector(y)
            out.append(torch.cat([y, self.image_newline[None].to(y)], 0))  # [M + 1, C]
        return tuple(out)
