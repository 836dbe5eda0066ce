"""`trio_encoder`: TRIO's stage before the LLM (Zhang et al., arXiv 2602.04657): window + global [CLS] selection, merge.

TRIO prunes twice: here, between the vision encoder and the LLM, and again inside the LLM by gradient saliency
(`mmc.apply(model, "trio", keep=32, trio_encoder_keep=96)` runs both: its release's default schedule). This stage,
written from the paper and checked against the release's `encode_images` (docs/fidelity_frontier.md), keeps k of
the N image tokens of one image:

1. local: the patch grid is cut into non-overlapping `window` x `window` blocks (row-major; rows or columns left
   over at the bottom/right belong to no block), and each block keeps its top floor(floor(k · local) / n_blocks)
   tokens by the SHALLOW block's [CLS] attention (`scores[..., 0]`);
2. global: the remaining budget goes to the tokens with the highest DEEP [CLS] attention (`scores[..., 1]`) among
   those not taken in step 1;
3. merge: every other token joins the kept token it is most similar to (cosine of `metric`, else of x: through
   `apply`, the projector's outputs, as in the release), and each kept token becomes the plain mean of itself and the
   tokens that joined it (size-weighted when `size=` is given).

The k outputs stay in the original token order. Through `mmc.apply` the method runs after the projector
(`EncoderNeeds(stage="projector")`) with `scores=` of shape [B, N, 2]: the head-averaged [CLS] rows of block
`shallow_layer` (release: 5) and of the feature block (release: `attentions[-2]`, LLaVA-1.5's feature layer), read
from the hooked q/k of both blocks (`EncoderNeeds(layer=(shallow, deep))`). A [B, N] `scores` serves both steps.

Grids: a (H, W) grid as above; (T, H, W): the blocks tile each frame; (W,): blocks of `window` consecutive tokens.

Letters: B batch, N tokens (prefix removed), k budget, d similarity features, G blocks, A tokens per block.
"""

from __future__ import annotations

import math

import torch

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.compressors.merge_ops import cosine_normalize, gather_tokens
from mmcompress.registry import register

__all__ = ["TRIOEncoder", "window_blocks", "trio_encoder_select"]


def window_blocks(grid: tuple[int, ...], window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[G, A] int64 token indices of the non-overlapping window blocks of a grid, blocks row-major, tokens row-major.

    (H, W): G = (H // window) (W // window) blocks of A = window² tokens; (T, H, W): the same per frame, frame by
    frame; (W,): G = W // window blocks of A = window consecutive tokens. G may be 0 (a grid smaller than a block).
    """
    idx = torch.arange(math.prod(grid), device=device).view(grid)
    if len(grid) == 1:
        g = grid[0] // window
        return idx[: g * window].view(g, window)
    if len(grid) == 2:
        idx = idx.unsqueeze(0)  # [1, H, W]
    T, H, W = idx.shape
    gh, gw = H // window, W // window
    idx = idx[:, : gh * window, : gw * window].reshape(T, gh, window, gw, window)  # [T, gh, ws, gw, ws]
    return idx.permute(0, 1, 3, 2, 4).reshape(T * gh * gw, window * window)


def trio_encoder_select(shallow: torch.Tensor, deep: torch.Tensor, blocks: torch.Tensor, k: int,
                        local: float = 0.5) -> torch.Tensor:
    """[B, k] int64 kept token indices, increasing: per-block top of `shallow`, then the global top of `deep`.

    Args:
        shallow: [B, N] scores ranking tokens within each block.
        deep: [B, N] scores ranking the rest globally.
        blocks: [G, A] token indices of the blocks (`window_blocks`).
        k: budget, 1 <= k <= N.
        local: share of the budget meant for the blocks: each block keeps floor(floor(k · local) / G) tokens (at
            most A); the global step takes the rest. Ties in either ranking go to the lower index.
    """
    B, N = shallow.shape
    G, A = blocks.shape
    per = min(int(k * local) // G, A) if G else 0
    taken = torch.zeros(B, N, dtype=torch.bool, device=shallow.device)
    if per:
        s = shallow[:, blocks]  # [B, G, A]
        top = torch.sort(s, dim=2, descending=True, stable=True).indices[:, :, :per]  # [B, G, per]
        taken.scatter_(1, blocks.expand(B, G, A).gather(2, top).reshape(B, G * per), True)
    rest = k - G * per
    if rest:
        d = deep.float().masked_fill(taken, float("-inf"))  # [B, N] locals excluded (the release zeroes them)
        top = torch.sort(d, dim=1, descending=True, stable=True).indices[:, :rest]  # [B, rest]
        taken.scatter_(1, top, True)
    return taken.nonzero()[:, 1].view(B, k)


@register("trio_encoder")
class TRIOEncoder(Compressor):
    """TRIO's encoder stage: window top by shallow [CLS] attention + global top by deep [CLS] attention, then every
    other token averaged into its most similar kept token.

    Args:
        keep: budget (see `Compressor`); the release's `--visual_token_num` (96 by its README's default).
        window: side of the square blocks (release: 6, on LLaVA-1.5's 24 x 24 grid: 16 blocks).
        local: share of the budget picked within the blocks (release: 1 - global_ratio = 0.5).
        shallow_layer: vision block whose [CLS] row ranks tokens within blocks, read by `apply` (release: 5).
        deep_layer: vision block whose [CLS] row ranks the rest: "feature" (the block that outputs the LLM's
            features; the release's `attentions[-2]` on LLaVA-1.5), "last" or an int index.
        epsilon: target error for keep="auto" (the `adaptive` estimator picks the per-sample budget).
    """

    family, modality, needs = "attention, similarity", "image", ("scores", "grid")
    encoder_needs = EncoderNeeds(layer=(5, "feature"), heads="mean", stage="projector")

    def __init__(self, keep: int | float | str = 0.5, *, window: int = 6, local: float = 0.5,
                 shallow_layer: int | str = 5, deep_layer: int | str = "feature", epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected an int >= 1, got {window!r}")
        if isinstance(local, bool) or not isinstance(local, (int, float)) or not 0.0 <= local <= 1.0:
            raise ValueError(f"local: expected a fraction in [0, 1], got {local!r}")
        for nm, v in (("shallow_layer", shallow_layer), ("deep_layer", deep_layer)):
            if not ((isinstance(v, int) and not isinstance(v, bool)) or v in ("feature", "last")):
                raise ValueError(f"{nm}: expected an int block index, 'feature' or 'last', got {v!r}")
        self.window, self.local = window, float(local)
        self.encoder_needs = EncoderNeeds(layer=(shallow_layer, deep_layer), heads="mean", stage="projector")

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, _ = inp.x.shape
        sc = inp.scores  # [B, N] or [B, N, 2]
        shallow, deep = (sc, sc) if sc.dim() == 2 else (sc[..., 0], sc[..., 1])
        blocks = window_blocks(inp.grid, self.window, inp.x.device)  # [G, A]
        idx = trio_encoder_select(shallow, deep, blocks, k, self.local)  # [B, k]
        u = cosine_normalize(inp.sim)  # [B, N, d]
        nearest = torch.matmul(u, gather_tokens(u, idx).transpose(1, 2)).argmax(dim=2)  # [B, N] first max
        assign = nearest.scatter_(1, idx, torch.arange(k, device=idx.device).expand(B, k))  # kept: their own slot
        return Plan(assign=assign, rep=idx)
