"""Every compressor checks its optional tensors (`scores=`, `text=`, `metric=`, `size=`) for NaN/inf as it checks
`x`: a ValueError naming the argument, before the method runs, unless MMCOMPRESS_CHECKS=0."""

from __future__ import annotations

import pytest
import torch
from conftest import call_kwargs

import mmcompress as mmc

B, N, C = 2, 16, 8
ARGS = ("scores", "text", "metric", "size")


def _inputs(name: str, arg: str, bad: float) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, generator=g)
    kw = call_kwargs(name, x)
    given = {"scores": torch.rand(B, N, generator=g), "text": torch.randn(B, 3, C, generator=g),
             "metric": torch.randn(B, N, 4, generator=g), "size": torch.ones(B, N)}[arg]
    given[1, 2] = bad  # the second sample's token 2 (for text: its query row 2, every channel)
    kw[arg] = given
    return x, kw


@pytest.mark.parametrize("arg", ARGS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_optional_tensor_names_its_argument(name, arg, bad):
    x, kw = _inputs(name, arg, bad)
    with pytest.raises(ValueError, match=rf"^{arg}: "):
        mmc.create(name, keep=4)(x, **kw)


@pytest.mark.parametrize("arg", ARGS[:3])
def test_checks_off_skips_the_optional_checks_too(arg, monkeypatch):
    monkeypatch.setenv("MMCOMPRESS_CHECKS", "0")
    x, kw = _inputs("uniform", arg, float("nan"))  # uniform reads none of them: its output is finite
    out = mmc.create("uniform", keep=4)(x, **kw)
    assert out.x.shape == (B, 4, C) and bool(torch.isfinite(out.x).all())


def test_a_finite_tensor_whose_sum_overflows_passes():
    x = torch.randn(B, N, C)
    metric = torch.full((B, N, 4), 3e38)  # finite; its float32 sum is inf, so the exact check decides
    scores = torch.full((B, N), 3e38)
    out = mmc.create("visionzip", keep=4)(x, scores=scores, metric=metric)
    assert out.x.shape[1] == 4
