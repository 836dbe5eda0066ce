"""Adapters for the LLaVA family of transformers 5.x: `llava`, `llava_next` (anyres tiles), `llava_onevision`
(images and video). Optional in-LLM FastV (`fastv_k=`, `fastv_r=`) on top of, or instead of, encoder-side compression.

How it is plumbed (per instance; `attach` sets instance attributes only: `model.forward` and
`model.model.get_image_features` / `get_video_features`, each a `functools.wraps` wrapper so generate() still sees
the original signatures, plus FastV's hooks when asked; `detach` deletes exactly those):

1. Encoding: the model's own `get_image_features` / `get_video_features` run unchanged, with temporary hooks that
   capture the projector's input (stage "vision", the default: features after the feature-layer selection, before
   the projector) or output (stage "projector") and, when the compressor needs `scores`, q/k of the selected vision
   layer (`QKCapture`; CLS row, or mean attention received without a CLS; no eager attention). The items to
   compress ride along on the returned output object, because generate() calls these encoders itself BEFORE the
   prefill and hands their outputs to forward as `mm_encoder_outputs`.
2. Prefill (forward with pixel values or such encoder outputs): each image / video is one item, compressed in one
   call per group of equal shapes (see `_items_images`, `_anyres_items`, `_items_videos` for the grid each family
   passes). Stage "vision" then runs the projector on the compressed tokens (`compress_ms` in `stats` includes it).
3. The `<image>` / `<video>` placeholder run of every item is shortened to its new length (the first m of its run
   are kept), the batch is re-padded (`plumbing.shrink_batch`: the padding side of the input, else option
   `padding_side`, default "left"), position ids are rebuilt from the new mask (cumsum - 1, as HF generate does),
   labels follow (-100 on padding), and the unmodified forward runs with `mm_encoder_outputs=` holding the
   compressed features (transformers checks placeholder count == feature count).
4. Decode steps of `generate()` are remapped onto the shorter cache (`plumbing.DecodeState`).

An item whose budget keeps all its tokens uses the model's own features unchanged, so keep=1.0 gives bit-identical
logits. `text=` (stage "projector" only) is the LLM input embedding of the question: see `plumbing.question_mask`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmcompress.compressors.attention_scores import QKCapture
from mmcompress.integrations.base import Adapter, register_adapter
from mmcompress.integrations.fastv import FastV
from mmcompress.integrations.plumbing import (
    DecodeState,
    media_segments,
    padding_side_of,
    placeholder_keep,
    question_embeddings,
    question_mask,
    shrink_batch,
)

__all__ = ["LlavaAdapter", "vision_layers", "vision_scores_capture"]

STAGES = ("vision", "projector")
ITEMS_ATTR = "_mmcompress_items"  # attribute of a get_*_features output holding the items to compress


@dataclass
class _Item:
    """One image or video to compress."""

    kind: str  # "image" | "video"
    sample: int  # batch index of the sample that holds its placeholders
    x: torch.Tensor  # [N, C'] tokens in the compression space
    original: torch.Tensor  # [n_in, C] the model's own features for it (used when nothing is removed)
    grid: tuple[int, ...] | None
    prefix: int
    scores: torch.Tensor | None  # [N]
    newline: bool  # append the model's image_newline after the compressed tokens
    text: torch.Tensor | None = None  # [L_b, C]
    out: torch.Tensor | None = None  # [m_out, C] final features


def vision_layers(tower: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a HF vision tower (CLIP/SigLIP `...encoder.layers`, DINOv2 `encoder.layer`)."""
    for name, mod in tower.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "layer", "blocks") and len(mod):
            return mod
    raise ValueError(f"model: cannot find the transformer blocks of vision tower {type(tower).__name__}")


def vision_scores_capture(tower: nn.Module, feature_layer: int | list[int]) -> QKCapture:
    """A `QKCapture` on the vision block whose OUTPUT is `hidden_states[feature_layer]` (last one if a list)."""
    layers = vision_layers(tower)
    j = feature_layer[-1] if isinstance(feature_layer, (list, tuple)) else int(feature_layer)
    idx = j if j < 0 else max(j - 1, 0)  # hidden_states[j] = output of layers[j - 1] (j > 0) / layers[j] (j < 0)
    return QKCapture(layers[idx])


def _row_scores(cap: QKCapture, n_patches: int) -> tuple[torch.Tensor, int]:
    """[tiles, N_total] attention scores and the number of extra (CLS + register) tokens.

    With a CLS token (N_total > n_patches) the CLS row is used; without one, the mean attention each token receives.
    """
    n_total = cap.q.shape[1]
    extra = n_total - n_patches
    rows = 0 if extra >= 1 else torch.arange(n_total, device=cap.q.device)
    return cap.scores(rows=rows), extra


@contextlib.contextmanager
def _capture(module: nn.Module, want_input: bool) -> Iterator[list[torch.Tensor]]:
    """Record the first tensor input (or the output) of every call of `module` inside the context."""
    got: list[torch.Tensor] = []
    if want_input:
        h = module.register_forward_pre_hook(lambda m, args: got.append(args[0]))
    else:
        h = module.register_forward_hook(lambda m, args, out: got.append(out))
    try:
        yield got
    finally:
        h.remove()


def _int_list(v: Any) -> list[int]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(i) for i in v if i is not None]
    return [int(v)]


@register_adapter
class LlavaAdapter(Adapter):
    """LLaVA / LLaVA-NeXT / LLaVA-OneVision adapter (transformers 5.x).

    Options:
        stage: "vision" (default; compress the selected vision features before the projector) or "projector"
            (after it; required by text-guided compressors, whose `text=` lives in the LLM embedding space).
        padding_side: side used when compression makes a batch ragged and the input had no padding ("left",
            the side generate() needs, or "right"); an input that is already padded keeps its side.
        text_exclude_ids: extra token ids left out of the question span (chat-template tokens).
        fastv_k: None (off) or the FastV layer K: layers >= K see the image tokens pruned by last-token attention.
        fastv_r: FastV's R, the fraction of image tokens pruned at layer K (default 0.5).
    """

    model_types = ("llava", "llava_next", "llava_onevision")
    options = {"stage": "vision", "padding_side": "left", "text_exclude_ids": (), "fastv_k": None, "fastv_r": 0.5}

    def __init__(self, model: nn.Module, compressor, **options: Any):
        super().__init__(model, compressor, **options)
        if self.opts["stage"] not in STAGES:
            raise ValueError(f"stage: expected one of {STAGES}, got {self.opts['stage']!r}")
        if self.opts["padding_side"] not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {self.opts['padding_side']!r}")
        needs = getattr(compressor, "needs", ())
        if "text" in needs and self.opts["stage"] != "projector":
            raise ValueError(f"stage: compressor {getattr(compressor, 'name', '')!r} needs `text=` (question "
                             f"embeddings, which live in the LLM input space); use stage='projector'")
        core = model.model if hasattr(getattr(model, "model", None), "vision_tower") else model
        if not hasattr(core, "vision_tower") or not hasattr(core, "multi_modal_projector"):
            raise ValueError(f"model: {type(model).__name__} has no vision_tower/multi_modal_projector")
        self.core = core
        self.kind = model.config.model_type
        self.fastv: FastV | None = None
        if self.opts["fastv_k"] is None and "fastv_r" in options:
            raise ValueError("fastv_r: FastV is off; pass fastv_k= (the layer K) as well")
        if self.opts["fastv_k"] is not None:
            self.fastv = FastV(core.language_model.layers, k=self.opts["fastv_k"], r=self.opts["fastv_r"])
        self._decode = DecodeState()
        self._prev_forward: Any = None
        self._orig: Callable | None = None

    # ---- attach / detach ------------------------------------------------------------------------
    def attach(self) -> None:
        m = self.model
        self._prev_forward = m.__dict__.get("forward")
        orig = m.forward
        self._orig = orig
        self._params = list(inspect.signature(orig).parameters)
        adapter = self

        @functools.wraps(orig)  # keeps the signature: generate() inspects forward's parameters
        def forward(*args: Any, **kwargs: Any) -> Any:
            return adapter._forward(*args, **kwargs)

        forward._mmcompress = True  # type: ignore[attr-defined]
        m.forward = forward
        self._patched: list[str] = []
        for modality in ("image", "video"):
            name = f"get_{modality}_features"
            if not hasattr(self.core, name) or name in self.core.__dict__:
                continue
            self._patch_encoder(modality, name)
        if self.fastv is not None:
            self.fastv.attach()

    def _patch_encoder(self, modality: str, name: str) -> None:
        orig = getattr(self.core, name)
        sig = inspect.signature(orig)
        adapter = self

        @functools.wraps(orig)  # generate() reads this signature to pick the encoder's arguments
        def encode(*args: Any, **kwargs: Any) -> Any:
            return adapter._encode(modality, orig, sig, *args, **kwargs)

        encode._mmcompress = True  # type: ignore[attr-defined]
        self.core.__dict__[name] = encode
        self._patched.append(name)

    def detach(self) -> None:
        m = self.model
        cur = m.__dict__.get("forward")
        if cur is not None and getattr(cur, "_mmcompress", False):
            if self._prev_forward is None:
                del m.__dict__["forward"]
            else:
                m.__dict__["forward"] = self._prev_forward
        for name in getattr(self, "_patched", []):
            if getattr(self.core.__dict__.get(name), "_mmcompress", False):
                del self.core.__dict__[name]
        self._patched = []
        if self.fastv is not None:
            self.fastv.detach()

    # ---- the wrapped forward --------------------------------------------------------------------
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(self._params):
            raise TypeError(f"forward: too many positional arguments ({len(args)})")
        kw = dict(zip(self._params, args, strict=False))
        dup = set(kw) & set(kwargs)
        if dup:
            raise TypeError(f"forward: got multiple values for {sorted(dup)}")
        kw.update(kwargs)
        if not self.enabled:
            return self._orig(**kw)
        cache = kw.get("cache", kw.get("past_key_values"))
        has_media = kw.get("pixel_values") is not None or kw.get("pixel_values_videos") is not None or \
            bool(kw.get("mm_encoder_outputs"))
        if not has_media:
            if self._decode.knows(cache):
                ids = kw.get("input_ids")
                q = (ids if ids is not None else kw["inputs_embeds"]).shape[1]
                kw["attention_mask"], kw["position_ids"] = self._decode.decode_inputs(
                    cache, q, kw.get("attention_mask"), kw.get("position_ids"))
            return self._orig(**kw)
        self._decode.forget(cache)
        kw, shrink = self._prefill(kw)
        fv = self.fastv
        if fv is not None and fv.r > 0:
            if kw.get("labels") is not None:
                raise ValueError("labels: FastV prunes the LLM sequence; a loss over it is not supported")
            ids = kw["input_ids"]
            img = torch.zeros_like(ids, dtype=torch.bool)
            for t in self._media_ids():
                img |= ids == t
            with fv.armed(img, kw.get("attention_mask")):
                out = self._orig(**kw)
            self.last_stats["fastv_removed"] = list(fv.last_removed)
        else:
            out = self._orig(**kw)
        if shrink is not None:
            orig_len, new_mask, shift = shrink
            out_cache = getattr(out, "cache", None)
            self._decode.remember(cache if out_cache is None else out_cache, orig_len, new_mask, shift)
        return out

    def _media_ids(self) -> list[int]:
        cfg = self.model.config
        return _int_list(getattr(cfg, "image_token_id", None)) + _int_list(getattr(cfg, "video_token_id", None))

    def _special_ids(self) -> list[int]:
        ids: list[int] = []
        for cfg in (self.model.config, getattr(self.model.config, "text_config", None),
                    getattr(self.model, "generation_config", None)):
            for n in ("pad_token_id", "bos_token_id", "eos_token_id"):
                ids += _int_list(getattr(cfg, n, None)) if cfg is not None else []
        return ids + _int_list(self.opts["text_exclude_ids"])

    def _cfg(self, kw: dict[str, Any], name: str) -> Any:
        v = kw.get(name)
        return getattr(self.model.config, name, None) if v is None else v

    # ---- prefill: compress and rewrite ----------------------------------------------------------
    def _prefill(self, kw: dict[str, Any]) -> tuple[dict[str, Any], tuple | None]:
        ids = kw.get("input_ids")
        if ids is None:
            raise ValueError("input_ids: compression needs input_ids (the <image> placeholders), not inputs_embeds")
        am = kw.get("attention_mask")
        needs = getattr(self.compressor, "needs", ())
        outs: dict[str, Any] = dict(kw.get("mm_encoder_outputs") or {})
        with torch.no_grad():
            for modality, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
                if kw.get(key) is not None:
                    if outs.get(modality) is not None:
                        raise ValueError(f"{key}: given together with mm_encoder_outputs[{modality!r}]")
                    fn = getattr(self.core, f"get_{modality}_features")
                    ekw = {k: kw[k] for k in inspect.signature(fn).parameters if k != "kwargs" and
                           kw.get(k) is not None}
                    outs[modality] = fn(**ekw, return_dict=True)
        items: list[_Item] = []
        for modality in ("image", "video"):
            o = outs.get(modality)
            if o is not None:
                its = getattr(o, ITEMS_ATTR, None)
                if its is None:  # features precomputed elsewhere: passed through uncompressed
                    continue
                items += [dataclasses.replace(it) for it in its]
        texts: list[torch.Tensor | None] = [None] * ids.shape[0]
        if "text" in needs:
            qm = question_mask(ids, am, self._media_ids() + self._newline_ids(), self._special_ids())
            with torch.no_grad():
                texts = question_embeddings(self.core.get_input_embeddings(), ids, qm)
        # map items to samples through their placeholder runs
        segs: list[tuple[int, torch.Tensor]] = []
        for kind, tok in (("image", "image_token_id"), ("video", "video_token_id")):
            its = [it for it in items if it.kind == kind]
            if its:
                s = media_segments(ids, int(getattr(self.model.config, tok)), [it.original.shape[0] for it in its])
                for it, (b, _) in zip(its, s, strict=True):
                    it.sample = b
                    it.text = texts[b]
                segs += s
        t0 = time.perf_counter()
        with torch.no_grad():
            self._compress(items)
        ms = (time.perf_counter() - t0) * 1e3
        B = ids.shape[0]
        t_in, t_out = [0] * B, [0] * B
        for it in items:
            t_in[it.sample] += it.original.shape[0]
            t_out[it.sample] += it.out.shape[0]
        self.record(t_in, t_out, ms, stage=self.opts["stage"])
        new = dict(kw)
        new["pixel_values"] = None
        new.pop("pixel_values_videos", None)
        mm = dict(outs)
        img = [it.out for it in items if it.kind == "image"]
        vid = [it.out for it in items if it.kind == "video"]
        if img:
            mm["image"] = BaseModelOutputWithPooling(pooler_output=img)
        if vid:
            mm["video"] = BaseModelOutputWithPooling(pooler_output=torch.cat(vid, 0).unsqueeze(0))
        new["mm_encoder_outputs"] = mm
        if t_in == t_out:
            return new, None
        keep = placeholder_keep(tuple(ids.shape), segs, [it.out.shape[0] for it in items if it.kind == "image"]
                                + [it.out.shape[0] for it in items if it.kind == "video"], ids.device)
        side = padding_side_of(am) or self.opts["padding_side"]
        pad_id = self._pad_id()
        sh = shrink_batch(keep, am, {"input_ids": ids, "labels": kw.get("labels")},
                          {"input_ids": pad_id, "labels": -100}, side)
        new["input_ids"] = sh.tensors["input_ids"]
        if kw.get("labels") is not None:
            new["labels"] = sh.tensors["labels"]
        new["attention_mask"] = sh.attention_mask.to(am.dtype) if am is not None else sh.attention_mask
        new["position_ids"] = sh.position_ids
        shift = torch.tensor(t_in, device=ids.device) - torch.tensor(t_out, device=ids.device)
        return new, (ids.shape[1], new["attention_mask"], shift)

    def _pad_id(self) -> int:
        for cfg in (self.model.config, getattr(self.model.config, "text_config", None)):
            v = getattr(cfg, "pad_token_id", None)
            if isinstance(v, int):
                return v
        return 0

    def _newline_ids(self) -> list[int]:
        return _int_list(getattr(self.model.config, "image_newline_token_id", None))

    # ---- compression of the items ---------------------------------------------------------------
    def _compress(self, items: list[_Item]) -> None:
        """Compress items in groups of equal (N, grid, prefix, text length); fills `it.out`."""
        groups: dict[tuple, list[_Item]] = {}
        for it in items:
            key = (it.x.shape, it.grid, it.prefix, None if it.text is None else it.text.shape[0])
            groups.setdefault(key, []).append(it)
        project = self.opts["stage"] == "vision"
        for (_, grid, prefix, _), group in groups.items():
            x = torch.stack([it.x for it in group])  # [G, N, C']
            sc = None if group[0].scores is None else torch.stack([it.scores for it in group]).to(x.device)
            tx = None if group[0].text is None else torch.stack([it.text for it in group]).to(x.dtype)
            res = self.compressor(x, grid=grid, prefix=prefix, scores=sc, text=tx)
            counts = res.counts.tolist()
            feats = self.core.multi_modal_projector(res.x) if project else res.x  # [G, M, C]
            for j, it in enumerate(group):
                m = counts[j]
                if m >= x.shape[1]:  # nothing removed: the model's own features, bit for bit
                    it.out = it.original
                    continue
                f = feats[j, :m]
                if it.newline:
                    f = torch.cat([f, self.core.image_newline[None].to(f)], 0)
                it.out = f

    def _tile_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        p = self.model.config.vision_config.patch_size
        return pixel_values.shape[-2] // p, pixel_values.shape[-1] // p

    # ---- encoders: the model's own get_*_features, with capture -----------------------------------
    def _encode(self, modality: str, orig: Callable, sig: inspect.Signature, *args: Any, **kwargs: Any) -> Any:
        """Patched `get_image_features` / `get_video_features`: the original call, plus the items to compress.

        generate() calls these BEFORE the prefill and hands their outputs to forward as `mm_encoder_outputs`, so the
        raw (pre-projector) features, scores and layout ride along on the output object (`ITEMS_ATTR`) and the
        compression itself happens in forward, where input_ids (placeholders, question) are known.
        """
        if not self.enabled:
            return orig(*args, **kwargs)
        a = sig.bind(*args, **kwargs).arguments
        a.update(a.pop("kwargs", {}))
        for n in ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio"):
            if n in sig.parameters:
                a[n] = self._cfg(a, n)
        want_scores = "scores" in getattr(self.compressor, "needs", ())
        cap = vision_scores_capture(self.core.vision_tower, a["vision_feature_layer"]) if want_scores else None
        with _capture(self.core.multi_modal_projector, self.opts["stage"] == "vision") as got, \
                (cap or contextlib.nullcontext()):
            out = orig(*args, **kwargs)
        feats = got[0]  # [tiles or frames, N, C'] projector input (stage vision) or output (stage projector)
        if modality == "image":
            items = self._items_images(a, out, feats, cap)
        else:
            items = self._items_videos(a, out, feats, cap)
        object.__setattr__(out, ITEMS_ATTR, items)
        return out

    def _items_images(self, a: dict[str, Any], out: Any, feats: torch.Tensor, cap: QKCapture | None) -> list[_Item]:
        pv = a["pixel_values"]
        vfs = a["vision_feature_select_strategy"]
        orig = list(out.pooler_output)
        h, w = self._tile_grid(pv)
        scores = None
        if cap is not None:
            scores, _ = _row_scores(cap, h * w)  # [tiles, N_total]
            if vfs == "default":
                scores = scores[:, 1:]
        prefix = feats.shape[1] - h * w
        if prefix < 0:
            raise ValueError(f"model: {feats.shape[1]} vision tokens per tile but a {h}x{w} patch grid")
        if self.kind == "llava":
            if a.get("image_sizes") is not None:
                raise ValueError("image_sizes: variable-size (Pixtral-style) llava inputs are not supported")
            return [_Item("image", 0, feats[i], orig[i], (h, w), prefix, None if scores is None else scores[i], False)
                    for i in range(feats.shape[0])]
        if prefix:
            raise ValueError(f"model: {self.kind} with {prefix} extra (register) tokens per tile is not supported")
        return self._anyres_items(a, feats, orig, scores, (h, w))

    def _anyres_items(self, a: dict[str, Any], feats: torch.Tensor, orig: list[torch.Tensor],
                      scores: torch.Tensor | None, hw: tuple[int, int]) -> list[_Item]:
        """Per image: its base tile then its unpadded high-res grid, newlines removed, in ONE 1-D sequence.

        Grid passed to the compressor: (h, w) for a single-tile image; None for anyres images (the base tile and the
        high-res grid have different geometries). The compressed tokens are followed by one image_newline token.
        """
        core, cfg = self.core, self.model.config
        mod = sys.modules[type(core).__module__]
        sizes = a["image_sizes"]
        bni = a.get("batch_num_images")
        patching = [True] * len(sizes) if bni is None or self.kind == "llava_next" else \
            [int(n) == 1 for n in bni for _ in range(int(n))]
        n_tiles = [mod.image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                                 patch_size=cfg.vision_config.image_size) if p else 1
                   for s, p in zip(sizes, patching, strict=True)]
        per_img = list(torch.split(feats, n_tiles, 0))
        per_sc = None if scores is None else list(torch.split(scores.unsqueeze(-1), n_tiles, 0))
        packed = self._pack(per_img, sizes, a)
        packed_sc = None if per_sc is None else self._pack(per_sc, sizes, a)
        items = []
        for i, x in enumerate(packed):
            grid = hw if n_tiles[i] == 1 else None
            sc = None if packed_sc is None else packed_sc[i][:, 0]
            items.append(_Item("image", 0, x, orig[i], grid, 0, sc, True))
        return items

    def _pack(self, per_img: list[torch.Tensor], sizes: torch.Tensor, a: dict[str, Any]) -> list[torch.Tensor]:
        """The model's own unpad/pack of tiles, without newline tokens (works for any channel count)."""
        if self.kind == "llava_next":
            out, _ = self.core.pack_image_features(per_img, sizes, a["vision_feature_select_strategy"],
                                                   image_newline=None)
        else:
            out, _ = self.core.pack_image_features(per_img, sizes, image_newline=None,
                                                   vision_aspect_ratio=a["vision_aspect_ratio"])
        return list(out)

    def _items_videos(self, a: dict[str, Any], out: Any, feats: torch.Tensor, cap: QKCapture | None) -> list[_Item]:
        """Per video: the frames' 2x-pooled tokens as one (T, h', w') grid; one image_newline token follows."""
        core = self.core
        pvv = a["pixel_values_videos"]  # [B, T, 3, H, W]
        Bv, T = pvv.shape[:2]
        feats = core.apply_pooling(feats)  # [B*T, h'*w', C']
        h, w = self._tile_grid(pvv)
        hp, wp = math.ceil(h / 2), math.ceil(w / 2)
        scores = None
        if cap is not None:
            s, _ = _row_scores(cap, h * w)
            if a["vision_feature_select_strategy"] == "default":
                s = s[:, 1:]
            scores = core.apply_pooling(s.unsqueeze(-1))[..., 0].reshape(Bv, T * hp * wp)
        feats = feats.reshape(Bv, T * hp * wp, feats.shape[-1])
        orig = out.pooler_output  # [B, T*h'*w' + 1, C]
        return [_Item("video", 0, feats[b], orig[b], (T, hp, wp), 0, None if scores is None else scores[b], True)
                for b in range(Bv)]
