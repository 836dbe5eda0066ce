"""FastV (Chen et al., ECCV'24): drop image tokens inside the LLM, after decoder layer K - 1, by last-token attention.

Layers 0 .. K-1 see every token. The attention row of the LAST prompt token in layer K - 1 (softmax over keys,
averaged over heads) ranks the image tokens; the `round(R * n_img)` lowest of each sample are removed from the hidden
states entering layer K, so layers K .. end (and their KV cache) hold fewer tokens. The row is recomputed from
layer K - 1's q/k projections and rotary embedding, so the model keeps its SDPA/FlashAttention kernels (no eager
attention, no `output_attentions`). Kept tokens keep their original position ids (as in the paper).

Works through `generate()` with a dynamic KV cache: pruning happens once, in the prefill; decode steps append to
the shorter caches of layers >= K, whose attention masks are remapped here (layers < K keep the full cache).

Batches whose samples lose different numbers of tokens (different image-token counts) physically drop the smallest
count from every sample and hide the remaining pruned tokens as keys in the attention mask of layers >= K, so each
sample computes what it would compute alone.

Reuse (any HF decoder whose layers take `attention_mask`, `position_embeddings`, `position_ids`, `cache` kwargs and
whose attention has q_proj/k_proj and a module-level `apply_rotary_pos_emb`, e.g. Llama, Qwen2, Qwen2-VL text):

    >>> fv = FastV(model.model.language_model.layers, k=2, r=0.5)
    >>> fv.attach()
    >>> with fv.armed(image_mask, attention_mask):   # [B, L] bool image positions, [B, L] 0/1 mask, prefill only
    ...     out = model(...)
    >>> fv.detach()

Limitations: labels/loss over the pruned sequence are not supported (FastV is an inference method; the logits of a
pruned prefill cover the kept positions only); static/sliding-window caches are not remapped.

Letters: B batch, L prompt length entering layer K - 1, L' after pruning, t decode tokens, C channels, D head dim.
"""

from __future__ import annotations

import contextlib
import math
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmcompress.compressors.attention_scores import attention_row_scores, find_qk_linears

__all__ = ["FastV", "fastv_keep_count"]


def fastv_keep_count(n_img: torch.Tensor, r: float) -> torch.Tensor:
    """[B] image tokens removed per sample: round(r * n_img) (FastV's R is the fraction pruned)."""
    return torch.round(n_img.double() * r).long().clamp(min=0)


@dataclass
class _Plan:
    keep_idx: torch.Tensor  # [B, L'] int64 original positions kept physically, increasing
    key_valid: torch.Tensor  # [B, L'] bool False for positions pruned but kept for batch alignment
    orig_len: int  # L
    removed: torch.Tensor  # [B] image tokens pruned per sample
    pruned: torch.Tensor  # [B, L] bool positions pruned (physically or hidden)


def _cache_of(kwargs: dict[str, Any]) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _gather_seq(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
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


class FastV:
    """In-LLM image-token pruning at decoder layer `k` by the last token's attention (FastV).

    Args:
        layers: the decoder layers (e.g. `model.model.language_model.layers`).
        k: first layer that sees the pruned sequence (>= 1); scores come from layer k - 1. Paper default 2.
        r: fraction of each sample's image tokens pruned, in [0, 1). Paper default 0.5. r = 0 changes nothing.
        rope: function (q, k, cos, sin) -> (q, k) applying the rotary embedding; default: the
            `apply_rotary_pos_emb` of the attention module's own module.
    """

    def __init__(self, layers: nn.ModuleList, k: int = 2, r: float = 0.5, rope: Callable | None = None):
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"fastv_k: expected an int layer index, got {type(k).__name__}")
        if not 1 <= k < len(layers):
            raise ValueError(f"fastv_k: expected 1 <= K < {len(layers)} (the decoder's layer count), got {k}")
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            raise ValueError(f"fastv_r: expected a fraction pruned in [0, 1), got {r!r}")
        self.layers, self.k, self.r = layers, k, float(r)
        self.attn = getattr(layers[k - 1], "self_attn", None)
        if self.attn is None:
            raise ValueError(f"fastv_k: decoder layer {k - 1} has no `self_attn` module")
        self.q_lin, self.k_lin = find_qk_linears(self.attn)
        if rope is None:
            rope = getattr(sys.modules[type(self.attn).__module__], "apply_rotary_pos_emb", None)
        self.rope = rope
        self._handles: list = []
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._plan: _Plan | None = None  # plan of the prefill in flight
        self._cache_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._fwd_cache: dict[int, Any] = {}
        self.last_removed: list[int] = []  # image tokens pruned per sample in the last armed forward
        self.last_pruned: list[torch.Tensor] = []  # their positions in the LLM input, per sample

    # ---- lifecycle ------------------------------------------------------------------------------
    def attach(self) -> None:
        """Register the hooks (score capture on layer k - 1, pruning/remapping on layers >= k)."""
        self.detach()
        self._handles.append(self.attn.register_forward_pre_hook(self._score_hook, with_kwargs=True))
        for i in range(self.k, len(self.layers)):
            self._handles.append(self.layers[i].register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))

    def detach(self) -> None:
        """Remove exactly the hooks `attach` added."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pending = self._plan = None

    @contextlib.contextmanager
    def armed(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Iterator[None]:
        """Prune in the forward run inside this context (a prefill).

        Args:
            image_mask: [B, L] bool, True at image (and video) token positions of the LLM input.
            attention_mask: [B, L] 0/1 padding mask of the LLM input, or None.
        """
        if image_mask.dim() != 2:
            raise ValueError(f"image_mask: expected [B, L] bool, got shape {tuple(image_mask.shape)}")
        self._pending = (image_mask.bool(), None if attention_mask is None else attention_mask.bool())
        self._plan = None
        self._fwd_cache = {}
        try:
            yield
        finally:
            self._pending = self._plan = None
            self._fwd_cache = {}

    # ---- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def _score_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._pending is None or self.r == 0.0:
            return None
        h = args[0] if args else kwargs["hidden_states"]  # [B, L, C] after input_layernorm
        image_mask, amask = self._pending
        B, L, _ = h.shape
        if image_mask.shape != (B, L):
            raise ValueError(f"image_mask: shape {tuple(image_mask.shape)} does not match the LLM input [{B}, {L}]")
        attn = self.attn
        D = getattr(attn, "head_dim", None) or self.q_lin.out_features // attn.config.num_attention_heads
        q = self.q_lin(h).view(B, L, -1, D).transpose(1, 2)  # [B, H, L, D]
        k = self.k_lin(h).view(B, L, -1, D).transpose(1, 2)  # [B, Hk, L, D]
        pe = kwargs.get("position_embeddings")
        if pe is not None and self.rope is not None:
            cos, sin = pe
            q, k = self.rope(q, k, cos, sin)
        valid = torch.ones(B, L, dtype=torch.bool, device=h.device) if amask is None else amask.to(h.device)
        ar = torch.arange(L, device=h.device)
        last = torch.where(valid, ar, torch.full_like(ar, -1)).max(1).values  # [B] last valid (prompt) token
        key_mask = valid & (ar.unsqueeze(0) <= last.unsqueeze(1))
        scale = getattr(attn, "scaling", None) or 1.0 / math.sqrt(D)
        s = attention_row_scores(q, k, last.unsqueeze(1), scale=scale, key_mask=key_mask)  # [B, L]
        self._plan = self._make_plan(s, image_mask.to(h.device) & valid, L)
        self.last_removed = self._plan.removed.tolist()
        self.last_pruned = [p.nonzero().squeeze(1) for p in self._plan.pruned]
        return None

    def _make_plan(self, s: torch.Tensor, img: torch.Tensor, L: int) -> _Plan:
        B = s.shape[0]
        n_img = img.sum(1)
        d = fastv_keep_count(n_img, self.r)  # [B] pruned per sample
        # rank image tokens by score (lowest first); non-image tokens never pruned
        order = torch.where(img, s, torch.full_like(s, float("inf"))).argsort(dim=1, stable=True)  # [B, L]
        rank = order.argsort(dim=1)  # rank of each position, lowest score = 0
        pruned = img & (rank < d.unsqueeze(1))  # [B, L]
        dmin = int(d.min()) if B else 0
        phys = img & (rank < dmin)  # physically removed from every sample
        keep_idx = (~phys).nonzero()[:, 1].view(B, L - dmin)  # increasing within each row
        key_valid = ~pruned.gather(1, keep_idx)
        return _Plan(keep_idx=keep_idx, key_valid=key_valid, orig_len=L, removed=d, pruned=pruned)

    # ---- pruning / remapping --------------------------------------------------------------------
    def _make_layer_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            return self._layer_hook(i, args, kwargs)

        return hook

    def _layer_hook(self, i: int, args: tuple, kwargs: dict[str, Any]):
        cache = _cache_of(kwargs)
        plan = self._plan
        prefill = plan is not None and self._pending is not None
        if not prefill:
            plan = self._cache_plan(cache)
            if plan is None:
                return None
        h = args[0] if args else kwargs["hidden_states"]
        if prefill:
            if i == self.k:
                if h.shape[1] != plan.orig_len:
                    raise ValueError(f"fastv: layer {i} got {h.shape[1]} tokens, expected {plan.orig_len}")
                h = _gather_seq(h, plan.keep_idx.to(h.device), 1)
                if cache is not None:
                    try:
                        self._cache_plans[cache] = plan
                    except TypeError:
                        pass
            kwargs = dict(kwargs)
            kwargs.update(self._prefill_kwargs(kwargs, plan))
        else:
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = self._decode_mask(kwargs.get("attention_mask"), plan, h.shape[1], cache, i)
        if args:
            args = (h, *args[1:])
        else:
            kwargs["hidden_states"] = h
        return args, kwargs

    def _cache_plan(self, cache: Any) -> _Plan | None:
        if cache is None:
            return None
        try:
            return self._cache_plans.get(cache)
        except TypeError:
            return None

    def _prefill_kwargs(self, kwargs: dict[str, Any], plan: _Plan) -> dict[str, Any]:
        """Gathered attention_mask / position_embeddings / position_ids, computed once per forward."""
        out: dict[str, Any] = {}
        idx = plan.keep_idx
        for name in ("attention_mask", "position_embeddings", "position_ids"):
            v = kwargs.get(name)
            key = (name, id(v))
            if key in self._fwd_cache:
                out[name] = self._fwd_cache[key][1]
                continue
            if name == "attention_mask":
                new = self._prefill_mask(v, plan)
            elif name == "position_embeddings" and v is not None:
                new = tuple(_gather_seq(t, idx.to(t.device), 1) for t in v)
            elif name == "position_ids" and isinstance(v, torch.Tensor):
                if v.dim() == 2:
                    new = _gather_seq(v, idx.to(v.device), 1)
                else:  # [3, B, L] multimodal rope ids
                    new = torch.stack([_gather_seq(p, idx.to(v.device), 1) for p in v])
            else:
                new = v
            self._fwd_cache[key] = (v, new)  # keep v alive so its id stays unique during the forward
            out[name] = new
        return out

    @staticmethod
    def _prefill_mask(m: torch.Tensor | None, plan: _Plan) -> torch.Tensor | None:
        idx, kv = plan.keep_idx, plan.key_valid
        B, Lp = idx.shape
        if m is None:
            if bool(kv.all()):
                return None  # still plain causal
            causal = torch.ones(Lp, Lp, dtype=torch.bool, device=idx.device).tril()
            return causal[None, None] & kv[:, None, None, :]
        if not isinstance(m, torch.Tensor) or m.dim() != 4:
            raise ValueError(f"attention_mask: FastV supports 4-D (SDPA/eager) masks or None, got {type(m).__name__}")
        m = _gather_seq(_gather_seq(m, idx.to(m.device), 2), idx.to(m.device), 3)  # [B, 1, L', L']
        hide = ~kv.to(m.device)[:, None, None, :]
        if m.dtype == torch.bool:
            return m & ~hide
        return m.masked_fill(hide, torch.finfo(m.dtype).min)

    @staticmethod
    def _decode_mask(m: torch.Tensor | None, plan: _Plan, q: int, cache: Any, i: int) -> torch.Tensor | None:
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
            raise ValueError(f"attention_mask: FastV supports 4-D (SDPA/eager) masks or None, got {type(m).__name__}")
        Lfull = m.shape[-1]
        extra = torch.arange(plan.orig_len, Lfull, device=m.device).expand(B, -1)
        cols = torch.cat([idx.to(m.device), extra], 1)  # [B, L' + t + q]
        m = _gather_seq(m, cols, 3)
        hide = ~torch.cat([kv.to(m.device), torch.ones_like(extra, dtype=torch.bool)], 1)[:, None, None, :]
        if m.dtype == torch.bool:
            return m & ~hide
        return m.masked_fill(hide, torch.finfo(m.dtype).min)
