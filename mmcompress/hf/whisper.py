"""Whisper (`WhisperForConditionalGeneration`): compress the encoder frames the decoder cross-attends to.

    >>> mmc.apply(whisper, "audio_merge", keep=0.5)     # 1,500 frames per 30 s -> 750
    >>> whisper.generate(input_features)                # transcribes from the merged frames

Two hooks on this instance only: a forward hook on the encoder replaces its ``last_hidden_state`` [B, N, C] by the
compressed frames [B, M, C] (grid = (N,), so `pool` and `audio_merge` see time), and a pre-hook on every decoder
layer's cross-attention adds log(size) of each compressed frame to the attention logits (proportional attention: a
frame standing for s inputs weighs as much as its s members did; ragged budgets add -inf on padded slots). Cached
cross-attention K/V of ``generate()`` are computed from the compressed frames once, as usual. Keep = all frames is
bit-identical to the unwrapped model (no bias is added when every size is 1); `remove()` removes the hooks.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from mmcompress.hf.adapter import Adapter, register_adapter

__all__ = ["WhisperAdapter"]


@register_adapter
class WhisperAdapter(Adapter):
    """Encoder-output compression for Whisper with proportional cross-attention.

    Options:
        prop_attn: add log(size) to the cross-attention logits (default True).
    """

    model_types = ("whisper",)
    options = {"prop_attn": True}

    def __init__(self, model: nn.Module, compressor, **options: Any):
        super().__init__(model, compressor, **options)
        missing = [n for n in ("scores", "text") if n in getattr(compressor, "needs", ())]
        if missing:
            raise ValueError(f"{missing[0]}: compressor {compressor.name!r} needs `{missing[0]}=`, which the Whisper "
                             "adapter does not provide; use audio_merge, pool, tome, random or uniform")
        core = getattr(model, "model", model)
        self.encoder = core.get_encoder() if hasattr(core, "get_encoder") else core.encoder
        self.cross = [layer.encoder_attn for layer in core.decoder.layers]
        self._handles: list[Any] = []
        self._bias: torch.Tensor | None = None  # [B, M] log size (-inf on padding), None: no bias needed

    def attach(self) -> None:
        self._handles.append(self.encoder.register_forward_hook(self._after_encoder))
        for attn in self.cross:
            self._handles.append(attn.register_forward_pre_hook(self._before_cross, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._bias = None

    def _after_encoder(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not self.enabled:
            self._bias = None
            return output
        x = output[0] if isinstance(output, tuple) else output.last_hidden_state  # [B, N, C]
        B, N, _ = x.shape
        t0 = time.perf_counter()
        out = self.compressor(x, grid=(N,))
        ms = (time.perf_counter() - t0) * 1e3
        size, mask = out.size, out.mask
        if out.x is x or (mask is None and (not self.opts["prop_attn"] or bool((size == 1).all()))):
            self._bias = None  # identity, or nothing to re-weight: the cross-attention runs untouched
        else:
            logw = size.clamp(min=1e-6).log() if self.opts["prop_attn"] else torch.zeros_like(size)
            self._bias = logw if mask is None else logw.masked_fill(~mask, float("-inf"))  # [B, M]
        n_out = mask.sum(1) if mask is not None else torch.full((B,), out.x.shape[1])
        self.record(torch.full((B,), N), n_out, ms)
        if isinstance(output, tuple):
            return (out.x, *output[1:])
        output.last_hidden_state = out.x
        return output

    def _before_cross(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        bias = self._bias
        if bias is None or not self.enabled:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        B = hidden.shape[0]
        if B != bias.shape[0]:
            if B % bias.shape[0]:
                raise ValueError(f"batch: decoder batch {B} does not extend the encoder batch {bias.shape[0]}")
            bias = bias.repeat_interleave(B // bias.shape[0], dim=0)  # beams / num_return_sequences
        add = bias[:, None, None, :].to(hidden.dtype)  # [B, 1, 1, M] on every query row and head
        mask = kwargs.get("attention_mask")
        kwargs["attention_mask"] = add if mask is None else mask + add
        return args, kwargs
