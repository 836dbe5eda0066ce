"""benchmarks/merge_paths.py times both CPU merge paths on the same inputs, and its cases cover both sides of the
switch in `merge_tokens`."""

from __future__ import annotations

import torch

from tests.script_module import load_script


def test_times_both_paths_and_cases_straddle_the_switch():
    mod = load_script("benchmarks/merge_paths.py")
    t = mod.time_paths(2, 9, 3, True, reps=2, evict=torch.zeros(16))
    assert set(t) == {"reference", "bags"} and all(len(v) == 2 and min(v) > 0 for v in t.values())
    sides = {12 * r >= n - r for _, n, r in mod.CASES}
    assert sides == {True, False}
