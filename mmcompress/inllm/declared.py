"""In-LLM stages that before-the-LLM methods declare (FlashVID's FastV at layer 20, HoliTom's merge at layer K).

A compressor describes its in-LLM part as data (`inllm_stage(model) -> dict | None`); `mmc.apply` hands that
description to `build_declared`, which builds the rule on the shared stage. So `mmcompress.compressors` never
imports the in-LLM stage (the layers depend downwards: hf -> inllm -> compressors).

A description: ``{"rule": "fastv" | "holitom", "option": <the compressor option naming the layer>, "k": <layer or
"auto">, **the rule's own arguments}``; with ``"k": "auto"`` it also gives ``"depth_ref": (layer, n_layers)``, the
release's layer on the release's LLM, and the layer is that depth fraction of the model's LLM when the model is
shallower (``round(layer * L / n_layers)``, at least 1), the release's layer otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["build_declared", "resolve_layer"]


def resolve_layer(k: Any, depth_ref: tuple[int, int] | None, n_layers: int) -> Any:
    """The layer index of a description on an LLM of `n_layers` layers ("auto": see the module docstring)."""
    if k != "auto":
        return k
    if depth_ref is None:
        raise ValueError("inllm_stage: 'k': 'auto' needs 'depth_ref': (layer, n_layers) of the release")
    layer, ref_layers = depth_ref
    return layer if n_layers > layer else max(1, round(layer * n_layers / ref_layers))


def build_declared(spec: dict[str, Any]) -> Callable[[int], Any]:
    """build(n_layers) -> the rule a compressor's `inllm_stage` describes (see the module docstring)."""
    from mmcompress.inllm.options import check_layer

    spec = dict(spec)
    kind, option = spec.pop("rule", None), spec.pop("option", "llm_layer")
    k, depth_ref = spec.pop("k", None), spec.pop("depth_ref", None)
    if kind == "fastv":
        from mmcompress.inllm.fastv import FastVRule as rule_cls
    elif kind == "holitom":
        from mmcompress.inllm.holitom import HoliTomRule as rule_cls
    else:
        raise ValueError(f"inllm_stage: 'rule': expected 'fastv' or 'holitom', got {kind!r}")

    def build(n_layers: int) -> Any:
        layer = resolve_layer(k, depth_ref, n_layers)
        check_layer(option, layer, n_layers)
        return rule_cls(k=layer, **spec)

    return build
