"""HoliTom's in-LLM merging (mmcompress.inllm.holitom) on the shared stage: a hand case, and through apply."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import mmcompress as mmc
from mmcompress.inllm.holitom import HoliTomRule


def test_rule_keeps_fastv_set_and_halves_members_in_position_order():
    """4 image columns, r = 0.5: the 2 of highest attention (1, 3) stay; 2 and 4 are most similar to 1 and merge into
    it in position order: h1 <- (h1 + h2) / 2, then h1 <- (h1 + h4) / 2, as the release's loop does."""
    e = torch.eye(3)
    h = torch.stack([e[2], e[0], e[0] + 0.1 * e[1], e[1], 2 * e[0], e[2]]).unsqueeze(0)  # [1, 6, 3]
    img = torch.tensor([[False, True, True, True, True, False]])
    s = torch.tensor([[0.0, 0.9, 0.1, 0.8, 0.2, 0.0]])
    ctx = SimpleNamespace(img=img, h=h, last_token_attention=lambda: s)
    drop, h2 = HoliTomRule(k=1, r=0.5).drop(ctx)
    assert drop[0].tolist() == [False, False, True, False, True, False]
    torch.testing.assert_close(h2[0, 1], 1.5 * e[0] + 0.025 * e[1])
    torch.testing.assert_close(h2[0, [0, 2, 3, 4, 5]], h[0, [0, 2, 3, 4, 5]])  # nothing else rewritten
    assert torch.equal(h, ctx.h)  # the caller's states untouched


def test_apply_onevision_video_runs_the_inllm_merging():
    from llava_tiny import build, prompt

    m = build("llava_onevision", seed=2)
    T = 4
    pvv = torch.randn(1, T, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([prompt([], [11], [12, 13], video_tokens=T * 2 * 2 + 1)])
    with torch.no_grad():
        mmc.apply(m, "holitom", keep=6, tau=0.5, stage="projector", llm_layer=2)
        try:
            out = m(input_ids=ids, pixel_values_videos=pvv)
            st = mmc.stats(m)
        finally:
            mmc.remove(m)
        mmc.apply(m, "holitom", keep=6, tau=0.5, stage="projector")  # default: w/o M, no in-LLM stage
        try:
            m(input_ids=ids, pixel_values_videos=pvv)
            plain = mmc.stats(m)
        finally:
            mmc.remove(m)
    assert torch.isfinite(out.logits).all()
    assert st["tokens_out"] == [7] and st["inllm_removed"] == [7 - round(7 * 0.5)]  # the newline counts, as released
    assert "inllm_removed" not in plain
    with pytest.raises(ValueError, match="llm_layer"):
        mmc.create("holitom", llm_layer=0)
    with pytest.raises(ValueError, match="llm_prune"):
        mmc.create("holitom", llm_prune=1.0)
