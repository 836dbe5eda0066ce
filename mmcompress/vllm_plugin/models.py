"""vLLM model classes that compress image and video tokens between the encoder and the LLM: Qwen2-VL, Qwen2.5-VL
(images, videos) and LLaVA-1.5, plus the machinery the other families reuse (`llava` for LLaVA-NeXT and
LLaVA-OneVision, `qwen3` for Qwen3-VL).

Imported by vLLM only (through the "module:Class" strings that `vllm_plugin.register` gives its `ModelRegistry`).
Each class subclasses vLLM's own model and registers a processor subclass; the split is vLLM EVS's:

* Processor (before any encoder runs): the item's token count n is known from its grid, the budget
  `m = budget(n, keep)` is fixed there, the item's placeholder run is shortened to m tokens, and (m, compressor) ride
  along with the item's tensors as one extra field, `mmcompress_<modality>_plan` [items, 2].
  A family whose compressed run holds more than the kept tokens (LLaVA-1.5's CLS prefix, LLaVA-NeXT's newline)
  declares it in `_PlanProcessor._item_counts`.
* Model (`embed_multimodal`): the encoder runs unchanged; each item's n tokens are compressed to m with
  `mmc.create(name, keep=m)`. An item with m == n keeps the encoder's own tensor, so keep=1 is exact. A video is
  one item with grid (t, h, w) after the merger.
* Qwen2-VL / Qwen2.5-VL M-RoPE: the kept tokens keep the (t, h, w) ids they had in the uncompressed sequence, and the
  text after an item keeps its uncompressed ids (the geometry of `mmc.apply` in transformers: the same positions,
  with holes). `get_mrope_input_positions` computes the text ids at request admission and gives every placeholder of
  an item the item's base id; the kept tokens' (t, h, w) offsets, known only once the compressor has chosen, travel
  as 6 extra channels of the item embeddings (as vLLM's EVS carries its positions), are stripped in
  `embed_input_ids` and added to that step's positions in `forward`. (vLLM's own `recompute_mrope_positions` hook
  is not used: the CPU model runner never enables it.)

Letters: N tokens of one item, M kept, C hidden size, L prompt length.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement

import mmcompress as mmc
from mmcompress.vllm_plugin import REQUEST_KEYS, budget, method_code, method_name, resolve

POS_CHANNELS = 6  # (t, h, w) ids, each as (id // 128, id % 128): exact in bf16/fp16 up to id 32767
_BASE = 128


def _strip(kwargs: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in kwargs.items() if k not in REQUEST_KEYS}


def _plan_key(modality: str) -> str:
    return f"mmcompress_{modality}_plan"


@lru_cache(maxsize=256)
def _compressor(code: int, m: int) -> Any:
    return mmc.create(method_name(code), keep=m)


def _plans(value: Any) -> list[tuple[int, int]] | None:
    """The batched plan field as [(m, code)] per item (a stacked [items, 2] tensor or a list of [2] tensors)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return [(int(a), int(b)) for a, b in value.reshape(-1, 2).tolist()]
    return [(int(t.reshape(-1)[0]), int(t.reshape(-1)[1])) for t in value]


def compress_item(x: torch.Tensor, grid: tuple[int, ...] | None, m: int, code: int, prefix: int = 0,
                  ordered: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One item's tokens x [N, C] -> ([M, C], rep [M] representative input index of each, None when kept whole).

    `ordered`: the tokens in the order the method hands them to the LLM (`CompressOutput.ordered`), as `mmc.apply`
    gives them to a 1-D placeholder run (the LLaVA families); otherwise source order (Qwen: positions per token)."""
    n = x.shape[0] - prefix
    if code < 0 or m >= n:
        return x, None
    out = _compressor(code, m)(x.unsqueeze(0), grid=grid, prefix=prefix)
    rep = out.rep[0] if out.rep is not None else None
    return (out.ordered() if ordered else out.x)[0], rep


# ---- processors ---------------------------------------------------------------------------------------------------
class _PlanProcessor:
    """Mixin over a vLLM multimodal processor: fixes each item's budget and shortens its placeholder run."""

    mmc_modalities: tuple[str, ...] = ("image",)

    def _item_tokens(self, out: Any) -> dict[str, list[int]]:
        """Tokens n of every item of the processed batch, per modality."""
        raise NotImplementedError

    def _prefix_tokens(self) -> int:
        """Leading tokens of every item passed through untouched and not counted in keep (LLaVA's CLS, "full")."""
        return 0

    def _item_counts(self, out: Any) -> dict[str, list[tuple[int, int, int]]]:
        """Per modality, per item: (n_run, n, extra): its placeholder run uncompressed, the tokens the compressor
        sees, and the tokens its compressed run holds besides the kept ones (a prefix, or LLaVA-NeXT's newline)."""
        p = self._prefix_tokens()
        return {mod: [(n, n - p, p) for n in ns] for mod, ns in self._item_tokens(out).items()}

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> Any:
        setting = resolve(self.info.get_hf_config(), dict(hf_kwargs))
        return self._add_plans(super()._call_hf_processor(hf_data, _strip(hf_kwargs)), setting)

    def _add_plans(self, out: Any, setting: Any) -> Any:
        """Adds each item's [m, code] (placeholder run, compressor code; -1 none) to the processor output."""
        code = method_code(setting.method) if setting.active else -1
        for modality, counts in self._item_counts(out).items():
            ms = [n_run if code < 0 or budget(n, setting.keep) >= n else budget(n, setting.keep) + extra
                  for n_run, n, extra in counts]
            out[_plan_key(modality)] = torch.tensor([[m, code] for m in ms], dtype=torch.long).reshape(-1, 2)
        return out

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> dict:
        cfg = dict(super()._get_mm_fields_config(hf_inputs, _strip(hf_processor_mm_kwargs)))
        for modality in self.mmc_modalities:
            cfg[_plan_key(modality)] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return cfg

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: Any) -> list:
        updates = super()._get_prompt_updates(mm_items, _strip(hf_processor_mm_kwargs), out_mm_kwargs)
        return [_shorten(u, out_mm_kwargs) if isinstance(u, PromptReplacement) else u for u in updates]


def _shorten(update: PromptReplacement, out_mm_kwargs: Any) -> PromptReplacement:
    orig, modality = update.replacement, update.modality

    def replacement(item_idx: int) -> Any:
        r = orig(item_idx) if callable(orig) else orig
        items = out_mm_kwargs.get(modality, []) if hasattr(out_mm_kwargs, "get") else out_mm_kwargs[modality]
        item = items[item_idx] if item_idx < len(items) else None
        field = item.get(_plan_key(modality)) if item is not None else None
        if field is None:
            return r
        m = int(field.data.reshape(-1)[0])
        if not isinstance(r, list) or m >= len(r):
            return r
        if len(set(r)) != 1:
            raise ValueError(f"{modality}: its placeholder run mixes token ids; mmcompress cannot shorten it")
        return r[:m]

    return PromptReplacement(modality=modality, target=update.target, replacement=replacement)


class _QwenInfoMixin:
    def get_hf_processor(self, **kwargs: object) -> Any:
        return super().get_hf_processor(**_strip(kwargs))


class MMCQwen2VLProcessingInfo(_QwenInfoMixin, Qwen2VLProcessingInfo):
    pass


class MMCQwen2_5_VLProcessingInfo(_QwenInfoMixin, Qwen2_5_VLProcessingInfo):
    pass


class _QwenPlanProcessor(_PlanProcessor):
    mmc_modalities = ("image", "video")

    def _item_tokens(self, out: Any) -> dict[str, list[int]]:
        m2 = self.info.get_hf_config().vision_config.spatial_merge_size ** 2
        got = {}
        for modality in self.mmc_modalities:
            grid = out.get(f"{modality}_grid_thw")
            if grid is not None:
                got[modality] = (grid.prod(-1) // m2).tolist()
        return got


class MMCQwen2VLMultiModalProcessor(_QwenPlanProcessor, Qwen2VLMultiModalProcessor):
    pass


class MMCQwen2_5_VLMultiModalProcessor(_QwenPlanProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


class MMCLlavaProcessingInfo(LlavaProcessingInfo):
    def get_hf_processor(self, **kwargs: object) -> Any:
        return super().get_hf_processor(**_strip(kwargs))


class MMCLlavaMultiModalProcessor(_PlanProcessor, LlavaMultiModalProcessor):
    def _prefix_tokens(self) -> int:
        return 1 if self.info.get_hf_config().vision_feature_select_strategy == "full" else 0

    def _item_tokens(self, out: Any) -> dict[str, list[int]]:
        pv = out.get("pixel_values")
        if pv is None:
            return {}
        sizes = [(int(p.shape[-1]), int(p.shape[-2])) for p in pv]
        return {"image": [self.info.get_num_image_tokens(image_width=w, image_height=h) for w, h in sizes]}


# ---- Qwen2-VL / Qwen2.5-VL ----------------------------------------------------------------------------------------
def _encode_pos(rel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[M, 3] int (t, h, w) ids -> [M, 6] channels of `dtype` (exact for ids < 128 * 128)."""
    return torch.stack([rel // _BASE, rel % _BASE], -1).reshape(rel.shape[0], POS_CHANNELS).to(dtype)


def _decode_pos(ch: torch.Tensor) -> torch.Tensor:
    """[M, 6] channels -> [3, M] int64 ids."""
    v = ch.round().long().reshape(-1, 3, 2)
    return (v[..., 0] * _BASE + v[..., 1]).T


def _grid_ids(t: int, h: int, w: int, t_factor: float) -> np.ndarray:
    """[3, t*h*w] (t, h, w) ids of an item's merged tokens in raster order, relative to its first token."""
    g = np.indices((t, h, w))
    if t_factor != 1.0:
        g[0] = (g[0] * t_factor).astype(np.int64)
    return g.reshape(3, -1)


class _QwenMixin:
    """Compression in `embed_multimodal` plus the M-RoPE bookkeeping (see the module docstring)."""

    _mmc_pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _mmc_check(vllm_config: Any) -> None:
        pp = vllm_config.parallel_config.pipeline_parallel_size
        if pp > 1:  # the kept tokens' positions are added on the rank that embeds them (the first stage) only
            raise ValueError(f"pipeline_parallel_size: {pp}; the mmcompress plugin serves M-RoPE models with pipeline "
                             "parallel size 1 (tensor parallel works); or set MMCOMPRESS_VLLM=0")
        rate = getattr(vllm_config.model_config.multimodal_config, "video_pruning_rate", None)
        if rate:  # Qwen2.5-VL and Qwen3-VL offer vLLM's own video pruning (EVS); this plugin replaces it
            raise ValueError(f"video_pruning_rate: {rate} turns on vLLM's EVS video pruning, which the mmcompress "
                             "plugin replaces on this model; drop --video-pruning-rate or set MMCOMPRESS_VLLM=0")

    def _t_factors(self, modality: str, inp: Any, n_items: int) -> list[float]:
        if modality == "image":
            return [1.0] * n_items
        tps = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        sec = inp.get("second_per_grid_ts") if hasattr(inp, "get") else None
        if sec is None:
            return [1.0] * n_items
        return [float(s) * tps for s in torch.as_tensor(sec).reshape(-1).tolist()]

    def embed_multimodal(self, **kwargs: object) -> Any:
        plans = {m: _plans(kwargs.pop(_plan_key(m), None)) for m in ("image", "video")}
        mods = self._parse_and_validate_multimodal_inputs(**kwargs)
        merge = self.visual.spatial_merge_size
        out: list[torch.Tensor] = []
        for key, inp in mods.items():
            modality = "image" if key.startswith("image") else "video"
            feats = (self._process_image_input(inp) if modality == "image" else self._process_video_input(inp))
            grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in inp[f"{modality}_grid_thw"].tolist()]
            plan = plans[modality] or [(g[0] * g[1] * g[2], -1) for g in grids]
            for x, g, (m, code), tf in zip(feats, grids, plan, self._t_factors(modality, inp, len(grids)),
                                           strict=True):
                rel = torch.from_numpy(_grid_ids(*g, tf)).T.to(x.device)  # [N, 3]
                y, rep = compress_item(x, g, m, code)
                if rep is not None:
                    rel = rel[rep.to(rel.device)]
                out.append(torch.cat([y, _encode_pos(rel, y.dtype)], 1))  # [M, C + 6]
        return tuple(out)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """[3, L] positions of the (compressed) prompt: text keeps its uncompressed ids; every placeholder token of
        an item gets the item's base id (its first token's), to which `forward` adds the kept token's (t, h, w)."""
        parts, st, nxt = [], 0, 0  # nxt: first id after everything so far (uncompressed)
        for offset, t, h, w, tf in self.iter_mm_grid_thw(mm_features):
            feat = next(f for f in mm_features if f.mm_position.offset == offset)
            m = int(feat.mm_position.length)
            text_len = offset - st
            parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + nxt)
            base = text_len + nxt
            parts.append(np.full((3, m), base, dtype=np.int64))
            nxt = base + int(_grid_ids(t, h, w, tf).max()) + 1
            st = offset + m
        if st < len(input_tokens):
            text_len = len(input_tokens) - st
            parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + nxt)
            nxt += text_len
        pos = np.concatenate(parts, axis=1).reshape(3, -1) if parts else np.zeros((3, 0), dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(pos)), int(nxt - len(input_tokens))

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, *,
                        is_multimodal: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Strips the (t, h, w) channels off the item embeddings and keeps them for the next `forward`."""
        self._mmc_pending = None
        if multimodal_embeddings is not None and len(multimodal_embeddings) and is_multimodal is not None:
            rel = torch.cat([_decode_pos(e[:, -POS_CHANNELS:].float()) for e in multimodal_embeddings], 1)  # [3, K]
            stripped = []
            for e in multimodal_embeddings:
                y = e[:, :-POS_CHANNELS]
                if hasattr(e, "modality"):
                    y.modality = e.modality
                stripped.append(y)
            self._mmc_pending = (is_multimodal.nonzero().flatten(), rel)
            multimodal_embeddings = stripped
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Adds each kept token's (t, h, w) ids to its item's base id, in place on this step's [3, T] positions."""
        pending, self._mmc_pending = self._mmc_pending, None
        if pending is not None and positions.dim() == 2:
            idx, rel = pending
            if idx.numel() != rel.shape[1] or (idx.numel() and int(idx.max()) >= positions.shape[1]):
                raise RuntimeError(f"mmcompress: {rel.shape[1]} media embeddings for {idx.numel()} media positions")
            positions[:, idx.to(positions.device)] += rel.to(positions.device, positions.dtype)
        return super().forward(input_ids, positions, *args, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(MMCQwen2VLMultiModalProcessor, info=MMCQwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class MMCQwen2VLForConditionalGeneration(_QwenMixin, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with mmcompress between the vision tower and the LLM."""

    def __init__(self, *, vllm_config: Any, prefix: str = ""):
        self._mmc_check(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)


@MULTIMODAL_REGISTRY.register_processor(MMCQwen2_5_VLMultiModalProcessor, info=MMCQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class MMCQwen2_5_VLForConditionalGeneration(_QwenMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with mmcompress between the vision tower and the LLM (EVS off: this plugin owns pruning)."""

    def __init__(self, *, vllm_config: Any, prefix: str = ""):
        self._mmc_check(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.is_multimodal_pruning_enabled = False  # vLLM's own EVS post-processing stays off


# ---- LLaVA-1.5 ----------------------------------------------------------------------------------------------------
@MULTIMODAL_REGISTRY.register_processor(MMCLlavaMultiModalProcessor, info=MMCLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class MMCLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with mmcompress on the selected vision features before the projector (the default stage of
    `mmc.apply` on LLaVA), or after it for methods that declare `encoder_needs.stage="projector"` (divprune, as its
    release); positions are 1-D, so the shortened prompt needs nothing else."""

    def embed_multimodal(self, **kwargs: object) -> Any:
        plans = _plans(kwargs.pop(_plan_key("image"), None))
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaImageEmbeddingInputs) or plans is None or all(c < 0 for _, c in plans):
            return self._process_image_input(image_input)
        feats = self._process_image_pixels(image_input)  # [B, N, C'] or a tuple of [N_i, C']
        prefix = 1 if self.config.vision_feature_select_strategy == "full" else 0
        out = []
        for x, (m, code) in zip(feats, plans, strict=True):
            side = int(round((x.shape[0] - prefix) ** 0.5))
            grid = (side, side) if side * side == x.shape[0] - prefix else None
            if _stage(code) == "projector":  # as mmc.apply: the method's declared stage (e.g. divprune's release)
                y, _ = compress_item(self.multi_modal_projector(x), grid, m - prefix, code, prefix=prefix,
                                     ordered=True)
            else:  # default: the selected vision features, then the projector
                y = self.multi_modal_projector(compress_item(x, grid, m - prefix, code, prefix=prefix,
                                                             ordered=True)[0])
            out.append(y)
        return tuple(out)


def _stage(code: int) -> str | None:
    """The stage a compressor declares in its `encoder_needs` (None: the integration's default)."""
    if code < 0:
        return None
    return getattr(getattr(mmc.get(method_name(code)), "encoder_needs", None), "stage", None)
