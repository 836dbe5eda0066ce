"""The generic placeholder adapter: every VLM whose encoders' features replace runs of placeholder tokens.

Most Hugging Face VLMs (Qwen2/2.5/3-VL, Gemma 3, InternVL, SmolVLM/Idefics3, Mistral 3, LLaVA-NeXT-Video,
Qwen2-Audio, ...) share one pattern: `get_<modality>_features` turns pixels (or audio) into features, and forward
`masked_scatter`s them into the positions of the placeholder token (`image_token_id`, ...) of `input_ids`; forward
also accepts those features precomputed as `mm_encoder_outputs`, which is how `generate()` passes them. This module
owns all the plumbing of compressing them; a family only describes what differs (`Family`): where its features
come from, the grid of each item, which placeholder tokens are structural, and its position-id scheme.

How a forward is rewritten (prefill: a call with media and an empty cache):

1. Encoding: the model's own `get_<modality>_features` runs unchanged (patched per instance so that, when it runs,
   the item layout and, for attention-based methods, token scores ride along on its output: `generate()` calls the
   encoders itself BEFORE the prefill and hands their outputs to forward as `mm_encoder_outputs`).
2. Each item (image, video, audio clip) is one compressor sample, with its grid; items of equal shape are batched.
   Structural tokens (`ItemMeta.fixed`) are passed through untouched.
3. Every output token sits at the placeholder column of its representative input token (`out.rep`); the other
   placeholder columns are removed from every per-token tensor (`input_ids`, `attention_mask`, `labels`,
   `mm_token_type_ids`, `token_type_ids`) and samples are re-padded on the side they were padded on (left when none
   was; option `padding_side`). Structural text tokens between placeholders (row breaks, tile tags) stay where they
   are, so kept tokens stay in their rows.
4. Positions: "1d" families get positions rebuilt from the new mask (cumsum - 1, as `generate()` does); "mrope"
   families (Qwen2/2.5/3-VL) keep the (t, h, w) ids of the UNCOMPRESSED sequence, subset (text after the media keeps
   its original ids; `rope_deltas` is set so decoding continues where the uncompressed model would).
5. Decode steps of `generate()` are translated onto the shorter cache: the full-length attention mask into the
   compressed layout, position ids shifted by the columns removed.

An item whose budget keeps all its tokens uses the model's own features, so keep=1.0 gives bit-identical logits.

Letters: B batch, L sequence length (L' compressed), N tokens of one item, M kept, C hidden size.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmcompress.compressors.base import EncoderNeeds
from mmcompress.hf.adapter import Adapter, register_adapter
from mmcompress.hf.plumbing import (
    DecodeState,
    media_segments,
    padding_side_of,
    question_embeddings,
    question_mask,
    shrink_batch,
)
from mmcompress.inllm.fastv import FastV
from mmcompress.inllm.stage import InLLM, find_decoder

__all__ = ["Modality", "ItemMeta", "Family", "PlaceholderAdapter", "register_family", "int_list"]

META_ATTR = "_mmcompress_meta"  # attribute of an encoder output holding the per-item `ItemMeta` list
PER_TOKEN = ("input_ids", "labels", "mm_token_type_ids", "token_type_ids")  # [B, L] tensors that follow the layout
PAD_VALUES = {"labels": -100, "mm_token_type_ids": 0, "token_type_ids": 0}


@dataclass(frozen=True)
class Modality:
    """One kind of media of a family.

    Attributes:
        name: "image", "video" or "audio" (also the key of `mm_encoder_outputs`).
        input: the forward keyword that carries its raw input (e.g. "pixel_values"); its presence means media.
        token: config attribute(s) holding the placeholder token id, first one found wins.
        encoder: name of the model's encoder method (default `get_<name>_features`).
        type_id: its value in `mm_token_type_ids` (M-RoPE families), else None.
    """

    name: str
    input: str
    token: tuple[str, ...]
    encoder: str = ""
    type_id: int | None = None

    @property
    def encoder_name(self) -> str:
        return self.encoder or f"get_{self.name}_features"


def expanded_meta(meta: list, segs: list[tuple[int, torch.Tensor]], rows: int) -> list:
    """The item descriptions of an encoder output that `generate` expanded for beam search / several returned
    sequences: every sample's input row repeated r times (rows b r .. b r + r - 1 are sample b) and each sample's
    items repeated r times as a group ([A, B] -> [A, B, A, B]), as transformers' `_expand_multimodal_outputs`
    does; `segs` (sample, columns) are the expanded items. Returns `meta` unchanged when it is not such an expansion.
    """
    if not meta or len(segs) % len(meta) or rows % (len(segs) // len(meta)):
        return meta
    r = len(segs) // len(meta)
    per_row = [0] * rows
    for b, _ in segs:
        per_row[b] += 1
    out, i = [], 0
    for b0 in range(0, rows, r):
        n = per_row[b0]
        if any(per_row[b] != n for b in range(b0, b0 + r)):
            return meta
        out += meta[i : i + n] * r
        i += n
    return out if i == len(meta) else meta


@dataclass
class ItemMeta:
    """What the family knows about one item when its encoder runs.

    Attributes:
        grid: (H, W) or (T, H, W) of the item's compressible tokens, or None (1-D sequence).
        scores: [N] importance of each of its tokens (attention-based methods), or None.
        metric: [N, d] similarity features of its tokens (what the compressor's `EncoderNeeds.metric` asks for, e.g.
            the scoring block's keys), or None (the compressor then compares the tokens themselves).
        fixed: [N] bool, structural tokens kept untouched at their columns (newline rows), or None.
        x: [N', C'] the tokens to compress when they are not the features themselves (e.g. before the projector:
            `Family.project` maps the compressed ones to features); the item's placeholder run is then shortened
            to its first M' columns (1-D positions only).
        prefix: leading tokens of `x` passed through untouched (CLS, registers).
        tail: [k, C] features appended after the compressed ones (e.g. LLaVA's image_newline).
    """

    grid: tuple[int, ...] | None = None
    scores: torch.Tensor | None = None
    metric: torch.Tensor | None = None
    fixed: torch.Tensor | None = None
    x: torch.Tensor | None = None
    prefix: int = 0
    tail: torch.Tensor | None = None


def int_list(v: Any) -> list[int]:
    """A config id field (int, list or None) as a list of ints."""
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(i) for i in v if i is not None]
    return [int(v)]


class Family:
    """Description of one model family for `PlaceholderAdapter`; subclass and override what differs.

    Class attributes:
        model_types: `config.model_type` values it serves.
        modalities: its `Modality` list (only these are compressed; others pass through).
        positions: "1d" (positions from the mask) or "mrope" (override `rope_index`).
        structural: config attributes of token ids that are never part of the question (tile tags, image start/end).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    modalities: ClassVar[tuple[Modality, ...]] = ()
    positions: ClassVar[str] = "1d"
    structural: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[dict[str, Any]] = {}  # extra adapter options of this family and their defaults
    requires_meta: ClassVar[bool] = False  # features encoded before `apply` (no `ItemMeta`) pass uncompressed
    position_offset: ClassVar[int] = 0  # "1d" positions start here (PaliGemma: 1)
    merge: ClassVar[str] = "features"  # "features": forward takes `mm_encoder_outputs`; "embeds": `inputs_embeds`
    consumed: ClassVar[tuple[str, ...]] = ()  # forward inputs of the media, dropped once encoded ("embeds")

    def core(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module that owns the encoders and forward's media merge (`model.model` for *ForConditionalGeneration)."""
        inner = getattr(model, "model", None)
        return inner if inner is not None and hasattr(inner, self.modalities[0].encoder_name) else model

    def llm_layers(self, core: torch.nn.Module) -> torch.nn.ModuleList:
        """The decoder layers of the LLM (FastV)."""
        for name in ("language_model", "text_model"):
            lm = getattr(core, name, None)
            if lm is not None:
                return getattr(lm, "model", lm).layers
        raise ValueError(f"model: cannot find the LLM layers of {type(core).__name__}")

    def features(self, mod: Modality, out: Any) -> list[torch.Tensor]:
        """Per-item features [N_i, C] from an encoder output, in placeholder order (a list/tuple: one item each;
        [I, N, C]: one item per row; a flat [S, C] tensor: one item, unless the family overrides this)."""
        p = out.pooler_output
        if isinstance(p, (list, tuple)):
            return [t.reshape(-1, t.shape[-1]) for t in p]
        if p.dim() == 3:
            return list(p)
        return [p]

    def pack(self, mod: Modality, out: Any, feats: list[torch.Tensor], kept: list[torch.Tensor | None]) -> Any:
        """An encoder output holding the compressed per-item features, in the form forward reads.

        Args:
            kept: per item, [M_i] indices of its input tokens that survive (None: all, unchanged).
        """
        p = out.pooler_output
        if isinstance(p, (list, tuple)):
            return BaseModelOutputWithPooling(pooler_output=tuple(feats))
        return BaseModelOutputWithPooling(pooler_output=torch.cat(feats).unsqueeze(0))  # [1, S', C]

    def encode(self, adapter: PlaceholderAdapter, mod: Modality, kw: dict[str, Any]) -> Any:
        """This call's encoder output for `mod`, with `META_ATTR` set; default: the model's own encoder method."""
        return adapter._encoder_output(mod, kw)

    def describe(self, adapter: PlaceholderAdapter, mod: Modality, args: dict[str, Any], out: Any,
                 cap: Any) -> list[ItemMeta]:
        """Per-item grid / scores / structural tokens, from the encoder's arguments and output (default: none)."""
        return [ItemMeta() for _ in self.features(mod, out)]

    def check(self, adapter: PlaceholderAdapter) -> None:
        """Validate the adapter's options for this family (raise ValueError naming the option)."""

    def project(self, adapter: PlaceholderAdapter, x: torch.Tensor) -> torch.Tensor:
        """[G, M, C'] compressed `ItemMeta.x` tokens -> [G, M, C] features (default: they are features)."""
        return x

    def stats(self, adapter: PlaceholderAdapter) -> dict[str, Any]:
        """Extra entries of `mmcompress.stats` (every family's stats also hold `assign`: per item, in placeholder
        order, (modality, sample, [N] output slot of each compressed token or None when not compressed))."""
        return {}

    def capture(self, adapter: PlaceholderAdapter, mod: Modality, args: dict[str, Any]) -> Any:
        """A context manager active while the encoder runs, handed to `describe` (default: `score_capture` when
        the compressor needs scores or declares a metric, `adapter.encoder_needs`)."""
        wants = "scores" in adapter._needs or adapter.encoder_needs.metric is not None
        return self.score_capture(adapter, mod, args) if wants else None

    def score_capture(self, adapter: PlaceholderAdapter, mod: Modality, args: dict[str, Any]) -> Any:
        """A context manager recording what `describe` needs to score tokens, or None (no scores available)."""
        return None

    def rope_index(self, adapter: PlaceholderAdapter, kw: dict[str, Any], mm: torch.Tensor) -> torch.Tensor:
        """[3 or 4, B, L] positions of the uncompressed sequence ("mrope" families)."""
        raise NotImplementedError


def register_family(family_cls: type[Family]) -> type[Family]:
    """Class decorator: serve `family_cls.model_types` with a `PlaceholderAdapter` driven by this description."""
    name = family_cls.__name__.removesuffix("Family") + "Adapter"
    adapter_cls = type(name, (PlaceholderAdapter,), {
        "family": family_cls(), "model_types": family_cls.model_types, "__doc__": family_cls.__doc__,
        "options": {**PlaceholderAdapter.options, **family_cls.options}})
    register_adapter(adapter_cls)
    family_cls.adapter = adapter_cls
    return family_cls


def _cache_of(kw: dict[str, Any]) -> Any:
    return kw.get("cache", kw.get("past_key_values"))


def _find_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None and isinstance(out, tuple):
        cache = next((o for o in out if hasattr(o, "get_seq_length")), None)
    return cache


def _cache_len(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


class PlaceholderAdapter(Adapter):
    """Compress the media tokens of a placeholder-pattern VLM between its encoders and the LLM.

    Options:
        modalities: which of the family's modalities to compress (default all).
        padding_side: side used when compression makes an unpadded batch ragged ("left", the side generate()
            needs, or "right"); an input that is already padded keeps its side.
        text_exclude_ids: extra token ids left out of the question span (chat-template tokens).
        fastv_k: None (off) or the FastV layer K: LLM layers >= K see the media tokens pruned by last-token
            attention (`mmcompress.inllm.fastv`), on top of (or, with keep=1.0, instead of) the compressor.
        fastv_r: FastV's R, the fraction of media tokens pruned at layer K (default 0.5).
        inllm: None or a builder (decoder layer count -> rule) of another in-LLM method on the shared stage
            (`mmcompress.inllm.stage`; set by `mmc.apply(model, "pdrop" | "dart", ...)`).
    """

    family: ClassVar[Family]
    options = {"modalities": None, "padding_side": "left", "text_exclude_ids": (), "fastv_k": None, "fastv_r": 0.5,
               "inllm": None}

    def __init__(self, model: torch.nn.Module, compressor, **options: Any):
        super().__init__(model, compressor, **options)
        fam = self.family
        self.core = fam.core(model)
        names = tuple(m.name for m in fam.modalities if hasattr(self.core, m.encoder_name))
        mods = self.opts["modalities"]
        mods = names if mods is None else (mods,) if isinstance(mods, str) else tuple(mods)
        if not mods or not set(mods) <= set(names):
            raise ValueError(f"modalities: expected a non-empty subset of {names}, got {self.opts['modalities']!r}")
        self.mods = tuple(m for m in fam.modalities if m.name in mods)
        if self.opts["padding_side"] not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {self.opts['padding_side']!r}")
        for m in self.mods:
            if not hasattr(self.core, m.encoder_name):
                raise TypeError(f"model: {type(model).__name__} has no {m.encoder_name} for {m.name}")
        self.tokens = {m.name: self._token_id(m) for m in self.mods}
        self._needs = tuple(getattr(compressor, "needs", ()))
        #: what the compressor declared it needs from the encoder (families provide it; see `EncoderNeeds`)
        self.encoder_needs: EncoderNeeds = getattr(compressor, "encoder_needs", None) or EncoderNeeds()
        fam.check(self)
        if self.opts["fastv_k"] is None and "fastv_r" in options:
            raise ValueError("fastv_r: FastV is off; pass fastv_k= (the layer K) as well")
        self.inllm: InLLM | None = None  # the in-LLM pruning stage (FastV, PyramidDrop, SparseVLM, DART)
        if self.opts["fastv_k"] is not None:
            self.inllm = FastV(fam.llm_layers(self.core), k=self.opts["fastv_k"], r=self.opts["fastv_r"])
        elif self.opts["inllm"] is not None:
            layers = fam.llm_layers(self.core)
            self.inllm = InLLM(layers, self.opts["inllm"](len(layers)), decoder=find_decoder(self.core, layers))
        self._orig: Any = None
        self._had_forward = False
        self._prev_forward: Any = None
        self._decode = DecodeState()
        self._patched: list[str] = []

    def _token_id(self, m: Modality) -> int:
        cfg = self.model.config
        for attr in m.token:
            for c in (cfg, getattr(cfg, "text_config", None)):
                v = getattr(c, attr, None) if c is not None else None
                if isinstance(v, int):
                    return v
        raise ValueError(f"model: config has none of {m.token} (the {m.name} placeholder token id)")

    # ---- patching --------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Instance-level wrappers of `forward` and of the encoders (the class and other instances are untouched)."""
        m = self.model
        self._had_forward = "forward" in m.__dict__
        self._prev_forward = m.__dict__.get("forward")
        self._orig = m.forward
        self._sig = inspect.signature(self._orig)

        @functools.wraps(self._orig)  # keeps the signature: generate() inspects forward's parameters
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._forward(*args, **kwargs)

        forward._mmcompress = True  # type: ignore[attr-defined]
        m.forward = forward
        own_encode = type(self.family).encode is Family.encode
        for mod in self.mods:
            if own_encode and mod.encoder_name not in self.core.__dict__:
                self._patch_encoder(mod)
        if self.inllm is not None:
            self.inllm.attach()

    def _patch_encoder(self, mod: Modality) -> None:
        fn = getattr(self.core, mod.encoder_name)
        sig = inspect.signature(fn)

        @functools.wraps(fn)  # generate() reads this signature to pick the encoder's arguments
        def encode(*args: Any, **kwargs: Any) -> Any:
            return self._encode(mod, fn, sig, *args, **kwargs)

        encode._mmcompress = True  # type: ignore[attr-defined]
        self.core.__dict__[mod.encoder_name] = encode
        self._patched.append(mod.encoder_name)

    def detach(self) -> None:
        """Remove the wrappers: the instance's methods are the ones it had before `attach`."""
        m = self.model
        if getattr(m.__dict__.get("forward"), "_mmcompress", False):
            if self._had_forward:
                m.__dict__["forward"] = self._prev_forward
            else:
                del m.__dict__["forward"]
        for name in self._patched:
            if getattr(self.core.__dict__.get(name), "_mmcompress", False):
                del self.core.__dict__[name]
        self._patched = []
        if self.inllm is not None:
            self.inllm.detach()

    def _encode(self, mod: Modality, fn: Any, sig: inspect.Signature, *args: Any, **kwargs: Any) -> Any:
        """The model's own encoder call, plus the per-item `ItemMeta` list on its output (`META_ATTR`)."""
        if not self.enabled:
            return fn(*args, **kwargs)
        a = dict(sig.bind(*args, **kwargs).arguments)
        a.update(a.pop("kwargs", {}))
        cap = self.family.capture(self, mod, a)
        with cap or contextlib.nullcontext():
            out = fn(*args, **kwargs)
        if not isinstance(out, tuple):
            object.__setattr__(out, META_ATTR, self.family.describe(self, mod, a, out, cap))
        return out

    # ---- dispatch --------------------------------------------------------------------------------------
    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        kw = dict(self._sig.bind(*args, **kwargs).arguments)
        for name, p in self._sig.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                kw.update(kw.pop(name, {}))
        return kw

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        kw = self._bind(args, kwargs)
        cache = _cache_of(kw)
        past = _cache_len(cache)
        if past > 0:
            if self._decode.knows(cache):  # decoding after a compressed prefill: translate onto the shorter cache
                ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw["inputs_embeds"]
                given = kw.get("position_ids")
                kw["attention_mask"], kw["position_ids"] = self._decode.decode_inputs(
                    cache, ref.shape[1], kw.get("attention_mask"), given,
                    derive_positions=self.family.positions == "1d")
                if given is None and kw["position_ids"] is not None:
                    kw["position_ids"] = kw["position_ids"] + self.family.position_offset
            return self._orig(**kw)
        self._decode.forget(cache)
        enc = kw.get("mm_encoder_outputs") or {}
        present = [m for m in self.mods if kw.get(m.input) is not None or enc.get(m.name) is not None]
        if self.enabled and present:
            return self._prefill(kw, present)
        return self._orig(**kw)

    # ---- prefill ---------------------------------------------------------------------------------------
    def _encoder_output(self, mod: Modality, kw: dict[str, Any]) -> Any:
        """This call's encoder output for `mod`: the caller's `mm_encoder_outputs`, else the model's encoder run on
        forward's inputs (None arguments fall back to the config attribute of the same name, as forward does)."""
        enc = kw.get("mm_encoder_outputs") or {}
        if enc.get(mod.name) is not None:
            if kw.get(mod.input) is not None:
                raise ValueError(f"{mod.input}: given together with mm_encoder_outputs[{mod.name!r}]")
            return enc[mod.name]
        fn = getattr(self.core, mod.encoder_name)
        params = inspect.signature(fn).parameters
        cfg = self.model.config
        ekw = {}
        for k, p in params.items():
            if p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
                continue
            v = kw.get(k)
            if v is None and hasattr(cfg, k):
                v = getattr(cfg, k)
            if v is not None:
                ekw[k] = v
        if "return_dict" not in params and not any(p.kind is inspect.Parameter.VAR_KEYWORD
                                                   for p in params.values()):
            return fn(**ekw)
        return fn(**ekw, return_dict=True)

    def _texts(self, ids: torch.Tensor, am: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Per sample [L_b, C] input embeddings of the question (text-guided compressors)."""
        cfg = self.model.config
        media = list(self.tokens.values())
        excl = [i for a in self.family.structural for i in int_list(getattr(cfg, a, None))]
        text_cfg = getattr(cfg, "text_config", None)  # the top-level copies of these ids are deprecated there
        for c in (text_cfg or cfg, getattr(self.model, "generation_config", None)):
            for n in ("pad_token_id", "bos_token_id", "eos_token_id"):
                excl += int_list(getattr(c, n, None)) if c is not None else []
        qm = question_mask(ids, am, media, excl + int_list(self.opts["text_exclude_ids"]))
        return question_embeddings(self.model.get_input_embeddings(), ids, qm)

    def _compress(self, items: list[dict[str, Any]]) -> None:
        """Compress items in groups of equal (N, grid, prefix, text length, metric width); sets it["x_out"]
        ([M', C] features) and it["kept"] ([M] representatives; None when nothing was removed).

        Items compressed in another space (`project`: their run keeps its first M' columns) get their outputs in the
        order the method declares (`CompressOutput.order`, e.g. VisionZip's dominant-then-contextual); items whose
        outputs sit at their representatives' columns keep source order."""
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for it in items:
            t, mt = it["text"], it["metric"]
            key = (tuple(it["x"].shape), it["grid"], it["prefix"], it["project"], None if t is None else t.shape[0],
                   None if mt is None else mt.shape[-1])
            groups.setdefault(key, []).append(it)
        for (_, grid, prefix, project, _, _), group in groups.items():
            x = torch.stack([it["x"] for it in group])  # [G, N, C']
            sc = None if group[0]["scores"] is None else torch.stack([it["scores"] for it in group]).to(x.device)
            tx = None if group[0]["text"] is None else torch.stack([it["text"] for it in group]).to(x.dtype)
            mt = None if group[0]["metric"] is None else torch.stack([it["metric"] for it in group]).to(x.device)
            res = self.compressor(x, grid=grid, prefix=prefix, scores=sc, text=tx, metric=mt)
            if project and res.order is not None:
                res.x = res.ordered()  # the 1-D run reads the tokens in the method's order
            counts = res.counts.tolist()
            feats = self.family.project(self, res.x) if project else res.x  # [G, M, C]
            for j, it in enumerate(group):
                m = counts[j]
                it["assign"] = res.assign[j]  # [N] output slot of every compressed token (-1: dropped)
                if m >= x.shape[1]:  # nothing removed: the model's own features, bit for bit
                    it["x_out"], it["kept"] = None, None
                    continue
                it["x_out"], it["kept"] = feats[j, :m], res.rep[j, :m]
                if it["tail"] is not None:
                    it["x_out"] = torch.cat([it["x_out"], it["tail"].to(feats)])

    def _items(self, mod: Modality, out: Any, ids: torch.Tensor, texts: list) -> list[dict[str, Any]]:
        """The items of one modality: features, placeholder columns, what the compressor gets."""
        fam = self.family
        feats = fam.features(mod, out)
        segs = media_segments(ids, self.tokens[mod.name], [f.shape[0] for f in feats])  # (sample, [n_i] columns)
        meta = getattr(out, META_ATTR, None)
        if meta is None:
            if "scores" in self._needs:
                raise ValueError(f"scores: compressor {self.compressor.name!r} needs attention scores, taken "
                                 f"while the encoder runs; the {mod.name} features were encoded before "
                                 f"mmcompress.apply (pass {mod.input} instead of mm_encoder_outputs)")
            meta = [ItemMeta() for _ in feats]
        if len(meta) != len(feats):
            meta = expanded_meta(meta, segs, ids.shape[0])
        if len(meta) != len(feats):
            raise ValueError(f"model: {len(feats)} {mod.name} items but {len(meta)} item descriptions")
        items = []
        for f, mt, (b, cols) in zip(feats, meta, segs, strict=True):
            if "scores" in self._needs and mt.scores is None:
                raise ValueError(f"scores: the {type(fam).__name__} description gives no attention scores for "
                                 f"{mod.name}; use a compressor that does not need `scores`")
            sel = None if mt.fixed is None else (~mt.fixed.to(f.device)).nonzero().squeeze(1)  # [N_c]
            x = mt.x if mt.x is not None else f if sel is None else f[sel]
            sc = mt.scores if sel is None or mt.x is not None else mt.scores[sel]
            me = mt.metric if sel is None or mt.x is not None or mt.metric is None else mt.metric[sel]
            items.append({"mod": mod, "sample": b, "cols": cols, "orig": f, "sel": sel, "grid": mt.grid, "x": x,
                          "prefix": mt.prefix, "project": mt.x is not None, "tail": mt.tail, "text": texts[b],
                          "scores": sc, "metric": me,
                          "skip": getattr(out, META_ATTR, None) is None and fam.requires_meta})
        return items

    def _prefill(self, kw: dict[str, Any], present: list[Modality]) -> Any:
        ids = kw.get("input_ids")
        if ids is None:
            raise ValueError(f"input_ids: compression needs input_ids (the {present[0].name} placeholder tokens), "
                             f"not inputs_embeds")
        B, L = ids.shape
        dev = ids.device
        am = kw.get("attention_mask")
        if am is not None and (am.dim() != 2 or tuple(am.shape) != (B, L)):
            raise ValueError(f"attention_mask: expected a 2D mask of shape {(B, L)}, got {tuple(am.shape)}")
        fam = self.family
        with torch.no_grad():
            texts = self._texts(ids, am) if "text" in self._needs else [None] * B
        per_mod = []
        for mod in present:
            with torch.no_grad():
                out = fam.encode(self, mod, kw)
            per_mod.append((mod, out, self._items(mod, out, ids, texts)))
        todo = [it for _, _, its in per_mod for it in its if not it["skip"]]
        t0 = time.perf_counter()
        with torch.no_grad():
            self._compress(todo)
        ms = (time.perf_counter() - t0) * 1e3

        keep = torch.ones(B, L, dtype=torch.bool, device=dev)
        t_in, t_out = [0] * B, [0] * B
        enc_out: dict[str, Any] = dict(kw.get("mm_encoder_outputs") or {})
        for mod, out, mod_items in per_mod:
            feats_out, kept_out = [], []
            for it in mod_items:
                n = it["orig"].shape[0]
                kept = it.get("kept")
                t_in[it["sample"]] += n
                if kept is None:
                    feats_out.append(it["orig"])
                    kept_out.append(None)
                    t_out[it["sample"]] += n
                    continue
                x_out = it["x_out"].to(it["orig"].dtype)
                if it["project"]:  # compressed in another space: the run keeps its first M' columns
                    kept = torch.arange(x_out.shape[0], device=dev)
                elif it["sel"] is not None:  # structural tokens back in, everything in column order
                    kept = it["sel"][kept]
                    fixed = (~torch.isin(torch.arange(n, device=kept.device), it["sel"])).nonzero().squeeze(1)
                    kept = torch.cat([fixed, kept])
                    x_out = torch.cat([it["orig"][fixed], x_out])
                    order = kept.argsort()
                    kept, x_out = kept[order], x_out[order]
                keep[it["sample"], it["cols"]] = False
                keep[it["sample"], it["cols"][kept.to(dev)]] = True
                feats_out.append(x_out)
                kept_out.append(kept)
                t_out[it["sample"]] += x_out.shape[0]
            enc_out[mod.name] = out if all(k is None for k in kept_out) else fam.pack(mod, out, feats_out, kept_out)
        assign = [(it["mod"].name, it["sample"], it.get("assign")) for _, _, its in per_mod for it in its]
        self.record(t_in, t_out, ms, seq_len_in=L, assign=assign, **fam.stats(self))

        # Original positions ("mrope": computed as the model would, before any column is removed).
        mm = kw.get("mm_token_type_ids")
        pos = None
        if fam.positions == "mrope":
            if mm is None:
                mm = torch.zeros_like(ids, dtype=torch.int)
                for m in self.mods:
                    if m.type_id is not None:
                        mm = mm.masked_fill(ids == self.tokens[m.name], m.type_id)
            pos = kw.get("position_ids")
            if pos is None:
                pos = fam.rope_index(self, kw, mm)  # [3 or 4, B, L]
            elif pos.dim() == 2:
                pos = pos.unsqueeze(0).expand(3, B, L)

        new = dict(kw)
        for m in present:
            new.pop(m.input, None)
        for k in fam.consumed:
            new.pop(k, None)
        if fam.merge == "features":
            new["mm_encoder_outputs"] = enc_out
        if mm is not None:
            new["mm_token_type_ids"] = mm
        shrunk = None
        if not bool(keep.all()):  # drop the removed columns, re-pad on the input's side (option when unpadded)
            tensors = {k: new[k] for k in PER_TOKEN
                       if isinstance(new.get(k), torch.Tensor) and tuple(new[k].shape[:2]) == (B, L)}
            side = padding_side_of(am) or self.opts["padding_side"]
            shrunk = shrink_batch(keep, am, tensors, {**PAD_VALUES, "input_ids": self._pad_id()}, side)
            new.update(shrunk.tensors)
            new["attention_mask"] = shrunk.attention_mask if am is None else shrunk.attention_mask.to(am.dtype)
            new["position_ids"] = shrunk.position_ids + fam.position_offset
            if pos is not None:  # M-RoPE: the original ids of the kept columns
                g = shrunk.index.clamp(min=0).expand(pos.shape[0], *shrunk.index.shape)
                p = pos.gather(-1, g).masked_fill(shrunk.index < 0, 0)
                if p.shape[0] == 4:  # row 0 is the plain sequence index (mask building): renumber it
                    p[0] = shrunk.position_ids
                new["position_ids"] = p
        elif pos is not None:
            new["position_ids"] = pos
        valid = torch.ones(B, L, dtype=torch.bool, device=dev) if am is None else am.bool()
        removed = valid.sum(1) - (valid.sum(1) if shrunk is None else shrunk.attention_mask.sum(1))  # [B]

        ids_new = new["input_ids"]  # [B, L']
        if fam.merge == "embeds":  # forward cannot take features: merge them into the embeddings as it would
            with torch.no_grad():
                emb = self.model.get_input_embeddings()(new["input_ids"])  # [B, L', C]
                for mod, _, _ in per_mod:
                    f = torch.cat(fam.features(mod, enc_out[mod.name])).to(emb.device, emb.dtype)
                    emb = emb.masked_scatter((new["input_ids"] == self.tokens[mod.name]).unsqueeze(-1), f)
            new["inputs_embeds"], new["input_ids"] = emb, None
        fv = self.inllm
        if fv is not None and fv.active:
            if new.get("labels") is not None:
                raise ValueError(f"labels: {fv.method.name} prunes the LLM sequence; a loss over it is not supported")
            media = torch.zeros_like(ids_new, dtype=torch.bool)  # [B, L'] media columns
            for t in self.tokens.values():
                media |= ids_new == t
            with fv.armed(media, new.get("attention_mask")):
                out = self._orig(**new)
            self.last_stats["inllm_removed"] = list(fv.last_removed)
            self.last_stats["fastv_removed"] = self.last_stats["inllm_removed"]  # its first name (FastV came first)
            self.last_stats["inllm_layer_tokens"] = fv.last_kept_per_layer  # media tokens each LLM layer saw
        else:
            out = self._orig(**new)
        if pos is not None:  # decoding continues at the original positions
            mx = pos[-3:].masked_fill(~valid.unsqueeze(0), -1).amax(dim=(0, 2))  # [B]
            self.core.rope_deltas = (mx + 1 - valid.sum(1) + removed).unsqueeze(1)
        self.last_stats["seq_len_out"] = L if shrunk is None else shrunk.index.shape[1]
        if shrunk is not None:
            out_cache, cache = _find_cache(out), _cache_of(kw)
            self._decode.remember(cache if out_cache is None else out_cache, L, new["attention_mask"], removed)
        return out

    def _pad_id(self) -> int:
        cfg = self.model.config
        for c in (getattr(cfg, "text_config", None), cfg):
            pid = getattr(c, "pad_token_id", None) if c is not None else None
            if isinstance(pid, int):
                return pid
        return 0
