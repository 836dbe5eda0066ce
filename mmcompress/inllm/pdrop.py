"""PyramidDrop (Xing et al., CVPR'25): the LLM in stages; at the end of each stage a fraction of the image tokens is
dropped by the last instruction token's attention, so deeper stages see geometrically fewer image tokens.

Rule (release defaults: `layer_list = [8, 16, 24]` on a 32-layer LLM, ratios `[0.5, 0.25, 0.125]`, i.e. lambda =
0.5): before layer `layers[s]` each sample keeps `int(n_img * lambda ** (s + 1))` of its ORIGINAL image count (floor),
the highest-ranked by the attention of the last prompt token over the keys, computed with layer `layers[s]`'s own
query/key projections on its (normed, unpruned) input and averaged over heads. Kept tokens are renumbered 0..L'-1
(the release rebuilds `position_ids` as `arange` after every drop; 1-D RoPE. M-RoPE families keep their original
ids). On other depths the default stage boundaries are the quarters (N // 4, N // 2, 3 N // 4).

`keep` (a fraction) is the AVERAGE share of image tokens over the LLM's layers, as the paper's tables count tokens
(sum over layers of image tokens seen / number of layers): lambda is the root of

    keep = (l1 + (l2 - l1) lambda + (l3 - l2) lambda^2 + (N - l3) lambda^3) / N        (stage lengths l1, l2 - l1, ...)

(floors ignored), so with the default boundaries keep >= l1 / N (lambda = 0). `keep=None, pdrop_lambda=0.5` runs the
release's setting (average 0.469 on 32 layers).

Release: Cooperx521/PyramidDrop, `pdrop_rank_drop` / `pdrop_forward` in llava/model/modeling_llama_pdrop.py (see
docs/fidelity_inllm.md).

Letters: B batch, L tokens entering a prune layer, N decoder layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmcompress.inllm.stage import PruneContext, drop_lowest

__all__ = ["PDropRule", "pdrop_default_layers", "pdrop_average", "pdrop_lambda_for"]


def pdrop_default_layers(n_layers: int) -> tuple[int, ...]:
    """The release's [8, 16, 24] on 32 layers; the quarters of other depths (duplicates and 0 removed)."""
    pts = sorted({n_layers // 4, n_layers // 2, (3 * n_layers) // 4} - {0})
    return tuple(pts)


def pdrop_average(layers: Sequence[int], ratios: Sequence[float], n_layers: int) -> float:
    """Average share of image tokens over `n_layers` layers when layers >= layers[s] keep ratios[s] (floors ignored)."""
    bounds = [0, *layers, n_layers]
    shares = [1.0, *ratios]
    return sum((bounds[i + 1] - bounds[i]) * shares[i] for i in range(len(shares))) / n_layers


def pdrop_lambda_for(keep: float, layers: Sequence[int], n_layers: int) -> float:
    """lambda in [0, 1] whose pyramid averages `keep` over the layers (bisection; the average is increasing)."""
    lo_avg = pdrop_average(layers, [0.0] * len(layers), n_layers)
    if not lo_avg - 1e-12 <= keep <= 1.0:
        raise ValueError(f"keep: pdrop with prune layers {list(layers)} of {n_layers} keeps on average between "
                         f"{lo_avg:.4f} (lambda = 0) and 1, got {keep!r}; pass pdrop_layers= with earlier layers")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if pdrop_average(layers, [mid ** (s + 1) for s in range(len(layers))], n_layers) < keep:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class PDropRule:
    """PyramidDrop on the shared in-LLM stage.

    Args:
        layers: prune layers (each the first layer of a new stage), increasing, >= 1.
        ratios: share of the ORIGINAL image tokens kept from layers[s] on, one per layer (release: lambda ** (s+1)).
    """

    name = "pdrop"
    compact_positions = True

    def __init__(self, layers: Sequence[int], ratios: Sequence[float]):
        layers, ratios = tuple(layers), tuple(float(r) for r in ratios)
        if len(layers) != len(ratios) or not layers:
            raise ValueError(f"pdrop_layers: expected one ratio per layer, got layers {list(layers)} and ratios "
                             f"{list(ratios)}")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in layers):
            raise TypeError(f"pdrop_layers: expected ints, got {list(layers)}")
        if not all(0.0 <= r <= 1.0 for r in ratios) or list(ratios) != sorted(ratios, reverse=True):
            raise ValueError(f"pdrop_lambda: ratios must be non-increasing in [0, 1], got {list(ratios)}")
        self.points, self.ratios = layers, ratios

    @property
    def active(self) -> bool:
        return any(r < 1.0 for r in self.ratios)

    def score_layer(self, point: int) -> int:
        return point

    def drop(self, ctx: PruneContext) -> torch.Tensor:
        s = ctx.last_token_attention()  # [B, L] softmax row of the last prompt token, mean over heads
        ratio = self.ratios[ctx.stage]
        keep = torch.tensor([int(n * ratio) for n in ctx.n_img0.tolist()], device=s.device)  # release: int(n * r)
        n = ctx.img.sum(1)
        return drop_lowest(s, ctx.img, (n - keep).clamp(min=0))
