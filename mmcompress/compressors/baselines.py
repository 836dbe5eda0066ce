"""Baselines that belong in every results table: `random` and `uniform` selection.

Letters: B batch, N' tokens (prefix removed), k budget.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Iterator, Sequence

import torch

from mmcompress.compressors.base import Compressor, Inputs, Plan
from mmcompress.registry import register

__all__ = ["RandomSelect", "UniformSelect", "sample_keys", "selection_plan"]

# Per-sample keys of the samples in the next `random` calls (set by `sample_keys`; None = derive from the tokens).
_SAMPLE_KEYS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("mmcompress_sample_keys",
                                                                                      default=None)


@contextlib.contextmanager
def sample_keys(keys: Sequence[str | int]) -> Iterator[None]:
    """Within this context, row b of every `random` call draws its choice from (seed, ``keys[b]``).

    A benchmark passes its sample ids here, so that a sample's kept tokens depend on the sample alone, not on the
    batch it shares or on its row in it (``mmcompress bench`` does this around every batch):

        >>> with sample_keys(["q17", "q18"]):
        ...     model.generate(**inputs)            # a 2-sample batch of a model wrapped with mmc.apply(..., "random")

    Args:
        keys: one id (str or int) per sample of the calls made inside the context, in batch order.

    Raises:
        TypeError: `keys` is not a sequence of str/int.
    """
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        raise TypeError(f"keys: expected a sequence of sample ids, got {type(keys).__name__}")
    bad = [k for k in keys if isinstance(k, bool) or not isinstance(k, (str, int))]
    if bad:
        raise TypeError(f"keys: expected str or int sample ids, got {bad[0]!r}")
    token = _SAMPLE_KEYS.set(tuple(str(k) for k in keys))
    try:
        yield
    finally:
        _SAMPLE_KEYS.reset(token)


def _row_seed(seed: int, key: str | bytes) -> int:
    """63-bit generator seed of one row from (seed, key): SHA-256, so nearby keys give unrelated draws."""
    data = key if isinstance(key, bytes) else key.encode()
    digest = hashlib.sha256(str(seed).encode() + b"\x00" + data).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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

    Each row draws its own choice from (`seed`, the row's key), never from its place in the batch, so a sample keeps
    the same tokens whatever batch it runs in. The key is the sample id given by `sample_keys` (what ``mmcompress
    bench`` passes), else the row's tokens themselves (their bytes): ``mmc.create("random", seed=3)(x)`` needs no
    ids, and equal rows get equal choices. Deterministic on every device (drawn on the CPU).

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

    def row_keys(self, x: torch.Tensor) -> list[str | bytes]:
        """The key of each row of x [B, N', C]: the ids of `sample_keys`, else the row's bytes."""
        B = x.shape[0]
        keys = _SAMPLE_KEYS.get()
        if keys is not None:
            if len(keys) != B:
                raise ValueError(f"sample_keys: {len(keys)} sample ids given for a call on {B} rows (random keys "
                                 "each row by its sample's id: one id per row, in batch order)")
            return list(keys)
        raw = x.detach().to("cpu").contiguous()
        return [raw[b].view(torch.uint8).numpy().tobytes() for b in range(B)]

    def plan(self, inp: Inputs, k: int) -> Plan:
        B, N, _ = inp.x.shape
        gen = torch.Generator(device="cpu")
        noise = torch.empty(B, N)  # [B, N'] one independent draw per row
        for b, key in enumerate(self.row_keys(inp.x)):
            gen.manual_seed(_row_seed(self.seed, key))
            noise[b] = torch.rand(N, generator=gen)
        idx = noise.topk(k, dim=1).indices.to(inp.x.device)  # [B, k]
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
