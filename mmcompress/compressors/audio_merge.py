"""`audio_merge`: neighbour-only merging along time, so order is kept and every output is one contiguous span.

After A-ToMe (Li et al., "Accelerating Transducers through Adjacent Token Merging", Interspeech 2023): speech
encoders emit many near-identical consecutive frames (silence, held vowels), and merging ADJACENT similar frames
shortens the sequence without reordering it, which attention over a monotonic signal (a decoder's cross-attention,
CTC/transducer alignment) relies on. A-ToMe merges adjacent pairs above a similarity threshold layer by layer; here
the budget is exact and met in one pass: the cosine similarity of every pair of neighbours (on `metric`, default x)
is computed once, and the N' - k most similar neighbour boundaries are merged (chains of merged boundaries form one
span). Equivalently, the sequence is cut at its k - 1 least similar boundaries. Outputs are size-weighted means of
their spans, in time order; `pos` holds each span's first frame; `spans(out)` gives [start, end] of every output.

Letters: B batch, N' frames (prefix removed), k outputs, d metric channels.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, Inputs, Plan
from mmcompress.registry import register
from mmcompress.types import CompressOutput

__all__ = ["AudioMerge", "spans"]


@register("audio_merge")
class AudioMerge(Compressor):
    """Merge the most similar neighbouring frames until `keep` contiguous spans remain (see the module docstring)."""

    family, modality, needs = "similarity", "audio", ()

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, _ = inp.x.shape
        dev = inp.x.device
        if k >= N:
            idx = torch.arange(N, device=dev).expand(B, N)
            return Plan(assign=idx.clone(), rep=idx.clone())
        with torch.no_grad():
            f = torch.nn.functional.normalize(inp.sim.float(), dim=-1)  # [B, N', d]
            sim = (f[:, :-1] * f[:, 1:]).sum(-1)  # [B, N'-1] cosine of frame t and t+1
            # cut at the k-1 least similar boundaries; ties -> the earlier boundary (stable order of topk on -sim)
            cut = torch.zeros(B, N - 1, dtype=torch.bool, device=dev)
            if k > 1:
                cut.scatter_(1, (-sim).topk(k - 1, dim=1).indices, True)
            seg = torch.zeros(B, N, dtype=torch.long, device=dev)
            seg[:, 1:] = cut.long().cumsum(1)  # [B, N'] span id of each frame, 0..k-1, non-decreasing
            starts = torch.zeros(B, k, dtype=torch.long, device=dev)
            starts[:, 1:] = cut.nonzero()[:, 1].view(B, k - 1) + 1  # [B, k] first frame of each span
        return Plan(assign=seg, rep=starts)


def spans(out: CompressOutput) -> torch.Tensor:
    """[B, M, 2] int64 (first, last) input index of each output's members (-1, -1 for empty/padded slots).

    For `audio_merge` and `pool` on a 1-D grid every output is contiguous, so this is its time span.
    """
    a = out.assign  # [B, N] slot of each input, -1 dropped
    B, N = a.shape
    M = out.x.shape[1]
    idx = torch.arange(N, device=a.device).expand(B, N)
    valid = a >= 0
    slot = a.clamp(min=0)
    first = torch.full((B, M), N, dtype=torch.long, device=a.device)
    last = torch.full((B, M), -1, dtype=torch.long, device=a.device)
    first.scatter_reduce_(1, slot, torch.where(valid, idx, N), reduce="amin")
    last.scatter_reduce_(1, slot, torch.where(valid, idx, -1), reduce="amax")
    first = torch.where(last < 0, -1, first)
    return torch.stack([first, last], -1)
