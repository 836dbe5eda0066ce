"""What a bench row costs, independent of the machine: the LLM's exact prefill FLOPs at the token counts each decoder
layer really processed; how the in-LLM methods are scheduled to a budget; the grid of the `resize` reference.

FLOPs convention (`prefill_flops`): every matrix multiply of the prefill, 2 FLOPs per multiply-add, per sample at its
own length (no padding, as if it ran alone). Per decoder layer that processes T tokens (C hidden, H/Hk query/key-value
heads of width D, I MLP width):

    q, o projections      2 * 2 * T * C * H * D
    k, v projections      2 * 2 * T * C * Hk * D            (GQA: Hk < H)
    scores Q K^T, then AV 2 * 2 * T * T * H * D            (the full T x T products, as dense attention computes them)
    MLP                   (3 if gated else 2) * 2 * T * C * I   (gated: gate, up, down; else fc1, fc2)

plus the LM head for the LAST position only (2 * C * V: `generate()` asks the model for that position's logits in the
prefill). Norms, rotary embeddings, softmax, activations and residual adds (elementwise, < 1 % here) are not counted,
nor the scoring work of in-LLM methods. The same count applies to every row, so ratios compare like with like.

Letters: L decoder layers, n image tokens of the uncompressed host, t budget in tokens, T tokens a layer processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LLMShape", "layer_flops", "prefill_flops", "budget_tokens", "at_budget", "Schedule", "inllm_schedule",
           "resize_grid", "schedule_table", "RELEASE_K"]

RELEASE_K = 2  # FastV's and DART's release layer: layers 0 .. K - 1 see every image token


@dataclass(frozen=True)
class LLMShape:
    """The numbers of a decoder-only LLM that decide its prefill FLOPs.

    Attributes:
        layers: decoder layers L. hidden: width C. heads: query heads H. kv_heads: key/value heads Hk (GQA).
        head_dim: D. intermediate: MLP width I. gated: a gated MLP (gate, up, down: Llama, Qwen, Mistral, Gemma).
        vocab: LM head rows V.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool
    vocab: int

    @classmethod
    def from_config(cls, config: Any, gated: bool | None = None) -> LLMShape:
        """The shape of `config`'s text model (a VLM config's ``text_config``, or an LLM config itself).

        Args:
            config: a transformers config.
            gated: whether the MLP is gated; None: from the architecture (`from_model` reads it off the modules).

        Raises:
            ValueError: the config lacks a field (named in the message).
        """
        text = getattr(config, "text_config", None) or config

        def need(name: str) -> int:
            v = getattr(text, name, None)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"config: the text config has no positive int {name!r} (got {v!r})")
            return v

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        kv = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        if gated is None:
            gated = getattr(text, "model_type", "") not in _UNGATED
        return cls(layers=need("num_hidden_layers"), hidden=hidden, heads=heads, kv_heads=int(kv),
                   head_dim=int(head_dim), intermediate=need("intermediate_size"), gated=bool(gated),
                   vocab=need("vocab_size"))

    @classmethod
    def from_model(cls, model: Any) -> LLMShape:
        """The shape of `model`'s LLM; gated when its decoder's MLPs have a ``gate_proj`` (or ``gate_up_proj``)."""
        names = [n for n, _ in model.named_modules()]
        mlp = [n for n in names if ".mlp." in n and "vision" not in n and "visual" not in n]
        gated = any(n.endswith(("gate_proj", "gate_up_proj")) for n in mlp) if mlp else None
        return cls.from_config(model.config, gated=gated)


_UNGATED = ("gpt2", "gpt_neox", "opt", "phi", "gpt_bigcode", "starcoder2", "falcon", "bloom")


def layer_flops(shape: LLMShape, T: int) -> int:
    """FLOPs of one decoder layer on T tokens (see the module docstring)."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 0:
        raise ValueError(f"T: expected an int token count >= 0, got {T!r}")
    C, H, Hk, D, inter = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate
    proj = 2 * T * C * (2 * H * D + 2 * Hk * D)
    attn = 2 * 2 * T * T * H * D
    mlp = (3 if shape.gated else 2) * 2 * T * C * inter
    return proj + attn + mlp


def prefill_flops(shape: LLMShape, layer_tokens: Sequence[int]) -> int:
    """Exact prefill FLOPs of one sample whose decoder layer l processed ``layer_tokens[l]`` tokens (text + image).

    Raises:
        ValueError: not one count per layer.
    """
    if len(layer_tokens) != shape.layers:
        raise ValueError(f"layer_tokens: expected {shape.layers} counts (one per decoder layer), got "
                         f"{len(layer_tokens)}")
    return sum(layer_flops(shape, int(T)) for T in layer_tokens) + 2 * shape.hidden * shape.vocab


def budget_tokens(keep: Any, n: int) -> float:
    """The budget in image tokens: ``keep * n`` for a fraction, the count itself for an int."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or keep <= 0:
        raise ValueError(f"keep: expected a fraction in (0, 1] or a token count, got {keep!r}")
    return float(keep) * n if isinstance(keep, float) else float(keep)


def at_budget(tokens: float, budget: float) -> bool:
    """Whether a row's mean image tokens over the LLM's layers stays within a budget of `budget` tokens (a fractional
    budget is met by its ceiling: a compressor keeps a whole number of tokens)."""
    return tokens <= math.ceil(budget - 1e-9) + 1e-6


@dataclass(frozen=True)
class Schedule:
    """How an in-LLM method runs at one budget.

    Attributes:
        keep: the ``keep`` handed to `mmcompress.apply` (None where the options set the counts).
        options: the method's options (layers, counts, lambda).
        planned: the mean image tokens over the layers this schedule plans (the row measures the real one).
        reachable: False when no schedule of the method keeps >= 1 image token after its first prune and still meets
            the budget; the schedule is then the closest one above it.
    """

    keep: Any
    options: dict[str, Any]
    planned: float
    reachable: bool


def _mean(counts_by_layer: Sequence[float]) -> float:
    return sum(counts_by_layer) / len(counts_by_layer)


def _staged(n: int, points: Sequence[int], after: Sequence[int], L: int) -> list[int]:
    """Image tokens per layer: n before points[0], after[s] from points[s] on."""
    out, s = [], -1
    for i in range(L):
        while s + 1 < len(points) and points[s + 1] <= i:
            s += 1
        out.append(n if s < 0 else after[s])
    return out


def _fastv_like(method: str, t: float, n: int, L: int) -> Schedule:
    """FastV / DART: one prune point K (the release's 2, lowered to 1 when K = 2 cannot keep a token within the
    budget), c tokens kept from K on, the largest c with (K n + (L - K) c) / L <= t."""
    for K in range(min(RELEASE_K, L - 1), 0, -1):
        c = min(n, math.floor((t * L - K * n) / (L - K) + 1e-9))
        if method == "dart":  # kept = 4 image pivots + 8 pivots x quota (release pivots), quota = budget // 8
            q = (c - 4) // 8
            if q < 0:
                continue
            c = 4 + 8 * q
            keep = min(1.0, (8 * q + 4) / n)  # budget 8 q + 4: quota q
        else:
            keep = c / n
        if c >= 1 and keep > 0:
            opt = "fastv_k" if method == "fastv" else "dart_k"
            return Schedule(keep, {opt: K}, _mean(_staged(n, [K], [c], L)), True)
    keep = (1 if method == "fastv" else 4) / n  # the closest schedule above the budget: K = 1, the fewest tokens
    c = 1 if method == "fastv" else 4
    return Schedule(keep, {"fastv_k" if method == "fastv" else "dart_k": 1}, _mean(_staged(n, [1], [c], L)), False)


def _pdrop_layers(L: int) -> list[tuple[int, ...]]:
    """PyramidDrop's stage boundaries to try: the release's quarters (8, 16, 24 of 32), then the same spacing moved
    to start at layer 1 (for budgets the quarters cannot reach)."""
    quarters = tuple(sorted({L // 4, L // 2, (3 * L) // 4} - {0}))
    shifted = tuple(sorted({p - quarters[0] + 1 for p in quarters}))
    return [quarters] + ([shifted] if shifted != quarters else [])


def _pdrop_tokens(n: int, layers: Sequence[int], lam: float, L: int) -> list[int]:
    return _staged(n, layers, [int(n * lam ** (s + 1)) for s in range(len(layers))], L)


def _pdrop(t: float, n: int, L: int) -> Schedule:
    for layers in _pdrop_layers(L):
        lo, hi = 0.0, 1.0
        if _mean(_pdrop_tokens(n, layers, 1.0, L)) <= t:
            lo = 1.0
        else:
            for _ in range(60):  # the largest lambda whose floored pyramid stays within t
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if _mean(_pdrop_tokens(n, layers, mid, L)) <= t else (lo, mid)
        if int(n * lo) >= 1:
            return Schedule(None, {"pdrop_layers": list(layers), "pdrop_lambda": lo},
                            _mean(_pdrop_tokens(n, layers, lo, L)), True)
    layers = _pdrop_layers(L)[-1]
    lam = 1.0 / n  # one token after the first drop, none later
    return Schedule(None, {"pdrop_layers": list(layers), "pdrop_lambda": lam}, _mean(_pdrop_tokens(n, layers, lam, L)),
                    False)


SPARSEVLM_SHAPE = (300 / 576, 200 / 576, 110 / 576)  # the release's 192-token row, as shares of 576


def _sparsevlm_tokens(n: int, layers: Sequence[int], counts: Sequence[int], L: int) -> list[int]:
    """Image tokens per layer under SparseVLM's rule: after layer l_s, min(count_s, v - 1) kept + the recycled
    int((int(0.3 * pruned) + 1) / 10) + 1 (release v1.5)."""
    after, v = [], n
    for c in counts:
        kept = min(c, v - 1)
        pruned = v - kept
        v = kept + (int((int(0.3 * pruned) + 1) / 10) + 1 if pruned > 0 else 0)
        after.append(v)
    return _staged(n, [p + 1 for p in layers], after, L)


def _sparsevlm(t: float, n: int, L: int) -> Schedule:
    from mmcompress.inllm.sparsevlm import sparsevlm_default_layers

    layers = sparsevlm_default_layers(L)
    shape = list(SPARSEVLM_SHAPE[: len(layers)]) + [SPARSEVLM_SHAPE[-1]] * max(0, len(layers) - 3)

    def counts(s: float) -> list[int]:
        return [max(1, int(n * min(1.0, s * r))) for r in shape]

    lo, hi = 0.0, 1.0 / min(shape)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _mean(_sparsevlm_tokens(n, layers, counts(mid), L)) <= t else (lo, mid)
    cts = counts(lo)
    planned = _mean(_sparsevlm_tokens(n, layers, cts, L))
    return Schedule(None, {"sparsevlm_layers": list(layers), "sparsevlm_counts": cts}, planned, planned <= t + 1e-9)


TRIO_SHAPE = (96 / 576, 32 / 576)  # the release README's schedule: 96 tokens from its encoder stage, 32 after L/2


def _trio_encoder_stage() -> bool:
    from mmcompress.registry import available

    return "trio_encoder" in available()


def _trio(t: float, n: int, L: int) -> Schedule:
    """TRIO: its release's shape where the encoder stage exists (e tokens from the encoder stage, e / 3 from layer
    L / 2 on, as 96 -> 32 at layer 16 of 32), scaled to the largest e with a mean within t; without the encoder stage,
    the in-LLM stage alone at layer L / 2, lowered (like FastV's K) until it can keep a token within t."""
    P = L // 2
    if _trio_encoder_stage():
        e = min(n, math.floor(t * L / (P + (L - P) * TRIO_SHAPE[1] / TRIO_SHAPE[0]) + 1e-9))
        while e >= 1:
            c = min(e, max(1, math.floor(e * TRIO_SHAPE[1] / TRIO_SHAPE[0])),
                    math.floor((t * L - P * e) / (L - P) + 1e-9))
            if c >= 1:
                opts = {"trio_layer": P} if e >= n else {"trio_layer": P, "trio_encoder_keep": e}
                return Schedule(c, opts, _mean(_staged(e, [P], [c], L)), True)
            e -= 1
    for p in range(P, 0, -1):
        c = min(n, math.floor((t * L - p * n) / (L - p) + 1e-9))
        if c >= 1:
            return Schedule(c, {"trio_layer": p}, _mean(_staged(n, [p], [c], L)), True)
    return Schedule(1, {"trio_layer": 1}, _mean(_staged(n, [1], [1], L)), False)


_SCHEDULES = {"fastv": lambda t, n, L: _fastv_like("fastv", t, n, L),
              "dart": lambda t, n, L: _fastv_like("dart", t, n, L), "pdrop": _pdrop, "sparsevlm": _sparsevlm,
              "trio": _trio}


def inllm_schedule(method: str, keep: Any, n: int, L: int) -> Schedule:
    """The schedule of in-LLM `method` whose mean image tokens over the L layers meets the budget `keep`.

    Every method keeps its release's layer placement where the budget allows it (FastV/DART: K = 2; PyramidDrop: the
    quarters; SparseVLM: 2, 6, 15 of 32 scaled to L) and spends the budget as fully as it can without exceeding it:

    - fastv: keeps c = floor((t L - K n) / (L - K)) tokens from layer K on (K lowered to 1 when K = 2 leaves none).
    - dart: the same with the release's count, 4 image pivots + 8 pivots x quota (so c - 4 is a multiple of 8).
    - pdrop: the largest lambda whose pyramid (int(n lambda^(s+1)) from the s-th boundary on) stays within t; the
      boundaries move to start at layer 1 when the quarters cannot keep a token.
    - sparsevlm: the release's 192 row scaled (as `mmcompress.inllm.sparsevlm`), counting its recycled tokens.
    - trio: the release README's 96 -> 32 at layer L / 2 scaled to t (with its encoder stage; see `_trio`).

    Layer 0 sees all n tokens for every in-LLM method, so a budget t <= n / L is out of reach; the schedule is then
    the closest above it (``reachable=False``; the report marks such rows as above budget).

    Args:
        method: ``fastv``, ``pdrop``, ``dart``, ``sparsevlm`` or ``trio``.
        keep: a fraction of n in (0, 1] or a token count.
        n: image tokens of the uncompressed host.
        L: decoder layers of the host.

    Raises:
        ValueError: unknown method, bad keep / n / L.
    """
    if method not in _SCHEDULES:
        raise ValueError(f"method: expected one of {sorted(_SCHEDULES)}, got {method!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected the host's image token count (int >= 1), got {n!r}")
    if isinstance(L, bool) or not isinstance(L, int) or L < 2:
        raise ValueError(f"L: expected the decoder's layer count (int >= 2), got {L!r}")
    return _SCHEDULES[method](min(budget_tokens(keep, n), float(n)), n, L)


def resize_grid(t: float, grid: tuple[int, int]) -> tuple[int, int]:
    """The patch grid of the `resize` reference at a budget of t tokens: the largest g_h x g_w <= t with
    |g_h - g_w| <= 1 (at most one patch of aspect change), within the host's own grid; (1, 1) at least.

    E.g. 144 tokens (12 x 12): t = 72 -> 8 x 9, t = 36 -> 6 x 6, t = 18 -> 4 x 4 (16: 4 x 5 = 20 would exceed t).

    Args:
        t: the budget in tokens.
        grid: (H, W) patch grid of the uncompressed image.
    """
    H, W = grid
    if t >= H * W:
        return H, W
    best = (1, 1)
    for a in range(1, max(H, W) + 1):
        for b in (a, a + 1):
            gh, gw = (a, b) if H <= W else (b, a)
            if gh <= H and gw <= W and gh * gw <= t and gh * gw > best[0] * best[1]:
                best = (gh, gw)
    return best


def schedule_table(n: int, L: int, keeps: Sequence[float]) -> str:
    """Markdown table of every in-LLM method's schedule at `keeps` on a host with n image tokens and L layers."""
    out = ["| method | keep | budget (tokens) | schedule | planned mean tokens | within budget |",
           "|---|---|---|---|---|---|"]
    for m in ("fastv", "dart", "pdrop", "sparsevlm", "trio"):
        for k in keeps:
            s = inllm_schedule(m, k, n, L)
            opts = dict(s.options)
            if s.keep is not None:
                opts["keep"] = round(s.keep, 4)
            if "pdrop_lambda" in opts:
                opts["pdrop_lambda"] = round(opts["pdrop_lambda"], 4)
            desc = ", ".join(f"{a}={v}" for a, v in opts.items())
            out.append(f"| {m} | {k:g} | {k * n:g} | {desc} | {s.planned:.2f} | {'yes' if s.reachable else 'no'} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # python -m mmcompress.evals.cost --image-tokens 144 --layers 8 --keep 0.5,0.25,0.125
    import argparse

    p = argparse.ArgumentParser(description="the in-LLM methods' schedules per budget on a host shape")
    p.add_argument("--image-tokens", type=int, default=144)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--keep", default="0.5,0.25,0.125")
    a = p.parse_args()
    print(schedule_table(a.image_tokens, a.layers, [float(k) for k in a.keep.split(",")]))
