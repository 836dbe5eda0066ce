"""`idpruner`: maximal marginal relevance of importance against similarity (IDPruner, Tan et al., arXiv 2602.13315).

"IDPruner: Harmonizing Importance and Diversity in Visual Token Pruning for MLLMs" (Tencent AngelSlim), clean-room
from the paper and from running the release beside this module (docs/fidelity_frontier.md). Tokens are chosen
greedily by maximal marginal relevance:

1. importance: the raw scores s min-max scaled per sample, imp = (s - min s) / (max s - min s + 1e-6);
2. similarity: cosine of the tokens x, x_i / (|x_i| + 1e-8);
3. the first pick is the most important token; then each step adds
   argmax_{i not chosen} lambda * imp_i - (1 - lambda) * max_{j chosen} cos(x_i, x_j)   (`mmr_lambda` = lambda),
   `parallel_k` tokens per step (the top ones of the same score; 1 in the release's configurations).

The kept tokens pass on unchanged, in source order (`select_only`), as the release's keep mask leaves them.

Importance. The release's raw scores come from a learned "Vision Selector" (a small trained scorer, published only
for Qwen2.5-VL 3B and 7B, downloaded from the Hugging Face hub at run time). It is NOT included here: pass its
scores as `scores=` to reproduce the release's selection. Without `scores`, the importance is an attention-free
substitute computed from x alone, uniqueness: s_i = -cos(x_i, mean_j x̂_j) (x̂ the unit tokens), high for tokens
unlike the image's average content (background and repeated texture score low). It costs one O(N·C) pass, needs
nothing from the encoder (so every family and engine can provide it, as the release's selector-based pipeline
needs no attention map either), and is what the MMR's diversity term alone would not give: a preference among
tokens before any is chosen.

Runs after the projector (`EncoderNeeds(stage="projector")`): the release selects among the image's LLM input
embeddings. Cost: the [N, N] cosine matrix (O(N²·C)) plus k / `parallel_k` steps of O(N).

Differences from the release (docs/fidelity_frontier.md): batches of any size (the release asserts batch 1);
one selection per image through `apply` (the release pools every vision token of the sequence, all images, into
one selection); ties go to the lower index (the release's `topk` leaves them unspecified).

Letters: B batch, N tokens (prefix removed), k budget, C channels.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.compressors.baselines import selection_plan
from mmcompress.registry import register


def uniqueness(x: torch.Tensor) -> torch.Tensor:
    """[B, N] attention-free importance: minus the cosine of each token to the mean of the unit tokens; x: [B, N, C]."""
    u = x.float()
    u = u / (u.norm(dim=-1, keepdim=True) + 1e-8)  # [B, N, C]
    return -torch.matmul(u, u.mean(dim=1, keepdim=True).transpose(1, 2)).squeeze(2)  # [B, N]


def mmr_select(x: torch.Tensor, scores: torch.Tensor, k: int, lam: float = 0.5, step: int = 1) -> torch.Tensor:
    """Greedy maximal marginal relevance selection.

    Args:
        x: [B, N, C] tokens (compared by cosine in float32).
        scores: [B, N] raw importance (min-max scaled here).
        k: tokens to choose, 1 <= k <= N.
        lam: weight of importance against similarity to the chosen set, in [0, 1].
        step: tokens chosen per step.

    Returns:
        [B, k] int64 chosen indices, in selection order.
    """
    B, N, _ = x.shape
    dev = x.device
    s = scores.detach().float()
    lo, hi = s.min(dim=1, keepdim=True).values, s.max(dim=1, keepdim=True).values
    imp = (s - lo) / (hi - lo + 1e-6)  # [B, N]
    if lam == 1.0:  # importance alone: every step takes the top remaining tokens, i.e. the descending order
        return torch.sort(imp, dim=1, descending=True, stable=True).indices[:, :k]
    u = x.detach().float()
    u = u / (u.norm(dim=-1, keepdim=True) + 1e-8)  # [B, N, C]
    sim = torch.bmm(u, u.transpose(1, 2))  # [B, N, N] symmetric: row i = column i
    flat = sim.view(B * N, N)
    rows = (torch.arange(B, device=dev) * N).unsqueeze(1)  # [B, 1] flat row offset of each sample
    gain = imp * lam  # [B, N] the importance part, constant over the steps
    # highest similarity to the chosen tokens; a chosen token's entry is +inf, so its score below is -inf
    maxsim = torch.full((B, N), -2.0, device=dev)
    penalty, score = torch.empty_like(gain), imp  # first step: importance alone
    chosen = torch.empty(B, k, dtype=torch.long, device=dev)
    done = 0
    while True:
        n = min(step, k - done)
        pick = score.argmax(dim=1, keepdim=True) if n == 1 else score.topk(n, dim=1).indices  # [B, n]
        chosen[:, done : done + n] = pick
        done += n
        if done == k:
            break
        fp = (pick + rows).view(-1)  # [B * n] flat ids of the picks (rows of sim, entries of maxsim)
        near = flat.index_select(0, fp).view(B, n, N)
        torch.maximum(maxsim, near[:, 0] if n == 1 else near.amax(dim=1), out=maxsim)
        maxsim.view(-1).index_fill_(0, fp, float("inf"))
        torch.mul(maxsim, 1.0 - lam, out=penalty)
        score = gain - penalty  # lam imp - (1 - lam) maxsim, the release's two roundings
    return chosen


@register("idpruner")
class IDPruner(Compressor):
    """Keep k tokens by maximal marginal relevance of importance (`scores`, else uniqueness) against similarity.

    Args:
        keep: budget (see `Compressor`).
        mmr_lambda: weight of importance against the similarity to the kept tokens, in [0, 1] (release: 0.5).
        parallel_k: tokens added per greedy step (release: 1).
        epsilon: target error for keep="auto" (the `adaptive` estimator picks the per-sample budget).
    """

    family, modality = "importance, diversity", "image"
    select_only = True
    # the release selects among the image's LLM input embeddings (after the projector / merger)
    encoder_needs = EncoderNeeds(stage="projector")

    def __init__(self, keep: int | float | str = 0.5, *, mmr_lambda: float = 0.5, parallel_k: int = 1,
                 epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if isinstance(mmr_lambda, bool) or not isinstance(mmr_lambda, (int, float)) or not 0.0 <= mmr_lambda <= 1.0:
            raise ValueError(f"mmr_lambda: expected a float in [0, 1], got {mmr_lambda!r}")
        if isinstance(parallel_k, bool) or not isinstance(parallel_k, int) or parallel_k < 1:
            raise ValueError(f"parallel_k: expected an int >= 1, got {parallel_k!r}")
        self.mmr_lambda = float(mmr_lambda)
        self.parallel_k = parallel_k

    def plan(self, inp: Inputs, k: int) -> Plan:
        s = uniqueness(inp.x) if inp.scores is None else inp.scores
        idx = mmr_select(inp.x, s, k, self.mmr_lambda, self.parallel_k)  # [B, k]
        return selection_plan(idx, inp.x.shape[1])
