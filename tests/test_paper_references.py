"""The two sides of `compressor_speed.py --only fidelity` agree: each paper-named compressor equals the plain
per-sample implementation of its release's rules (benchmarks/paper_references.py, Python loops where the papers
describe loops) on the benchmark's own inputs, at batch 1 and 2."""

from __future__ import annotations

import pytest
import torch

from tests.script_module import load_script

speed = load_script("benchmarks/compressor_speed.py")


@pytest.mark.parametrize("B", [1, 2])
def test_compressors_equal_the_plain_release_rules(B):
    cases = speed._fidelity_cases(B)
    assert [c[0] for c in cases] == ["visionzip", "prumerge", "prumerge+", "divprune", "dycoke", "visiontrim",
                                     "idpruner", "trio_encoder"]
    for label, ours, plain in cases:
        got, want = ours(), plain()
        assert got.shape == want.shape, (label, got.shape, want.shape)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, label=label: f"{label}: {m}")


def test_plain_prumerge_plus_takes_the_stride_after_the_outliers():
    # 12 tokens, two outliers (11, 5): K = 2, stride int(int(12 / 2) / 3) = 2 over 0..10, minus those kept
    s = torch.full((12,), 0.01)
    s[11], s[5] = 5.0, 4.0
    x = torch.eye(12)
    out = speed.prumerge_plus_plain(x, s, torch.eye(12) + 0.1, knn=1)
    assert out.shape == (2 + 6 + 1, 12)  # 11, 5, then 0, 2, 4, 6, 8, 10, then the summary
    kept = [11, 5, 0, 2, 4, 6, 8, 10]
    for row, i in zip(out[:-1], kept, strict=True):
        assert row[i] == 1.0  # each output starts from its kept token
    pruned = [j for j in range(12) if j not in kept]
    torch.testing.assert_close(out[-1], (s[pruned, None] * x[pruned]).sum(0))
