"""`random` draws each row from (seed, the row's key), never from its place in the batch."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.baselines import sample_keys


def test_row_choice_does_not_depend_on_the_batch():
    x = torch.randn(5, 40, 8)
    comp = mmc.create("random", keep=7, seed=3)
    full = comp(x).assign  # [5, 40]
    for b in range(5):
        assert torch.equal(comp(x[b:b + 1]).assign, full[b:b + 1])
    assert torch.equal(comp(x.flip(0)).assign, full.flip(0))  # reordering the batch reorders the choices only


def test_sample_keys_decide_the_choice_whatever_the_tokens():
    x = torch.randn(4, 40, 8)
    comp = mmc.create("random", keep=7, seed=0)
    with sample_keys(["a", "b", "c", "d"]):
        ab = comp(x).assign
    with sample_keys(["c", "a"]):  # the same ids on other rows, with other tokens, in a smaller batch
        ca = comp(torch.randn(2, 40, 8)).assign
    assert torch.equal(ca[0], ab[2]) and torch.equal(ca[1], ab[0])
    assert not torch.equal(ab[0], ab[1])  # different ids: different draws
    with sample_keys(["a", "b", "c", "d"]):
        other_seed = mmc.create("random", keep=7, seed=1)(x).assign
    assert not torch.equal(other_seed, ab)


def test_sample_keys_bad_input():
    comp = mmc.create("random", keep=3)
    with sample_keys(["a"]), pytest.raises(ValueError, match="sample_keys: 1 sample ids given for a call on 2 rows"):
        comp(torch.randn(2, 10, 4))
    with pytest.raises(TypeError, match="keys"):
        with sample_keys("ab"):
            pass
    with pytest.raises(TypeError, match="keys"):
        with sample_keys([1.5]):
            pass
