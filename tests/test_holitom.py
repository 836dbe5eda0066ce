"""holitom: global temporal windows, DPC-kNN merging of static tokens, top dynamic tokens (before the LLM)."""

from __future__ import annotations

import math

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.holitom import density_peaks, static_windows

transformers = pytest.importorskip("transformers")


def test_windows_by_hand():
    # position 0 static throughout, position 1 only between frames 0 and 1. Removed tokens: [0,1]: 2, [0,2]: 2,
    # [0,3]: 3, [1,2]: 1, [1,3]: 2, [2,3]: 1. Best split: [0,1] + [2,3] = 3 ([0,3] ties at 3, found later: not taken)
    f = torch.tensor([[0.9, 0.9], [0.9, 0.1], [0.9, 0.1]])
    assert static_windows(f, 0.8) == ([(0, 1), (2, 3)], 3.0)
    assert static_windows(f, 0.8, max_window=1) == ([(0, 0), (1, 1), (2, 2), (3, 3)], 0.0)
    assert static_windows(torch.full((3, 2), 0.5), 0.8)[0] == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_density_peaks_by_hand():
    # 1-D points 0, 0.1, 0.3, 5 with 3 neighbours (self included): mean squared distances 0.0333, 0.0167, 0.0433,
    # 15.4 -> point 1 is densest (delta = max distance 5), then 0 (delta 0.1), 2 (0.2), 3 (4.7, but density e^-15)
    f = torch.tensor([[0.0], [0.1], [0.3], [5.0]])
    centres, d = density_peaks(f, 2, 3)
    assert centres.tolist() == [1, 2]
    assert density_peaks(f, 1, 3)[0].tolist() == [1]
    torch.testing.assert_close(d[0, 3], torch.tensor(5.0))


def tiny_video():
    # 2 frames x 2 positions: position 0 barely changes (static), position 1 changes (dynamic)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [1.0, 0.0]]])
    a = torch.tensor([[0.1, 0.5, 0.2, 0.3]])
    return x, a


def test_tiny_video_every_budget_by_hand():
    x, a = tiny_video()
    # count(r) = round(r) + 2 ceil(r): 2 below r = 0.5 (Python rounds 0.5 to 0), 3 above
    out = mmc.create("holitom", keep=3)(x, grid=(2, 1, 2), scores=a)
    assert out.assign.tolist() == [[0, 1, 0, 2]] and out.rep.tolist() == [[0, 1, 3]]
    torch.testing.assert_close(out.x[0, 0], (x[0, 0] + x[0, 2]) / 2)  # the window mean of the static position
    assert torch.equal(out.x[0, 1:], x[0, [1, 3]])
    assert torch.equal(out.ordered(), out.x)  # static cluster first, then frame by frame
    # keep 2: no static cluster at that ratio (round(0.49) = 0): the static tokens are dropped
    out = mmc.create("holitom", keep=2)(x, grid=(2, 1, 2), scores=a)
    assert out.assign.tolist() == [[-1, 0, -1, 1]]
    # keep 1: even the smallest ratio keeps 2 -> the slot with the higher score (0.5 at frame 0)
    assert mmc.create("holitom", keep=1)(x, grid=(2, 1, 2), scores=a).assign.tolist() == [[-1, 0, -1, -1]]


def test_fill_takes_members_out_of_static_clusters():
    x = torch.randn(1, 3 * 4, 8, generator=torch.Generator().manual_seed(0))
    x[0, 4:8] = x[0, 0:4] + 0.01  # frame 1 = frame 0: all static; frame 2 new
    a = torch.arange(12.0).unsqueeze(0) / 12
    # windows [0,1], [2]: at r = 1 the count is 4 clusters + 4 = 8; keep 10 takes frame-1 members out, by score
    out = mmc.create("holitom", keep=10, knn=2)(x, grid=(3, 2, 2), scores=a)
    assert out.x.shape == (1, 10, 8)
    slot = out.assign[0]
    assert out.size[0, slot[6]] == 1 and out.size[0, slot[7]] == 1  # the two best-scored members: own slots
    assert slot[4] == slot[0] and slot[5] == slot[1] and out.size[0, slot[0]] == 2  # the others stay merged
    torch.testing.assert_close(out.x[0, slot[0]], (x[0, 0] + x[0, 4]) / 2)
    assert torch.equal(out.x[0, slot[7]], x[0, 7]) and out.size.sum() == 12


def test_images_are_one_frame_and_bad_options():
    x, a = torch.randn(1, 9, 4), torch.rand(1, 9)
    out = mmc.create("holitom", keep=3)(x, grid=(3, 3), scores=a)
    assert out.rep[0].tolist() == sorted(a[0].topk(3).indices.tolist())  # one frame: top scores
    for bad in ({"tau": 2.0}, {"beta": -0.1}, {"knn": 0}, {"max_window": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            mmc.create("holitom", **bad)
    with pytest.raises(ValueError, match="scores"):
        mmc.create("holitom", keep=2)(x, grid=(3, 3))


# ---- through apply -------------------------------------------------------------------------------------------
def test_apply_onevision_video_gets_what_the_release_uses():
    """LLaVA-OneVision video at stage projector: the kept set equals holitom called by hand on the projected,
    2x-pooled frame tokens and the pooled mean attention received in the tower's last block (eager)."""
    from llava_tiny import build, prompt

    m = build("llava_onevision", seed=2, attn="eager")
    T = 4
    g = torch.Generator().manual_seed(3)
    pvv = torch.randn(1, T, 3, 32, 32, generator=g)
    pvv[0, 1] = pvv[0, 0] + 0.01 * torch.randn(3, 32, 32, generator=g)  # a near-static pair of frames
    ids = torch.tensor([prompt([], [11], [12, 13], video_tokens=T * 2 * 2 + 1)])
    with torch.no_grad():
        vt = m.model.vision_tower(pvv[0], output_hidden_states=True, output_attentions=True)
        feats = m.model.apply_pooling(m.model.multi_modal_projector(vt.hidden_states[-1]))  # [T, 4, C]
        att = vt.attentions[-1].mean(1).mean(1)  # [T, 16] mean attention received, heads averaged
        scores = m.model.apply_pooling(att.unsqueeze(-1))[..., 0]  # [T, 4]
        direct = mmc.create("holitom", keep=6, tau=0.5)(feats.reshape(1, -1, feats.shape[-1]), grid=(T, 2, 2),
                                                         scores=scores.reshape(1, -1))
        mmc.apply(m, "holitom", keep=6, tau=0.5, stage="projector")
        m(input_ids=ids, pixel_values_videos=pvv)
        st = mmc.stats(m)
        mmc.remove(m)
    assert st["tokens_out"] == [7]  # 6 + the video's newline token
    assert torch.equal(st["assign"][0][2], direct.assign[0])


def test_apply_qwen2_vl_video():
    from test_integration_qwen import MERGE, PIX_DIM, VE, VID, VS
    from test_integration_qwen import build as qwen_build

    model = qwen_build("qwen2_vl")
    g = torch.Generator().manual_seed(5)
    t, h, w = 4, 4, 4
    n = t * h * w // MERGE**2
    ids = torch.tensor([[3, 4, VS] + [VID] * n + [VE, 7, 8]])
    kw = dict(input_ids=ids, mm_token_type_ids=(ids == VID).int() * 2, video_grid_thw=torch.tensor([[t, h, w]]),
              pixel_values_videos=torch.randn(t * h * w, PIX_DIM, generator=g))
    mmc.apply(model, "holitom", keep=5)
    try:
        with torch.no_grad():
            out = model(**kw).logits
        assert torch.isfinite(out).all() and out.shape[1] == ids.shape[1] - (n - 5)
        assert mmc.stats(model)["tokens_out"] == [5]
    finally:
        mmc.remove(model)
    assert math.isfinite(float(out.sum()))
