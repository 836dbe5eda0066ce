"""Shared fixtures: call arguments that satisfy each compressor's `needs`."""

from __future__ import annotations

import math

import pytest
import torch

import mmcompress as mmc


def call_kwargs(name: str, x: torch.Tensor, prefix: int = 0, grid=None, seed: int = 0) -> dict:
    """Inputs a compressor needs (scores, text, grid) for x [B, N, C], drawn deterministically from `seed`."""
    cls = mmc.get(name)
    B, N, C = x.shape
    g = torch.Generator().manual_seed(seed)
    kw: dict = {"prefix": prefix}
    if grid is None and "grid" in cls.needs:
        grid = (N - prefix,)
    if grid is not None:
        kw["grid"] = grid
    if "scores" in cls.needs:
        kw["scores"] = torch.rand(B, N, generator=g).to(x.device)
    if "text" in cls.needs:
        kw["text"] = torch.randn(B, 3, C, generator=g).to(device=x.device, dtype=x.dtype)
    return kw


def square_grid(n: int):
    """(h, w) when n is a perfect square, else None."""
    r = math.isqrt(n)
    return (r, r) if r * r == n else None


@pytest.fixture(params=mmc.available())
def name(request) -> str:
    return request.param
