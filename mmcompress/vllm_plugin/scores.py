"""Attention scores, keys and the CLS token that a compressor's `EncoderNeeds` asks for, read off vLLM's own vision
towers while they run, as `mmc.apply` computes them in transformers.

Imported by the plugin's model classes only. Nothing in vLLM is patched: forward hooks are put on ONE instance's
modules for the duration of one encoder call and removed after it. The q and k a block's attention uses are taken
where vLLM hands them to its encoder attention (`MMEncoderAttention`, after the rotary embedding on Qwen; the q/k
projections' outputs on CLIP/SigLIP), so the attention backend is whatever vLLM chose; with tensor parallelism the
heads of every rank are gathered first, so every rank computes the same scores.

* Qwen2-VL / Qwen2.5-VL / Qwen3-VL (`QwenScores`): as `mmcompress.hf.qwen_vl.vision_scores`: the mean attention each
  patch receives in the LAST vision block (over heads and all queries of its attention segment), averaged over the
  patches of each merged token; Qwen2.5-VL's window order is undone. No keys (they are rotated) and no CLS.
* CLIP / SigLIP towers of LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (`TowerSignals`): as `mmcompress.hf.llava`:
  the block `EncoderNeeds.layer` names, its CLS row (or, without a CLS, the mean attention each token receives),
  heads averaged or one all-channel head, keys as `metric`, the CLS of the feature block's output for `cls_prefix`
  (`attention_scores.encoder_signals` does the arithmetic, as in transformers). vLLM builds the tower only up to
  the feature layer; the block right after it (LLaVA's "last" block, which PruMerge reads) is scored from its own
  pre-norm and q/k weights, which the plugin keeps from the checkpoint (`ExtraQK`).

Letters: S patches of one encoder call, H heads (Hl per rank), D head dim, C' vision width, N tokens of one item.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mmcompress.compressors.attention_scores import attention_row_scores, encoder_signals
from mmcompress.compressors.base import EncoderNeeds
from mmcompress.hf.llava import feature_block

__all__ = ["QwenScores", "TowerSignals", "ExtraQK", "tower_layers", "scoring_block", "wants_signals"]


def _gather_heads(t: torch.Tensor, dim: int, local: int, total: int) -> torch.Tensor:
    """The heads of every tensor-parallel rank along `dim` (rank order = head order), when this rank holds `local`
    of `total` heads."""
    if local == total:
        return t
    from vllm.distributed import tensor_model_parallel_all_gather

    return tensor_model_parallel_all_gather(t.contiguous(), dim=dim)


class _Hooks:
    """Hooks on one instance's modules for the duration of a `with` block."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def pre(self, module: nn.Module, fn: Any) -> None:
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def post(self, module: nn.Module, fn: Any) -> None:
        self.handles.append(module.register_forward_hook(fn))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _qk_of_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    q = kwargs["query"] if "query" in kwargs else args[0]
    k = kwargs["key"] if "key" in kwargs else args[1]
    return q.detach(), k.detach()


# ---- Qwen2-VL / Qwen2.5-VL / Qwen3-VL -----------------------------------------------------------------------------
class QwenScores:
    """Context around one Qwen vision-tower call: records q and k of its last block's attention; `scores(grids)`
    then gives each item's [N_i] scores (see the module docstring).

    Args:
        visual: vLLM's vision tower (`model.visual`).
        num_heads: the tower's attention heads H (all ranks).
    """

    def __init__(self, visual: nn.Module, num_heads: int):
        self.visual, self.num_heads = visual, num_heads
        self.attn = visual.blocks[-1].attn.attn  # MMEncoderAttention of the last block
        self.q: list[torch.Tensor] = []
        self.k: list[torch.Tensor] = []
        self.hooks = _Hooks()

    def __enter__(self) -> QwenScores:
        def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            q, k = _qk_of_call(args, kwargs)  # [1, S, Hl, D] each
            self.q.append(q)
            self.k.append(k)

        self.hooks.pre(self.attn, grab)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.hooks.close()

    def scores(self, grid_thw: list[list[int]]) -> list[torch.Tensor]:
        """Per item [N_i] float32 scores of the merged tokens, in raster order (`grid_thw`: the items' patch grids
        as vLLM's tower got them, in the order of the recorded calls)."""
        if not self.q:
            raise RuntimeError("mmcompress: the vision tower ran without its last block's attention being recorded")
        q = torch.cat([t.reshape(-1, *t.shape[-2:]) for t in self.q])  # [S, Hl, D]
        k = torch.cat([t.reshape(-1, *t.shape[-2:]) for t in self.k])
        q = _gather_heads(q, 1, q.shape[1], self.num_heads)  # [S, H, D]
        k = _gather_heads(k, 1, k.shape[1], self.num_heads)
        v = self.visual
        m2 = v.spatial_merge_size ** 2
        windowed = hasattr(v, "fullatt_block_indexes") and len(v.blocks) - 1 not in v.fullatt_block_indexes
        bounds, order, off = [0], [], 0  # segment ends (patches); window order of the merged tokens
        for t, h, w in grid_thw:
            n = t * h * w
            if hasattr(v, "get_window_index_thw"):  # Qwen2.5-VL: the blocks run in window order
                idx, cu_win = v.get_window_index_thw(t, h, w)
                order.append(idx.to(torch.long) + off // m2)
                ends = cu_win.tolist() if windowed else [(j + 1) * h * w for j in range(t)]
            else:
                ends = [(j + 1) * h * w for j in range(t)]
            bounds += [off + int(e) for e in ends if int(e) > 0]
            off += n
        if off != q.shape[0]:
            raise RuntimeError(f"mmcompress: {q.shape[0]} patches recorded for grids {grid_thw} ({off} patches)")
        scale = float(getattr(self.attn, "scale", q.shape[-1] ** -0.5))
        parts = []
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            qs, ks = q[s:e].transpose(0, 1).unsqueeze(0), k[s:e].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            parts.append(attention_row_scores(qs, ks, torch.arange(e - s, device=q.device), scale=scale)[0])
        u = torch.cat(parts).view(-1, m2).mean(1)  # [S / m^2] per merged token, in the blocks' order
        if order:
            u = u[torch.argsort(torch.cat(order).to(u.device))]
        return list(torch.split(u, [t * h * w // m2 for t, h, w in grid_thw]))


# ---- CLIP / SigLIP (LLaVA families) -------------------------------------------------------------------------------
def tower_layers(tower: nn.Module) -> nn.ModuleList:
    """The encoder blocks vLLM built for a CLIP/SigLIP tower (up to the feature layer)."""
    for name, mod in tower.named_modules():
        if isinstance(mod, nn.ModuleList) and name.endswith("encoder.layers"):
            return mod
    raise ValueError(f"mmcompress: cannot find the encoder blocks of vision tower {type(tower).__name__}")


def scoring_block(hf_config: Any, needs: EncoderNeeds) -> int:
    """The absolute index of the vision block whose attention `needs.layer` names, over the checkpoint's tower (as
    `mmcompress.hf.llava.vision_scores_capture` picks it)."""
    total = hf_config.vision_config.num_hidden_layers
    layer = needs.layer
    if layer == "feature":
        idx = feature_block(None, hf_config.vision_feature_layer)
    else:
        idx = -1 if layer == "last" else int(layer)
    if not -total <= idx < total:
        raise ValueError(f"layer: block {idx} asked but the vision tower has {total} blocks")
    return idx % total


class ExtraQK:
    """The pre-norm and q/k projections of the vision block right after the last one vLLM builds (vLLM builds a LLaVA
    tower only up to its feature layer; PruMerge reads the tower's last block), kept from the checkpoint.

    Args:
        index: the block's index in the checkpoint's tower.
        eps: its LayerNorm epsilon.
    """

    _NAME = re.compile(r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\."
                       r"(layer_norm1|self_attn\.q_proj|self_attn\.k_proj)\.(weight|bias)$")
    _NEED = tuple(f"{p}.{s}" for p in ("layer_norm1", "self_attn.q_proj", "self_attn.k_proj")
                  for s in ("weight", "bias"))

    def __init__(self, index: int, eps: float):
        self.index, self.eps = index, eps
        self.got: dict[str, torch.Tensor] = {}

    def tee(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields every checkpoint weight on to vLLM's loader, keeping a copy of this block's."""
        for name, w in weights:
            m = self._NAME.search(name)
            if m is not None and int(m.group(1)) == self.index:
                self.got[f"{m.group(2)}.{m.group(3)}"] = w.detach().clone()
            yield name, w

    def qk(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's input h [B, N, C'] -> (q, k) [B, N, C'] (all heads)."""
        missing = [n for n in self._NEED if n not in self.got]
        if missing:
            raise RuntimeError(f"mmcompress: vision block {self.index} weights {missing} were not in the checkpoint")
        g = {n: t.to(h.device, h.dtype) for n, t in self.got.items()}
        x = nn.functional.layer_norm(h, h.shape[-1:], g["layer_norm1.weight"], g["layer_norm1.bias"], self.eps)
        q = nn.functional.linear(x, g["self_attn.q_proj.weight"], g["self_attn.q_proj.bias"])
        k = nn.functional.linear(x, g["self_attn.k_proj.weight"], g["self_attn.k_proj.bias"])
        return q, k


def wants_signals(needs: frozenset[str], enc: EncoderNeeds) -> bool:
    """Whether a compressor reads the tower's attention (scores) or keys (metric)."""
    return "scores" in needs or enc.metric is not None


class TowerSignals:
    """Context around one CLIP/SigLIP tower call (all tiles or frames at once): records q and k of every block the
    given declarations score, and the CLS of the feature block's output; then `signals(enc, n_patches)` gives the
    scores [tiles, N'] and metric [tiles, N', d] (or None) one declaration asks for, and `cls` [tiles, 1, C'].

    Args:
        tower: vLLM's vision tower (CLIPVisionModel / SiglipVisionModel).
        hf_config: the LLaVA config (vision_config, vision_feature_layer).
        scored: the declarations whose blocks are scored (compressors that need scores or keys).
        want_cls: record the CLS of the feature block's output (`cls_prefix`).
        extra: the weights of the block after the built ones (`ExtraQK`), or None.
    """

    def __init__(self, tower: nn.Module, hf_config: Any, scored: list[EncoderNeeds], want_cls: bool,
                 extra: ExtraQK | None):
        self.cfg, self.want_cls, self.extra = hf_config, want_cls, extra
        self.layers = tower_layers(tower)
        self.num_heads = hf_config.vision_config.num_attention_heads
        self.feature = feature_block(None, hf_config.vision_feature_layer) % hf_config.vision_config.num_hidden_layers
        built = len(self.layers)
        self.blocks = sorted({scoring_block(hf_config, e) for e in scored})
        for b in self.blocks:
            if b > built or b == built and (extra is None or extra.index != built):
                raise ValueError(f"layer: vision block {b} is scored but vLLM builds this tower only up to block "
                                 f"{built - 1} (its feature layer)")
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cls: torch.Tensor | None = None
        self.hooks = _Hooks()

    def __enter__(self) -> TowerSignals:
        built = len(self.layers)
        for b in self.blocks:
            if b < built:
                def grab_qk(_m: nn.Module, args: tuple, kwargs: dict, b: int = b) -> None:
                    self.qk[b] = _qk_of_call(args, kwargs)  # [tiles, N', Hl * D] each

                self.hooks.pre(self.layers[b].self_attn.attn, grab_qk)
            else:
                def grab_input(_m: nn.Module, _a: tuple, out: Any, b: int = b) -> None:
                    self.qk[b] = self.extra.qk(out[0] if isinstance(out, (tuple, list)) else out)

                self.hooks.post(self.layers[b - 1], grab_input)
        if self.want_cls:
            def grab_cls(_m: nn.Module, _a: tuple, out: Any) -> None:
                h = out[0] if isinstance(out, (tuple, list)) else out
                self.cls = h[:, :1].detach()

            self.hooks.post(self.layers[self.feature], grab_cls)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.hooks.close()

    def signals(self, enc: EncoderNeeds, n_patches: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([tiles, N'] scores, [tiles, N', d] metric or None) over all N' tokens of the block `enc` scores (the CLS
        included when the tower has one), as `mmcompress.hf.llava._row_scores` computes them."""
        b = scoring_block(self.cfg, enc)
        if b not in self.qk:
            raise RuntimeError(f"mmcompress: the vision tower ran without its block {b} being recorded")
        q, k = self.qk[b]
        local = self.num_heads if b >= len(self.layers) else int(
            getattr(self.layers[b].self_attn, "num_heads_per_partition", self.num_heads))
        q = _gather_heads(q, -1, local, self.num_heads)  # [tiles, N', H * D]
        k = _gather_heads(k, -1, local, self.num_heads)
        n_total = q.shape[1]
        rows = 0 if n_total > n_patches else torch.arange(n_total, device=q.device)
        return encoder_signals(q, k, enc, rows, num_heads=self.num_heads)
