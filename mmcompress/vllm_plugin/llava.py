"""vLLM model classes for LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (anyres tiles, image_newline; OneVision videos)
with mmcompress between the encoder and the LLM.

Imported by vLLM only (through `vllm_plugin.SUPPORTED`). What `mmc.apply` does on these models in transformers
(`mmcompress/hf/llava.py`), and so what this does: each method runs at the stage `mmc.apply` picks (before the
projector by default, after it for text-guided methods and those that declare `encoder_needs.stage="projector"`),
with the scores, keys and CLS its `EncoderNeeds` declares read off vLLM's own CLIP/SigLIP tower during its call
(`scores.TowerSignals`) and the request's question (`text`).

* LLaVA-1.5: an image is one item with its (h, w) patch grid; with the "full" strategy its CLS is a kept prefix; a
  method that declares `cls_prefix` (VisionZip) gets the feature layer's CLS ahead of the patches ("default"
  strategy) and hands it to the LLM, so its run is 1 + k placeholders.
* LLaVA-NeXT / OneVision images: ONE item, its base tile then its unpadded high-res grid in raster order, the
  per-row newline tokens removed (grid None: the two parts have different geometries; a single-tile image keeps its
  (h, w) grid); its N tokens are compressed to k, projected, and followed by ONE image_newline token, so a
  compressed image takes k + 1 placeholders, fixed in the processor from the image size alone; an image whose
  budget keeps all N tokens is vLLM's own embedding, bit for bit. OneVision's high-res grid is first shrunk as
  vLLM shrinks it ("anyres_max_9"); scores are packed like the features.
* A OneVision video is ONE item: its frames' tokens after the 2x2 bilinear pooling as a (T, h', w') grid (pooled
  before the projector at the default stage, as `mmc.apply` does; scores pooled alike), compressed to k and
  followed by one image_newline, as vLLM's own video embedding is.

Letters: N tokens of one image without newlines, k kept, C hidden size, C' vision width, h x w patches per tile.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _get_num_hidden_layers,
)
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

from mmcompress.compressors.base import EncoderNeeds
from mmcompress.vllm_plugin import resolve
from mmcompress.vllm_plugin.models import (
    ItemCount,
    LlavaSignals,
    _plan_key,
    _PlanProcessor,
    _plans,
    _question_ids,
    _request,
    _stage,
    _strip,
    _text_key,
    compress_item,
    needs_of,
)
from mmcompress.vllm_plugin.scores import scoring_block, wants_signals


class _LlavaChecks:
    """What the LLaVA families' CLIP/SigLIP towers can give a compressor (`scores.TowerSignals`)."""

    def _check_needs(self, method: str, needs: frozenset[str], enc: EncoderNeeds) -> None:
        super()._check_needs(method, needs, enc)
        if not wants_signals(needs, enc):
            return
        cfg = self.info.get_hf_config()
        block, built = scoring_block(cfg, enc), _get_num_hidden_layers(cfg)
        if block > built:
            raise ValueError(f"mmcompress {method!r} reads vision block {block}, but vLLM builds this tower only up to "
                             f"its feature layer (blocks 0..{built - 1}); the plugin can score one block past it")


# ---- LLaVA-1.5 ----------------------------------------------------------------------------------------------------
class MMCLlavaProcessingInfo(LlavaProcessingInfo):
    def get_hf_processor(self, **kwargs: object) -> Any:
        return super().get_hf_processor(**_strip(kwargs))


class MMCLlavaMultiModalProcessor(_LlavaChecks, _PlanProcessor, LlavaMultiModalProcessor):
    def _item_counts(self, out: Any, enc: EncoderNeeds) -> dict[str, list[ItemCount]]:
        pv = out.get("pixel_values")
        if pv is None:
            return {}
        sizes = [(int(p.shape[-1]), int(p.shape[-2])) for p in pv]
        ns = [self.info.get_num_image_tokens(image_width=w, image_height=h) for w, h in sizes]
        if self.info.get_hf_config().vision_feature_select_strategy == "full":  # the CLS is a feature: kept ahead
            return {"image": [ItemCount(n, n - 1, prefix=1) for n in ns]}
        if enc.cls_prefix:  # the method gets the CLS ahead of the patches and hands it to the LLM (VisionZip)
            return {"image": [ItemCount(n, n, prefix=1) for n in ns]}
        return {"image": [ItemCount(n, n) for n in ns]}


@MULTIMODAL_REGISTRY.register_processor(MMCLlavaMultiModalProcessor, info=MMCLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class MMCLlavaForConditionalGeneration(LlavaSignals, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with mmcompress on the selected vision features (see the module docstring); positions are
    1-D, so the shortened prompt needs nothing else."""

    def embed_multimodal(self, **kwargs: object) -> Any:
        plans = _plans(kwargs.pop(_plan_key("image"), None))
        texts = kwargs.pop(_text_key("image"), None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaImageEmbeddingInputs) or plans is None or all(c < 0 for _, c, _ in plans):
            return self._process_image_input(image_input)
        default = self.config.vision_feature_select_strategy == "default"
        feats, sig = self._mmc_tower(lambda: self._process_image_pixels(image_input), plans, cls_ok=default)
        prefix = 0 if default else 1  # "full": the CLS is the first feature
        out = []
        for i, (x, (_, code, k), q) in enumerate(zip(feats, plans, _question_ids(texts, len(plans)), strict=True)):
            n = x.shape[0] - prefix
            side = int(round(n ** 0.5))
            grid = (side, side) if side * side == n else None
            enc = _needs(code)
            sc, me = self._mmc_signals(sig, code, slice(i, i + 1), n, drop_cls=default and not enc.cls_prefix)
            p = prefix
            if code >= 0 and enc.cls_prefix and default:  # the feature layer's CLS ahead of the patches
                x, p = torch.cat([sig.cls[i].to(x.dtype), x], 0), 1
            projector_stage = _stage(code) == "projector"
            if projector_stage:  # as mmc.apply: text-guided and declared methods (e.g. divprune's release)
                x = self.multi_modal_projector(x)
            y, _ = compress_item(x, grid, k, code, prefix=p, ordered=True, scores=_first(sc), metric=_first(me),
                                 text=self._mmc_question(q))
            out.append(y if projector_stage else self.multi_modal_projector(y))
        return tuple(out)


def _needs(code: int) -> EncoderNeeds:
    return needs_of(code)[1]


def _first(t: torch.Tensor | None) -> torch.Tensor | None:
    """[1, ...] -> [...] (None stays None)."""
    return None if t is None else t[0]


# ---- LLaVA-NeXT ---------------------------------------------------------------------------------------------------
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


class MMCLlavaNextMultiModalProcessor(_LlavaChecks, _PlanProcessor, LlavaNextMultiModalProcessor):
    def _item_counts(self, out: Any, enc: EncoderNeeds) -> dict[str, list[ItemCount]]:
        sizes = out.get("image_sizes")
        if sizes is None:
            return {}
        counts = [_anyres_counts(self.info, int(w), int(h)) for h, w in sizes.tolist()]
        # compressed: k kept + one image_newline; base tile + high-res grid: no grid
        return {"image": [ItemCount(n_run, n, extra=1, grid=False) for n_run, n in counts]}


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


class _Anyres(LlavaSignals):
    """LLaVA-NeXT / OneVision images: each image's packed tokens compressed (see the module docstring)."""

    def _mmc_anyres(self, feats: Any, proj: Any, tiles: list[int], sizes: list, plans: list, questions: list,
                    sig: Any, max_tiles: int | None, own_kw: dict | None = None) -> list[torch.Tensor]:
        """Per image: vLLM's own embedding when nothing is removed, else its packed tokens compressed to k, then
        one image_newline [k + 1, C]."""
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        default = self.config.vision_feature_select_strategy == "default"
        out, start = [], 0
        for i, (_, code, k) in enumerate(plans):
            own = self._merge_image_patch_embeddings(torch.tensor(sizes[i]), proj[i], strategy="spatial_unpad",
                                                     **(own_kw or {}))
            span = slice(start, start + tiles[i])
            start += tiles[i]
            if code < 0:
                out.append(own)  # nothing removed: vLLM's own embedding (with its newlines)
                continue
            projector_stage = _stage(code) == "projector"
            def pack(t: torch.Tensor, i: int = i) -> torch.Tensor:
                return pack_anyres(t, tuple(sizes[i]), self.config.image_grid_pinpoints, vc.image_size, side,
                                   max_tiles=max_tiles)

            x = pack(proj[i] if projector_stage else feats[i])  # [N, C' or C]
            sc, _ = self._mmc_signals(sig, code, span, side * side, drop_cls=default)  # [tiles, h*w]
            sc = None if sc is None else pack(sc.unsqueeze(-1))[:, 0]  # [N], packed like the features
            grid = (side, side) if tiles[i] == 1 else None
            y, _ = compress_item(x, grid, k, code, ordered=True, scores=sc, text=self._mmc_question(questions[i]))
            if not projector_stage:
                y = self.multi_modal_projector(y)
            out.append(torch.cat([y, self.image_newline[None].to(y)], 0))  # [k + 1, C]
        return out


@MULTIMODAL_REGISTRY.register_processor(MMCLlavaNextMultiModalProcessor, info=MMCLlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class MMCLlavaNextForConditionalGeneration(_Anyres, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with mmcompress on each image's packed tokens (see the module docstring)."""

    def embed_multimodal(self, **kwargs: object) -> Any:
        plans = _plans(kwargs.pop(_plan_key("image"), None))
        texts = kwargs.pop(_text_key("image"), None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaNextImageEmbeddingInputs) or plans is None or all(c < 0 for _, c, _ in plans):
            return self._process_image_input(image_input)
        pv = image_input["pixel_values"]
        tiles = [p.shape[0] for p in pv]  # per image [tiles, 3, H, W] (a stacked tensor or a list)
        stacked, sig = self._mmc_tower(lambda: self._image_pixels_to_features(self.vision_tower, torch.cat(list(pv))),
                                       plans)  # [sum tiles, h*w, C']
        projected = self.multi_modal_projector(stacked)  # as vLLM: all tiles at once (so keep=1 is bit-exact)
        feats, proj = torch.split(stacked, tiles), torch.split(projected, tiles)
        return tuple(self._mmc_anyres(feats, proj, tiles, image_input["image_sizes"].tolist(), plans,
                                      _question_ids(texts, len(plans)), sig, None))


# ---- LLaVA-OneVision ----------------------------------------------------------------------------------------------
class MMCLlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    def get_hf_processor(self, **kwargs: object) -> Any:
        return super().get_hf_processor(**_strip(kwargs))


class MMCLlavaOnevisionMultiModalProcessor(_LlavaChecks, _PlanProcessor, LlavaOnevisionMultiModalProcessor):
    mmc_modalities = ("image", "video")

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Any) -> Any:
        # OneVision calls the HF processor itself (per video), not through `_call_hf_processor`
        setting = resolve(self.info.get_hf_config(), _request(hf_kwargs))
        return self._add_plans(super()._apply_hf_processor_main(mm_items, _strip(hf_kwargs)), setting, hf_kwargs)

    def _item_counts(self, out: Any, enc: EncoderNeeds) -> dict[str, list[ItemCount]]:
        got = {}
        sizes = out.get("image_sizes")
        if sizes is not None:
            got["image"] = [ItemCount(n_run, n, extra=1, grid=False) for n_run, n in
                            (_anyres_counts(self.info, int(w), int(h)) for h, w in sizes.tolist())]
        videos = out.get("pixel_values_videos")
        if videos is not None:
            got["video"] = []
            for v in videos:  # [frames, 3, H, W]
                n = v.shape[0] * self.info._get_num_frame_tokens(image_width=v.shape[-1], image_height=v.shape[-2])
                got["video"].append(ItemCount(n + 1, n, extra=1))  # + one image_newline, compressed or not
        return got


@MULTIMODAL_REGISTRY.register_processor(MMCLlavaOnevisionMultiModalProcessor, info=MMCLlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class MMCLlavaOnevisionForConditionalGeneration(_Anyres, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision with mmcompress on each image's packed tokens and each video's pooled frames."""

    def embed_multimodal(self, **kwargs: object) -> Any:
        plans = {m: _plans(kwargs.pop(_plan_key(m), None)) for m in ("image", "video")}
        texts = {m: kwargs.pop(_text_key(m), None) for m in ("image", "video")}
        mods = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        for modality, inp in mods.items():  # vLLM's order of modalities
            plan = plans.get(modality)
            if (plan is None or all(c < 0 for _, c, _ in plan)
                    or isinstance(inp, LlavaOnevisionImageEmbeddingInputs)):
                own = self._process_image_input(inp) if modality == "image" else self._process_video_pixels(inp)
                out += tuple(own)
                continue
            questions = _question_ids(texts[modality], len(plan))
            out += (self._mmc_images if modality == "image" else self._mmc_videos)(inp, plan, questions)
        return out

    def _mmc_images(self, inp: Any, plan: list, questions: list) -> tuple[torch.Tensor, ...]:
        pv = inp["pixel_values"]
        tiles = [p.shape[0] for p in pv]
        stacked, sig = self._mmc_tower(lambda: self._image_pixels_to_features(self.vision_tower, torch.cat(list(pv))),
                                       plan)  # [sum tiles, h*w, C']
        feats = torch.split(stacked, tiles)
        if isinstance(pv, torch.Tensor):  # as vLLM projects them (so an image kept whole is bit-exact)
            proj = torch.split(self.multi_modal_projector(stacked), tiles)
        else:
            proj = [self.multi_modal_projector(f) for f in feats]
        return tuple(self._mmc_anyres(feats, proj, tiles, inp["image_sizes"].tolist(), plan, questions, sig,
                                      9, {"image_newline": self.image_newline}))  # vLLM's fixed "anyres_max_9"

    def _mmc_videos(self, inp: Any, plan: list, questions: list) -> tuple[torch.Tensor, ...]:
        pv = inp["pixel_values_videos"]
        frames = [v.shape[0] for v in pv]
        flat, sig = self._mmc_tower(lambda: self._image_pixels_to_features(self.vision_tower, torch.cat(list(pv))),
                                    plan)  # [sum frames, h*w, C']
        own = None
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        hp = wp = math.ceil(side / 2)
        default = self.config.vision_feature_select_strategy == "default"
        out, start = [], 0
        for v, (f, (_, code, k), q) in enumerate(zip(torch.split(flat, frames), plan, questions, strict=True)):
            span = slice(start, start + f.shape[0])
            start += f.shape[0]
            if code < 0:
                if own is None:  # vLLM's own: projector, then pooling, over all frames at once
                    pooled = self.apply_pooling(self.multi_modal_projector(flat))
                    own = [torch.cat([p.reshape(-1, p.shape[-1]), self.image_newline[None]], 0)
                           for p in torch.split(pooled, frames)]
                out.append(own[v])
                continue
            n = f.shape[0] * hp * wp
            projector_stage = _stage(code) == "projector"
            x = self.apply_pooling(self.multi_modal_projector(f) if projector_stage else f)  # [T, h'*w', C' or C]
            sc, _ = self._mmc_signals(sig, code, span, side * side, drop_cls=default)  # [T, h*w]
            sc = None if sc is None else self.apply_pooling(sc.unsqueeze(-1))[..., 0].reshape(n)  # pooled alike
            y, _ = compress_item(x.reshape(n, -1), (f.shape[0], hp, wp), k, code, ordered=True, scores=sc,
                                 text=self._mmc_question(q))
            if not projector_stage:
                y = self.multi_modal_projector(y)
            out.append(torch.cat([y, self.image_newline[None].to(y)], 0))  # [k + 1, C]
        return tuple(out)
