"""DART (Wen et al., EMNLP'25, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More"): keep the image tokens least duplicated with a few pivot tokens, inside the LLM before layer K.

Rule at layer K (release default K = 2), from what layer K - 1 computed (no attention map needed):

1. pivots: the `pivot_image` (4) image tokens and the `pivot_text` (4) tokens after the last image token whose keys
   in layer K - 1 (rotary applied, all query heads concatenated) have the largest L1 norms;
2. per-pivot quota `ceil(budget // (pivot_image + pivot_text))`, with budget = `max_num_trunction` (the release's
   scripts: 128) or, without it, `n_img * (1 - reduction_ratio)`;
3. for each pivot in turn (the order of a Python set of their columns, as the release iterates), the quota of
   still-unpicked, non-pivot image tokens least cosine-similar to it, compared on the output of layer K - 1 passed
   through the decoder's final norm;
4. kept: the image pivots and every pick (so `pivot_image + 8 * quota` tokens: 132 at the scripts' budget of 128),
   in their original order, at their original positions.

`keep` through `mmc.apply(model, "dart", keep=...)`: an int is the release's `max_num_trunction`; a fraction f is
`reduction_ratio = 1 - f`. DART prunes once, so the budget is what layers K .. end see (not an average over layers).

Release: ZichenWen1/DART, `get_retained_image_token` in llava/model/language_model/modeling_llama_self.py (see
docs/fidelity_inllm.md for the commit and what agrees).

Letters: B batch, L tokens entering layer K, C channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmcompress.inllm.stage import PruneContext

__all__ = ["DARTRule", "dart_quota"]


def dart_quota(n_img: int, max_num_trunction: int | None, reduction_ratio: float, pivots: int) -> int:
    """Tokens each pivot picks: ceil(budget // pivots), budget = max_num_trunction or n_img * (1 - reduction_ratio)."""
    budget = max_num_trunction if max_num_trunction is not None else n_img * (1 - reduction_ratio)
    return int(math.ceil(budget // pivots))


class DARTRule:
    """DART on the shared in-LLM stage.

    Args:
        k: first layer that sees the pruned sequence (>= 1); pivots and duplication come from layer k - 1. Release 2.
        max_num_trunction: the release's token budget (int), or None to use `reduction_ratio`.
        reduction_ratio: fraction of image tokens removed when `max_num_trunction` is None, in [0, 1).
        pivot_image: image pivots (release 4). pivot_text: text pivots after the image (release 4).
    """

    name = "dart"
    compact_positions = False

    def __init__(self, k: int = 2, max_num_trunction: int | None = 128, reduction_ratio: float = 0.778,
                 pivot_image: int = 4, pivot_text: int = 4):
        for nm, v in (("dart_pivot_image", pivot_image), ("dart_pivot_text", pivot_text)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{nm}: expected an int >= 0, got {v!r}")
        if pivot_image + pivot_text == 0:
            raise ValueError("dart_pivot_image: at least one pivot (image or text) is needed")
        if max_num_trunction is not None and (isinstance(max_num_trunction, bool) or
                                              not isinstance(max_num_trunction, int) or max_num_trunction < 0):
            raise ValueError(f"keep: DART's token budget must be an int >= 0, got {max_num_trunction!r}")
        if isinstance(reduction_ratio, bool) or not isinstance(reduction_ratio, (int, float)) \
                or not 0.0 <= reduction_ratio < 1.0:
            raise ValueError(f"keep: DART's reduction ratio must lie in [0, 1), got {reduction_ratio!r}")
        self.k, self.points = k, (k,)
        self.max_num_trunction, self.reduction_ratio = max_num_trunction, float(reduction_ratio)
        self.pivot_image, self.pivot_text = pivot_image, pivot_text

    @property
    def active(self) -> bool:
        return True

    def score_layer(self, point: int) -> int:
        return point - 1

    def drop(self, ctx: PruneContext) -> torch.Tensor:
        q, k = ctx.qk()  # [B, H, L, D], [B, Hk, L, D]
        B, _, L, _ = k.shape
        n_rep = max(1, q.shape[1] // k.shape[1])
        keys = k.repeat_interleave(n_rep, dim=1).transpose(1, 2).reshape(B, L, -1)  # [B, L, H * D] as the release
        l1 = torch.norm(keys, p=1, dim=-1)  # [B, L]
        hid = ctx.final_norm(ctx.h)  # [B, L, C]
        drop = torch.zeros_like(ctx.img)
        for b in range(B):
            drop[b] = self._drop_one(l1[b], hid[b], ctx.img[b], ctx.valid[b])
        return drop

    def _drop_one(self, l1: torch.Tensor, hid: torch.Tensor, img: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        cols = img.nonzero().squeeze(1)  # image columns, increasing
        n = int(cols.numel())
        if n == 0:
            return torch.zeros_like(img)
        base = int(valid.nonzero()[0, 0])  # first live column: column indices as in a solo, unpadded run
        after = valid.clone()
        after[: int(cols[-1]) + 1] = False
        text_cols = after.nonzero().squeeze(1)
        pi = cols[l1[cols].topk(min(self.pivot_image, n)).indices]
        pt = text_cols[l1[text_cols].topk(min(self.pivot_text, int(text_cols.numel()))).indices]
        quota = dart_quota(n, self.max_num_trunction, self.reduction_ratio, self.pivot_image + self.pivot_text)
        img_piv = [int(c) - base for c in pi.tolist()]
        txt_piv = [int(c) - base for c in pt.tolist()]
        kept = set(img_piv)
        remaining = sorted(set((cols - base).tolist()) - kept)
        for p in list(set(img_piv + txt_piv)):  # the release's iteration order (a Python set of columns)
            if not remaining or quota <= 0:
                break
            cand = torch.tensor(remaining, device=hid.device) + base
            sim = -F.cosine_similarity(hid[p + base], hid[cand], dim=-1)
            top = sim.topk(min(quota, len(remaining))).indices.tolist()
            picked = {remaining[i] for i in top}
            kept |= picked
            remaining = [c for c in remaining if c not in picked]
        keep = torch.zeros_like(img)
        keep[torch.tensor(sorted(kept), dtype=torch.long, device=img.device) + base] = True
        return img & ~keep
