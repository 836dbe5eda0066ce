"""`cdpruner`: conditional DPP selection (CDPruner, Zhang et al., NeurIPS'25), clean-room from the paper.

"Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs". The kept set is
the (greedy) maximum a posteriori subset of a determinantal point process whose kernel couples the similarity of
the tokens with their relevance to the instruction:

1. similarity S = cos(m_i, m_j) on the similarity features m (`metric` if given, else x);
2. relevance: the mean over the L text embeddings of the cosine between each token of x and the text, negated
   (`negate=True`, see below), then min-max scaled per sample to (0, 1]: r = (v - min v + 1e-6) / (max v - min v);
   with `theta` set, r <- exp(theta / (2 (1 - theta)) * r) (the paper's optional relevance strength);
3. kernel L = diag(r) S diag(r);
4. greedy MAP inference (Chen et al., NeurIPS'18): repeatedly add the token with the largest remaining
   log-determinant gain, tracked by an incremental Cholesky factor (O(k·N) memory for the factor, O(k²·N) time,
   plus the O(N²·d) kernel). Ties go to the lowest index.

Only the kept set matters: the kept tokens are passed on unchanged, in their original order (`select_only`).

The sign: the authors' release computes the relevance from CLIP's patch and text embeddings and negates it
(their issue #9/#14: CLIP's patch-text cosine runs opposite to relevance in LLaVA); the paper's formula has no
sign. `negate=True` (default) computes what the release computes; `negate=False` is the paper's formula. When the
kernel's rank is exhausted (k > rank, e.g. fewer channels than k), the release divides by sqrt of a zero or
negative gain and its picks become NaN-driven; here the remaining picks go to the largest remaining gain (clamped
at 0, ties to the lowest index) without updating the factor, so k distinct tokens are always kept.

Letters: B batch, N tokens (prefix removed), k budget, L text length, d similarity features.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.compressors.baselines import selection_plan
from mmcompress.compressors.merge_ops import cosine_normalize
from mmcompress.registry import register


def relevance(x: torch.Tensor, text: torch.Tensor, negate: bool = True, theta: float | None = None) -> torch.Tensor:
    """Per-token relevance to the instruction.

    Args:
        x: [B, N, C] tokens.
        text: [B, L, C] text embeddings in the same space.
        negate: negate the mean cosine before scaling (the authors' release); False is the paper's formula.
        theta: optional relevance strength in (0, 1): r <- exp(theta / (2 (1 - theta)) * r).

    Returns:
        [B, N] float32 relevance, min-max scaled per sample to (0, 1] (then exponentiated when theta is set);
        all ones when every token is equally relevant.
    """
    u = cosine_normalize(x.float())  # [B, N, C]
    t = cosine_normalize(text.float())  # [B, L, C]
    v = torch.matmul(u, t.transpose(1, 2)).mean(dim=2)  # [B, N]
    if negate:
        v = -v
    lo = v.min(dim=1, keepdim=True).values
    hi = v.max(dim=1, keepdim=True).values
    span = hi - lo
    r = torch.where(span > 0, (v - lo + 1e-6) / span.clamp_min(torch.finfo(v.dtype).tiny), torch.ones_like(v))
    if theta is not None:
        r = torch.exp(theta / (2.0 * (1.0 - theta)) * r)
    return r


def greedy_dpp(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP inference of a DPP by incremental Cholesky updates.

    Args:
        kernel: [B, N, N] symmetric positive semi-definite kernel (float32).
        k: tokens to choose, 1 <= k <= N.

    Returns:
        [B, k] int64 chosen indices, in selection order.
    """
    B, N, _ = kernel.shape
    dev = kernel.device
    ar = torch.arange(B, device=dev)
    c = kernel.new_zeros(k, B, N)  # [k, B, N] rows of the incremental Cholesky factor
    gain = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # [B, N] remaining gain d_i^2
    taken = torch.zeros(B, N, dtype=torch.bool, device=dev)
    chosen = torch.empty(B, k, dtype=torch.long, device=dev)
    for i in range(k):
        j = gain.masked_fill(taken, float("-inf")).argmax(dim=1)  # [B]
        chosen[:, i] = j
        dj = gain[ar, j]  # [B]
        ok = dj > 0  # a gain <= 0 means the kernel's rank is exhausted: no factor update
        # e = (L[j, :] - sum_t c_t[j] c_t[:]) / sqrt(d_j^2)
        proj = torch.einsum("tb,tbn->bn", c[:i, ar, j], c[:i]) if i else 0.0  # [B, N]
        e = (kernel[ar, j] - proj) / torch.where(ok, dj, torch.ones_like(dj)).sqrt().unsqueeze(1)  # [B, N]
        e = torch.where(ok.unsqueeze(1), e, torch.zeros_like(e))
        c[i] = e
        gain = gain - e.square()
        taken[ar, j] = True
    return chosen


@register("cdpruner")
class CDPruner(Compressor):
    """Keep the greedy MAP subset of a DPP whose kernel is the token similarity weighted by relevance to `text`.

    Args:
        keep: budget (see `Compressor`).
        negate: negate the text relevance as the authors' release does for CLIP/LLaVA (default); False: the
            paper's formula.
        theta: optional relevance strength in (0, 1) (the release leaves it off: None).
        epsilon: target error for keep="auto" (the `adaptive` estimator picks the per-sample budget).
    """

    family, modality, needs = "diversity", "image", ("text",)
    select_only = True
    # after the projector: the release's similarity is on the projected tokens, and `text` lives in that space
    encoder_needs = EncoderNeeds(stage="projector")

    def __init__(self, keep: int | float | str = 0.5, *, negate: bool = True, theta: float | None = None,
                 epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if not isinstance(negate, bool):
            raise TypeError(f"negate: expected a bool, got {type(negate).__name__}")
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                                  or not 0.0 < theta < 1.0):
            raise ValueError(f"theta: expected None or a float in (0, 1), got {theta!r}")
        self.negate = negate
        self.theta = None if theta is None else float(theta)

    def kernel(self, inp: Inputs) -> torch.Tensor:
        """[B, N, N] float32 conditional kernel diag(r) S diag(r)."""
        r = relevance(inp.x, inp.text, self.negate, self.theta)  # [B, N]
        u = cosine_normalize(inp.sim.float())  # [B, N, d]
        s = torch.matmul(u, u.transpose(1, 2))  # [B, N, N]
        return r.unsqueeze(2) * s * r.unsqueeze(1)

    def plan(self, inp: Inputs, k: int) -> Plan:
        return selection_plan(greedy_dpp(self.kernel(inp), k), inp.x.shape[1])
