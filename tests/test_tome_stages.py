"""benchmarks/tome_stages.py times what `tome`'s public call does: its staged call gives the same output."""

from __future__ import annotations

import torch

import mmcompress as mmc
from tests.script_module import load_script


def test_staged_call_equals_public_call():
    mod = load_script("benchmarks/tome_stages.py")
    x, metric = torch.randn(3, 21, 8), torch.randn(3, 21, 4)
    for keep in (20, 11):  # one matching round each (r <= ceil(N / 2))
        comp = mmc.create("tome", keep=keep)
        got, times = mod.staged_call(comp, x, metric)
        ref = comp(x, metric=metric)
        assert len(times) == 6 and times == sorted(times)
        for name in ("x", "size", "assign", "rep"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
