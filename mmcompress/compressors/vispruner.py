"""`vispruner`: important tokens by visual attention, then de-duplication (VisPruner, Zhang et al., ICCV'25).

"Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs", clean-room from the
paper. The budget k is split into k_imp = floor(important * k) important tokens and k - k_imp diverse ones:

1. important: the k_imp tokens with the highest `scores` (the encoder's [CLS] attention row, averaged over heads);
2. diverse: the remaining tokens, kept in descending-`scores` order, are thinned by rounds of duplicate removal
   until k - k_imp are left. Each round takes r = min(8, R - (k - k_imp)) (R = tokens left), splits the current
   order alternately into A (positions 0, 2, 4, ...) and B (1, 3, 5, ...), scores each A token by its highest
   cosine similarity (on `metric` if given, else x) to any B token, and removes the r most duplicated A tokens.
   The next round's order is the surviving A tokens by descending duplication score, then B in its order.

Both rankings use torch's default (unstable) descending sort, as the release does: exact float ties among the
duplication scores do occur over ~60 rounds, and the order they leave decides the next round's split, so a stable
sort would drift from the release on some inputs. The order of tied entries is torch's, fixed for a given device.

The kept tokens pass on unchanged, in their original order (`select_only`); the rest are dropped. Cost per round
O(R²·d); about (N - k) / 8 rounds.

Differences from the authors' release (measured in docs/fidelity_frontier.md): the release indexes its A/B split
with R // 2 columns, which fails when R is odd (e.g. budgets with N - k_imp odd) or when r exceeds |A|; here A
has ceil(R / 2) tokens and a round removes at most |A|, so every budget works. With R even throughout (e.g. LLaVA's
576 tokens and an even k_imp) the kept set is the release's.

Letters: B batch, N tokens (prefix removed), k budget, R remaining candidates, d similarity features.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.compressors.baselines import selection_plan
from mmcompress.compressors.merge_ops import cosine_normalize, gather_tokens
from mmcompress.registry import register

#: tokens removed per de-duplication round (the paper's schedule).
ROUND = 8


def deduplicate(u: torch.Tensor, cand: torch.Tensor, n: int, step: int = ROUND) -> torch.Tensor:
    """Thin the candidates to n tokens by rounds of alternate-split duplicate removal.

    Args:
        u: [B, N, d] unit-norm features (float32).
        cand: [B, R] candidate indices, in the order the first split uses (descending score).
        n: candidates to keep, 0 <= n <= R.
        step: most tokens removed per round.

    Returns:
        [B, n'] surviving candidate indices (n' = n unless n = 0, which keeps none), in the final round's order.
    """
    if n == 0:
        return cand[:, :0]
    while True:
        R = cand.shape[1]
        a, b = cand[:, ::2], cand[:, 1::2]  # [B, ceil(R/2)], [B, floor(R/2)]
        r = min(step, R - n, a.shape[1])
        if r <= 0 or b.shape[1] == 0:
            return cand
        ua, ub = gather_tokens(u, a), gather_tokens(u, b)  # [B, |A|, d], [B, |B|, d]
        dup = torch.matmul(ua, ub.transpose(1, 2)).max(dim=2).values  # [B, |A|] highest similarity to B
        survivors = dup.argsort(dim=1, descending=True)[:, r:]  # [B, |A| - r]
        cand = torch.cat([a.gather(1, survivors), b], dim=1)


@register("vispruner")
class VisPruner(Compressor):
    """Keep the top-`scores` tokens, fill the rest of the budget with de-duplicated remaining tokens.

    Args:
        keep: budget (see `Compressor`).
        important: fraction of the budget given to the top-`scores` tokens, in [0, 1] (paper and release: 0.5).
        epsilon: target error for keep="auto" (the `adaptive` estimator picks the per-sample budget).
    """

    family, modality, needs = "attention, diversity", "image", ("scores",)
    select_only = True
    # the release: [CLS] row of the feature layer's attention, heads averaged; similarity on the encoder features
    encoder_needs = EncoderNeeds(layer="feature", heads="mean")

    def __init__(self, keep: int | float | str = 0.5, *, important: float = 0.5, epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if isinstance(important, bool) or not isinstance(important, (int, float)) or not 0.0 <= important <= 1.0:
            raise ValueError(f"important: expected a fraction in [0, 1], got {important!r}")
        self.important = float(important)

    def plan(self, inp: Inputs, k: int) -> Plan:
        k_imp = int(k * self.important)
        order = inp.scores.argsort(dim=1, descending=True)  # [B, N]
        u = cosine_normalize(inp.sim.float())  # [B, N, d]
        diverse = deduplicate(u, order[:, k_imp:], k - k_imp)
        return selection_plan(torch.cat([order[:, :k_imp], diverse], dim=1), inp.x.shape[1])
