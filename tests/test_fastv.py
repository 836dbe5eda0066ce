"""FastV (in-LLM pruning at layer K by last-token attention) on tiny random LLaVA models, SDPA kept."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.inllm.fastv import FastV

transformers = pytest.importorskip("transformers")

from llava_tiny import assert_generate_equals_solo_runs, build, image_tokens, images, module_model_fixtures, pad, prompt  # noqa: E402

K = 2


model, _unwrap = module_model_fixtures()


def one(model, n_images: int = 1, post=(11, 12, 13), seed: int = 0) -> dict:
    pv = images(n_images, seed)
    n = image_tokens(model, pv, None)
    return {"input_ids": torch.tensor([prompt(n, [20], list(post))]), "pixel_values": pv}


def run(model, kw, **extra):
    with torch.no_grad():
        return model(**kw, **extra)


def test_r0_is_bit_identical(model):
    kw = one(model)
    ref = run(model, kw).logits
    with torch.no_grad():
        gref = model.generate(**kw, max_new_tokens=3, do_sample=False)
    mmc.apply(model, "fastv", keep=1.0, fastv_k=K)
    assert torch.equal(run(model, kw).logits, ref)
    with torch.no_grad():
        assert torch.equal(model.generate(**kw, max_new_tokens=3, do_sample=False), gref)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_prunes_kv_after_layer_k_and_generates(model):
    kw = one(model)
    L = kw["input_ids"].shape[1]
    mmc.apply(model, "fastv", keep=0.5, fastv_k=K)
    out = run(model, kw, use_cache=True)
    lens = [layer.keys.shape[2] for layer in out.cache.layers]
    assert lens[:K] == [L] * K and lens[K:] == [L - 8] * (len(lens) - K)  # 16 image tokens, R = 0.5
    assert out.logits.shape[1] == L - 8
    assert mmc.stats(model)["inllm_removed"] == [8]
    with torch.no_grad():
        g = model.generate(**kw, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert g.sequences.shape[1] == L + 4
    lens = [layer.keys.shape[2] for layer in g.cache.layers]
    assert lens[0] == L + 3 and lens[-1] == L - 8 + 3  # decode steps appended to the shorter cache


def test_pruned_tokens_are_the_least_attended_in_eager_attention(model):
    """Independent check of the scores: layer K-1's eager attention map (a separate eager copy of the weights)."""
    kw = one(model)
    eager = build("llava", attn="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        att = eager(**kw, output_attentions=True).attentions[K - 1]  # [1, H, L, L]
    row = att[0, :, -1].mean(0)  # [L]
    img = kw["input_ids"][0] == 5
    pos = img.nonzero().squeeze(1)
    expect = pos[row[pos].argsort()[:8]].sort().values
    mmc.apply(model, "fastv", keep=0.5, fastv_k=K)
    run(model, kw)
    got = model._mmcompress_adapter.inllm.last_pruned[0]
    assert torch.equal(got, expect)


def test_batch_with_different_prune_counts_equals_single_runs(model):
    """Left-padded batch, 1 image vs 2 images (8 vs 16 tokens pruned): generate == solo generate."""
    pv = images(3, seed=7)
    n = image_tokens(model, pv, None)
    seqs = [prompt(n[:1], [20], [11, 12, 13]), prompt(n[1:], [21, 22], [14])]
    ids, am = pad(seqs, "left")
    mmc.apply(model, "fastv", keep=0.5, fastv_k=K)
    st = assert_generate_equals_solo_runs(model, ids, am, pv, seqs, [pv[:1], pv[1:]])
    assert st["inllm_removed"] == [8, 16]


def test_combines_with_encoder_compression_and_removes_cleanly(model):
    kw = one(model)
    ref = run(model, kw).logits
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    mmc.apply(model, "uniform", keep=8, fastv_k=K, fastv_r=0.5)
    out = run(model, kw)
    st = mmc.stats(model)
    assert st["tokens_out"] == [8] and st["inllm_removed"] == [4]
    assert out.logits.shape[1] == kw["input_ids"].shape[1] - 8 - 4
    mmc.remove(model)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert torch.equal(run(model, kw).logits, ref)


def test_options_are_checked(model):
    with pytest.raises(ValueError, match="fastv_k"):
        mmc.apply(model, "fastv", keep=0.5, fastv_k=99)
    with pytest.raises(ValueError, match="fastv_r"):
        mmc.apply(model, "uniform", keep=1.0, fastv_k=1, fastv_r=1.0)
    with pytest.raises(ValueError, match="keep"):
        mmc.apply(model, "fastv", keep=2)
    with pytest.raises(ValueError, match="fastv_k"):
        mmc.apply(model, "uniform", keep=0.5, fastv_r=0.5)
    mmc.apply(model, "fastv", keep=0.5)
    kw = one(model)
    with pytest.raises(ValueError, match="labels"):
        run(model, kw, labels=kw["input_ids"])


def test_reusable_on_a_plain_decoder():
    """The helper alone, as another adapter (e.g. Qwen2-VL) uses it: any [B, L] mask of 'image' positions."""
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    ids = torch.randint(3, 64, (1, 20))
    img = torch.zeros(1, 20, dtype=torch.bool)
    img[0, 4:14] = True
    with torch.no_grad():
        ref = lm(ids).logits
        fv = FastV(lm.model.layers, k=1, r=0.3)
        fv.attach()
        with fv.armed(img):
            out = lm(ids, use_cache=True)
        fv.detach()
        assert torch.equal(lm(ids).logits, ref)
    assert fv.last_removed == [3] and out.logits.shape[1] == 17
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [20, 17, 17]
    assert bool(torch.isfinite(out.logits).all())


def test_unpadded_batch_with_different_prune_counts_equals_single_runs(model):
    """No padding (the model's mask is None): hidden pruned keys need a mask built by FastV, prefill and decode."""
    pv = images(3, seed=8)
    n = image_tokens(model, pv, None)
    s0 = prompt(n[:1], [20], [11] * 18)  # 1 image: 8 pruned
    s1 = prompt(n[1:], [21], [12])  # 2 images: 16 pruned
    assert len(s0) == len(s1)
    ids = torch.tensor([s0, s1])
    mmc.apply(model, "fastv", keep=0.5, fastv_k=K)
    assert_generate_equals_solo_runs(model, ids, None, pv, [s0, s1], [pv[:1], pv[1:]], steps=3)


def test_keep_count_is_the_releases_round_n_times_1_minus_r():
    """The release keeps round(n * (1 - R)) tokens (Python round, half to even): 8 of 15 at R = 0.5, not 15 - 8."""
    from mmcompress.inllm.fastv import fastv_keep_count

    n = torch.tensor([15, 16, 17, 1, 3, 576, 575])
    assert fastv_keep_count(n, 0.5).tolist() == [round(v * 0.5) for v in n.tolist()] == [8, 8, 8, 0, 2, 288, 288]
    assert fastv_keep_count(torch.tensor([10, 13]), 0.3).tolist() == [round(10 * 0.7), round(13 * 0.7)] == [7, 9]


def test_odd_image_count_keeps_the_releases_count():
    """15 image tokens at R = 0.5: 8 kept, 7 pruned (the old `n - round(n R)` kept 7)."""
    torch.manual_seed(1)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    ids = torch.randint(3, 64, (1, 24))
    img = torch.zeros(1, 24, dtype=torch.bool)
    img[0, 3:18] = True
    fv = FastV(lm.model.layers, k=2, r=0.5)
    fv.attach()
    try:
        with torch.no_grad(), fv.armed(img):
            out = lm(ids, use_cache=True)
    finally:
        fv.detach()
    assert fv.last_removed == [7] and out.logits.shape[1] == 24 - 7
