"""The in-LLM stage's column layout: which original columns each prune point keeps, and the attention masks of the
shorter sequence, in the prefill and in decode steps on the shorter KV cache.

The decoder passes every layer the full-length mask, positions and rotary embeddings; layers from a prune point on
hold only the kept columns (`StagePlan.keep_idx`), so these are gathered onto them. A batch whose samples drop
different counts keeps some dropped columns physically (`key_valid` False) and hides them in the mask.

Letters: B batch, L0 original length, L' kept columns, q query tokens of a decode step, t tokens generated so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["StagePlan", "cache_of", "gather_seq", "prefill_mask", "decode_mask"]


@dataclass
class StagePlan:
    """One prune point's layout: which original columns the layers from `point` on hold."""

    point: int  # first layer of this stage
    keep_idx: torch.Tensor  # [B, L'] int64 original columns kept physically, increasing
    key_valid: torch.Tensor  # [B, L'] bool False at dropped columns kept for batch alignment
    orig_len: int  # L0
    dead: torch.Tensor  # [B, L0] bool columns dropped so far (physically or hidden)
    shift: torch.Tensor  # [B] columns dropped so far per sample (decode positions move down by it when compact)
    new_pos: torch.Tensor | None  # [B, L'] compacted position ids, or None (original positions kept)


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache a decoder layer was called with, or None."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def gather_seq(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather t along `dim` (a sequence dim) with idx [B, L'] (t's batch dim may be 1 and is then expanded)."""
    B, Lp = idx.shape
    if t.shape[0] == 1 and B > 1 and dim != 0:
        t = t.expand(B, *t.shape[1:])
    shape = [1] * t.dim()
    shape[0], shape[dim] = B, Lp
    view = idx.view(shape)
    tgt = list(t.shape)
    tgt[dim] = Lp
    return t.gather(dim, view.expand(tgt))


def prefill_mask(m: torch.Tensor | None, plan: StagePlan) -> torch.Tensor | None:
    """The prefill's attention mask on the stage's kept columns: [B, 1, L', L'] (None while plainly causal)."""
    idx, kv = plan.keep_idx, plan.key_valid
    B, Lp = idx.shape
    if m is None:
        if bool(kv.all()):
            return None  # still plain causal
        causal = torch.ones(Lp, Lp, dtype=torch.bool, device=idx.device).tril()
        return causal[None, None] & kv[:, None, None, :]
    if not isinstance(m, torch.Tensor) or m.dim() != 4:
        raise ValueError(f"attention_mask: in-LLM pruning supports 4-D (SDPA/eager) masks or None, "
                         f"got {type(m).__name__}")
    m = gather_seq(gather_seq(m, idx.to(m.device), 2), idx.to(m.device), 3)  # [B, 1, L', L']
    hide = ~kv.to(m.device)[:, None, None, :]
    if m.dtype == torch.bool:
        return m & ~hide
    return m.masked_fill(hide, torch.finfo(m.dtype).min)

def decode_mask(m: torch.Tensor | None, plan: StagePlan, q: int, cache: Any, i: int) -> torch.Tensor | None:
    """A decode step's full-length mask on the stage's layout: [B, 1, q, L' + t + q] (kept prompt columns, then
    the t generated ones and the q of this step; dropped columns kept for batch alignment are hidden)."""
    idx, kv = plan.keep_idx, plan.key_valid
    B, Lp = idx.shape
    if m is None:
        if bool(kv.all()):
            return None
        past = cache.layers[i].get_seq_length() if cache is not None else Lp  # L' + t before this step
        t = past - Lp
        valid = torch.cat([kv, kv.new_ones(B, t + q)], 1)  # [B, L' + t + q]
        causal = torch.ones(q, past + q, dtype=torch.bool, device=kv.device).tril(diagonal=past)
        return causal[None, None] & valid[:, None, None, :]
    if not isinstance(m, torch.Tensor) or m.dim() != 4:
        raise ValueError(f"attention_mask: in-LLM pruning supports 4-D (SDPA/eager) masks or None, "
                         f"got {type(m).__name__}")
    Lfull = m.shape[-1]
    extra = torch.arange(plan.orig_len, Lfull, device=m.device).expand(B, -1)
    cols = torch.cat([idx.to(m.device), extra], 1)  # [B, L' + t + q]
    m = gather_seq(m, cols, 3)
    hide = ~torch.cat([kv.to(m.device), torch.ones_like(extra, dtype=torch.bool)], 1)[:, None, None, :]
    if m.dtype == torch.bool:
        return m & ~hide
    return m.masked_fill(hide, torch.finfo(m.dtype).min)
