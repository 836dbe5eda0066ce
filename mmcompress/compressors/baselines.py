"""Baselines that belong in every results table: `random` and `uniform` selection.

Letters: B batch, N' tokens (prefix removed), k budget.
"""

from __future__ import annotations

import torch

from mmcompress.compressors.base import Compressor, Inputs, Plan
from mmcompress.registry import register


def selection_plan(idx: torch.Tensor, N: int) -> Plan:
    """Plan that keeps the tokens idx [B, k] (distinct, any order) and drops the rest."""
    B, k = idx.shape
    idx = idx.sort(dim=1).values
    assign = torch.full((B, N), -1, dtype=torch.long, device=idx.device)
    assign.scatter_(1, idx, torch.arange(k, device=idx.device).expand(B, k))
    return Plan(assign=assign, rep=idx)


@register("random")
class RandomSelect(Compressor):
    """Keep k tokens chosen uniformly at random (without replacement), in original order.

    Deterministic: the generator is re-seeded with `seed` on every call, independently per sample.

    Args:
        keep: budget (see `Compressor`).
        seed: random seed.
    """

    family, modality = "baseline", "any"
    select_only = True

    def __init__(self, keep: int | float | str = 0.5, *, seed: int = 0, epsilon: float = 0.1):
        super().__init__(keep, epsilon=epsilon)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.seed = seed

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, _ = inp.x.shape
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        noise = torch.rand(B, N, generator=gen)  # [B, N'] drawn on CPU: same choice on every device
        idx = noise.topk(k, dim=1).indices.to(inp.x.device)
        return selection_plan(idx, N)


@register("uniform")
class UniformSelect(Compressor):
    """Keep k evenly strided tokens: index floor((i + 0.5) * N' / k) for i < k (centred strides)."""

    family, modality = "baseline", "any"
    select_only = True

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, _ = inp.x.shape
        idx = ((torch.arange(k, device=inp.x.device, dtype=torch.float64) + 0.5) * N / k).floor().long()
        return selection_plan(idx.clamp(max=N - 1).expand(B, k), N)
