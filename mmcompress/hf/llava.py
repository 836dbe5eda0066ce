"""LLaVA, LLaVA-NeXT (anyres tiles) and LLaVA-OneVision (images and video) on the generic placeholder adapter.

What differs from the other families (`placeholder.py` owns the plumbing):

* Stage: compression runs on the selected vision features BEFORE the projector (option `stage="vision"`, the
  default; the projector then runs on the compressed tokens and `compress_ms` includes it) or after it
  (`stage="projector"`, required by text-guided methods, whose `text=` lives in the LLM input space). The model's own
  `get_image_features` / `get_video_features` run unchanged while hooks capture the projector's input or output.
* Items: an image is one item; `llava` has a (h, w) patch grid (prefix = tokens kept ahead of it, e.g. CLS with
  strategy "full"); LLaVA-NeXT / OneVision anyres images are their base tile then their unpadded high-res grid with
  the newline tokens removed, in ONE 1-D sequence (grid None; a single-tile image keeps its (h, w) grid), followed by
  one image_newline once compressed; a OneVision video is its frames' 2x-pooled tokens as one (T, h', w') grid, one
  image_newline after it. Compressed items shorten their placeholder run to its first M' columns.
* Scores and metric (attention-based methods), as the compressor's `EncoderNeeds` declares them: q/k of the selected
  vision layer or of the last one (`QKCapture`), the CLS row (or, without a CLS, the mean attention each token
  receives), heads averaged or one all-channel head, keys as `metric`; no eager attention. A compressor that declares
  `cls_prefix` gets the CLS of the selected hidden state ahead of the patches (`prefix=1`) when the "default" strategy
  drops it (plain `llava` only), projected like the patches.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mmcompress.compressors.attention_scores import QKCapture, QKCaptures
from mmcompress.compressors.base import EncoderNeeds
from mmcompress.hf.placeholder import Family, ItemMeta, Modality, register_family

__all__ = ["LlavaFamily", "vision_layers", "vision_scores_capture"]

STAGES = ("vision", "projector")


def vision_layers(tower: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a HF vision tower (CLIP/SigLIP `...encoder.layers`, DINOv2 `encoder.layer`)."""
    for name, mod in tower.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "layer", "blocks") and len(mod):
            return mod
    raise ValueError(f"model: cannot find the transformer blocks of vision tower {type(tower).__name__}")


def feature_block(tower: nn.Module, feature_layer: int | list[int]) -> int:
    """Index (negative or not) of the vision block whose OUTPUT is `hidden_states[feature_layer]` (last if a list)."""
    j = feature_layer[-1] if isinstance(feature_layer, (list, tuple)) else int(feature_layer)
    return j if j < 0 else max(j - 1, 0)  # hidden_states[j] = output of layers[j - 1] (j > 0) / layers[j] (j < 0)


def vision_scores_capture(tower: nn.Module, feature_layer: int | list[int],
                          needs: EncoderNeeds | None = None) -> QKCapture | QKCaptures:
    """A `QKCapture` on the vision block `needs.layer` names: "feature" (default) is the block whose OUTPUT is
    `hidden_states[feature_layer]`, "last" the tower's last block, an int that block; a tuple of them gives a
    `QKCaptures` on those blocks (scores [B, N, S], one column per block)."""
    layers = vision_layers(tower)
    picked = []
    for layer in ("feature",) if needs is None else needs.layers:
        idx = feature_block(tower, feature_layer) if layer == "feature" else -1 if layer == "last" else int(layer)
        if not -len(layers) <= idx < len(layers):
            raise ValueError(f"layer: block {idx} asked but the vision tower has {len(layers)} blocks")
        picked.append(layers[idx])
    return QKCapture(picked[0]) if len(picked) == 1 else QKCaptures(picked)


def _row_scores(cap: QKCapture, n_patches: int, needs: EncoderNeeds | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """[tiles, N_total] attention scores, [tiles, N_total, d] metric (or None) and the number of extra (CLS +
    register) tokens, as `needs` declares them (default: head-averaged rows, no metric).

    With a CLS token (N_total > n_patches) the CLS row is used; without one, the mean attention each token receives.
    """
    n_total = cap.q.shape[1]
    extra = n_total - n_patches
    rows = 0 if extra >= 1 else torch.arange(n_total, device=cap.q.device)
    scores, metric = cap.signals(needs or EncoderNeeds(), rows)
    return scores, metric, extra


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


class _Capture:
    """What LLaVA's encoders need captured: the projector's input (stage vision) or output, and q/k for scores."""

    def __init__(self, projector: nn.Module, want_input: bool, qk: QKCapture | None,
                 cls_block: nn.Module | None = None):
        self.projector, self.want_input, self.qk, self.cls_block = projector, want_input, qk, cls_block
        self.stack = contextlib.ExitStack()
        self.got: list[torch.Tensor] = []
        self.cls: list[torch.Tensor] = []  # [tiles, 1, C'] CLS of the selected hidden state (cls_prefix)

    def __enter__(self) -> _Capture:
        self.got = self.stack.enter_context(_capture(self.projector, self.want_input))
        self.cls = []
        if self.qk is not None:
            self.stack.enter_context(self.qk)
        if self.cls_block is not None:
            def grab(_m, _a, out):
                h = out[0] if isinstance(out, (tuple, list)) else out
                self.cls.append(h[:, :1].detach())

            self.stack.callback(self.cls_block.register_forward_hook(grab).remove)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()


@register_family
class LlavaFamily(Family):
    """LLaVA / LLaVA-NeXT / LLaVA-OneVision (transformers 5.x).

    Options (besides the generic ones):
        stage: "vision" (default; compress the selected vision features before the projector) or "projector"
            (after it; required by text-guided compressors, whose `text=` lives in the LLM embedding space).
    """

    model_types = ("llava", "llava_next", "llava_onevision")
    modalities = (Modality("image", "pixel_values", ("image_token_id", "image_token_index")),
                  Modality("video", "pixel_values_videos", ("video_token_id", "video_token_index")))
    options = {"stage": "vision"}
    requires_meta = True
    _selection = ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio")

    def core(self, model: nn.Module) -> nn.Module:
        core = model.model if hasattr(getattr(model, "model", None), "vision_tower") else model
        if not hasattr(core, "vision_tower") or not hasattr(core, "multi_modal_projector"):
            raise ValueError(f"model: {type(model).__name__} has no vision_tower/multi_modal_projector")
        return core

    def check(self, adapter: Any) -> None:
        stage = adapter.opts["stage"]
        if stage not in STAGES:
            raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
        if "text" in adapter._needs and stage != "projector":
            raise ValueError(f"stage: compressor {getattr(adapter.compressor, 'name', '')!r} needs `text=` (question "
                             f"embeddings, which live in the LLM input space); use stage='projector'")

    def capture(self, adapter: Any, mod: Modality, args: dict[str, Any]) -> _Capture:
        cfg = adapter.model.config
        for n in self._selection:  # the encoder's None arguments mean the config's values
            if args.get(n) is None and hasattr(cfg, n):
                args[n] = getattr(cfg, n)
        qk = cls_block = None
        enc = adapter.encoder_needs
        tower = adapter.core.vision_tower
        if "scores" in adapter._needs or enc.metric is not None:
            qk = vision_scores_capture(tower, args["vision_feature_layer"], enc)
        if (enc.cls_prefix and adapter.model.config.model_type == "llava" and mod.name == "image"
                and args["vision_feature_select_strategy"] == "default"):
            cls_block = vision_layers(tower)[feature_block(tower, args["vision_feature_layer"])]
        return _Capture(adapter.core.multi_modal_projector, adapter.opts["stage"] == "vision", qk, cls_block)

    def describe(self, adapter: Any, mod: Modality, args: dict[str, Any], out: Any, cap: Any) -> list[ItemMeta]:
        feats = cap.got[0]  # [tiles or frames, N, C'] projector input (stage vision) or output (stage projector)
        if mod.name == "image":
            return _items_images(adapter, args, out, feats, cap)
        return _items_videos(adapter, args, out, feats, cap.qk)

    def project(self, adapter: Any, x: torch.Tensor) -> torch.Tensor:
        return adapter.core.multi_modal_projector(x) if adapter.opts["stage"] == "vision" else x

    def stats(self, adapter: Any) -> dict[str, Any]:
        return {"stage": adapter.opts["stage"]}


def _tile_grid(adapter: Any, pixel_values: torch.Tensor) -> tuple[int, int]:
    p = adapter.model.config.vision_config.patch_size
    return pixel_values.shape[-2] // p, pixel_values.shape[-1] // p


def _newline(adapter: Any) -> torch.Tensor:
    return adapter.core.image_newline[None]  # [1, C]


def _items_images(adapter: Any, a: dict[str, Any], out: Any, feats: torch.Tensor, capture: _Capture) -> list[ItemMeta]:
    kind = adapter.model.config.model_type
    pv = a["pixel_values"]
    h, w = _tile_grid(adapter, pv)
    scores = metric = None
    cls_prefix = bool(capture.cls)
    if capture.qk is not None:
        scores, metric, _ = _row_scores(capture.qk, h * w, adapter.encoder_needs)  # [tiles, N_total(, d)]
        if a["vision_feature_select_strategy"] == "default" and not cls_prefix:
            scores = scores[:, 1:]
            metric = None if metric is None else metric[:, 1:]
    if cls_prefix:  # the CLS of the same hidden state, ahead of the patches (projected like them at stage projector)
        cls = capture.cls[-1].to(feats.dtype)  # [tiles, 1, C']
        if adapter.opts["stage"] == "projector":
            cls = adapter.core.multi_modal_projector(cls)
        feats = torch.cat([cls, feats], 1)
    prefix = feats.shape[1] - h * w
    if prefix < 0:
        raise ValueError(f"model: {feats.shape[1]} vision tokens per tile but a {h}x{w} patch grid")
    if kind == "llava":
        if a.get("image_sizes") is not None:
            raise ValueError("image_sizes: variable-size (Pixtral-style) llava inputs are not supported; "
                             "Mistral 3 models use the mistral3 family")
        return [ItemMeta(grid=(h, w), scores=None if scores is None else scores[i], x=feats[i], prefix=prefix,
                         metric=None if metric is None else metric[i]) for i in range(feats.shape[0])]
    if prefix:
        raise ValueError(f"model: {kind} with {prefix} extra (register) tokens per tile is not supported")
    return _anyres_items(adapter, a, feats, scores, (h, w))


def _anyres_items(adapter: Any, a: dict[str, Any], feats: torch.Tensor, scores: torch.Tensor | None,
                  hw: tuple[int, int]) -> list[ItemMeta]:
    """Per image: its base tile then its unpadded high-res grid, newlines removed, in ONE 1-D sequence.

    Grid passed to the compressor: (h, w) for a single-tile image; None for anyres images (the base tile and the
    high-res grid have different geometries). The compressed tokens are followed by one image_newline token.
    """
    core, cfg = adapter.core, adapter.model.config
    kind = cfg.model_type
    mod = sys.modules[type(core).__module__]
    sizes = a["image_sizes"]
    bni = a.get("batch_num_images")
    patching = [True] * len(sizes) if bni is None or kind == "llava_next" else \
        [int(n) == 1 for n in bni for _ in range(int(n))]
    n_tiles = [mod.image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                             patch_size=cfg.vision_config.image_size) if p else 1
               for s, p in zip(sizes, patching, strict=True)]
    per_img = list(torch.split(feats, n_tiles, 0))
    rows = scores is not None and scores.dim() == 3  # [tiles, N, S]: one column per scored block
    per_sc = None if scores is None else list(torch.split(scores if rows else scores.unsqueeze(-1), n_tiles, 0))
    packed = _pack(adapter, per_img, sizes, a)
    packed_sc = None if per_sc is None else _pack(adapter, per_sc, sizes, a)
    return [ItemMeta(grid=hw if n_tiles[i] == 1 else None,
                     scores=None if packed_sc is None else packed_sc[i] if rows else packed_sc[i][:, 0],
                     x=x, tail=_newline(adapter)) for i, x in enumerate(packed)]


def _pack(adapter: Any, per_img: list[torch.Tensor], sizes: torch.Tensor, a: dict[str, Any]) -> list[torch.Tensor]:
    """The model's own unpad/pack of tiles, without newline tokens (works for any channel count)."""
    if adapter.model.config.model_type == "llava_next":
        out, _ = adapter.core.pack_image_features(per_img, sizes, a["vision_feature_select_strategy"],
                                                  image_newline=None)
    else:
        out, _ = adapter.core.pack_image_features(per_img, sizes, image_newline=None,
                                                  vision_aspect_ratio=a["vision_aspect_ratio"])
    return list(out)


def _items_videos(adapter: Any, a: dict[str, Any], out: Any, feats: torch.Tensor,
                  cap: QKCapture | None) -> list[ItemMeta]:
    """Per video: the frames' 2x-pooled tokens as one (T, h', w') grid; one image_newline token follows."""
    core = adapter.core
    pvv = a["pixel_values_videos"]  # [B, T, 3, H, W]
    Bv, T = pvv.shape[:2]
    feats = core.apply_pooling(feats)  # [B*T, h'*w', C']
    h, w = _tile_grid(adapter, pvv)
    hp, wp = math.ceil(h / 2), math.ceil(w / 2)
    scores = None
    if cap is not None:
        s, _, _ = _row_scores(cap, h * w, adapter.encoder_needs)
        if a["vision_feature_select_strategy"] == "default":
            s = s[:, 1:]
        pooled = core.apply_pooling(s if s.dim() == 3 else s.unsqueeze(-1))  # [B*T, h'*w', S or 1]
        scores = pooled.reshape(Bv, T * hp * wp, -1) if s.dim() == 3 else pooled[..., 0].reshape(Bv, T * hp * wp)
    feats = feats.reshape(Bv, T * hp * wp, feats.shape[-1])
    return [ItemMeta(grid=(T, hp, wp), scores=None if scores is None else scores[b], x=feats[b],
                     tail=_newline(adapter)) for b in range(Bv)]
