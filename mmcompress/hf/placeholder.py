"""The generic placeholder adapter: every VLM whose encoders' features replace runs of placeholder tokens.

Most Hugging Face VLMs (Qwen2/2.5/3-VL, Gemma 3, InternVL, SmolVLM/Idefics3, Mistral 3, LLaVA-NeXT-Video,
Qwen2-Audio, ...) share one pattern: `get_<modality>_features` turns pixels (or audio) into features, and forward
`masked_scatter`s them into the positions of the placeholder token (`image_token_id`, ...) of `input_ids`; forward
also accepts those features precomputed as `mm_encoder_outputs`, which is how `generate()` passes them. This module
owns all the plumbing of compressing them; a family only describes what differs (`Family`, in `family.py`): where
its features come from, the grid of each item, which placeholder tokens are structural, and its position-id scheme.
The per-item bookkeeping (encoder output -> items -> compressed features) is in `items.py`; this module patches the
model, dispatches prefill and decode steps, and rewrites the sequence around the compressed items.

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
from typing import Any, ClassVar

import torch

from mmcompress.compressors.base import EncoderNeeds
from mmcompress.hf.adapter import Adapter, register_adapter
from mmcompress.hf.family import META_ATTR, Family, ItemMeta, Modality, expanded_meta, int_list
from mmcompress.hf.items import compress_items, item_list, question_texts
from mmcompress.hf.plumbing import DecodeState, padding_side_of, shrink_batch
from mmcompress.inllm.fastv import FastV
from mmcompress.inllm.stage import InLLM, find_decoder

# Modality, ItemMeta, Family, int_list, expanded_meta and META_ATTR live in `family`; re-exported here, where
# families have always imported them from.
__all__ = ["Modality", "ItemMeta", "Family", "PlaceholderAdapter", "register_family", "int_list", "expanded_meta",
           "META_ATTR"]

PER_TOKEN = ("input_ids", "labels", "mm_token_type_ids", "token_type_ids")  # [B, L] tensors that follow the layout
PAD_VALUES = {"labels": -100, "mm_token_type_ids": 0, "token_type_ids": 0}


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
        if self.encoder_needs.stage == "pixels":  # before the encoder (mmcompress.hf.pixels): images only
            from mmcompress.hf.pixels import check_pixel_stage

            check_pixel_stage(self)
            self.mods = tuple(m for m in self.mods if m.name == "image")
        if self.opts["fastv_k"] is None and "fastv_r" in options:
            raise ValueError("fastv_r: FastV is off; pass fastv_k= (the layer K) as well")
        self.inllm: InLLM | None = None  # the in-LLM pruning stage (FastV, PyramidDrop, SparseVLM, DART)
        if self.opts["fastv_k"] is not None:
            self.inllm = FastV(fam.llm_layers(self.core), k=self.opts["fastv_k"], r=self.opts["fastv_r"])
        elif self.opts["inllm"] is not None:
            layers = fam.llm_layers(self.core)
            self.inllm = InLLM(layers, self.opts["inllm"](len(layers)), decoder=find_decoder(self.core, layers),
                               head=self.model.get_output_embeddings())  # rules with a backward pass (TRIO)
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
        if self.encoder_needs.stage == "pixels":
            from mmcompress.hf.pixels import encode_pixels

            return encode_pixels(self, mod, fn, a, (args, kwargs))
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
            texts = question_texts(self, ids, am) if "text" in self._needs else [None] * B
        per_mod = []
        for mod in present:
            with torch.no_grad():
                out = fam.encode(self, mod, kw)
            per_mod.append((mod, out, item_list(self, mod, out, ids, texts)))
        todo = [it for _, _, its in per_mod for it in its if not it["skip"]]
        t0 = time.perf_counter()
        with torch.no_grad():
            compress_items(self, todo)
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
