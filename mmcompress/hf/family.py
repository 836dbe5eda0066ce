"""What a placeholder-pattern family describes for the generic adapter: `Family`, its `Modality` list and the
per-item `ItemMeta` its encoder hook returns.

A family says only what differs between models (where its features come from, each item's grid, which placeholder
tokens are structural, its position-id scheme); `mmcompress.hf.placeholder.PlaceholderAdapter` does the rest, and
`register_family` (there) turns a description into an adapter.

Letters: N tokens of one item, C hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

if TYPE_CHECKING:  # annotations only: the adapter imports this module
    from mmcompress.hf.placeholder import PlaceholderAdapter

__all__ = ["META_ATTR", "Modality", "ItemMeta", "Family", "expanded_meta", "int_list"]

META_ATTR = "_mmcompress_meta"  # attribute of an encoder output holding the per-item `ItemMeta` list


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
        kept: [M] tokens kept by a stage BEFORE the encoder (`mmcompress.hf.pixels`): only they were encoded (the
            others are zeros) and the compressor is not called for the item; None: no such stage.
    """

    grid: tuple[int, ...] | None = None
    scores: torch.Tensor | None = None
    metric: torch.Tensor | None = None
    fixed: torch.Tensor | None = None
    x: torch.Tensor | None = None
    prefix: int = 0
    tail: torch.Tensor | None = None
    kept: torch.Tensor | None = None


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
