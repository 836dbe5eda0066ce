"""`visiontrim`: dominant tokens by attention + text-guided merging of the rest (VisionTrim, Yu et al., ICLR'26), as
its authors' release computes them.

VisionTrim keeps the "dominant" tokens an attention score ranks highest (DVTS) and turns the others into a few
"complement" tokens chosen and grown by their agreement with the question (TGVC). By default this module computes
what the release (hanxunyu/VisionTrim, `CLIPVisionTower.token_prune_visiontrim`) computes on the same inputs
(docs/fidelity_frontier.md lists the agreement measured and every difference):

1. Budget: of k tokens out, k_d = round(dominant * k) are dominant and k_c = k - k_d complement tokens (the release's
   `DVTS_token_num` / `TGVC_token_num`, 48 / 16 by default: `dominant` = 48/64; `complement=` sets k_c directly).
2. Dominant (DVTS): the k_d tokens with the highest `scores` (ties: lower index first), in source order. Through
   `mmc.apply` the scores are the release's: 0.5 * a / ||a|| + 0.5 * r / ||r|| over the patches, with a the [CLS]
   row of the feature layer's attention and r the attention each patch receives from the other patches (itself
   excluded), heads averaged (`EncoderNeeds(scores="row+received")`; `dvts_scores` computes it from an eager map).
3. Text relevance of each of the R remaining tokens: the mean over the L text tokens of cos(x_i, t_l). The k_c most
   relevant (ties: lower index) are the complement targets, in source order; the other R - k_c tokens are merged.
4. `rounds` times (the release hard-codes 3): each merged token joins the target j maximising
   sum_l cos(x_i, t_l) cos(t_l, T_j) (T_j the target's current value; ties: the first target), and every target
   ADDS the (size-weighted) mean of the tokens that joined it: T_j <- T_j + mean_j (0 when none joined). So the
   complement tokens grow over the rounds (up to 1 + rounds times a token's norm; docs/fidelity_frontier.md
   measures it), and `exact_mean` is False.
   `assign` records the last round's groups; `size` is the sum of member sizes.
5. Order (`CompressOutput.order`): dominant tokens in source order, then complement tokens in source order, as the
   release hands them to the LLM. `x` itself is in source order, as for every compressor.

Options: ``merge="mean"`` (the same groups, each complement token the size-weighted mean of its target and the
tokens of its last-round group: no longer than the longest input), ``order="source"``, ``rounds=``.

Not computed (dead code in the release): its "LTAM" local affinity (`build_token_affinity`) and its combination with
the CLS attention (`combine_importance`), both overwritten before use, and the multi-layer CLS sum. Its in-LLM stage
is commented out in the release and is not built. Its text side is CLIP's text tower on the question and CLIP's
visual projection on the image features; here `text` lives in x's space (through `apply`: the question's LLM input
embeddings, with x the projected image tokens).

Cost: O(N log N) ranking, O(R·L·C) relevance, per round O(k_c·C·L + R·L·k_c) assignment and O(R·C) merge.

Letters: B batch, N tokens (prefix removed), k budget, R remaining tokens, L text tokens, C channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.compressors.merge_ops import accum_dtype, gather_tokens, segment_sum
from mmcompress.compressors.visionzip import rank_desc
from mmcompress.registry import register


def dvts_scores(attn: torch.Tensor, cls: bool = True) -> torch.Tensor:
    """The release's DVTS importance from an eager attention map.

    Args:
        attn: [B, H, N', N'] softmax attention of one layer (the feature layer), N' = N + 1 with a leading CLS.
        cls: True when token 0 is the CLS (the score is then over the N patches, columns 1:); False: no CLS, the
            mean attention each token receives stands in for the CLS row.

    Returns:
        [B, N] float32: 0.5 * a / ||a|| + 0.5 * r / ||r||, a the CLS row (heads averaged), r_j the attention token j
        receives from the other patches (heads averaged, itself excluded).
    """
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn: expected a [B, H, N, N] attention map, got {getattr(attn, 'shape', type(attn))}")
    a = attn.float().mean(1)  # [B, N', N']
    p = a[:, 1:, 1:] if cls else a  # [B, N, N] patch-to-patch
    row = a[:, 0, 1:] if cls else a.mean(1)  # [B, N]
    recv = p.sum(1) - torch.diagonal(p, dim1=1, dim2=2)  # [B, N] received from the other patches
    return 0.5 * F.normalize(row, dim=-1) + 0.5 * F.normalize(recv, dim=-1)


@register("visiontrim")
class VisionTrim(Compressor):
    """Top-`scores` dominant tokens plus text-chosen complement tokens grown from the text-matched rest, as released.

    Args:
        keep: budget (see `Compressor`): dominant + complement tokens.
        dominant: fraction of the budget given to dominant tokens, in [0, 1] (release default: 48 of 64).
        complement: number of complement tokens (overrides `dominant`; the release's `TGVC_token_num`).
        rounds: merge rounds, >= 1 (the release: 3).
        merge: "release" (each round adds the mean of the tokens that joined: target + mean_1 + ... + mean_rounds)
            or "mean" (the same groups; each complement token the size-weighted mean of its last-round group).
        order: "release" (dominant tokens, then complement ones: `CompressOutput.order`) or "source".
        epsilon: target error for keep="auto" (the `adaptive` estimator picks the per-sample budget).
    """

    family, modality, needs = "attention, query", "image", ("scores", "text")
    exact_mean = False
    #: the release ranks by the feature layer's CLS row plus the attention each patch receives (heads averaged),
    #: and compares tokens with the question: after the projector, where `text` (question embeddings) lives.
    encoder_needs = EncoderNeeds(layer="feature", heads="mean", scores="row+received", stage="projector")

    def __init__(self, keep: int | float | str = 0.5, *, dominant: float = 48 / 64, complement: int | None = None,
                 rounds: int = 3, merge: str = "release", order: str = "release", epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if isinstance(dominant, bool) or not isinstance(dominant, (int, float)) or not 0.0 <= dominant <= 1.0:
            raise ValueError(f"dominant: expected a fraction in [0, 1], got {dominant!r}")
        if complement is not None and (isinstance(complement, bool) or not isinstance(complement, int)
                                       or complement < 0):
            raise ValueError(f"complement: expected None or an int >= 0, got {complement!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds: expected an int >= 1, got {rounds!r}")
        for nm, v, ok in (("merge", merge, ("release", "mean")), ("order", order, ("release", "source"))):
            if v not in ok:
                raise ValueError(f"{nm}: expected one of {ok}, got {v!r}")
        self.dominant, self.complement, self.rounds = float(dominant), complement, rounds
        self.merge, self.order = merge, order
        self.exact_mean = merge == "mean"  # the mean option: every output is the size-weighted mean of its members

    def split(self, k: int) -> tuple[int, int]:
        """(k_d, k_c): dominant and complement token counts for a budget of k tokens."""
        if self.complement is not None:
            kc = min(self.complement, k - 1) if k >= 2 else 0
            return k - kc, kc
        kd = min(k, round(self.dominant * k))
        if self.dominant < 1.0 and k >= 2:
            kd = min(kd, k - 1)
        return kd, k - kd

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, C = inp.x.shape
        dev = inp.x.device
        kd, kc = self.split(k)
        rank = rank_desc(inp.scores)  # [B, N]
        dom = rank[:, :kd].sort(dim=1).values  # [B, kd] in source order
        assign = torch.full((B, N), -1, dtype=torch.long, device=dev)
        assign.scatter_(1, dom, torch.arange(kd, device=dev).expand(B, kd))
        if kc == 0:
            return Plan(assign=assign, rep=dom)
        rest = rank[:, kd:].sort(dim=1).values  # [B, R] remaining tokens in source order, R = N - kd > kc
        R = rest.shape[1]
        acc = accum_dtype(inp.x.dtype)
        xr = gather_tokens(inp.x, rest).to(acc)  # [B, R, C]
        tn = F.normalize(inp.text.to(acc), dim=-1)  # [B, L, C]
        i2t = torch.matmul(F.normalize(xr, dim=-1), tn.transpose(1, 2))  # [B, R, L] cos(x_i, t_l)
        pick = rank_desc(i2t.mean(2))[:, :kc].sort(dim=1).values  # [B, kc] targets: positions among the rest
        is_tgt = torch.zeros(B, R, dtype=torch.bool, device=dev)
        is_tgt.scatter_(1, pick, True)
        hid = (~is_tgt).nonzero()[:, 1].view(B, R - kc)  # [B, R - kc] merged tokens' positions, source order
        xh = xr.gather(1, hid.unsqueeze(-1).expand(B, R - kc, C))  # [B, H, C]
        ah = i2t.gather(1, hid.unsqueeze(-1).expand(B, R - kc, i2t.shape[2]))  # [B, H, L]
        w = gather_tokens(inp.sizes().unsqueeze(-1), rest).squeeze(-1).to(acc)  # [B, R] sizes of the rest
        wh = w.gather(1, hid)  # [B, H]
        xw = xh * wh.unsqueeze(-1)  # [B, H, C]
        tgt = xr.gather(1, pick.unsqueeze(-1).expand(B, kc, C))  # [B, kc, C] T_j, grown each round
        near = None
        for r in range(self.rounds):
            t2i = torch.matmul(tn, F.normalize(tgt, dim=-1).transpose(1, 2))  # [B, L, kc] cos(t_l, T_j)
            near = torch.matmul(ah, t2i).argmax(dim=2)  # [B, H] in [0, kc)
            if self.merge == "release" or r < self.rounds - 1:  # the mean option needs no last update
                num = segment_sum(xw, near, kc)  # [B, kc, C]
                den = segment_sum(wh, near, kc)  # [B, kc]
                tgt = tgt + num / den.clamp(min=torch.finfo(acc).tiny).unsqueeze(-1)  # mean 0 where none joined
        slot = torch.empty(B, R, dtype=torch.long, device=dev)
        slot.scatter_(1, pick, torch.arange(kd, kd + kc, device=dev).expand(B, kc))
        slot.scatter_(1, hid, near + kd)
        assign.scatter_(1, rest, slot)
        rep = torch.cat([dom, rest.gather(1, pick)], dim=1)  # [B, k]
        seq = None if self.order == "source" else torch.arange(k, device=dev).expand(B, k)
        if self.merge == "mean":  # base class: size-weighted means of the groups in `assign`
            return Plan(assign=assign, rep=rep, order=seq)
        out = torch.cat([gather_tokens(inp.x, dom).to(acc), tgt], dim=1).to(inp.x.dtype)  # [B, k, C]
        return Plan(assign=assign, rep=rep, x=out, order=seq)
