"""vLLM model classes that compress image and video tokens between the encoder and the LLM for Qwen2-VL and
Qwen2.5-VL (images, videos), plus the machinery the other families reuse (`llava` for LLaVA-1.5, LLaVA-NeXT and
LLaVA-OneVision, `qwen3` for Qwen3-VL).

Imported by vLLM only (through the "module:Class" strings that `vllm_plugin.register` gives its `ModelRegistry`).
Each class subclasses vLLM's own model and registers a processor subclass; the split is vLLM EVS's:

* Processor (before any encoder runs): the item's token count n is known from its grid, the compressor's budget
  `k = budget(n, keep, method)` is fixed there, the item's placeholder run is shortened to m tokens (k, plus what
  the family adds: LLaVA's CLS prefix, LLaVA-NeXT's newline; `_PlanProcessor._item_counts`), and (m, compressor, k)
  ride along with the item's tensors as one extra field, `mmcompress_<modality>_plan` [items, 3]. A text-guided
  compressor's question ids ride as `mmcompress_<modality>_text` [items, L] (`text`); what a model cannot give a
  method (a grid, a question, a scored block) is refused there, with a reason, before anything runs.
* Model (`embed_multimodal`): the encoder runs unchanged; the attention scores, keys or CLS a compressor declares
  (`EncoderNeeds`) are recorded by hooks during that same call (`scores`); each item's n tokens are compressed to k
  with `mmc.create(name, keep=k)`. An item whose budget keeps everything keeps the encoder's own tensor, so keep=1
  is exact. A video is one item with grid (t, h, w) after the merger.
* Qwen2-VL / Qwen2.5-VL M-RoPE: the kept tokens keep the (t, h, w) ids they had in the uncompressed sequence, and the
  text after an item keeps its uncompressed ids (the geometry of `mmc.apply` in transformers: the same positions,
  with holes). `get_mrope_input_positions` computes the text ids at request admission and gives every placeholder of
  an item the item's base id; the kept tokens' (t, h, w) offsets, known only once the compressor has chosen, travel
  as 6 extra channels of the item embeddings (as vLLM's EVS carries its positions), are stripped in
  `embed_input_ids` and added to that step's positions in `forward`. (vLLM's own `recompute_mrope_positions` hook
  is not used: the CPU model runner never enables it.)

Letters: N tokens of one item, M kept (k by the compressor), C hidden size, L prompt length.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import torch
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
from mmcompress.compressors.base import EncoderNeeds
from mmcompress.hf.qwen_vl import Qwen2VLFamily
from mmcompress.vllm_plugin import REQUEST_KEYS, budget, method_code, method_name, method_needs, resolve
from mmcompress.vllm_plugin.pixels import GROUPS_KEY, PixelPlan, encode_split
from mmcompress.vllm_plugin.scores import ExtraQK, QwenScores, TowerSignals, tower_layers, wants_signals
from mmcompress.vllm_plugin.text import (
    DUMMY_KEY,
    QUESTION_KEY,
    decode_ids,
    encode_ids,
    excluded_token_ids,
    media_token_ids,
    question_ids,
)

POS_CHANNELS = 6  # (t, h, w) ids, each as (id // 128, id % 128): exact in bf16/fp16 up to id 32767
_BASE = 128
PRIVATE_KEYS = REQUEST_KEYS + (QUESTION_KEY, DUMMY_KEY)


def _strip(kwargs: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in kwargs.items() if k not in PRIVATE_KEYS}


def _request(kwargs: Mapping[str, object]) -> dict[str, object]:
    """The request's own plugin setting among its `mm_processor_kwargs`."""
    return {k: v for k, v in kwargs.items() if k in REQUEST_KEYS}


def _plan_key(modality: str) -> str:
    return f"mmcompress_{modality}_plan"


def _text_key(modality: str) -> str:
    return f"mmcompress_{modality}_text"


@lru_cache(maxsize=256)
def _compressor(code: int, k: int, prefix: int) -> Any:
    """The item's compressor at a fixed budget of k non-prefix tokens (a method that counts its prefix in keep gets
    keep = k + prefix)."""
    cls = mmc.get(method_name(code))
    return mmc.create(method_name(code), keep=k + prefix if cls.prefix_in_budget else k)


def _plans(value: Any) -> list[tuple[int, int, int]] | None:
    """The batched plan field as [(m, code, k)] per item: its placeholder run m, the compressor code (-1: none) and
    the compressor's budget k (a stacked [items, 3] tensor or a list of [3] tensors)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return [(int(a), int(b), int(c)) for a, b, c in value.reshape(-1, 3).tolist()]
    return [tuple(int(v) for v in t.reshape(-1)[:3]) for t in value]


def _question_ids(value: Any, n_items: int) -> list[torch.Tensor | None]:
    """The batched question field as per-item [L] ids (None: no question)."""
    if value is None:
        return [None] * n_items
    rows = list(value) if not isinstance(value, torch.Tensor) or value.dim() > 1 else [value]
    return [r.reshape(-1).long() if r.numel() else None for r in rows]


def needs_of(code: int) -> tuple[frozenset[str], EncoderNeeds]:
    """(needs, EncoderNeeds) of a compressor code (nothing for -1)."""
    if code < 0:
        return frozenset(), EncoderNeeds()
    return method_needs(method_name(code))


def wants_scores(plan: list[tuple[int, int, int]]) -> bool:
    """Whether any item of `plan` asks for encoder scores or keys."""
    for _, code, _ in plan:
        needs, enc = needs_of(code)
        if "scores" in needs or enc.metric is not None:
            return True
    return False


def compress_item(x: torch.Tensor, grid: tuple[int, ...] | None, k: int, code: int, prefix: int = 0,
                  ordered: bool = False, scores: torch.Tensor | None = None, metric: torch.Tensor | None = None,
                  text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One item's tokens x [P + N, C] -> ([P + k, C], rep [P + k] representative input index of each; None when
    kept whole), with what the compressor declared it needs: scores [P + N], metric [P + N, d], text [L, C].

    `ordered`: the tokens in the order the method hands them to the LLM (`CompressOutput.ordered`), as `mmc.apply`
    gives them to a 1-D placeholder run (the LLaVA families); otherwise source order (Qwen: positions per token)."""
    n = x.shape[0] - prefix
    if code < 0 or k >= n:
        return x, None

    def one(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.unsqueeze(0).to(x.device)

    out = _compressor(code, k, prefix)(x.unsqueeze(0), grid=grid, prefix=prefix, scores=one(scores),
                                       metric=one(metric), text=None if text is None else one(text.to(x.dtype)))
    rep = out.rep[0] if out.rep is not None else None
    return (out.ordered() if ordered else out.x)[0], rep


class ItemCount(NamedTuple):
    """How one item's placeholder run is planned: `run` its uncompressed length, `n` the tokens the compressor may
    remove, `extra` tokens a compressed run holds after the kept ones (LLaVA-NeXT's newline), `prefix` tokens passed
    ahead of the n and kept (LLaVA's CLS), `grid` False when the item has no grid (LLaVA-NeXT anyres images)."""

    run: int
    n: int
    extra: int = 0
    prefix: int = 0
    grid: bool = True


# ---- processors ---------------------------------------------------------------------------------------------------
class _PlanProcessor:
    """Mixin over a vLLM multimodal processor: fixes each item's budget, shortens its placeholder run, and finds the
    request's question for text-guided compressors (`text`)."""

    mmc_modalities: tuple[str, ...] = ("image",)
    #: config attributes of token ids never part of the question (the HF family's `structural`)
    mmc_structural: tuple[str, ...] = ()

    def _item_tokens(self, out: Any) -> dict[str, list[int]]:
        """Tokens n of every item of the processed batch, per modality."""
        raise NotImplementedError

    def _item_counts(self, out: Any, enc: EncoderNeeds) -> dict[str, list[ItemCount]]:
        """Per modality, per item: its `ItemCount` for a compressor that declares `enc`."""
        return {mod: [ItemCount(n, n) for n in ns] for mod, ns in self._item_tokens(out).items()}

    def _check_needs(self, method: str, needs: frozenset[str], enc: EncoderNeeds) -> None:
        """Raise ValueError when this model cannot give `method` what it needs (default: it can, except a
        pixel-stage method, served by the Qwen families' `pixels.PixelPlan`)."""
        if enc.stage == "pixels":
            raise ValueError(f"mmcompress {method!r} drops patches BEFORE the vision encoder, which needs a tower that "
                             "takes a variable patch set at their original positions (Qwen2-VL, Qwen2.5-VL, "
                             "Qwen3-VL); this model's tower takes fixed grids, as in mmc.apply")
        if ("scores" in needs or enc.metric is not None) and \
                getattr(self.info.ctx.get_mm_config(), "mm_encoder_tp_mode", "weights") == "data":
            raise ValueError(f"mmcompress {method!r} reads the vision tower's attention, which the plugin records in "
                             "the tower's own call; with --mm-encoder-tp-mode data each rank encodes only some images, "
                             "so drop that option to serve it")

    # vLLM entry points
    def apply(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """vLLM's processing of one request; a text-guided setting adds the request's question ids to its kwargs."""
        kw = dict(inputs.hf_processor_mm_kwargs)
        kw.pop(QUESTION_KEY, None)
        setting = resolve(self.info.get_hf_config(), _request(kw))
        if setting.active and "text" in method_needs(setting.method)[0]:
            cfg = self.info.get_hf_config()
            excl = excluded_token_ids(cfg, self.info.ctx.model_config.try_get_generation_config(),
                                      self.mmc_structural)
            ids = question_ids(list(inputs.prompt), media_token_ids(cfg), excl)
            if not ids and kw.get(DUMMY_KEY):
                ids = [excl[0] if excl else 0]  # vLLM's profiling prompt holds only placeholders
            if not ids:
                raise ValueError(f"mmcompress {setting.method!r} is guided by the question, but this prompt has no "
                                 "text besides its media and special tokens")
            kw[QUESTION_KEY] = encode_ids(ids)  # part of vLLM's multimodal cache key of each item
        inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kw)
        return super().apply(inputs, *args, **kwargs)

    def get_dummy_inputs(self, *args: Any, **kwargs: Any) -> Any:
        inputs = super().get_dummy_inputs(*args, **kwargs)
        return dataclasses.replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, DUMMY_KEY: True})

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> Any:
        setting = resolve(self.info.get_hf_config(), _request(hf_kwargs))
        return self._add_plans(super()._call_hf_processor(hf_data, _strip(hf_kwargs)), setting, hf_kwargs)

    def _add_plans(self, out: Any, setting: Any, hf_kwargs: Mapping[str, object]) -> Any:
        """Adds each item's [m, code, k] (placeholder run, compressor code or -1, the compressor's budget) and its
        question ids [L] (text-guided methods; else L = 0) to the processor output."""
        code = method_code(setting.method) if setting.active else -1
        needs, enc = needs_of(code)
        if code >= 0:
            self._check_needs(setting.method, needs, enc)
        question = decode_ids(hf_kwargs.get(QUESTION_KEY)) if "text" in needs else []
        for modality, counts in self._item_counts(out, enc).items():
            rows = []
            for c in counts:
                k = budget(c.n, setting.keep, setting.method, c.prefix) if code >= 0 else c.n
                if code < 0 or k >= c.n:
                    rows.append([c.run, -1, c.n])
                    continue
                if "grid" in needs and not c.grid:
                    raise ValueError(f"mmcompress {setting.method!r} needs each item's token grid; this model's "
                                     f"{modality}s of several tiles (base tile + high-resolution grid) are one 1-D "
                                     "sequence without one, as in mmc.apply")
                rows.append([c.prefix + k + c.extra, code, k])
            out[_plan_key(modality)] = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
            out[_text_key(modality)] = torch.tensor([question] * len(rows), dtype=torch.long).reshape(len(rows), -1)
        return out

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> dict:
        cfg = dict(super()._get_mm_fields_config(hf_inputs, _strip(hf_processor_mm_kwargs)))
        for modality in self.mmc_modalities:
            cfg[_plan_key(modality)] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
            cfg[_text_key(modality)] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
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
    mmc_structural = Qwen2VLFamily.structural

    def _item_tokens(self, out: Any) -> dict[str, list[int]]:
        m2 = self.info.get_hf_config().vision_config.spatial_merge_size ** 2
        got = {}
        for modality in self.mmc_modalities:
            grid = out.get(f"{modality}_grid_thw")
            if grid is not None:
                got[modality] = (grid.prod(-1) // m2).tolist()
        return got


class MMCQwen2VLMultiModalProcessor(PixelPlan, _QwenPlanProcessor, Qwen2VLMultiModalProcessor):
    mmc_pixel_norm = Qwen2VLFamily.pixel_norm


class MMCQwen2_5_VLMultiModalProcessor(PixelPlan, _QwenPlanProcessor, Qwen2_5_VLMultiModalProcessor):
    mmc_pixel_norm = Qwen2VLFamily.pixel_norm


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


class _QuestionMixin:
    """The request's question as the LLM's input embeddings (`text` in `mmc.apply`)."""

    def _mmc_question(self, ids: torch.Tensor | None) -> torch.Tensor | None:
        """[L] question ids -> [L, C] the LLM's input embeddings of them (None: no question)."""
        if ids is None:
            return None
        lm = self.get_language_model()
        return lm.embed_input_ids(ids.to(next(lm.parameters()).device))


class _QwenMixin(_QuestionMixin):
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

    def _mmc_encode(self, modality: str, inp: Any, plan: list[tuple[int, int, int]], groups: Any = None
                    ) -> tuple[Any, list[torch.Tensor | None], list[torch.Tensor | None]]:
        """The encoder call for one modality -> (features per item, scores per item or None each, kept group
        indices per item or None each). Images whose method runs before the encoder (`groups`: their kept-group
        masks, `pixels`) come out as the tower's output for their kept groups only ([M_i, C]), the others as vLLM's
        own call gives them ([N_i, C])."""
        pix = [i for i, (_, code, _) in enumerate(plan) if code >= 0 and needs_of(code)[1].stage == "pixels"]
        if modality == "image" and pix:
            return encode_split(self.visual, inp, plan, groups, pix, lambda sub, p: self._mmc_own(modality, sub, p))
        feats, scores = self._mmc_own(modality, inp, plan)
        return feats, scores, [None] * len(plan)

    def _mmc_own(self, modality: str, inp: Any, plan: list[tuple[int, int, int]]
                 ) -> tuple[Any, list[torch.Tensor | None]]:
        """vLLM's own encoder call for one modality -> (features per item, scores per item or None each), the
        scores recorded in the same call when an item's compressor asks for them (`scores.QwenScores`)."""
        cap = QwenScores(self.visual, self.config.vision_config.num_heads) if wants_scores(plan) else None
        with cap or contextlib.nullcontext():
            feats = self._process_image_input(inp) if modality == "image" else self._process_video_input(inp)
        if cap is None:
            return feats, [None] * len(plan)
        return feats, cap.scores(inp[f"{modality}_grid_thw"].tolist())

    def embed_multimodal(self, **kwargs: object) -> Any:
        plans = {m: _plans(kwargs.pop(_plan_key(m), None)) for m in ("image", "video")}
        texts = {m: kwargs.pop(_text_key(m), None) for m in ("image", "video")}
        groups = kwargs.pop(GROUPS_KEY, None)
        mods = self._parse_and_validate_multimodal_inputs(**kwargs)
        merge = self.visual.spatial_merge_size
        out: list[torch.Tensor] = []
        for key, inp in mods.items():
            modality = "image" if key.startswith("image") else "video"
            grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in inp[f"{modality}_grid_thw"].tolist()]
            plan = plans[modality] or [(g[0] * g[1] * g[2], -1, 0) for g in grids]
            feats, scores, kept = self._mmc_encode(modality, inp, plan, groups)
            questions = _question_ids(texts[modality], len(grids))
            for x, g, (_, code, k), tf, sc, q, kp in zip(feats, grids, plan,
                                                         self._t_factors(modality, inp, len(grids)), scores,
                                                         questions, kept, strict=True):
                rel = torch.from_numpy(_grid_ids(*g, tf)).T.to(x.device)  # [N, 3]
                if kp is not None:  # the tower ran on the kept groups only (pixel stage): x is [M, C]
                    y, rep = x, kp
                else:
                    y, rep = compress_item(x, g, k, code, scores=sc, text=self._mmc_question(q))
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


def _stage(code: int) -> str:
    """Where a compressor runs on the LLaVA families, as `mmc.apply` picks it with no `stage=`: after the projector
    for text-guided methods (the question lives in the LLM's input space) and for methods that declare it
    (`encoder_needs.stage`, e.g. divprune's release), else before it ("vision")."""
    needs, enc = needs_of(code)
    if "text" in needs:
        return "projector"
    return enc.stage or "vision"


class LlavaSignals(_QuestionMixin):
    """Mixin of the LLaVA families' model classes: the scores, keys, CLS and question their compressors need."""

    def load_weights(self, weights: Any) -> Any:
        extra = self._mmc_extra()
        return super().load_weights(weights if extra is None else extra.tee(weights))

    def _mmc_extra(self) -> ExtraQK | None:
        """The block after the built ones (scored from its own q/k), when vLLM truncated the tower."""
        if "_mmc_extra_qk" not in self.__dict__:
            built, vc = len(tower_layers(self.vision_tower)), self.config.vision_config
            self.__dict__["_mmc_extra_qk"] = (ExtraQK(built, getattr(vc, "layer_norm_eps", 1e-5))
                                              if built < vc.num_hidden_layers else None)
        return self.__dict__["_mmc_extra_qk"]

    def _mmc_tower(self, run: Any, plan: list[tuple[int, int, int]], cls_ok: bool = False
                   ) -> tuple[Any, TowerSignals | None]:
        """`run()` (vLLM's own tower call) -> (its output, what the plan's compressors need recorded, or None).
        `cls_ok`: the family hands a `cls_prefix` method the feature layer's CLS (plain LLaVA, "default")."""
        scored, want_cls = [], False
        for _, code, _ in plan:
            needs, enc = needs_of(code)
            if wants_signals(needs, enc):
                scored.append(enc)
            want_cls |= enc.cls_prefix and cls_ok
        if not scored and not want_cls:
            return run(), None
        sig = TowerSignals(self.vision_tower, self.config, scored, want_cls, self._mmc_extra())
        with sig:
            out = run()
        return out, sig

    @staticmethod
    def _mmc_signals(sig: TowerSignals | None, code: int, tiles: slice, n_patches: int, drop_cls: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One item's ([tiles, N] scores, [tiles, N, d] metric or None) from the recorded tower call; `drop_cls`:
        the selected features drop the CLS ("default" strategy), so do its scores."""
        needs, enc = needs_of(code)
        if sig is None or not wants_signals(needs, enc):
            return None, None
        sc, me = sig.signals(enc, n_patches)
        sc, me = sc[tiles], None if me is None else me[tiles]
        if drop_cls:
            sc, me = sc[:, 1:], None if me is None else me[:, 1:]
        return sc, me


