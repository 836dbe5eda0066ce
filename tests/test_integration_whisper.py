"""Whisper adapter on a tiny random WhisperForConditionalGeneration: identity is bit-identical, remove() restores,
disabled(), generate() with compressed frames, proportional cross-attention, ragged budgets, SDPA kept, per instance."""

from __future__ import annotations

import pytest
import torch
from family_tiny import tiny_whisper

import mmcompress as mmc

tiny = tiny_whisper


def feats(B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 8, 80, generator=torch.Generator().manual_seed(seed))  # [B, mels, 2 * 40 frames]


def logits(m, x, dec=None):
    dec = torch.tensor([[1, 5, 9, 12]] * x.shape[0]) if dec is None else dec
    with torch.no_grad():
        return m(input_features=x, decoder_input_ids=dec).logits


@pytest.mark.parametrize("method", ["audio_merge", "pool", "tome", "uniform"])
def test_identity_is_bit_identical_and_remove_restores(method):
    m, x = tiny(), feats()
    ref = logits(m, x)
    mmc.apply(m, method, keep=1.0)
    assert torch.equal(logits(m, x), ref)
    mmc.apply(m, method, keep=0.5)
    out = logits(m, x)
    assert not torch.allclose(out, ref)
    assert mmc.stats(m)["tokens_in"] == [40, 40] and mmc.stats(m)["tokens_out"] == [20, 20]
    with mmc.disabled(m):
        assert torch.equal(logits(m, x), ref)
    mmc.remove(m)
    assert torch.equal(logits(m, x), ref)
    assert m.config._attn_implementation == "sdpa"


def test_equals_manual_proportional_cross_attention():
    """Compressed forward = the unwrapped decoder run on the compressed frames with log(size) added to the
    cross-attention logits (built here by hand in eager attention)."""
    m, x = tiny(attn="eager"), feats(1)
    comp = mmc.create("audio_merge", keep=13)
    with torch.no_grad():
        enc = m.model.encoder(x).last_hidden_state
        out = comp(enc, grid=(enc.shape[1],))
        bias = out.size.log()[:, None, None, :]
        handles = [layer.encoder_attn.register_forward_pre_hook(lambda mod, a, kw: (a, {**kw, "attention_mask": bias}),
                                                                with_kwargs=True) for layer in m.model.decoder.layers]
        dec = torch.tensor([[1, 5, 9, 12]])
        want = m(encoder_outputs=(out.x,), decoder_input_ids=dec).logits
        for h in handles:
            h.remove()
    mmc.apply(m, "audio_merge", keep=13)
    assert torch.allclose(logits(m, x), want, atol=1e-6)
    # without proportional attention the result differs
    mmc.apply(m, "audio_merge", keep=13, prop_attn=False)
    assert not torch.allclose(logits(m, x), want, atol=1e-4)


def test_generate_matches_uncached_greedy_and_batch_equals_single():
    m, x = tiny(), feats(2)
    mmc.apply(m, "audio_merge", keep=0.25)
    with torch.no_grad():
        gen = m.generate(input_features=x, max_new_tokens=5, do_sample=False)
    # uncached greedy: every step re-runs the compressed encoder and the full decoder prefix
    ids = gen[:, :1]
    for _ in range(gen.shape[1] - 1):
        nxt = logits(m, x, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    assert torch.equal(ids, gen)
    with torch.no_grad():
        single = [m.generate(input_features=x[i : i + 1], max_new_tokens=5, do_sample=False) for i in range(2)]
    assert all(torch.equal(s[0], gen[i]) for i, s in enumerate(single))


def test_ragged_auto_budgets_equal_single_runs():
    m = tiny()
    mmc.apply(m, "audio_merge", keep="auto", epsilon=0.3)
    x = torch.cat([feats(1, 3), feats(1, 4)])  # these two clips get 12 and 13 frames at epsilon 0.3
    both = logits(m, x)
    st = mmc.stats(m)
    assert st["tokens_out"][0] != st["tokens_out"][1], st
    for i in range(2):
        assert torch.allclose(logits(m, x[i : i + 1]), both[i : i + 1], atol=1e-5)


def test_per_instance_and_bad_options():
    a, b = tiny(0), tiny(0)
    x = feats()
    ref = logits(b, x)
    mmc.apply(a, "audio_merge", keep=0.5)
    assert torch.equal(logits(b, x), ref)  # the other instance is untouched
    with pytest.raises(ValueError, match="scores"):
        mmc.apply(a, "visionzip", keep=0.5)
    with pytest.raises(TypeError, match="unknown option"):
        mmc.apply(a, "audio_merge", keep=0.5, stage="vision")
