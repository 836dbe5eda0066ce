"""Shared plumbing for adapters whose number of multimodal tokens per sample changes (LLaVA family, Qwen2-VL, ...).

Pure tensor helpers, no model patching:

* `media_segments`: which placeholder positions of each sample belong to which media item (image, video, audio).
* `shrink_batch`: drop positions from `input_ids`, `attention_mask`, `labels` (and any other per-token tensor) and
  re-pad the batch on the left or right; rebuilds `position_ids` as HF generate does (cumsum of the mask - 1).
* `question_mask` / `question_embeddings`: the question span used as `text=` for text-guided compressors.
* `DecodeState`: after a prefill whose sequence was shortened, maps the 2-D `attention_mask` / `position_ids` that
  `generate()` keeps passing (sized for the ORIGINAL prompt) onto the shorter KV cache.

Letters: B batch, L sequence length before, L' after, I media items, C channels.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "padding_side_of",
    "media_segments",
    "Shrunk",
    "shrink_batch",
    "positions_from_mask",
    "question_mask",
    "question_embeddings",
    "DecodeState",
]


def padding_side_of(attention_mask: torch.Tensor | None) -> str | None:
    """'left', 'right' or None (no padding) for a 2-D [B, L] attention mask.

    Raises:
        ValueError: when both ends of the batch hold padding (mixed padding sides).
    """
    if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.bool().all()):
        return None
    m = attention_mask.bool()
    left, right = bool((~m[:, 0]).any()), bool((~m[:, -1]).any())
    if left and right:
        raise ValueError("attention_mask: padding at both ends of the batch; pad every sample on one side")
    return "left" if left else "right"


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] int64 position ids from a [B, L] 0/1 mask: cumsum - 1, 0 on padding (HF generate's rule)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def media_segments(input_ids: torch.Tensor, token_id: int, counts: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
    """Assign placeholder positions to media items in order of appearance.

    Args:
        input_ids: [B, L] token ids.
        token_id: the placeholder id of this modality (e.g. `config.image_token_id`).
        counts: tokens of each media item, in the order the model consumes them (batch order, then position).

    Returns:
        For each item: (sample index, [n_i] positions of its placeholders in that sample).

    Raises:
        ValueError: when the placeholders of a sample cannot be split into whole items.
    """
    per_sample = [(input_ids[b] == token_id).nonzero().squeeze(1) for b in range(input_ids.shape[0])]
    total = sum(int(p.numel()) for p in per_sample)
    if total != sum(counts):
        raise ValueError(f"input_ids: {total} placeholder tokens (id {token_id}) but the media items need "
                         f"{sum(counts)} ({list(counts)})")
    out: list[tuple[int, torch.Tensor]] = []
    b, used = 0, 0
    for n in counts:
        while b < len(per_sample) and used >= per_sample[b].numel():
            b, used = b + 1, 0
        if b >= len(per_sample) or used + n > per_sample[b].numel():
            raise ValueError(f"input_ids: an item of {n} tokens straddles two samples; each sample must hold the "
                             f"exact placeholder count of its own images/videos")
        out.append((b, per_sample[b][used : used + n]))
        used += n
    return out


@dataclass
class Shrunk:
    """A batch with some positions removed and re-padded.

    Attributes:
        attention_mask: [B, L'] int64 0/1.
        position_ids: [B, L'] int64 (cumsum of the mask - 1; 0 on padding).
        index: [B, L'] int64 original position of each new slot (-1 on padding).
        tensors: the shortened per-token tensors, same keys as given.
        side: padding side used.
    """

    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    index: torch.Tensor
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    side: str = "left"


def shrink_batch(keep: torch.Tensor, attention_mask: torch.Tensor | None, tensors: dict[str, torch.Tensor | None],
                 pad_values: dict[str, Any], side: str) -> Shrunk:
    """Drop the positions where `keep` is False from every per-token tensor and re-pad the batch.

    Args:
        keep: [B, L] bool, True for positions to keep (padding positions may be either; they are re-derived).
        attention_mask: [B, L] 0/1 or None (all ones).
        tensors: per-token tensors [B, L, ...] to shorten (None values are skipped), e.g. input_ids, labels.
        pad_values: value used on new padding slots for each key of `tensors` (e.g. pad id, -100 for labels).
        side: 'left' or 'right'.

    Returns:
        A `Shrunk` batch of length L' = max kept valid tokens per sample.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side: expected 'left' or 'right', got {side!r}")
    B, L = keep.shape
    dev = keep.device
    valid = torch.ones_like(keep) if attention_mask is None else attention_mask.bool()
    sel = keep & valid  # [B, L]
    n = sel.sum(1)  # [B]
    Lp = int(n.max()) if B else 0
    # stable order: kept valid tokens in original order; their new slot depends on the padding side
    rank = sel.long().cumsum(1) - 1  # [B, L] slot among kept tokens
    offset = (Lp - n).unsqueeze(1) if side == "left" else torch.zeros_like(n).unsqueeze(1)
    slot = torch.where(sel, rank + offset, torch.full_like(rank, Lp))  # dropped -> sentinel column Lp
    index = torch.full((B, Lp + 1), -1, dtype=torch.long, device=dev)
    index.scatter_(1, slot, torch.arange(L, device=dev).expand(B, L))
    index = index[:, :Lp]  # [B, L']
    new_mask = (index >= 0).long()
    gather = index.clamp(min=0)
    out: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if t is None:
            continue
        g = gather.view(B, Lp, *([1] * (t.dim() - 2))).expand(B, Lp, *t.shape[2:])
        v = t.gather(1, g)
        pad = ~(index >= 0).view(B, Lp, *([1] * (t.dim() - 2)))
        out[k] = v.masked_fill(pad, pad_values.get(k, 0))
    return Shrunk(attention_mask=new_mask, position_ids=positions_from_mask(new_mask), index=index, tensors=out,
                  side=side)


def question_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, media_ids: Iterable[int],
                  exclude_ids: Iterable[int] = ()) -> torch.Tensor:
    """[B, L] bool: the question tokens of each sample, the `text=` source of text-guided compressors.

    Rule: the valid tokens AFTER the last media placeholder of the sample (image/video/newline ids in `media_ids`),
    minus any id in `exclude_ids` (special and template tokens: pad, bos, eos, chat-template markers such as
    `<|im_end|>` or the tokens of "ASSISTANT:"). A sample whose span is empty falls back to all its valid non-media,
    non-excluded tokens; a sample with none of those either falls back to all its valid non-media tokens.
    """
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    media = torch.zeros_like(valid)
    for t in media_ids:
        media |= input_ids == int(t)
    excl = torch.zeros_like(valid)
    for t in set(int(i) for i in exclude_ids):
        excl |= input_ids == t
    L = input_ids.shape[1]
    ar = torch.arange(L, device=input_ids.device).expand_as(input_ids)
    last = torch.where(media, ar, torch.full_like(ar, -1)).max(1).values  # [B]
    span = valid & ~media & ~excl & (ar > last.unsqueeze(1))
    fallback = valid & ~media & ~excl
    span = torch.where(span.any(1, keepdim=True), span, fallback)
    return torch.where(span.any(1, keepdim=True), span, valid & ~media)


def question_embeddings(embed: torch.nn.Module, input_ids: torch.Tensor, qmask: torch.Tensor) -> list[torch.Tensor]:
    """Per sample [L_b, C] input embeddings of the question tokens (`qmask` from `question_mask`)."""
    out = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][qmask[b]]
        out.append(embed(ids.unsqueeze(0))[0] if ids.numel() else None)
    return out


@dataclass
class _Entry:
    orig_len: int  # L, the prompt length generate() believes in
    mask: torch.Tensor  # [B, L'] the shortened prompt's mask
    shift: torch.Tensor  # [B] tokens removed from each sample's valid prompt


class DecodeState:
    """Per-cache memory of a shortened prefill, so decode steps of `generate()` line up with the shorter cache.

    `generate()` keeps growing the ORIGINAL 2-D attention mask and position ids; the KV cache holds the shortened
    prompt. `remember(cache, ...)` at prefill; `decode_inputs(cache, ...)` at each later step rewrites them. Entries
    die with their cache (weak references), so nothing leaks across generate() calls.
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def remember(self, cache: Any, orig_len: int, new_mask: torch.Tensor, shift: torch.Tensor) -> None:
        """Record that `cache` holds a prompt of `new_mask` [B, L'] standing for an original prompt of `orig_len`."""
        if cache is None:
            return
        try:
            self._entries[cache] = _Entry(orig_len, new_mask, shift)
        except TypeError:  # an unhashable / non-weakref-able cache: decode steps are then not rewritten
            pass

    def forget(self, cache: Any) -> None:
        """Drop any entry of `cache` (a fresh prefill reuses the object)."""
        if cache is not None:
            try:
                self._entries.pop(cache, None)
            except TypeError:
                pass

    def knows(self, cache: Any) -> bool:
        """Whether `cache` holds a shortened prompt."""
        try:
            return cache is not None and cache in self._entries
        except TypeError:
            return False

    def decode_inputs(self, cache: Any, q_len: int, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None,
                      derive_positions: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Rewrite a decode step's [B, L + t] attention mask and position ids for the shortened cache.

        Position ids: [B, q] are shifted by the tokens removed; of M-RoPE ids [4, B, q] only row 0 (the plain
        sequence index) is, the (t, h, w) rows [3, B, q] continue the original numbering (the model's rope deltas);
        missing ones are derived from the new mask when `derive_positions`.
        """
        e = self._entries[cache]
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] >= e.orig_len:
            tail = attention_mask[:, e.orig_len:]
            new_mask = torch.cat([e.mask.to(attention_mask.dtype), tail], 1)
        elif attention_mask is None:
            new_mask = None
        else:
            raise ValueError(f"attention_mask: a decode step after a compressed prefill needs the 2-D mask grown from "
                             f"the original prompt (>= {e.orig_len} columns), got shape {tuple(attention_mask.shape)}")
        if position_ids is not None and position_ids.dim() == 2:
            position_ids = position_ids - e.shift.to(position_ids.device).unsqueeze(1)
        elif position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
            position_ids = position_ids.clone()
            position_ids[0] -= e.shift.to(position_ids.device).unsqueeze(1)
        elif position_ids is None and new_mask is not None and derive_positions:
            position_ids = positions_from_mask(new_mask)[:, -q_len:]
        return new_mask, position_ids
