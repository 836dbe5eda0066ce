"""How `mmc.apply(model, name, keep=..., <name>_...=...)` becomes an in-LLM rule: one option builder per method.

A builder checks `keep` and the method's own options (`<name>_*`) when `mmc.apply` is called, and returns
`build(n_layers) -> rule`, which the adapter calls once it knows the decoder's depth (the layer options are checked
against it then). A method with a stage before the LLM (TRIO) names it in `ENCODER_STAGES`: its budget option
selects that compressor instead of the identity (`mmc.apply(model, "trio", keep=32, trio_encoder_keep=96)`). `FastV`
is not here: it is an adapter option pair (`fastv_k`, `fastv_r`) of its own, read by the
Hugging Face adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["BUILDERS", "ENCODER_STAGES", "OPTIONS", "check_layer"]


def check_layer(option: str, k: Any, n_layers: int) -> None:
    """Raise unless `k` is an int layer index in [1, n_layers) (`option` names the argument)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{option}: expected an int layer index, got {type(k).__name__}")
    if not 1 <= k < n_layers:
        raise ValueError(f"{option}: expected 1 <= K < {n_layers} (the decoder's layer count), got {k}")


def pdrop_builder(keep: Any, own: dict[str, Any]):
    """PyramidDrop: `keep` = average share of image tokens over the layers, or None with `pdrop_lambda`."""

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


def dart_builder(keep: Any, own: dict[str, Any]):
    """DART: `keep` = the release's token budget (int) or the fraction kept (float); pivots before layer `dart_k`."""

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
        check_layer("dart_k", k, n_layers)
        return rule

    return build


def sparsevlm_builder(keep: Any, own: dict[str, Any]):
    """SparseVLM: `keep` = a release budget (192, 128, 96, 64), an average fraction, or None with counts."""

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


def trio_builder(keep: Any, own: dict[str, Any]):
    """TRIO: `keep` = image tokens kept per sample (int, the release's `image_token_list` entry) or the fraction kept
    (float, floored as its Qwen2.5-VL script); pruned before layer `trio_layer` (default: half the depth)."""

    from mmcompress.inllm.trio import TRIORule

    layer, tau = own.pop("trio_layer", None), own.pop("trio_tau", 0.8)
    n_pos, rerun = own.pop("trio_positions", 4), own.pop("trio_rerun", "next")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or keep <= 0 or (isinstance(keep, float)
                                                                                   and keep > 1):
        raise ValueError(f"keep: 'trio' takes the image tokens kept per sample (an int, e.g. 32) or the fraction "
                         f"kept in (0, 1], got {keep!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not -1 <= tau <= 1:
        raise ValueError(f"trio_tau: expected a cosine threshold in [-1, 1], got {tau!r}")
    if isinstance(n_pos, bool) or not isinstance(n_pos, int) or n_pos < 1:
        raise ValueError(f"trio_positions: expected an int >= 1, got {n_pos!r}")
    if rerun not in ("next", "prev"):
        raise ValueError(f"trio_rerun: expected 'next' (re-run layer P, the LLaVA release) or 'prev' (layer P - 1, "
                         f"the Qwen2.5-VL release), got {rerun!r}")

    def build(n_layers: int) -> TRIORule:
        p = n_layers // 2 if layer is None else layer
        check_layer("trio_layer", p, n_layers)
        return TRIORule(p, keep, tau=float(tau), n_pos=n_pos, rerun=rerun)

    return build


#: method -> builder(keep, own options) -> build(n_layers) -> rule; `own` is popped as the builder reads it
BUILDERS: dict[str, Callable[[Any, dict[str, Any]], Callable[[int], Any]]] = {
    "pdrop": pdrop_builder, "dart": dart_builder, "sparsevlm": sparsevlm_builder, "trio": trio_builder}
#: method -> (its option naming a before-the-LLM budget, the compressor that stage is): TRIO's encoder stage
ENCODER_STAGES: dict[str, tuple[str, str]] = {"trio": ("trio_encoder_keep", "trio_encoder")}
#: method -> the option names it accepts (all `<name>_*`)
OPTIONS: dict[str, frozenset[str]] = {
    "pdrop": frozenset({"pdrop_layers", "pdrop_lambda"}),
    "dart": frozenset({"dart_k", "dart_pivot_image", "dart_pivot_text"}),
    "sparsevlm": frozenset({"sparsevlm_layers", "sparsevlm_counts", "sparsevlm_recycle"}),
    "trio": frozenset({"trio_layer", "trio_tau", "trio_positions", "trio_rerun", "trio_encoder_keep"}),
}
