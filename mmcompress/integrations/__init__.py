"""Wrap unmodified Hugging Face (and timm/open_clip) models: `apply`, `remove`, `disabled`, `stats`.

    >>> model = mmc.apply(model, "visionzip", keep=64)   # in place, this instance only; returns model
    >>> with mmc.disabled(model): ...                     # temporarily uncompressed
    >>> mmc.remove(model)                                 # exact restoration
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch

from mmcompress.integrations.base import ATTR, Adapter, adapter_for, register_adapter, supported_model_types

__all__ = ["apply", "remove", "disabled", "stats", "Adapter", "register_adapter", "supported_model_types"]

# Modules under mmcompress.integrations that register adapters on import.
_BUILTIN_ADAPTER_MODULES = ("llava", "qwen_vl", "families", "vit_merge", "whisper")


def _load_builtin_adapters() -> None:
    for name in _BUILTIN_ADAPTER_MODULES:
        if importlib.util.find_spec(f"mmcompress.integrations.{name}") is not None:
            importlib.import_module(f"mmcompress.integrations.{name}")


def _split_options(adapter_cls: type[Adapter], comp_cls: type, options: dict[str, Any]):
    adapter_opts = {k: v for k, v in options.items() if k in adapter_cls.options}
    comp_opts = {k: v for k, v in options.items() if k not in adapter_cls.options}
    accepted = set(inspect.signature(comp_cls.__init__).parameters) - {"self", "keep"}
    unknown = set(comp_opts) - accepted
    if unknown:
        raise TypeError(f"options: unknown option(s) {sorted(unknown)} for adapter {adapter_cls.__name__} "
                        f"(accepts {sorted(adapter_cls.options)}) and compressor {comp_cls.__name__} "
                        f"(accepts {sorted(accepted - {'args', 'kwargs'})})")
    return adapter_opts, comp_opts


FASTV = "fastv"  # in-LLM baseline: an adapter option (fastv_k, fastv_r), not an encoder-side compressor


def _fastv_options(adapter_cls: type[Adapter], keep: Any, options: dict[str, Any]):
    """`apply(model, "fastv", keep=f, fastv_k=K)` -> identity encoder compressor + FastV pruning 1 - f at layer K."""
    if "fastv_k" not in adapter_cls.options:
        raise ValueError(f"name: 'fastv' is not supported by {adapter_cls.__name__} (no fastv_k option)")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep: 'fastv' takes the fraction of image tokens kept in (0, 1], got {keep!r}")
    if "fastv_r" in options:
        raise TypeError("fastv_r: with name 'fastv' the pruned fraction is 1 - keep; pass keep= instead")
    options = {**options, "fastv_k": options.get("fastv_k", 2), "fastv_r": 1.0 - float(keep)}
    return "uniform", 1.0, options


def _default_stage(adapter_cls: type[Adapter], comp_cls: type, adapter_opts: dict[str, Any]) -> dict[str, Any]:
    """The stage a method needs when the caller did not choose one: text-guided methods compare tokens with the
    question's embeddings, which live in the LLM input space, so they run after the projector."""
    if "stage" in adapter_opts or "stage" not in adapter_cls.options:
        return adapter_opts
    if "text" in tuple(getattr(comp_cls, "needs", ())):
        return {**adapter_opts, "stage": "projector"}
    return adapter_opts


def apply(model: torch.nn.Module, name: str, keep: int | float | str = 0.5, **options: Any) -> torch.nn.Module:
    """Compress the multimodal tokens of `model` (this instance only, in place) with compressor `name`.

    Idempotent: a model already wrapped is first restored, so applying twice equals applying once.

    Args:
        model: a supported model instance (see `supported_model_types()`).
        name: compressor name from `mmcompress.available()`.
        keep: budget per sample, as in `mmcompress.create`.
        **options: adapter options (e.g. `stage=`) and compressor options, told apart by name. Without
            `stage=`, each method runs where it needs to: text-guided methods (`needs` contains "text") after the
            projector with the question's embeddings, the others between the vision tower and the projector.

    `name="fastv"` applies FastV alone (in-LLM pruning, Chen et al. ECCV'24): `keep` is the fraction of image
    tokens kept after layer `fastv_k` (default 2); other compressors combine with FastV through `fastv_k=`/`fastv_r=`.

    Returns:
        The same model object.
    """
    from mmcompress.registry import get

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    adapter_cls = adapter_for(model)
    if name == FASTV:
        name, keep, options = _fastv_options(adapter_cls, keep, options)
    comp_cls = get(name)
    adapter_opts, comp_opts = _split_options(adapter_cls, comp_cls, options)
    adapter_opts = _default_stage(adapter_cls, comp_cls, adapter_opts)
    compressor = comp_cls(keep=keep, **comp_opts)
    remove(model)
    adapter = adapter_cls(model, compressor, **adapter_opts)
    adapter.attach()
    object.__setattr__(model, ATTR, adapter)
    return model


def _adapter(model: torch.nn.Module) -> Adapter | None:
    return model.__dict__.get(ATTR)


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply` exactly (no-op on a model that is not wrapped). Returns the model."""
    adapter = _adapter(model)
    if adapter is not None:
        adapter.detach()
        del model.__dict__[ATTR]
    return model


@contextlib.contextmanager
def disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Context in which a wrapped model runs uncompressed."""
    adapter = _adapter(model)
    if adapter is None:
        yield model
        return
    before = adapter.enabled
    adapter.enabled = False
    try:
        yield model
    finally:
        adapter.enabled = before


def stats(model: torch.nn.Module) -> dict[str, Any]:
    """Statistics of the last forward of a wrapped model: tokens in/out per sample, compress time (ms)."""
    adapter = _adapter(model)
    if adapter is None:
        raise ValueError("model: is not wrapped by mmcompress.apply")
    return dict(adapter.last_stats)
