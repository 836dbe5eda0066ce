"""Beam search and several returned sequences on compressed models: `generate` expands every sample's input row and
its encoded media items (transformers' `_expand_multimodal_outputs`); the adapter expands its item descriptions the
same way, so beams with a cache equal beams that re-run the compressed prefill at every step (no cache)."""

from __future__ import annotations

import pytest
import torch
from family_tiny import AUD, BREAK, END, IMG, SPECS, START, VID, batch, build

import mmcompress as mmc
from mmcompress.hf.placeholder import ItemMeta, expanded_meta


def _beams(model, kw, use_cache: bool):
    with torch.no_grad():
        return model.generate(**kw, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False,
                              use_cache=use_cache, output_scores=True, return_dict_in_generate=True,
                              suppress_tokens=[IMG, VID, AUD, START, END, BREAK])  # a random model may emit them


NAMES = ["qwen2_vl", "qwen3_vl", "gemma3", "internvl", "llava_next_video", "qwen2_audio"]


@pytest.mark.parametrize("name", NAMES)
def test_beams_with_cache_equal_beams_without(name):
    """Encoder-side compression is deterministic per prompt, so re-running the compressed prefill at every step (no
    cache) gives the same beams as decoding on the shorter cache."""
    spec = SPECS[name]
    model = build(name)
    kw = batch(spec, [spec.sample(0), spec.sample(1, pre=4, post=2)])
    mmc.apply(model, "uniform", keep=0.5)
    cached = _beams(model, kw, True)
    st = mmc.stats(model)
    assert len(st["tokens_in"]) >= 6 and all(o < i for o, i in zip(st["tokens_out"], st["tokens_in"], strict=True))
    plain = _beams(model, kw, False)
    assert cached.sequences.shape[0] == 4
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(cached.sequences_scores, plain.sequences_scores, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "qwen2_audio"])
def test_in_llm_beams_of_a_batch_equal_solo_beams(name):
    """FastV prunes the cache once, by the prompt's last token (re-running it without a cache would rank by each new
    token instead), so its beams are checked against each sample's solo beams."""
    spec = SPECS[name]
    model = build(name)
    samples = [spec.sample(0), spec.sample(1, pre=4, post=2)]
    mmc.apply(model, "fastv", keep=0.5)
    both = _beams(model, batch(spec, samples), True)
    assert all(r > 0 for r in mmc.stats(model)["inllm_removed"])
    for b, smp in enumerate(samples):
        solo = _beams(model, batch(spec, [smp]), True)
        n = solo.sequences.shape[1]
        assert torch.equal(both.sequences[2 * b: 2 * b + 2, -3:], solo.sequences[:, n - 3:])
        torch.testing.assert_close(both.sequences_scores[2 * b: 2 * b + 2], solo.sequences_scores,
                                   atol=1e-5, rtol=1e-4)


def test_identity_beams_equal_the_unwrapped_model():
    spec = SPECS["qwen2_vl"]
    model = build("qwen2_vl")
    kw = batch(spec, [spec.sample(0), spec.sample(1, pre=4, post=2)])
    ref = _beams(model, kw, True)
    mmc.apply(model, "uniform", keep=1.0)
    got = _beams(model, kw, True)
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.equal(got.sequences_scores, ref.sequences_scores)


def test_expanded_meta_by_hand():
    """Two samples, r = 2: sample 0 has items A, B (rows 0, 1), sample 1 none (rows 2, 3), sample 2 has C (rows 4,
    5): the expansion is A, B, A, B, C, C."""
    a, b, c = ItemMeta(prefix=1), ItemMeta(prefix=2), ItemMeta(prefix=3)
    cols = torch.arange(2)
    segs = [(0, cols), (0, cols), (1, cols), (1, cols), (4, cols), (5, cols)]
    assert [m.prefix for m in expanded_meta([a, b, c], segs, 6)] == [1, 2, 1, 2, 3, 3]
    assert expanded_meta([a, b, c], segs[:5], 6) == [a, b, c]  # not an expansion: unchanged (the caller refuses)
    assert expanded_meta([a, b], segs[:4], 3) == [a, b]  # rows not a multiple of r
