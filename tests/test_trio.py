"""TRIO (gradient saliency + NMS inside the LLM) and the shared stage's backward capability.

Checked against plain-PyTorch references written here: the release's loss (shifted logits, the model's own argmax at
4 positions before the last, mean) differentiated by plain autograd on the re-run layer, and the release's NMS loop
over every token; through `mmc.apply` on tiny LLaVA models under `no_grad` and `inference_mode`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmcompress as mmc
from mmcompress.inllm.saliency import layer_input_grad
from mmcompress.inllm.stage import InLLM
from mmcompress.inllm.trio import TRIORule, nms_select, trio_loss_positions

transformers = pytest.importorskip("transformers")

from llava_tiny import assert_generate_equals_solo_runs, image_tokens, images, module_model_fixtures, pad, prompt  # noqa: E402

model, _unwrap = module_model_fixtures()


def release_nms(scores, feats, k, tau=0.8):
    """The release's loop: every token in decreasing score, taken unless suppressed; then fill; sorted."""
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    f = F.normalize(feats.float(), dim=-1)
    near = (f @ f.T >= tau).tolist()
    sel, sup = [], [False] * len(order)
    for i in order:
        if len(sel) >= k:
            break
        if sup[i]:
            continue
        sel.append(i)
        sup = [a or b for a, b in zip(sup, near[i], strict=True)]
    for i in order:
        if len(sel) >= k:
            break
        if i not in sel:
            sel.append(i)
    return sorted(sel)


def test_loss_positions_are_the_four_before_the_last():
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]]).bool()
    got = trio_loss_positions(valid, 4)
    assert got[0].nonzero().squeeze(1).tolist() == [3, 4, 5, 6]
    assert got[1].nonzero().squeeze(1).tolist() == [3, 4, 5, 6]  # left padding: counted from the last live column
    assert got[2].nonzero().squeeze(1).tolist() == [5, 6]  # clamped at the first live column (merged)


def test_nms_hand_case():
    # 0 and 1 nearly parallel (cos > 0.8), 2 orthogonal to both, 3 opposite of 0, 4 close to 2
    feats = torch.tensor([[1.0, 0.0, 0.0], [0.95, 0.1, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.9, 0.2]])
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    assert nms_select(scores, feats, 2).tolist() == [0, 2]  # 1 suppressed by 0
    assert nms_select(scores, feats, 3).tolist() == [0, 2, 3]  # 4 suppressed by 2
    assert nms_select(scores, feats, 4).tolist() == [0, 1, 2, 3]  # fill: best suppressed (1) first
    assert nms_select(scores, feats, 4, tau=0.999).tolist() == [0, 1, 2, 3]  # cos(0, 1) = 0.9945: top 4
    assert nms_select(scores, feats, 9).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("seed", range(6))
def test_nms_equals_the_release_loop(seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 16, generator=g)
    feats = base[torch.randint(0, 6, (40,), generator=g)] + 0.4 * torch.randn(40, 16, generator=g)  # clusters
    scores = torch.rand(40, generator=g)
    for k in (1, 5, 12, 30):
        assert nms_select(scores, feats, k).tolist() == release_nms(scores, feats, k)


def llama(layers=4, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="sdpa")).eval()


def reference_scores(lm, ids, point, layer):
    """The release's computation on the unwrapped model, by plain autograd: h entering `point`, layer `layer` re-run,
    shifted logits, CE vs own argmax at the 4 last shifted positions (mean), grad norm."""
    m = lm.model
    with torch.no_grad():
        h = lm(ids, output_hidden_states=True).hidden_states[point]  # [B, L, C] entering layer `point`
    L = ids.shape[1]
    pos = torch.arange(L)[None]
    x = h.detach().clone().requires_grad_(True)
    out = m.layers[layer](x, attention_mask=None, position_ids=pos, position_embeddings=m.rotary_emb(x, pos))
    out = out[0] if isinstance(out, tuple) else out
    logits = lm.lm_head(m.norm(out))[:, :-1].float()  # [B, L-1, V]
    S1 = L - 1
    pmask = torch.zeros(ids.shape[0], S1, dtype=torch.bool)
    pmask[:, [S1 - 1 - t for t in range(4)]] = True
    labels = torch.where(pmask, logits.detach().argmax(-1), torch.full_like(pmask, -100, dtype=torch.long))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    (g,) = torch.autograd.grad(loss, x)
    return h, g.norm(dim=-1)  # [B, L, C], [B, L]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("rerun", ["next", "prev"])
def test_rule_equals_a_plain_autograd_reference(mode, rerun):
    lm = llama()
    P, keep = 2, 5
    ids = torch.randint(10, 64, (1, 24), generator=torch.Generator().manual_seed(1))
    img = torch.zeros(1, 24, dtype=torch.bool)
    img[0, 3:19] = True  # 16 image columns
    h, ref = reference_scores(lm, ids, P, P if rerun == "next" else P - 1)
    cols = img[0].nonzero().squeeze(1)
    expect = cols[release_nms(ref[0, cols], h[0, cols], keep)]
    rule = TRIORule(P, keep, rerun=rerun)
    stage = InLLM(lm.model.layers, rule, decoder=lm.model, head=lm.lm_head)
    stage.attach()
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx, stage.armed(img):
        lm(ids)
    stage.detach()
    torch.testing.assert_close(rule.last_scores, ref, rtol=1e-4, atol=1e-7)
    kept = cols[~torch.isin(cols, stage.last_pruned[0])]
    assert kept.tolist() == expect.tolist()
    assert all(p.grad is None for p in lm.parameters())


def test_layer_input_grad_leaves_no_state_and_works_in_inference_mode():
    lm = llama()
    m = lm.model
    ids = torch.randint(10, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(9)[None]
    with torch.inference_mode():
        h = m.embed_tokens(ids)
        pe = m.rotary_emb(h, pos)
        g = layer_input_grad(m.layers[1], h, {"position_ids": pos, "position_embeddings": pe,
                                               "cache": object(), "use_cache": True},
                             lambda out: out[:, -2].pow(2).sum())
    assert g.shape == h.shape and not g.requires_grad
    assert all(p.grad is None for p in lm.parameters())
    x = m.embed_tokens(ids).detach().requires_grad_(True)
    out = m.layers[1](x, position_ids=pos, position_embeddings=m.rotary_emb(x, pos))
    (out[0] if isinstance(out, tuple) else out)[:, -2].pow(2).sum().backward()
    torch.testing.assert_close(g, x.grad)
    with pytest.raises(ValueError, match="loss_fn"):
        layer_input_grad(m.layers[1], h.clone(), {"position_embeddings": m.rotary_emb(h, pos)}, lambda out: out)


def one(model, seed=0, post=(11, 12, 13, 14, 15)):
    pv = images(1, seed)
    n = image_tokens(model, pv, None)
    return {"input_ids": torch.tensor([prompt(n, [20], list(post))]), "pixel_values": pv}


def test_identity_is_bit_identical_and_remove_restores(model):
    kw = one(model)
    with torch.no_grad():
        ref = model(**kw).logits
    for keep in (1.0, 16, 99):  # 16 image tokens: an int budget >= n prunes nothing (and runs no backward)
        mmc.apply(model, "trio", keep=keep)
        with torch.no_grad():
            assert torch.equal(model(**kw).logits, ref)
    mmc.apply(model, "trio", keep=4)
    with torch.no_grad():
        assert model(**kw).logits.shape[1] == kw["input_ids"].shape[1] - 12
    assert mmc.stats(model)["inllm_removed"] == [12]
    mmc.remove(model)
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, ref)
    assert model.config.text_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_apply_batch_generate_equals_solo_runs(model, mode):
    pv = images(3, seed=7)
    n = image_tokens(model, pv, None)
    seqs = [prompt(n[:1], [20], [11, 12, 13, 14]), prompt(n[1:], [21, 22], [14, 15, 16])]
    ids, am = pad(seqs, "left")
    mmc.apply(model, "trio", keep=6)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        st = assert_generate_equals_solo_runs(model, ids, am, pv, seqs, [pv[:1], pv[1:]])
    assert st["inllm_removed"] == [10, 26]
    assert all(p.grad is None for p in model.parameters())


def test_options_are_checked(model):
    with pytest.raises(ValueError, match="keep"):
        mmc.apply(model, "trio", keep=0)
    with pytest.raises(ValueError, match="trio_layer"):
        mmc.apply(model, "trio", keep=4, trio_layer=9)
    with pytest.raises(ValueError, match="trio_rerun"):
        mmc.apply(model, "trio", keep=4, trio_rerun="both")
    with pytest.raises(ValueError, match="trio_tau"):
        mmc.apply(model, "trio", keep=4, trio_tau=2.0)
    with pytest.raises(TypeError, match="trio_nms"):
        mmc.apply(model, "trio", keep=4, trio_nms=False)
    mmc.apply(model, "trio", keep=0.25, trio_layer=1)
    assert model._mmcompress_adapter.inllm.method.points == (1,)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "gemma3"])
def test_families_batch_equals_solo_under_inference_mode(family):
    """M-RoPE (original ids kept), Gemma 3 (tied head, typed rope): batch generate rows == their solo runs."""
    from family_tiny import SPECS, batch
    from family_tiny import build as build_family

    spec = SPECS[family]
    model = build_family(family)
    samples = [spec.sample(5), spec.sample(6, pre=4)]
    kw = batch(spec, samples)
    with torch.no_grad():
        ref = model(**kw).logits
    mmc.apply(model, "trio", keep=2, trio_layer=1)
    gen = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    try:
        with torch.inference_mode():
            out = model.generate(**kw, **gen)
            removed = mmc.stats(model)["inllm_removed"]
            for b, s in enumerate(samples):
                solo = model.generate(**batch(spec, [s]), **gen)
                assert torch.equal(out.sequences[b, -3:], solo.sequences[0, -3:])
                for sb, ss in zip(out.scores, solo.scores, strict=True):
                    torch.testing.assert_close(sb[b], ss[0], atol=1e-5, rtol=1e-4)
        assert all(r > 0 for r in removed)
        assert all(p.grad is None for p in model.parameters())
    finally:
        mmc.remove(model)
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, ref)


def test_a_rule_needing_gradients_requires_the_output_head():
    lm = llama()
    with pytest.raises(ValueError, match="head"):
        InLLM(lm.model.layers, TRIORule(2, 4), decoder=lm.model)
