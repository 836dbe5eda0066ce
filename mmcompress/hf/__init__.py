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
from mmcompress.inllm.declared import build_declared
from mmcompress.inllm.options import BUILDERS, ENCODER_STAGES, OPTIONS

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
IN_LLM = (FASTV, *BUILDERS)  # fastv, pdrop, dart, sparsevlm, trio (tests/test_cli_registry.py: = catalog.IN_LLM)


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
    unknown = set(own) - OPTIONS[name]
    if unknown:
        raise TypeError(f"options: unknown option(s) {sorted(unknown)} for {name!r} (accepts {sorted(OPTIONS[name])})")
    comp, comp_keep = "uniform", 1.0  # identity before the LLM, unless the method's own encoder stage is asked for
    opt, stage = ENCODER_STAGES.get(name, (None, None))
    if own.get(opt) is not None:
        comp_keep = own.pop(opt)
        if isinstance(comp_keep, bool) or not isinstance(comp_keep, (int, float)) or comp_keep <= 0 or (
                isinstance(comp_keep, float) and comp_keep > 1):
            raise ValueError(f"{opt}: expected the tokens kept per image before the LLM (an int, e.g. 96) or the "
                             f"fraction kept in (0, 1], got {comp_keep!r}")
        comp = stage
    own.pop(opt, None)
    return comp, comp_keep, {**options, "inllm": BUILDERS[name](keep, own)}


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
    - `"trio"` (arXiv 2602.04657): `keep` is the image tokens kept per sample (int, e.g. 32) or the fraction kept
      (float), from layer `trio_layer=` (default half the depth) on, chosen by the gradient of a re-run layer's loss
      and NMS (`trio_tau=0.8`); a backward pass inside the prefill, under no_grad/inference_mode callers.
      `trio_encoder_keep=96` adds TRIO's encoder stage (`trio_encoder`: 96 tokens enter the LLM; its options such
      as `window=` pass through): the release's default schedule, 96 in and 32 from half the depth on.

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
    if getattr(getattr(comp_cls, "encoder_needs", None), "stage", None) == "pixels" \
            and getattr(getattr(adapter_cls, "family", None), "pixel_norm", None) is None:
        raise ValueError(f"name: {name!r} drops patches BEFORE the vision encoder, which needs a tower that takes a "
                         f"variable patch set at their original positions (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); "
                         f"{getattr(model.config, 'model_type', type(model).__name__)} is not served "
                         f"({adapter_cls.__name__})")
    adapter_opts, comp_opts = _split_options(adapter_cls, comp_cls, options)
    adapter_opts = _default_stage(adapter_cls, comp_cls, adapter_opts)
    compressor = comp_cls(keep=keep, **comp_opts)
    declared = getattr(compressor, "inllm_stage", None)  # a method's own in-LLM stage (FlashVID: FastV at 20)
    if declared is not None and "inllm" in adapter_cls.options and adapter_opts.get("inllm") is None \
            and adapter_opts.get("fastv_k") is None:
        spec = declared(model)
        if spec is not None:
            adapter_opts = {**adapter_opts, "inllm": build_declared(spec)}
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
