"""In-encoder token merging for ViTs (ToMe, Bolya et al. ICLR'23): fewer tokens after every block.

Inside each transformer block, between the attention and the MLP, `r_l` patch tokens are merged by the registered
compressor (normally `tome`), with the block's attention keys averaged over heads as the similarity `metric` and the
running token sizes as `size`; CLS/register tokens are the `prefix` and never merge. Later blocks use proportional
attention: log(size) of every key is added to the attention logits, passed as an additive float mask to the model's
own attention (SDPA stays SDPA; no eager attention needed). The final hidden states hold fewer tokens; CLS pooling
is unchanged, SigLIP's attention-pooling head gets the same log(size) bias.

Budget: `keep` (int tokens, or a fraction of the patch tokens) is reached after the last block, with the merges
spread evenly over the blocks (earlier blocks take the remainder), or with option `r`: merge `r` per block until
`keep` remain. A block that merges nothing and sees no merged tokens runs its original forward, so keep = all is
bit-identical to the unpatched model.

Hosts: Hugging Face `dinov2` / `dinov2_with_registers`, `clip_vision_model`, `siglip_vision_model`, and full `clip` /
`siglip` models (their vision tower); timm `VisionTransformer` (standard `Block`s) and open_clip `VisionTransformer`
(`ResidualAttentionBlock`s), also inside an open_clip CLIP model. Patching is per instance (block `forward`
instance attributes), undone exactly by `remove`.

Letters: B batch, N tokens (prefix included), P prefix tokens, C channels, H heads, d head dim.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcompress.hf.adapter import Adapter, register_adapter

_HF_VISION = {
    # model_type: (attribute path to the vision root or "" for the model itself, block family)
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
    "clip_vision_model": "clip",
    "clip": "clip",
    "siglip_vision_model": "clip",
    "siglip": "clip",
}


class _Capture:
    """Output of one module during a `with` block (a forward hook removed on exit)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.out: torch.Tensor | None = None

    def __enter__(self) -> _Capture:
        def hook(_m, _i, o):
            self.out = o

        self.handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def _head_mean(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*d] projection output -> [B, N, d] mean over heads (ToMe's metric)."""
    B, N, _ = t.shape
    return t.reshape(B, N, heads, -1).mean(2)


# ---- block forwards with proportional attention and a merge between attention and MLP ---------------------------
# Each takes (block, x [B, N, C], bias [B, 1, 1, N] or None, merge(x, keys) -> x) and mirrors the host's own forward.

def _run_dinov2(blk: nn.Module, x: torch.Tensor, bias, merge: Callable, heads: int) -> torch.Tensor:
    res = x
    with _Capture(blk.attention.k_proj) as cap:
        a, _ = blk.attention(blk.norm1(x), attention_mask=bias)
    x = blk.drop_path(blk.layer_scale1(a)) + res
    x = merge(x, _head_mean(cap.out, heads))
    res = x
    return blk.drop_path(blk.layer_scale2(blk.mlp(blk.norm2(x)))) + res


def _run_clip(blk: nn.Module, x: torch.Tensor, bias, merge: Callable, heads: int) -> torch.Tensor:
    res = x
    with _Capture(blk.self_attn.k_proj) as cap:
        a, _ = blk.self_attn(hidden_states=blk.layer_norm1(x), attention_mask=bias)
    x = res + a
    x = merge(x, _head_mean(cap.out, heads))
    return x + blk.mlp(blk.layer_norm2(x))


def _run_timm(blk: nn.Module, x: torch.Tensor, bias, merge: Callable, heads: int) -> torch.Tensor:
    with _Capture(blk.attn.qkv) as cap:
        a = blk.attn(blk.norm1(x), attn_mask=bias)
    x = x + blk.drop_path1(blk.ls1(a))
    B, N, _ = x.shape
    keys = cap.out.reshape(B, N, 3, heads, -1)[:, :, 1].mean(2)  # [B, N, d]
    x = merge(x, keys)
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def _run_open_clip(blk: nn.Module, x: torch.Tensor, bias, merge: Callable, heads: int) -> torch.Tensor:
    mha: nn.MultiheadAttention = blk.attn
    y = blk.ln_1(x)
    C = y.shape[-1]
    w, b = mha.in_proj_weight, mha.in_proj_bias
    keys = _head_mean(F.linear(y, w[C: 2 * C], None if b is None else b[C: 2 * C]), heads)  # one extra k projection
    kpm = None if bias is None else bias[:, 0, 0, :]  # [B, N] float: added to the logits of every query
    yy = y if mha.batch_first else y.transpose(0, 1)
    a = mha(yy, yy, yy, need_weights=False, key_padding_mask=kpm)[0]
    x = x + blk.ls_1(a if mha.batch_first else a.transpose(0, 1))
    x = merge(x, keys)
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


_RUNNERS = {"dinov2": _run_dinov2, "clip": _run_clip, "timm": _run_timm, "open_clip": _run_open_clip}


# ---- host discovery ----------------------------------------------------------------------------------------------
def _timm_vit(model: nn.Module) -> nn.Module | None:
    mod = sys.modules.get("timm.models.vision_transformer")
    return model if mod is not None and isinstance(model, mod.VisionTransformer) else None


def _open_clip_vit(model: nn.Module) -> nn.Module | None:
    mod = sys.modules.get("open_clip.transformer")
    if mod is None:
        return None
    for m in (model, getattr(model, "visual", None)):
        if isinstance(m, mod.VisionTransformer):
            return m
    return None


def _resolve(model: nn.Module) -> tuple[str, nn.Module, nn.Module, int, int]:
    """(family, vision root, block container, prefix tokens, heads) of a supported model."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt in _HF_VISION:
        fam = _HF_VISION[mt]
        root = model
        for attr in ("vision_model", "dinov2"):
            if hasattr(root, attr):
                root = getattr(root, attr)
        cfg = root.config
        layers = root.encoder.layer if fam == "dinov2" else root.encoder.layers
        prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0) if fam == "dinov2" else int(mt.startswith("clip"))
        return fam, root, layers, prefix, int(cfg.num_attention_heads)
    if (vit := _timm_vit(model)) is not None:
        mod = sys.modules["timm.models.vision_transformer"]
        if not all(type(b) is mod.Block for b in vit.blocks):
            raise TypeError(f"model: timm blocks {sorted({type(b).__name__ for b in vit.blocks})} are not supported "
                            "(standard `Block` only)")
        return "timm", vit, vit.blocks, int(vit.num_prefix_tokens), int(vit.blocks[0].attn.num_heads)
    if (vit := _open_clip_vit(model)) is not None:
        mod = sys.modules["open_clip.transformer"]
        blocks = vit.transformer.resblocks
        if not all(type(b) is mod.ResidualAttentionBlock for b in blocks):
            raise TypeError(f"model: open_clip blocks {sorted({type(b).__name__ for b in blocks})} are not supported "
                            "(ResidualAttentionBlock with nn.MultiheadAttention only)")
        return "open_clip", vit, blocks, 1, int(blocks[0].attn.num_heads)
    raise TypeError(f"model: {type(model).__name__} is not a supported ViT")


@register_adapter
class ViTMergeAdapter(Adapter):
    """Progressive in-encoder merging (ToMe) with proportional attention for ViT encoders.

    Options:
        r: tokens merged per block (until `keep` remain); None spreads the merges evenly to reach `keep`.
        prop_attn: add log(size) to the attention logits of merged keys (ToMe's proportional attention).
    """

    model_types = tuple(_HF_VISION)
    options = {"r": None, "prop_attn": True}

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether `model` (no `config.model_type`) is a timm or open_clip ViT this adapter handles."""
        return _timm_vit(model) is not None or _open_clip_vit(model) is not None

    def __init__(self, model: nn.Module, compressor, **options: Any):
        super().__init__(model, compressor, **options)
        r = self.opts["r"]
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ValueError(f"r: expected None or an int >= 0 (tokens merged per block), got {r!r}")
        if compressor.keep == "auto":
            raise ValueError("keep: 'auto' is not supported for in-encoder merging (the token count must be equal "
                             "across the batch inside the encoder); give an int or a fraction")
        missing = [n for n in ("scores", "text", "grid") if n in getattr(compressor, "needs", ())]
        if missing:
            raise ValueError(f"{missing[0]}: compressor {compressor.name!r} needs `{missing[0]}=`, which in-encoder "
                             "merging cannot provide; use a similarity compressor such as 'tome'")
        self.family, self.root, self.blocks, self.prefix, self.heads = _resolve(model)
        self._saved: list[tuple[nn.Module, bool, Any]] = []
        self._size: torch.Tensor | None = None  # [B, N] running sizes during a forward (None: all ones)
        self._plan: list[int] = []
        self._trace: list[int] = []
        self._ms = 0.0

    # ---- patching --------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Give every block (and SigLIP's pooling head) an instance-level forward."""
        for i, blk in enumerate(self.blocks):
            self._patch(blk, self._block_forward(i, blk))
        head = getattr(self.root, "head", None)
        if self.family == "clip" and isinstance(getattr(head, "attention", None), nn.MultiheadAttention):
            self._patch(head, self._head_forward(head))

    def _patch(self, mod: nn.Module, fn: Callable) -> None:
        had = "forward" in mod.__dict__
        self._saved.append((mod, had, mod.__dict__.get("forward")))
        mod.forward = fn

    def detach(self) -> None:
        """Restore every patched module's forward exactly."""
        for mod, had, fwd in reversed(self._saved):
            if had:
                mod.forward = fwd
            else:
                mod.__dict__.pop("forward", None)
        self._saved.clear()
        self._size = None

    # ---- schedule --------------------------------------------------------------------------------------
    def _target(self, n: int) -> int:
        keep = self.compressor.keep
        if isinstance(keep, int):
            if keep > n:
                raise ValueError(f"keep: {keep} tokens asked but the encoder has only {n} patch tokens")
            return keep
        return max(1, min(n, round(keep * n)))

    def schedule(self, n: int) -> list[int]:
        """Tokens merged in each block for `n` patch tokens entering the first block."""
        L = len(self.blocks)
        total = n - self._target(n)
        r = self.opts["r"]
        if r is None:
            return [total // L + (1 if i < total % L else 0) for i in range(L)]
        plan = []
        for _ in range(L):
            plan.append(min(r, total))
            total -= plan[-1]
        return plan

    # ---- forwards ----------------------------------------------------------------------------------------
    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """[B, 1, 1, N] additive log(size) mask, or None when no token is merged yet (or prop_attn is off)."""
        if self._size is None or not self.opts["prop_attn"]:
            return None
        return self._size.log().to(dtype)[:, None, None, :]

    def _merge(self, i: int) -> Callable:
        def merge(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
            r = self._plan[i]
            if r == 0:
                return x
            comp = copy.copy(self.compressor)
            comp.keep = x.shape[1] - self.prefix - r  # this block's budget (the user's keep is for the last one)
            t0 = time.perf_counter()
            out = comp(x, prefix=self.prefix, size=self._size, metric=keys)
            self._ms += (time.perf_counter() - t0) * 1e3
            self._size = out.size  # [B, M] float32
            return out.x

        return merge

    def _block_forward(self, i: int, blk: nn.Module) -> Callable:
        orig = blk.forward  # the bound method (or a previous instance forward)
        run = _RUNNERS[self.family]
        last = len(self.blocks) - 1

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return orig(x, *args, **kwargs)
            bf = blk.attn.batch_first if self.family == "open_clip" else True  # read per call: layouts can change
            h = x if bf else x.transpose(0, 1)  # [B, N, C]
            if i == 0:
                self._size, self._ms = None, 0.0
                self._plan = self.schedule(h.shape[1] - self.prefix)
                self._trace = [h.shape[1]]
            if self._size is None and self._plan[i] == 0:
                out = orig(x, *args, **kwargs)
            else:
                if any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
                    raise ValueError("attention_mask: in-encoder merging does not support an attention mask on the "
                                     "vision tokens (their number changes per block)")
                h = run(blk, h, self._bias(h.dtype), self._merge(i), self.heads)
                out = h if bf else h.transpose(0, 1)
            n = out.shape[1] if bf else out.shape[0]
            self._trace.append(n)
            if i == last:
                B = out.shape[0] if bf else out.shape[1]
                self.record([self._trace[0]] * B, [n] * B, self._ms, per_block=list(self._trace[1:]),
                            r=list(self._plan))
            return out

        return forward

    def _head_forward(self, head: nn.Module) -> Callable:
        """SigLIP attention-pooling head with the log(size) bias on its keys (mirrors the host's forward)."""
        orig = head.forward

        def forward(hidden_state: torch.Tensor) -> torch.Tensor:
            bias = self._bias(hidden_state.dtype) if self.enabled else None
            if bias is None or bias.shape[-1] != hidden_state.shape[1]:
                return orig(hidden_state)
            probe = head.probe.repeat(hidden_state.shape[0], 1, 1)
            h = head.attention(probe, hidden_state, hidden_state, key_padding_mask=bias[:, 0, 0, :])[0]
            return (h + head.mlp(head.layernorm(h)))[:, 0]

        return forward
