"""FastV (Chen et al., ECCV'24): drop image tokens inside the LLM, before decoder layer K, by last-token attention.

Layers 0 .. K-1 see every token. The attention row of the LAST prompt token in layer K - 1 (softmax over keys,
averaged over heads) ranks the image tokens; each sample keeps its `round(n_img * (1 - R))` highest (the release's
count, Python/torch round-half-to-even), the others are removed from the hidden states entering layer K, so layers
K .. end (and their KV cache) hold fewer tokens. Kept tokens keep their original position ids (as in the release).

Release: pkunlp-icler/FastV, `fastv_forward` in src/FastV/llava-hf/.../modeling_llama.py (see docs/fidelity_inllm.md).
The mechanics (SDPA kept, `generate()`, ragged batches, exact `detach`) are the shared stage's
(`mmcompress.inllm.stage`); this module only states the rule.

Reuse (any HF decoder whose layers take `attention_mask`, `position_embeddings`, `position_ids`, `cache` kwargs and
whose attention has q_proj/k_proj and a module-level `apply_rotary_pos_emb`, e.g. Llama, Qwen2, Qwen2-VL text):

    >>> fv = FastV(model.model.language_model.layers, k=2, r=0.5)
    >>> fv.attach()
    >>> with fv.armed(image_mask, attention_mask):   # [B, L] bool image positions, [B, L] 0/1 mask, prefill only
    ...     out = model(...)
    >>> fv.detach()

Letters: B batch, L tokens entering layer K.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mmcompress.inllm.stage import InLLM, PruneContext, drop_lowest

__all__ = ["FastV", "FastVRule", "fastv_keep_count"]


def fastv_keep_count(n_img: torch.Tensor, r: float) -> torch.Tensor:
    """[B] image tokens KEPT per sample: round(n_img * (1 - r)), half to even, as the release's Python `round`."""
    return torch.round(n_img.double() * (1.0 - float(r))).long().clamp(min=0)


def check_fastv(k: int, r: float, n_layers: int) -> None:
    """ValueError/TypeError naming `fastv_k` / `fastv_r` when out of range."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"fastv_k: expected an int layer index, got {type(k).__name__}")
    if not 1 <= k < n_layers:
        raise ValueError(f"fastv_k: expected 1 <= K < {n_layers} (the decoder's layer count), got {k}")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
        raise ValueError(f"fastv_r: expected a fraction pruned in [0, 1), got {r!r}")


class FastVRule:
    """FastV on the shared stage: one prune point K, scored by layer K - 1's last-token attention row.

    Args:
        k: first layer that sees the pruned sequence (>= 1). Release default 2.
        r: fraction of each sample's image tokens pruned, in [0, 1). Release default 0.5.
        ceil_keep: None (FastV's count, round(n * (1 - r))), or the fraction KEPT rounded up, ceil(n * ceil_keep)
            (FlashVID's in-LLM stage: `math.ceil(visual_token_length * llm_retention_ratio)`; r is then unused).
        skip_last: the last live image token of each sample is no candidate: always kept, never counted in n
            (LLaVA-OneVision's video newline, which FlashVID's release leaves out of the range it prunes).
    """

    name = "fastv"
    compact_positions = False

    def __init__(self, k: int = 2, r: float = 0.5, *, ceil_keep: float | None = None, skip_last: bool = False):
        self.k, self.r = k, float(r)
        self.ceil_keep, self.skip_last = ceil_keep, bool(skip_last)
        self.points = (k,)

    @property
    def active(self) -> bool:
        return self.r > 0.0 if self.ceil_keep is None else self.ceil_keep < 1.0

    def score_layer(self, point: int) -> int:
        return point - 1

    def drop(self, ctx: PruneContext) -> torch.Tensor:
        s = ctx.last_token_attention()  # [B, L]
        img = ctx.img
        if self.skip_last:  # each sample's last image column stays (LLaVA-OneVision's video newline)
            ar = torch.arange(img.shape[1], device=img.device)
            last = torch.where(img, ar, torch.full_like(ar, -1)).max(1).values  # [B]
            img = img & (ar.unsqueeze(0) != last.unsqueeze(1))
        n = img.sum(1)
        if self.ceil_keep is not None:  # ceil(n * f) in float64, as the release's math.ceil on Python floats
            kept = torch.ceil(n.double() * float(self.ceil_keep)).long()
        else:
            kept = fastv_keep_count(n, self.r)
        return drop_lowest(s, img, n - kept)


class FastV(InLLM):
    """In-LLM image-token pruning at decoder layer `k` by the last token's attention (FastV).

    Args:
        layers: the decoder layers (e.g. `model.model.language_model.layers`).
        k: first layer that sees the pruned sequence (>= 1); scores come from layer k - 1. Release default 2.
        r: fraction of each sample's image tokens pruned, in [0, 1). Release default 0.5. r = 0 changes nothing.
        rope: function (q, k, cos, sin) -> (q, k) applying the rotary embedding; default: the
            `apply_rotary_pos_emb` of the attention module's own module.
    """

    def __init__(self, layers: nn.ModuleList, k: int = 2, r: float = 0.5, rope: Callable | None = None):
        check_fastv(k, r, len(layers))
        super().__init__(layers, FastVRule(k, r), rope=rope)
        self.k, self.r = k, float(r)
