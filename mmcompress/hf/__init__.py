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

from mmcompress.hf.adapter import ATTR, Adapter, adapter_for, register_adapter, supported_model_types

__all__ = ["apply", "remove", "disabled", "stats", "Adapter", "register_adapter", "supported_model_types"]

# Modules under mmcompress.hf that register adapters on import.
_BUILTIN_ADAPTER_MODULES = ("llava", "qwen_vl", "families", "vit_merge", "whisper")


def _load_builtin_adapters() -> None:
    for name in _BUILTIN_ADAPTER_MODULES:
        if importlib.util.find_spec(f"mmcompress.hf.{name}") is not None:
            importlib.import_module(f"mmcompress.hf.{name}")


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
# methods that prune inside the LLM, on the shared stage (mmcompress/inllm/stage.py)
IN_LLM = ("fastv", "pdrop", "dart", "sparsevlm")


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


def _check_layer(option: str, k: Any, n_layers: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{option}: expected an int layer index, got {type(k).__name__}")
    if not 1 <= k < n_layers:
        raise ValueError(f"{option}: expected 1 <= K < {n_layers} (the decoder's layer count), got {k}")


def _pdrop_builder(keep: Any, own: dict[str, Any]):
    from mmcompress.inllm.pdrop import PDropRule, pdrop_default_layers, pdrop_lambda_for

    lam = own.pop("pdrop_lambda", None)
    layers = own.pop("pdrop_layers", None)
    if lam is None and keep is None:
        raise ValueError("keep: 'pdrop' takes the average fraction of image tokens kept over the LLM's layers, or "
                         "keep=None with pdrop_lambda=")
    if lam is not None and keep is not None:
        raise ValueError("pdrop_lambda: sets the pyramid itself; pass keep=None with it (keep= is the average share "
                         "of image tokens over the layers, from which lambda is solved)")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, float) or not 0 < keep <= 1):
        raise ValueError(f"keep: 'pdrop' takes the average fraction of image tokens kept over the LLM's layers in "
                         f"(0, 1], got {keep!r}")
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 1):
        raise ValueError(f"pdrop_lambda: expected a ratio in [0, 1], got {lam!r}")

    def build(n_layers: int) -> PDropRule:
        pts = pdrop_default_layers(n_layers) if layers is None else tuple(layers)
        if not pts or any(isinstance(p, bool) or not isinstance(p, int) for p in pts) \
                or list(pts) != sorted(set(pts)) or not all(1 <= p < n_layers for p in pts):
            raise ValueError(f"pdrop_layers: expected increasing ints in [1, {n_layers}), got {layers!r}")
        lm = float(lam) if lam is not None else pdrop_lambda_for(float(keep), pts, n_layers)
        return PDropRule(pts, [lm ** (s + 1) for s in range(len(pts))])

    return build


def _dart_builder(keep: Any, own: dict[str, Any]):
    from mmcompress.inllm.dart import DARTRule

    k = own.pop("dart_k", 2)
    piv_i, piv_t = own.pop("dart_pivot_image", 4), own.pop("dart_pivot_text", 4)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or keep <= 0 or (isinstance(keep, float)
                                                                                   and keep > 1):
        raise ValueError(f"keep: 'dart' takes the release's token budget (an int, e.g. 128) or the fraction of image "
                         f"tokens kept in (0, 1], got {keep!r}")
    budget = dict(max_num_trunction=keep, reduction_ratio=0.0) if isinstance(keep, int) else \
        dict(max_num_trunction=None, reduction_ratio=1.0 - keep)
    rule = DARTRule(k=k if isinstance(k, int) else 2, pivot_image=piv_i, pivot_text=piv_t, **budget)

    def build(n_layers: int) -> DARTRule:
        if isinstance(k, int) and not isinstance(k, bool) and k == 0:
            raise ValueError("dart_k: expected K >= 1: DART's pivots are the largest keys of layer K - 1, and its "
                             "paper defines no variant before the LLM (docs/fidelity_inllm.md); for a selection before "
                             "the LLM use a compressor such as 'divprune' or 'cdpruner'")
        _check_layer("dart_k", k, n_layers)
        return rule

    return build


def _sparsevlm_builder(keep: Any, own: dict[str, Any]):
    from mmcompress.inllm.sparsevlm import SPARSEVLM_COUNTS, SparseVLMRule, sparsevlm_default_layers

    layers, counts = own.pop("sparsevlm_layers", None), own.pop("sparsevlm_counts", None)
    recycle = own.pop("sparsevlm_recycle", True)
    if counts is not None:
        if keep is not None:
            raise ValueError("sparsevlm_counts: sets the per-layer counts itself; pass keep=None with it")
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"sparsevlm_counts: expected ints >= 0, got {counts!r}")
    elif isinstance(keep, int) and not isinstance(keep, bool):
        if keep not in SPARSEVLM_COUNTS:
            raise ValueError(f"keep: 'sparsevlm' takes one of the release's budgets {sorted(SPARSEVLM_COUNTS)} "
                             f"(per-layer counts from its table) or an average fraction in (0, 1], got {keep!r}")
        counts = SPARSEVLM_COUNTS[keep]
    elif isinstance(keep, bool) or not isinstance(keep, float) or not 0 < keep <= 1:
        raise ValueError(f"keep: 'sparsevlm' takes one of the release's budgets {sorted(SPARSEVLM_COUNTS)} or the "
                         f"average fraction of image tokens over the LLM's layers in (0, 1], got {keep!r}")

    def build(n_layers: int) -> SparseVLMRule:
        lay = sparsevlm_default_layers(n_layers) if layers is None else tuple(layers)
        if not lay or any(isinstance(v, bool) or not isinstance(v, int) for v in lay) \
                or list(lay) != sorted(set(lay)) or not all(0 <= v < n_layers - 1 for v in lay):
            raise ValueError(f"sparsevlm_layers: expected increasing ints in [0, {n_layers - 1}), got {layers!r}")
        cts = None if counts is None else tuple(counts)[: len(lay)]
        if cts is not None and len(cts) != len(lay):
            raise ValueError(f"sparsevlm_counts: expected one count per layer {list(lay)}, got {counts!r}")
        return SparseVLMRule(lay, counts=cts, keep=None if cts is not None else float(keep), n_layers=n_layers,
                             recycle=bool(recycle))

    return build


_BUILDERS = {"pdrop": _pdrop_builder, "dart": _dart_builder, "sparsevlm": _sparsevlm_builder}


def _inllm_options(adapter_cls: type[Adapter], name: str, keep: Any, options: dict[str, Any]):
    """`apply(model, "pdrop"|"dart", keep=..., <name>_...=...)` -> identity encoder compressor + the in-LLM rule."""
    if name == FASTV:
        return _fastv_options(adapter_cls, keep, options)
    if "inllm" not in adapter_cls.options:
        raise ValueError(f"name: {name!r} is not supported by {adapter_cls.__name__} (no in-LLM stage)")
    for o in ("fastv_k", "fastv_r"):
        if o in options:
            raise TypeError(f"{o}: is FastV's option; {name!r} is another in-LLM method (use its {name}_* options)")
    own = {k: options.pop(k) for k in list(options) if k.startswith(name + "_")}
    known = {"pdrop": {"pdrop_layers", "pdrop_lambda"}, "dart": {"dart_k", "dart_pivot_image", "dart_pivot_text"},
             "sparsevlm": {"sparsevlm_layers", "sparsevlm_counts", "sparsevlm_recycle"}}
    unknown = set(own) - known[name]
    if unknown:
        raise TypeError(f"options: unknown option(s) {sorted(unknown)} for {name!r} (accepts {sorted(known[name])})")
    return "uniform", 1.0, {**options, "inllm": _BUILDERS[name](keep, own)}


def _default_stage(adapter_cls: type[Adapter], comp_cls: type, adapter_opts: dict[str, Any]) -> dict[str, Any]:
    """The stage a method needs when the caller did not choose one: text-guided methods compare tokens with the
    question's embeddings, which live in the LLM input space, so they run after the projector."""
    if "stage" in adapter_opts or "stage" not in adapter_cls.options:
        return adapter_opts
    if "text" in tuple(getattr(comp_cls, "needs", ())):
        return {**adapter_opts, "stage": "projector"}
    stage = getattr(getattr(comp_cls, "encoder_needs", None), "stage", None)  # declared (DyCoke: "projector")
    if stage is not None:
        return {**adapter_opts, "stage": stage}
    return adapter_opts


def apply(model: torch.nn.Module, name: str, keep: int | float | str = 0.5, **options: Any) -> torch.nn.Module:
    """Compress the multimodal tokens of `model` (this instance only, in place) with compressor `name`.

    Idempotent: a model already wrapped is first restored, so applying twice equals applying once, and applying
    another method replaces the first (methods do not stack).
    `stats(model)["method"]` and `["keep"]` name the method in effect.

    Args:
        model: a supported model instance (see `supported_model_types()`).
        name: compressor name from `mmcompress.available()`.
        keep: budget per sample, as in `mmcompress.create`.
        **options: adapter options (e.g. `stage=`) and compressor options, told apart by name. Without
            `stage=`, each method runs where it needs to: text-guided methods (`needs` contains "text") after the
            projector with the question's embeddings, the others between the vision tower and the projector.

    In-LLM methods (pruning inside the decoder on one shared stage, `mmcompress.inllm.stage`; see
    docs/fidelity_inllm.md):
    - `"fastv"` (Chen et al. ECCV'24): `keep` is the fraction of image tokens kept from layer `fastv_k` (default 2)
      on; other compressors combine with FastV through `fastv_k=`/`fastv_r=`.
    - `"pdrop"` (PyramidDrop, CVPR'25): `keep` is the average fraction of image tokens over the LLM's layers (lambda
      solved from it), or `keep=None, pdrop_lambda=0.5` (the release); `pdrop_layers=` (default: the quarters).
    - `"dart"` (EMNLP'25): `keep` is the release's token budget (int, e.g. 128: 4 + 8 * 16 = 132 kept) or the
      fraction kept (float); `dart_k=` (default 2), `dart_pivot_image=`, `dart_pivot_text=` (default 4 each).
    - `"sparsevlm"` (ICML'25, release v1.5): `keep` is one of the release's budgets (192, 128, 96, 64: its per-layer
      counts) or the average fraction of image tokens over the layers; `sparsevlm_layers=` (default 2, 6, 15 of
      32), `sparsevlm_counts=` (with keep=None), `sparsevlm_recycle=` (default True).

    Returns:
        The same model object.
    """
    from mmcompress.registry import get

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    applied = {"method": name, "keep": keep}  # as called (an in-LLM method runs as an identity compressor + a rule)
    adapter_cls = adapter_for(model)
    if name in IN_LLM:
        name, keep, options = _inllm_options(adapter_cls, name, keep, dict(options))
    comp_cls = get(name)
    adapter_opts, comp_opts = _split_options(adapter_cls, comp_cls, options)
    adapter_opts = _default_stage(adapter_cls, comp_cls, adapter_opts)
    compressor = comp_cls(keep=keep, **comp_opts)
    remove(model)
    adapter = adapter_cls(model, compressor, **adapter_opts)
    adapter.applied = applied
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
    """The method in effect and statistics of the last forward of a wrapped model.

    Returns:
        ``method`` and ``keep`` as passed to the last `apply` (the one in effect: applying again replaces it), then,
        once a forward has run, ``tokens_in``/``tokens_out`` per sample and ``compress_ms`` (plus what the adapter
        records, e.g. ``inllm_removed``).
    """
    adapter = _adapter(model)
    if adapter is None:
        raise ValueError("model: is not wrapped by mmcompress.apply")
    return {**getattr(adapter, "applied", {}), **adapter.last_stats}
