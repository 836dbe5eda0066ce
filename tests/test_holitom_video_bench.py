"""benchmarks/video_fidelity.py (make bench-video): its metrics and summary table on hand-made cases, and holitom
run the way it runs it (no clips or weights needed)."""

from __future__ import annotations

import math

import pytest
import torch

import mmcompress as mmc
from mmcompress.types import CompressOutput
from tests.script_module import load_script


@pytest.fixture(scope="module")
def vf():
    return load_script("benchmarks/video_fidelity.py")


def test_measure_by_hand(vf):
    # 2 frames of 1 token: frame 0 = (1, 0) kept, frame 1 = (0, 1) dropped. Reconstruction (1, 0), (0, 0):
    # error ||(0, 1)|| / sqrt(2); frame 0 is retrieved, frame 1 (a zero feature, cosine 0 to both) is not
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = CompressOutput(x=torch.tensor([[[1.0, 0.0]]]), assign=torch.tensor([[0, -1]]), size=torch.ones(1, 1))
    err, hits = vf.measure(x, out, 2, 1)
    assert math.isclose(err, 1 / math.sqrt(2), rel_tol=1e-6) and hits == 0.5
    same = mmc.create("uniform", keep=1.0)(x[None], grid=(2, 1, 1))  # identity: no error, every frame retrieved
    assert vf.measure(x, same, 2, 1) == (0.0, 1.0)


def test_summary_averages_over_clips(vf):
    rows = [{"clip": c, "method": "holitom", "keep": 0.25, "share": s, "rel_error": e, "frame_retrieval": h}
            for c, s, e, h in (("a", 0.25, 0.2, 1.0), ("b", 0.25, 0.4, 0.5))]
    table = vf.summary(rows)
    assert table[2] == "| holitom | 0.25 | 0.250 | 0.300 | 0.75 | 2/2 |"


def test_holitom_as_the_bench_runs_it():
    # the bench's call: one clip [1, T * P, C] on grid (T, 8, 8) with per-token scores; exact budget, provenance valid
    g = torch.Generator().manual_seed(0)
    T, P, C = 4, 64, 16
    x = torch.randn(1, P, C, generator=g).repeat(1, T, 1) + 0.05 * torch.randn(1, T * P, C, generator=g)
    out = mmc.create("holitom", keep=0.25)(x, grid=(T, 8, 8), scores=torch.rand(1, T * P, generator=g))
    assert out.x.shape == (1, 64, C) and out.size.sum() == int((out.assign >= 0).sum())
    assert int(out.assign.max()) == 63
