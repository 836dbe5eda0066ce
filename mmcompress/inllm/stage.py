"""One in-LLM pruning stage: image tokens dropped inside the decoder, at one or several layers, by a pluggable rule.

A method (`InLLMMethod`: FastV, PyramidDrop, DART, ...) names its prune points (the layers that first see a shorter
sequence) and, at each, which tokens to drop given a `PruneContext` (the hidden states entering that layer, the
queries/keys of the scoring attention, the image tokens still alive). This module owns the rest, once for all of
them:

- scoring without eager attention: q/k are recomputed from the scoring layer's own projections and rotary
  embedding, so the model keeps its SDPA/FlashAttention kernels (no `output_attentions`);
- pruning by forward pre-hooks on the decoder layers: at a prune point the hidden states are gathered, and every
  later layer gets the attention mask, `position_embeddings` and `position_ids` of the kept columns (original
  positions by default; `compact_positions` renumbers them 0..L'-1 as PyramidDrop's release does, 1-D RoPE only);
- `generate()` with a dynamic cache: pruning happens once, in the prefill; decode steps append to the shorter caches
  of the pruned layers, whose masks (and, when compacted, positions) are remapped here (the column layout and
  the masks: `layout.py`);
- ragged batches: samples that lose different numbers of tokens physically drop the smallest count and hide the
  rest as keys in the attention masks of the pruned layers, so each sample computes what it computes alone;
- `detach()` removes exactly the hooks `attach()` added (the model is restored bit for bit).

    >>> stage = InLLM(model.model.language_model.layers, FastVRule(k=2, r=0.5))
    >>> stage.attach()
    >>> with stage.armed(image_mask, attention_mask):   # [B, L] bool image positions, [B, L] 0/1 mask; prefill
    ...     out = model(...)
    >>> stage.detach()

Limitations: labels/loss over the pruned sequence are not supported (inference methods: the logits of a pruned
prefill cover the kept positions only); static/sliding-window caches are not remapped.

Letters: B batch, L0 prompt length entering the first prune point, L (L') before (after) a prune point, C channels,
H (Hk) query (key) heads, D head dim, t decode tokens.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from mmcompress.compressors.attention_scores import attention_row_scores, find_qk_linears
from mmcompress.inllm.layout import StagePlan, cache_of, decode_mask, gather_seq, prefill_mask
from mmcompress.inllm.saliency import layer_input_grad

__all__ = ["InLLM", "InLLMMethod", "PruneContext", "drop_lowest", "find_decoder"]


class InLLMMethod(Protocol):
    """What a method tells the stage.

    Attributes:
        name: the method's name (messages, stats).
        points: increasing layer indices, each the first layer that sees the sequence pruned there (>= 1).
        compact_positions: renumber the kept tokens' positions 0..L'-1 (1-D RoPE) instead of keeping the originals.
        needs_grad (optional, default False): the rule calls `PruneContext.layer_grad` (a backward pass inside the
            prefill: TRIO); the stage then needs the output head (`InLLM(head=...)`).
    """

    name: str
    points: tuple[int, ...]
    compact_positions: bool

    @property
    def active(self) -> bool:
        """False when the method provably drops nothing (e.g. FastV with R = 0): the stage then does not arm."""

    def score_layer(self, point: int) -> int:
        """Layer whose attention (its normed input, q/k, RoPE) scores prune point `point`: `point - 1` or `point`."""

    def drop(self, ctx: PruneContext) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[B, L] bool tokens to drop at `ctx.point`, a subset of `ctx.img`; or (drop, h') where h' [B, L, C] are
        the hidden states entering the point with some image columns rewritten (token recycling: merged tokens
        written into image columns that are then kept)."""


def drop_lowest(scores: torch.Tensor, img: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the `d[b]` image tokens (`img`) of lowest score in each row; ties by position (stable).

    Args:
        scores: [B, L] float.
        img: [B, L] bool candidates.
        d: [B] int64 how many to drop per row (clamped to the candidates).
    """
    order = torch.where(img, scores, torch.full_like(scores, float("inf"))).argsort(dim=1, stable=True)  # [B, L]
    rank = order.argsort(dim=1)  # rank of each position, lowest score = 0
    return img & (rank < d.to(rank.device).unsqueeze(1))


def find_decoder(root: nn.Module, layers: nn.ModuleList) -> nn.Module | None:
    """The module of `root` that owns `layers` (a HF text model: it also holds `rotary_emb` and the final `norm`)."""
    for m in root.modules():
        if getattr(m, "layers", None) is layers:
            return m
    return None


@dataclass
class PruneContext:
    """What a method sees at one prune point (current layout: L columns, dead keys of a ragged batch excluded).

    Attributes:
        point: the layer that will see the pruned sequence.
        stage: index of `point` in the method's points.
        h: [B, L, C] hidden states entering layer `point`.
        x: [B, L, C] the scoring attention's input (after its layer's input norm).
        pe: (cos, sin) position embeddings of the scoring attention, or None.
        valid: [B, L] bool live tokens (padding and dropped-but-kept-for-alignment tokens excluded).
        img: [B, L] bool live image tokens.
        n_img0: [B] int64 image tokens of each sample before any pruning.
        positions: [B, L] int64 original positions (column indices in the prefill input) of the current columns.
        h_in: [B, L0, C] the hidden states entering layer 0 (the LLM's input embeddings) when the method asks for
            them (`wants_input = True`), else None.
        valid0: [B, L0] bool non-padding columns of the prefill input.
        image0: [B, L0] bool image columns of the prefill input.
        kwargs: layer `point`'s keyword arguments for the current layout (mask, position embeddings and ids), for
            rules with `needs_grad`; else None.
    """

    point: int
    stage: int
    h: torch.Tensor
    x: torch.Tensor
    pe: tuple[torch.Tensor, torch.Tensor] | None
    valid: torch.Tensor
    img: torch.Tensor
    n_img0: torch.Tensor
    positions: torch.Tensor
    owner: InLLM
    h_in: torch.Tensor | None = None
    valid0: torch.Tensor | None = None
    image0: torch.Tensor | None = None
    kwargs: dict[str, Any] | None = None
    _qk: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def last(self) -> torch.Tensor:
        """[B] column of each sample's last live token (the last prompt token)."""
        ar = torch.arange(self.valid.shape[1], device=self.valid.device)
        return torch.where(self.valid, ar, torch.full_like(ar, -1)).max(1).values

    def qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, H, L, D] and k [B, Hk, L, D] of the scoring attention, rotary embedding applied."""
        if self._qk is None:
            self._qk = self.owner._qk(self.point, self.x, self.pe)
        return self._qk

    def last_token_attention(self) -> torch.Tensor:
        """[B, L] softmax attention of the last live token over the live keys, mean over heads (eager's row)."""
        q, k = self.qk()
        attn = self.owner._attn(self.point)
        D = q.shape[-1]
        scale = getattr(attn, "scaling", None) or 1.0 / math.sqrt(D)
        last = self.last
        ar = torch.arange(self.valid.shape[1], device=self.valid.device)
        key_mask = self.valid & (ar.unsqueeze(0) <= last.unsqueeze(1))
        return attention_row_scores(q, k, last.unsqueeze(1), scale=scale, key_mask=key_mask)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The decoder's final norm applied to `h` (DART compares tokens in that space); identity if none."""
        norm = getattr(self.owner.decoder, "norm", None) if self.owner.decoder is not None else None
        return h if norm is None else norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., V] the output head on the final norm of `h` [..., C] (the stage's `head`)."""
        if self.owner.head is None:
            raise RuntimeError(f"{self.owner.method.name}: the stage has no output head (InLLM(head=...))")
        return self.owner.head(self.final_norm(h))

    def layer_grad(self, layer: int, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                   autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """[B, L, C] d loss_fn(layers[layer](h)) / d h at the current layout (`h` entering this point), computed on
        detached clones under any caller mode (no_grad, inference_mode), with no autograd state left behind
        (`mmcompress.inllm.saliency`). `layer` is `point` or an earlier layer whose output `h` is (`point - 1`)."""
        if self.kwargs is None:
            raise RuntimeError(f"{self.owner.method.name}: layer_grad needs the rule to declare needs_grad = True")
        return self.owner._layer_grad(layer, self.h, self.kwargs, loss_fn, autocast_dtype)


class InLLM:
    """The shared in-LLM pruning stage: hooks on the decoder layers that apply `method` in the prefill.

    Args:
        layers: the decoder layers (e.g. `model.model.language_model.layers`).
        method: the rule (`InLLMMethod`): prune points, scoring layer, tokens to drop.
        decoder: the module owning `layers` (for `rotary_emb` when positions are compacted, `norm` for DART);
            default: None (compaction then falls back to original positions, `final_norm` to the identity).
        rope: function (q, k, cos, sin) -> (q, k) applying the rotary embedding; default: the
            `apply_rotary_pos_emb` of each scoring attention module's own module.
        head: the output head (`model.get_output_embeddings()`), for rules with `needs_grad`; default None.
    """

    def __init__(self, layers: nn.ModuleList, method: InLLMMethod, decoder: nn.Module | None = None,
                 rope: Callable | None = None, head: nn.Module | None = None):
        n = len(layers)
        pts = tuple(method.points)
        if not pts or list(pts) != sorted(set(pts)) or not all(1 <= p < n for p in pts):
            raise ValueError(f"{method.name}: prune layers must be increasing in [1, {n}) (the decoder has {n} "
                             f"layers), got {list(pts)}")
        self.layers, self.method, self.decoder, self.points = layers, method, decoder, pts
        self.head, self.needs_grad = head, bool(getattr(method, "needs_grad", False))
        if self.needs_grad and head is None:
            raise ValueError(f"head: {method.name} re-runs a layer through the output head; pass the model's "
                             f"output embeddings")
        self._score = {}
        for p in pts:
            c = method.score_layer(p)
            attn = getattr(layers[c], "self_attn", None)
            if attn is None:
                raise ValueError(f"{method.name}: decoder layer {c} has no `self_attn` module")
            q_lin, k_lin = find_qk_linears(attn)
            rp = rope or getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
            self._score[p] = (c, attn, q_lin, k_lin, rp)
        rot = getattr(decoder, "rotary_emb", None) if decoder is not None else None
        self.rotary = rot if callable(rot) else None
        self._layer_types = getattr(getattr(decoder, "config", None), "layer_types", None)
        self._typed_rope = self.rotary is not None and "layer_type" in inspect.signature(self.rotary.forward).parameters
        self._handles: list = []
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._plans: list[StagePlan] = []  # plans of the prefill in flight, one per prune point reached
        self._captured: dict[int, tuple[torch.Tensor, Any]] = {}  # point -> (x, position_embeddings)
        self._cache_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._fwd_cache: dict[tuple, Any] = {}
        self.last_removed: list[int] = []  # image tokens dropped per sample by the end of the last armed prefill
        self.last_pruned: list[torch.Tensor] = []  # their columns in the LLM input, per sample
        self.last_kept_per_layer: list[list[int]] = []  # image tokens each layer saw, per sample

    @property
    def active(self) -> bool:
        """Whether the method can drop anything (the adapter arms the stage only then)."""
        return bool(self.method.active)

    # ---- lifecycle ------------------------------------------------------------------------------
    def attach(self) -> None:
        """Register the hooks (score capture on the scoring attentions, pruning/remapping on later layers)."""
        self.detach()
        for p, (c, attn, *_ ) in self._score.items():
            if c < p:
                self._handles.append(attn.register_forward_pre_hook(self._make_capture(p), with_kwargs=True))
        if getattr(self.method, "wants_input", False):
            self._handles.append(self.layers[0].register_forward_pre_hook(self._input_hook, with_kwargs=True))
        for i in range(self.points[0], len(self.layers)):
            self._handles.append(self.layers[i].register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))

    def detach(self) -> None:
        """Remove exactly the hooks `attach` added."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pending = None
        self._plans = []
        self._captured = {}

    @contextlib.contextmanager
    def armed(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Iterator[None]:
        """Prune in the forward run inside this context (a prefill).

        Args:
            image_mask: [B, L0] bool, True at image (and video) token positions of the LLM input.
            attention_mask: [B, L0] 0/1 padding mask of the LLM input, or None.
        """
        if not isinstance(image_mask, torch.Tensor) or image_mask.dim() != 2:
            got = getattr(image_mask, "shape", image_mask)
            raise ValueError(f"image_mask: expected a [B, L] bool tensor, got {got}")
        self._pending = (image_mask.bool(), None if attention_mask is None else attention_mask.bool())
        self._plans, self._captured, self._fwd_cache = [], {}, {}
        try:
            yield
            self._record(*self._pending)
        finally:
            self._pending = None
            self._plans, self._captured, self._fwd_cache = [], {}, {}

    # ---- scoring --------------------------------------------------------------------------------
    def _attn(self, point: int) -> nn.Module:
        return self._score[point][1]

    def _input_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._pending is not None:
            self._captured[-1] = (args[0] if args else kwargs["hidden_states"], None)
        return None

    def _make_capture(self, point: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if self._pending is not None:
                x = args[0] if args else kwargs["hidden_states"]
                self._captured[point] = (x, kwargs.get("position_embeddings"))
            return None

        return hook

    def _qk(self, point: int, x: torch.Tensor, pe: Any) -> tuple[torch.Tensor, torch.Tensor]:
        _, attn, q_lin, k_lin, rope = self._score[point]
        B, L, _ = x.shape
        D = getattr(attn, "head_dim", None) or q_lin.out_features // attn.config.num_attention_heads
        q = q_lin(x).view(B, L, -1, D)  # [B, L, H, D]
        k = k_lin(x).view(B, L, -1, D)  # [B, L, Hk, D]
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # per-head RMSNorm (Qwen3,
        if q_norm is not None:  # Gemma 3, ...): applied before the rotary embedding, as their attention does
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, L, D], [B, Hk, L, D]
        if pe is not None and rope is not None:
            cos, sin = pe
            q, k = rope(q, k, cos, sin)
        return q, k

    @torch.no_grad()
    def _prune(self, i: int, h: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """At prune point i: ask the method, make the next plan, return the gathered hidden states."""
        image_mask, amask = self._pending
        prev = self._plans[-1] if self._plans else None
        B, L, _ = h.shape
        if prev is None:
            L0 = L
            if image_mask.shape != (B, L0):
                raise ValueError(f"image_mask: shape {tuple(image_mask.shape)} does not match the LLM input "
                                 f"[{B}, {L0}]")
            positions = torch.arange(L0, device=h.device).expand(B, L0)
            live = torch.ones(B, L0, dtype=torch.bool, device=h.device)
            dead0 = torch.zeros(B, L0, dtype=torch.bool, device=h.device)
        else:
            L0 = prev.orig_len
            if L != prev.keep_idx.shape[1]:
                raise ValueError(f"{self.method.name}: layer {i} got {L} tokens, expected {prev.keep_idx.shape[1]}")
            positions = prev.keep_idx.to(h.device)
            live = prev.key_valid.to(h.device)
            dead0 = prev.dead.to(h.device)
        valid0 = torch.ones(B, L0, dtype=torch.bool, device=h.device) if amask is None else amask.to(h.device)
        valid = valid0.gather(1, positions) & live
        img = image_mask.to(h.device).gather(1, positions) & valid
        c = self._score[i][0]
        if c < i:
            if i not in self._captured:
                raise RuntimeError(f"{self.method.name}: layer {c}'s attention did not run before layer {i}")
            x, pe = self._captured.pop(i)
        else:  # the pruned layer's own attention on its (unpruned) input
            layer = self.layers[i]
            norm = getattr(layer, "input_layernorm", None)
            x = h if norm is None else norm(h)
            pe = self._gathered(kwargs, prev, i).get("position_embeddings")
        ctx = PruneContext(point=i, stage=self.points.index(i), h=h, x=x, pe=pe, valid=valid, img=img,
                           n_img0=(image_mask.to(h.device) & valid0).sum(1), positions=positions, owner=self,
                           h_in=self._captured.get(-1, (None,))[0], valid0=valid0, image0=image_mask.to(h.device),
                           kwargs={**kwargs, **self._gathered(kwargs, prev, i)} if self.needs_grad else None)
        drop = self.method.drop(ctx)
        if isinstance(drop, tuple):  # (drop, hidden states with some image columns rewritten: token recycling)
            drop, h = drop
            if h.shape != ctx.h.shape:
                raise RuntimeError(f"{self.method.name}: rewritten hidden states must keep shape {tuple(ctx.h.shape)}")
        if drop.shape != (B, L) or drop.dtype != torch.bool:
            raise RuntimeError(f"{self.method.name}: drop must be a [B, L] bool mask, got {tuple(drop.shape)}")
        drop = drop & img
        dead_rel = ~live | drop  # [B, L] dropped now or earlier (hidden)
        d = dead_rel.sum(1)
        dmin = int(d.min()) if B else 0
        phys = dead_rel & (dead_rel.long().cumsum(1) <= dmin)  # the first dmin dead columns of each row
        keep_rel = (~phys).nonzero()[:, 1].view(B, L - dmin)  # increasing within each row
        keep_idx = positions.gather(1, keep_rel)
        key_valid = ~dead_rel.gather(1, keep_rel)
        dead = dead0.clone()
        dead.scatter_(1, positions, dead_rel | dead0.gather(1, positions))
        plan = StagePlan(point=i, keep_idx=keep_idx, key_valid=key_valid, orig_len=L0, dead=dead,
                     shift=(dead & valid0).sum(1), new_pos=None)
        if self.method.compact_positions:
            plan.new_pos = self._compact(plan, kwargs, valid0, h, i)
        self._plans.append(plan)
        return gather_seq(h, keep_rel, 1)

    def _layer_grad(self, layer: int, h: torch.Tensor, kwargs: dict[str, Any], loss_fn: Callable,
                    autocast_dtype: torch.dtype | None) -> torch.Tensor:
        """The backward capability: layer `layer` re-run with the stage's own hooks off (no pruning, no capture)."""
        pending, self._pending = self._pending, None
        try:
            return layer_input_grad(self.layers[layer], h, kwargs, loss_fn, autocast_dtype)
        finally:
            self._pending = pending

    def _rope(self, x: torch.Tensor, pos: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the decoder's rotary embedding at `pos` for layer i (Gemma 3: per layer type)."""
        if self._typed_rope and self._layer_types is not None:
            return tuple(self.rotary(x, pos, self._layer_types[i]))
        return tuple(self.rotary(x, pos))

    def _compact(self, plan: StagePlan, kwargs: dict[str, Any], valid0: torch.Tensor, h: torch.Tensor,
                 i: int) -> torch.Tensor | None:
        """[B, L'] position ids of the kept columns renumbered without the dropped ones (1-D RoPE), or None."""
        pid, pe = kwargs.get("position_ids"), kwargs.get("position_embeddings")
        if self.rotary is None or (pid is not None and (not isinstance(pid, torch.Tensor) or pid.dim() != 2)) \
                or not (isinstance(pe, tuple) and len(pe) == 2 and pe[0].dim() == 3):
            return None  # M-RoPE or no rotary module: original positions are kept (documented)
        B, L0 = plan.dead.shape
        if pid is None:
            pid = torch.arange(L0, device=plan.dead.device).expand(B, L0)
        pid = pid.expand(B, L0) if pid.shape[0] == 1 else pid
        before = (plan.dead & valid0).long().cumsum(1)  # dropped columns at or before each column
        return (pid.to(before.device) - before).gather(1, plan.keep_idx)

    # ---- pruning / remapping --------------------------------------------------------------------
    def _make_layer_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            return self._layer_hook(i, args, kwargs)

        return hook

    def _layer_hook(self, i: int, args: tuple, kwargs: dict[str, Any]):
        cache = cache_of(kwargs)
        h = args[0] if args else kwargs["hidden_states"]
        prefill = self._pending is not None
        if prefill:
            if i in self._score:
                h = self._prune(i, h, kwargs)
                if cache is not None:
                    try:
                        self._cache_plans[cache] = list(self._plans)
                    except TypeError:
                        pass
            if not self._plans:
                return None
            kwargs = dict(kwargs)
            kwargs.update(self._gathered(kwargs, self._plans[-1], i))
        else:
            plan = self._decode_plan(cache, i)
            if plan is None:
                return None
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = decode_mask(kwargs.get("attention_mask"), plan, h.shape[1], cache, i)
            if plan.new_pos is not None:
                kwargs.update(self._decode_positions(kwargs, plan, h, i))
        if args:
            args = (h, *args[1:])
        else:
            kwargs["hidden_states"] = h
        return args, kwargs

    def _decode_plan(self, cache: Any, i: int) -> StagePlan | None:
        if cache is None:
            return None
        try:
            plans = self._cache_plans.get(cache)
        except TypeError:
            return None
        if not plans:
            return None
        cur = None
        for p in plans:
            if p.point <= i:
                cur = p
        return cur

    def _gathered(self, kwargs: dict[str, Any], plan: StagePlan | None, i: int) -> dict[str, Any]:
        """attention_mask / position_embeddings / position_ids of the plan's columns, computed once per forward."""
        names = ("attention_mask", "position_embeddings", "position_ids")
        src = {k: kwargs.get(k) for k in names}  # the decoder passes every layer the full-length originals
        if plan is None:
            return src
        out: dict[str, Any] = {}
        idx = plan.keep_idx
        for name in names:
            v = src[name]
            key = (name, id(v), plan.point)
            if key in self._fwd_cache:
                out[name] = self._fwd_cache[key][1]
                continue
            if name == "attention_mask":
                new = prefill_mask(v, plan)
            elif name == "position_embeddings" and v is not None:
                if plan.new_pos is not None:
                    new = self._rope(v[0], plan.new_pos.to(v[0].device), i)
                else:
                    new = tuple(gather_seq(t, idx.to(t.device), 1) for t in v)
            elif name == "position_ids" and isinstance(v, torch.Tensor):
                if plan.new_pos is not None:
                    new = plan.new_pos.to(v.device)
                elif v.dim() == 2:
                    new = gather_seq(v, idx.to(v.device), 1)
                else:  # [3 or 4, B, L] multimodal rope ids
                    new = torch.stack([gather_seq(p, idx.to(v.device), 1) for p in v])
            else:
                new = v
            self._fwd_cache[key] = (v, new)  # keep v alive so its id stays unique during the forward
            out[name] = new
        return out

    def _decode_positions(self, kwargs: dict[str, Any], plan: StagePlan, h: torch.Tensor, i: int) -> dict[str, Any]:
        """Decode steps of a compacted stage: positions moved down by the columns dropped before it."""
        pid = kwargs.get("position_ids")
        B = plan.shift.shape[0]
        if not isinstance(pid, torch.Tensor) or pid.dim() != 2:
            cache = cache_of(kwargs)
            past = int(cache.layers[0].get_seq_length()) if cache is not None else 0
            pid = torch.arange(past, past + h.shape[1], device=h.device).expand(B, -1)
        new = pid.expand(B, -1) - plan.shift.to(pid.device).unsqueeze(1)
        return {"position_ids": new, "position_embeddings": self._rope(h, new, i)}

    # ---- bookkeeping ----------------------------------------------------------------------------
    def _record(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """The last prefill's outcome (`last_removed`, `last_pruned`, `last_kept_per_layer`)."""
        valid0 = image_mask.new_ones(image_mask.shape) if attention_mask is None else attention_mask.bool()
        img0 = image_mask.bool() & valid0.to(image_mask.device)
        n0 = img0.sum(1)
        n_layers = len(self.layers)
        if not self._plans:
            self.last_removed = [0] * image_mask.shape[0]
            self.last_pruned = [img0.new_zeros(0, dtype=torch.long) for _ in range(image_mask.shape[0])]
            self.last_kept_per_layer = [[int(n)] * n_layers for n in n0]
            return
        per_stage = [n0.to(p.dead.device) - (p.dead & img0.to(p.dead.device)).sum(1) for p in self._plans]
        last = self._plans[-1].dead & img0.to(self._plans[-1].dead.device)
        self.last_removed = last.sum(1).tolist()
        self.last_pruned = [r.nonzero().squeeze(1) for r in last]
        kept = []
        for b in range(image_mask.shape[0]):
            row, s = [], -1
            for i in range(n_layers):
                while s + 1 < len(self._plans) and self._plans[s + 1].point <= i:
                    s += 1
                row.append(int(n0[b]) if s < 0 else int(per_stage[s][b]))
            kept.append(row)
        self.last_kept_per_layer = kept
