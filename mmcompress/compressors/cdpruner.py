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
    return _relevance(cosine_normalize(x.float()), text, negate, theta)


def _relevance(u: torch.Tensor, text: torch.Tensor, negate: bool, theta: float | None) -> torch.Tensor:
    """`relevance` from the unit-norm tokens u [B, N, C] (float32)."""
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
    gain = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # [B, N] remaining gain d_i^2; chosen ones -inf
    chosen = torch.empty(B, k, dtype=torch.long, device=dev)
    rows = kernel.reshape(B * N, N)  # flat row ids b * N + j (index_select: cheaper than advanced indexing)
    flat_c, flat_gain = c.view(k, B * N), gain.view(B * N)
    for i in range(k):
        j = gain.argmax(dim=1)  # [B]
        chosen[:, i] = j
        bj = j + ar * N  # [B] flat ids
        dj = flat_gain.index_select(0, bj)  # [B]
        ok = dj > 0  # a gain <= 0 means the kernel's rank is exhausted: no factor update
        # e = (L[j, :] - sum_t c_t[j] c_t[:]) / sqrt(d_j^2)
        if i:  # sum_t c_t[j] c_t[:] as one bmm ([B, 1, i] x [B, i, N]; the release's einsum "tb,tbn->bn")
            proj = torch.bmm(flat_c[:i].index_select(1, bj).t().unsqueeze(1), c[:i].transpose(0, 1)).squeeze(1)
        else:
            proj = 0.0
        e = (rows.index_select(0, bj) - proj) / torch.where(ok, dj, 1.0).sqrt().unsqueeze(1)  # [B, N]
        e = torch.where(ok.unsqueeze(1), e, 0.0)
        c[i] = e
        gain -= e.square()
        flat_gain.index_fill_(0, bj, float("-inf"))
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
        u_x = cosine_normalize(inp.x.float())  # [B, N, C]
        r = _relevance(u_x, inp.text, self.negate, self.theta)  # [B, N]
        u = u_x if inp.metric is None else cosine_normalize(inp.sim.float())  # [B, N, d]
        s = torch.matmul(u, u.transpose(1, 2))  # [B, N, N]
        return s.mul_(r.unsqueeze(2)).mul_(r.unsqueeze(1))  # (r_i s_ij) r_j, in place

    def plan(self, inp: Inputs, k: int) -> Plan:
        return selection_plan(greedy_dpp(self.kernel(inp), k), inp.x.shape[1])
