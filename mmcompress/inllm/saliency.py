"""A backward pass inside the prefill: the gradient of a loss with respect to a decoder layer's input.

The shared in-LLM stage offers it to the rules that declare `needs_grad = True` (TRIO) through
`PruneContext.layer_grad`; this module holds the mechanics, once:

- it works whatever the caller's autograd mode: `torch.no_grad()`, `torch.inference_mode()` (whose tensors cannot
  join autograd) or grad enabled. The layer is re-run on detached clones of its inputs (hidden states, mask,
  position embeddings) inside `torch.inference_mode(False)` + `torch.enable_grad()`, so nothing flows back into the
  caller's graph;
- nothing is left behind: the gradient is taken with `torch.autograd.grad` with respect to the probe alone (no
  `.grad` is written on any parameter), the graph is freed by that call (`retain_graph=False`), and the KV cache is
  neither read nor written (the layer runs with `use_cache=False` and no cache);
- the layer runs as the model runs it (its own attention implementation, SDPA included, and every hook other than
  the stage's own, which the stage suspends for the re-run).

Cost: one extra forward + backward of ONE decoder layer on the sequence entering the prune point, plus what the
loss reads (TRIO: the final norm and the output head at 4 positions per sample). Figures: docs/methods.md (trio).

Letters: B batch, L tokens, C channels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["grad_scope", "detached", "layer_input_grad"]

#: layer keyword arguments that carry a KV cache: the re-run gets None for each
CACHE_KEYS = ("past_key_value", "past_key_values", "cache", "layer_past")


@contextlib.contextmanager
def grad_scope() -> Iterator[None]:
    """Autograd on, whatever the caller's mode (`no_grad`, `inference_mode`)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def detached(v: Any) -> Any:
    """`v` with every tensor detached; inference tensors are cloned (call inside `grad_scope`): they cannot be saved
    for backward. Tuples, lists and dicts are walked; anything else is returned as is."""
    if isinstance(v, torch.Tensor):
        return v.detach().clone() if v.is_inference() else v.detach()
    if isinstance(v, tuple):
        return tuple(detached(t) for t in v)
    if isinstance(v, list):
        return [detached(t) for t in v]
    if isinstance(v, dict):
        return {k: detached(t) for k, t in v.items()}
    return v


def layer_input_grad(layer: nn.Module, h: torch.Tensor, kwargs: dict[str, Any],
                     loss_fn: Callable[[torch.Tensor], torch.Tensor],
                     autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, L, C] d loss_fn(layer(h)) / d h, with no autograd state left behind.

    Args:
        layer: a decoder layer, called as the decoder calls it: `layer(h, **kwargs)` (a tensor or a tuple whose first
            element is the hidden states out).
        h: [B, L, C] hidden states entering `layer` (any autograd mode; never modified).
        kwargs: the layer's keyword arguments for this layout (attention mask, position embeddings, ids, ...); cache
            entries are replaced by None and `use_cache` by False.
        loss_fn: [B, L, C] hidden states out of `layer` -> scalar loss (may call the final norm and output head).
        autocast_dtype: run the layer and the loss under `torch.autocast(h.device.type, autocast_dtype)`, or None.

    Returns:
        The gradient, detached, in h's dtype, on h's device.
    """
    if not isinstance(h, torch.Tensor) or h.dim() != 3:
        raise ValueError(f"h: expected [B, L, C] hidden states, got {getattr(h, 'shape', type(h).__name__)}")
    with grad_scope():
        probe = h.detach().clone().requires_grad_(True)  # [B, L, C] a leaf of its own (never an inference tensor)
        kw = {k: (None if k in CACHE_KEYS else detached(v)) for k, v in kwargs.items()}
        if "use_cache" in kw:
            kw["use_cache"] = False
        ac = torch.autocast(h.device.type, dtype=autocast_dtype) if autocast_dtype is not None \
            else contextlib.nullcontext()
        with ac:
            out = layer(probe, **kw)
            out = out[0] if isinstance(out, (tuple, list)) else out  # [B, L, C]
            loss = loss_fn(out)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"loss_fn: expected a scalar tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
        (g,) = torch.autograd.grad(loss, probe, retain_graph=False, create_graph=False)
    return g.detach()
