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
                                     "idpruner", "trio_encoder", "prunesid", "flashvid"]
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


def test_plain_prunesid_threshold_scales_with_the_budget():
    # CLS + 8 patches in 2-D: patches 0..6 along e0 (lengths 1..7), patch 7 at cosine 0.11 to e0, scores falling
    # 0.9, 0.8, ..., 0.3 and 0.05 for patch 7. K <= 7: G = floor(K / 4) = 1 group. Mean cosine over the 28 pairs:
    # (21 + 7 * 0.11) / 28 = 0.7775. K = 4: threshold 4/32 * 0.7775 = 0.0972 < 0.11, so patch 0 suppresses every other
    # patch and the CLS + 3 best by score come out. K = 7: 7/32 * 0.7775 = 0.1701 >= 0.11, patch 7 survives NMS and
    # is ranked right after patch 0 (survivors first, in NMS order) despite its lowest score; then 1, 2, 3, 4.
    c = 0.11
    patches = torch.cat([torch.arange(1.0, 8.0)[:, None] * torch.tensor([[1.0, 0.0]]),
                         torch.tensor([[c, (1 - c * c) ** 0.5]])])
    x = torch.cat([torch.tensor([[-3.0, 5.0]]), patches])  # [1 + 8, 2]
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.05])
    assert torch.equal(speed.prunesid_plain(x, s, 4), x[[0, 1, 2, 3]])
    assert torch.equal(speed.prunesid_plain(x, s, 7), x[[0, 1, 8, 2, 3, 4, 5]])


def test_plain_flashvid_tree_value_is_its_sum_over_one_plus_the_direct_merges():
    # 3 frames x 3 tokens, one segment (threshold -1), no selection (alpha 0), b = 2. Frame 1's a = e0 + 0.1 e3 and
    # b = e0 - 0.1 e3 both merge into frame 0's e0 (cosine 0.995); frame 2's c = a merges into a (cosine 1; 0.98 to
    # b). Every other token has cosine <= 0.1 to the previous frame: 6 roots = b * 3 frames, ratio 2 * 3 / 6 = 1, no
    # clustering. The root e0 stands for e0 + a + b + c = 4 e0 + 0.1 e3 over 1 + 2 direct merges (a and b; c merged
    # into a): 4/3 e0 + 0.1/3 e3 (the tree's mean would be e0 + 0.025 e3).
    e = torch.eye(4)
    a, b = e[0] + 0.1 * e[3], e[0] - 0.1 * e[3]
    x = torch.stack([torch.stack([e[0], e[1], e[2]]), torch.stack([a, b, e[3]]), torch.stack([a, -e[1], -e[2]])])
    out = speed.flashvid_plain(x, torch.full((3, 3), 1 / 9), 2, alpha=0.0, seg_th=-1.0, min_seg=1)
    want = torch.stack([4 / 3 * e[0] + 0.1 / 3 * e[3], e[1], e[2], e[3], -e[1], -e[2]])
    torch.testing.assert_close(out, want)
