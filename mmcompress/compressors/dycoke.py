"""`dycoke`: DyCoke's token temporal merging (TTM; Tao et al., CVPR'25), as its authors' release computes it.

The release (KD-TAO/DyCoke, `llava/model/llava_arch.py`, `dycole_ttm`) prunes the video tokens of LLaVA-OneVision
after the projector and the 2x2 pooling, frame against frame, by the cosine similarity of the tokens at the SAME
place (`metric` if given, else x). On a (T, H, W) grid with P = H * W tokens per frame:

1. Pairs: every odd frame 2i + 1 is compared with frame 2i; then every frame 4j + 2 with 4j + 2 < T - 2 is compared
   with frame 4j (frame T - 2 is never pruned, nor are frames 4j).
2. A compared ("pruned") frame keeps its q = int((1 - prune) * P) tokens LEAST similar to the same places of its
   partner (release default prune = 0.7: 58 of 196); the others are dropped (no averaging). Every other frame
   stays whole. So the count is fixed by (T, P, prune), not by the content: keep="auto" is this rule (the class
   default; pass it to `mmc.create` / `mmc.apply`, whose own default keep is 0.5).
3. Order (`CompressOutput.order`): frame by frame; a whole frame in place order, a pruned frame's tokens by
   ascending similarity (the order `topk(largest=False)` returns), as the release hands them to the LLM.

A fixed int/float keep (not in the release) keeps the same pairs and order: whole frames stay whole and the pruned
frames share what is left equally (the first ones one more token when it does not divide); a budget below the whole
frames' tokens drops the pruned frames and thins the whole frames to equal shares of evenly spaced places.

Release defects NOT reproduced (docs/fidelity.md): with an odd T the release silently loses the last frame (it is
never appended), here that frame stays whole; with T <= 4 (no second-stage pair) or T = 1 the release crashes on
an empty `torch.stack`, here the pairs that exist are used (T = 1: nothing is compared). The release also runs a
second, in-LLM stage (dynamic KV-cache pruning) that this compressor does not include. `temporal` is our own,
different method (chained merging of consecutive frames with a threshold, scene cuts, then spatial merging).

Letters: B batch, T frames, P tokens per frame, N = T * P tokens (prefix removed), k budget, C channels.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, EncoderNeeds, Inputs, Plan
from mmcompress.registry import register

__all__ = ["DyCoke", "dycoke_pairs"]


def dycoke_pairs(T: int) -> dict[int, int]:
    """{pruned frame: the frame it is compared with} of the release's schedule for T frames (see module doc)."""
    pairs = {i + 1: i for i in range(0, T - 1, 2)}
    pairs.update({i + 2: i for i in range(0, T - 4, 4)})
    return pairs


def _shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal ints, the first ones one larger when it does not divide."""
    q, r = divmod(total, parts)
    return [q + (i < r) for i in range(parts)]


@register("dycoke")
class DyCoke(Compressor):
    """Per frame pair, keep the pruned frame's tokens least similar to its partner's at the same place; drop the rest.

    Args:
        keep: "auto" (default; the release's fixed quota int((1 - prune) * P) per pruned frame) or a budget (see
            the module doc).
        prune: fraction of a pruned frame's tokens dropped by keep="auto" (the release's `dycoke_k`, 0.7), in [0, 1).
        epsilon: unused by this method (kept for a uniform signature).
    """

    family, modality, needs = "similarity", "video", ("grid",)
    select_only = True
    #: the per-token norms of the similarity pass cover every token of x: the finiteness check reads them
    check_in_plan = True
    #: the release runs on the LLM-space frame tokens (after the projector and LLaVA-OneVision's pooling)
    encoder_needs = EncoderNeeds(stage="projector")

    def __init__(self, keep: int | float | str = "auto", *, prune: float = 0.7, epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if isinstance(prune, bool) or not isinstance(prune, (int, float)) or not 0.0 <= prune < 1.0:
            raise ValueError(f"prune: expected a fraction in [0, 1), got {prune!r}")
        self.prune = float(prune)

    @staticmethod
    def _frames(inp: Inputs) -> tuple[int, int]:
        """(T, P): frames and tokens per frame (a 1-D or 2-D grid is one frame)."""
        N = inp.x.shape[1]
        if inp.grid is not None and len(inp.grid) == 3:
            return inp.grid[0], inp.grid[1] * inp.grid[2]
        return 1, N

    def quotas(self, T: int, P: int, k: int | None) -> list[int]:
        """[T] tokens kept per frame: the release's rule (k None) or the shares of a fixed budget k."""
        pairs = dycoke_pairs(T)
        if k is None:
            q = int((1.0 - self.prune) * P)  # the release's int(merging_ratio * num_tokens_per_frame)
            return [q if f in pairs else P for f in range(T)]
        whole = [f for f in range(T) if f not in pairs]
        out = [0] * T
        if k >= len(whole) * P:
            for f in whole:
                out[f] = P
            pruned = sorted(pairs)
            for f, q in zip(pruned, _shares(k - len(whole) * P, len(pruned)) if pruned else [], strict=True):
                out[f] = q
        else:
            for f, q in zip(whole, _shares(k, len(whole)), strict=True):
                out[f] = q
        return out

    def auto_keep(self, inp: Inputs) -> torch.Tensor:
        T, P = self._frames(inp)
        return torch.full((inp.x.shape[0],), sum(self.quotas(T, P, None)), dtype=torch.long, device=inp.x.device)

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, _ = inp.x.shape
        dev = inp.x.device
        T, P = self._frames(inp)
        quotas = self.quotas(T, P, None) if self.keep == "auto" else None
        if quotas is None or sum(quotas) != k:
            quotas = self.quotas(T, P, k)
        pairs = dycoke_pairs(T)
        # rank[b, f]: frame f's places in the order they are handed on; the first quotas[f] of them are kept
        rank = torch.arange(P, device=dev).repeat(T, 1)  # [T, P]: whole frames in place order
        for f, q in enumerate(quotas):
            if 0 < q < P and f not in pairs:  # a whole frame thinned below the schedule: evenly spaced places
                pos = ((torch.arange(q, device=dev, dtype=torch.float64) + 0.5) * P / q).floor().long()
                rank[f, :q] = pos
        rank = rank.expand(B, T, P)
        compared = [f for f in sorted(pairs) if 0 < quotas[f] < P]
        probe = None
        if compared:  # the places least similar to the partner frame, by ascending similarity
            rank = rank.clone()
            fs = torch.tensor(compared, device=dev)
            sim, norm = self._similarity(inp.sim, T, P, pairs, compared)  # [B, F, P], [B, T, P]
            qmax = max(quotas[f] for f in compared)
            # topk as the release calls it (ties among equal values then come out in its order, too)
            rank[:, fs, :qmax] = torch.topk(sim, qmax, dim=2, largest=False).indices
            probe = norm if inp.metric is None else None  # [B, T, P] norms of every token of x
        take = torch.arange(P, device=dev) < torch.tensor(quotas, device=dev).unsqueeze(1)  # [T, P]
        seq = (rank + torch.arange(0, N, P, device=dev).view(1, T, 1))[:, take]  # [B, k] token ids in output order
        rep, slot = seq.sort(dim=1)  # source order; seq = rep[slot]
        order = slot.argsort(dim=1)  # [B, k] the slot of each output
        assign = torch.full((B, N), -1, dtype=torch.long, device=dev)
        assign.scatter_(1, rep, torch.arange(k, device=dev).expand(B, k))
        return Plan(assign=assign, rep=rep, order=order, probe=probe)

    @staticmethod
    def _similarity(m: torch.Tensor, T: int, P: int, pairs: dict[int, int],
                    frames: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, len(frames), P] cosine similarity of each listed frame's tokens to its partner's at the same place,
        [B, T, P] the norms of all tokens).

        Bit for bit the release's values, so that ties and near-ties order as there: a first-stage pair (odd frame
        2i + 1 against 2i) is `F.cosine_similarity(F.normalize(x_2i), F.normalize(x_2i+1))`, a second-stage pair
        (4j + 2 against 4j) `F.cosine_similarity(x_4j, x_4j+2)`, each as those functions round: x / max(|x|, eps)
        per token, product, sum over channels. A looser product, dot / (|x| |y|), reorders places whose
        similarities differ in the last bits (measured: 12 of 18 DINOv2 clips handed the LLM another order).
        Six calls per pair for the whole batch (the release makes about 16 per pair and sample); the norms of the
        first pass serve F.normalize and the finiteness check.
        """
        B, d = m.shape[0], m.shape[-1]
        m = m.detach()  # the selection takes no gradient
        if m.dtype in (torch.float16, torch.bfloat16):
            m = m.float()
        u = m.reshape(B, T, P, d)  # [B, T, P, d]
        norm = torch.linalg.vector_norm(u, dim=-1)  # [B, T, P]
        out = torch.empty(B, len(frames), P, dtype=u.dtype, device=u.device)
        # pair by pair through one reused [B, 2, P, d] buffer (the whole batch per op): clip-wide normalised copies
        # were 1.4-1.8x slower on CPU (16 x 196 x 384/896, batch 1/2), per-sample loops 1.05-1.15x
        buf = torch.empty(B, 2, P, d, dtype=u.dtype, device=u.device)
        den = norm.clamp_min(1e-12).unsqueeze(-1)  # [B, T, P, 1] F.normalize's denominators
        for j, f in enumerate(frames):
            g = pairs[f]
            if f % 2 == 1:  # first stage: F.cosine_similarity(F.normalize(x_g), F.normalize(x_f)), g = f - 1
                torch.div(u[:, g:f + 1], den[:, g:f + 1], out=buf)
                buf.div_(torch.linalg.vector_norm(buf, dim=-1, keepdim=True).clamp_min_(1e-8))
            else:  # second stage: F.cosine_similarity(x_g, x_f), g = f - 2
                torch.div(u[:, g], norm[:, g].clamp_min(1e-8).unsqueeze(-1), out=buf[:, 0])
                torch.div(u[:, f], norm[:, f].clamp_min(1e-8).unsqueeze(-1), out=buf[:, 1])
            torch.sum(torch.mul(buf[:, 0], buf[:, 1], out=buf[:, 0]), dim=-1, out=out[:, j])  # [B, P]
        return out, norm
