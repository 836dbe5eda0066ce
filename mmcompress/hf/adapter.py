"""Adapter protocol: one adapter class per model family, chosen by `config.model_type`, patching ONE instance.

An adapter owns all plumbing of its family (placeholder tokens, masks, position ids, caches, generate()).
Patching is per instance (instance attributes, hooks with handles), never on classes, and fully undoable.
"""

from __future__ import annotations

from typing import Any

import torch

_ADAPTERS: dict[str, type[Adapter]] = {}
ATTR = "_mmcompress_adapter"  # instance attribute holding the attached adapter


class Adapter:
    """Base class of model-family adapters.

    Subclasses set `model_types` and `options` (adapter option names and defaults, e.g. {"stage": "projector"}),
    and implement `attach` / `detach`. The compressor call is `self.compressor(x, ...)`; the adapter records
    per-forward statistics into `self.last_stats` through `record()`.

    Args:
        model: the model instance to patch.
        compressor: a built compressor (`mmcompress.create(...)`).
        **options: adapter options (keys of `options`).
    """

    model_types: tuple[str, ...] = ()
    options: dict[str, Any] = {}

    def __init__(self, model: torch.nn.Module, compressor, **options: Any):
        unknown = set(options) - set(self.options)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {sorted(unknown)}; "
                            f"accepted: {sorted(self.options)}")
        self.model = model
        self.compressor = compressor
        self.opts = {**self.options, **options}
        self.enabled = True
        self.last_stats: dict[str, Any] = {}

    def attach(self) -> None:
        """Patch `self.model` (this instance only)."""
        raise NotImplementedError

    def detach(self) -> None:
        """Undo `attach` exactly: afterwards the model's outputs are bit-identical to never having been patched."""
        raise NotImplementedError

    def record(self, tokens_in: torch.Tensor | list[int], tokens_out: torch.Tensor | list[int], ms: float,
               **extra: Any) -> None:
        """Store statistics of the last forward: per-sample token counts in/out and compression time."""
        def as_list(t):
            return t.tolist() if isinstance(t, torch.Tensor) else list(t)

        self.last_stats = {"tokens_in": as_list(tokens_in), "tokens_out": as_list(tokens_out),
                           "compress_ms": float(ms), **extra}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: route every `config.model_type` in `cls.model_types` to `cls`."""
    for t in cls.model_types:
        _ADAPTERS[t] = cls
    return cls


def supported_model_types() -> list[str]:
    """model_type values with an adapter (imports the built-in adapter modules first)."""
    from mmcompress.hf import _load_builtin_adapters

    _load_builtin_adapters()
    return sorted(_ADAPTERS)


def adapter_for(model: torch.nn.Module) -> type[Adapter]:
    """The adapter class for `model`, by `model.config.model_type`.

    Models without a known `config.model_type` (timm, open_clip) go to the first adapter whose optional
    classmethod `matches(model)` returns True.
    """
    mt = getattr(getattr(model, "config", None), "model_type", None)
    types_ = supported_model_types()
    if mt not in _ADAPTERS:
        for cls in dict.fromkeys(_ADAPTERS.values()):
            matches = getattr(cls, "matches", None)
            if matches is not None and matches(model):
                return cls
        raise ValueError(f"model: unsupported model_type {mt!r} ({type(model).__name__}); supported: "
                         f"{', '.join(types_)}")
    return _ADAPTERS[mt]
