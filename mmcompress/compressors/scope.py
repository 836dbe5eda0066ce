"""`scope`: saliency x coverage greedy selection (SCOPE, Deng et al., NeurIPS'25), clean-room from the paper.

"SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodal LLMs". The kept set S should cover
every token (each token is as well represented as its most similar kept token) and favour salient tokens:

1. similarity s(i, j) = cos(m_i, m_j) on the similarity features m (`metric` if given, else x);
2. set coverage: f(S) = sum_i max(0, max_{j in S} s(i, j)) (a facility-location function, monotone submodular);
3. greedy: starting from S = {}, repeatedly add the token j not in S maximising
   gain(j) * a_j ** alpha (combine="multi", the default) or gain(j) + a_j ** alpha (combine="add"), where
   gain(j) = f(S + {j}) - f(S) = sum_i max(0, s(i, j) - c_i) with c_i = max(0, max_{j in S} s(i, j)), and
   a = `scores` (the [CLS] attention row; the release sums it over heads, which only rescales the "multi"
   product); alpha = 1. Ties go to the lowest index.

The kept tokens pass on unchanged, in their original order (`select_only`). Cost: O(k·N²) time, O(N²) memory
for the similarity matrix.

The release runs a batch's budget as num_token / batch size per image (on LLaVA-NeXT a batch is one image's
crops); here every sample gets the budget `keep`. It computes in the features' dtype (half on GPU); here in
float32.

Letters: B batch, N tokens (prefix removed), k budget, d similarity features.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.compressors.baselines import selection_plan
from mmcompress.compressors.merge_ops import cosine_normalize
from mmcompress.registry import register


def greedy_coverage(sim: torch.Tensor, saliency: torch.Tensor, k: int, combine: str = "multi") -> torch.Tensor:
    """Greedy saliency-weighted facility-location selection.

    Args:
        sim: [B, N, N] float32 cosine similarities (symmetric).
        saliency: [B, N] float32 saliency, already raised to alpha.
        k: tokens to choose, 1 <= k <= N.
        combine: "multi" (gain x saliency) or "add" (gain + saliency).

    Returns:
        [B, k] int64 chosen indices, in selection order.
    """
    B, N, _ = sim.shape
    dev = sim.device
    ar = torch.arange(B, device=dev)
    cover = sim.new_zeros(B, N)  # [B, N] c_i: coverage of token i by the chosen set (>= 0)
    taken = torch.zeros(B, N, dtype=torch.bool, device=dev)
    chosen = torch.empty(B, k, dtype=torch.long, device=dev)
    for t in range(k):
        gain = (sim - cover.unsqueeze(2)).clamp_min(0).sum(dim=1)  # [B, N] sum over covered tokens i
        score = gain * saliency if combine == "multi" else gain + saliency
        j = score.masked_fill(taken, float("-inf")).argmax(dim=1)  # [B]
        chosen[:, t] = j
        taken[ar, j] = True
        cover = torch.maximum(cover, sim[ar, j])
    return chosen


@register("scope")
class Scope(Compressor):
    """Greedily keep the tokens with the largest coverage gain x saliency (`scores`); drop the rest.

    Args:
        keep: budget (see `Compressor`).
        alpha: exponent of the saliency (release default 1.0).
        combine: "multi" (gain x saliency ** alpha, the release default) or "add".
        epsilon: target error for keep="auto" (the `adaptive` estimator picks the per-sample budget).
    """

    family, modality, needs = "attention, coverage", "image", ("scores",)
    select_only = True
    # the release: [CLS] row of the feature layer's attention (summed over heads: same ranking as the mean);
    # similarity on the encoder features
    encoder_needs = EncoderNeeds(layer="feature", heads="mean")

    def __init__(self, keep: int | float | str = 0.5, *, alpha: float = 1.0, combine: str = "multi",
                 epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
            raise ValueError(f"alpha: expected a float >= 0, got {alpha!r}")
        if combine not in ("multi", "add"):
            raise ValueError(f"combine: expected 'multi' or 'add', got {combine!r}")
        self.alpha = float(alpha)
        self.combine = combine

    def plan(self, inp: Inputs, k: int) -> Plan:
        u = cosine_normalize(inp.sim.float())  # [B, N, d]
        sim = torch.matmul(u, u.transpose(1, 2))  # [B, N, N]
        sal = inp.scores.float() ** self.alpha
        return selection_plan(greedy_coverage(sim, sal, k, self.combine), inp.x.shape[1])
