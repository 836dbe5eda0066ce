"""Qwen2-VL / Qwen2.5-VL adapter on tiny random models: identity, restoration, M-RoPE ids, generate(), ragged."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.baselines import UniformSelect

transformers = pytest.importorskip("transformers")

IMG, VID, VS, VE, PAD = 60, 61, 62, 63, 0
PATCH, TPATCH, MERGE = 4, 2, 2
PIX_DIM = 3 * TPATCH * PATCH * PATCH  # flattened patch: channels x temporal patch x patch x patch


def _text_cfg() -> dict:
    return dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1, eos_token_id=None,
                pad_token_id=PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random Qwen2-VL ("qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") model, eval mode, sdpa attention."""
    torch.manual_seed(seed)
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    if kind == "qwen2_vl":
        vc = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TPATCH, in_channels=3)
        cfg = transformers.Qwen2VLConfig(vision_config=vc, text_config=_text_cfg(), **ids)
        return transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    vc = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
              spatial_merge_size=MERGE, temporal_patch_size=TPATCH, in_channels=3, window_size=16,
              fullatt_block_indexes=[1])
    cfg = transformers.Qwen2_5_VLConfig(vision_config=vc, text_config=_text_cfg(), **ids)
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def qwen2():
    return build("qwen2_vl")


@pytest.fixture(scope="module")
def qwen25():
    return build("qwen2_5_vl")


@pytest.fixture(autouse=True)
def _unwrap(request):
    yield
    for name in ("qwen2", "qwen25"):
        if name in request.fixturenames:
            mmc.remove(request.getfixturevalue(name))


def sample(h: int, w: int, pre: int = 2, post: int = 4, seed: int = 0, t: int = 1):
    """One prompt with one image of (t, h, w) patches: ids [L], pixels [t*h*w, PIX_DIM], grid [1, 3]."""
    g = torch.Generator().manual_seed(seed)
    n = t * h * w // MERGE**2
    ids = [1 + int(i) for i in torch.randint(1, 50, (pre,), generator=g)] + [VS] + [IMG] * n + [VE]
    ids += [int(i) for i in torch.randint(2, 50, (post,), generator=g)]
    return torch.tensor(ids), torch.randn(t * h * w, PIX_DIM, generator=g), torch.tensor([[t, h, w]])


def batch(samples, side: str = "left"):
    """Pad prompts from `sample` into one batch (kwargs for forward/generate)."""
    L = max(s[0].numel() for s in samples)
    ids = torch.full((len(samples), L), PAD)
    am = torch.zeros(len(samples), L, dtype=torch.long)
    for b, (x, _, _) in enumerate(samples):
        sl = slice(L - x.numel(), L) if side == "left" else slice(0, x.numel())
        ids[b, sl] = x
        am[b, sl] = 1
    return dict(input_ids=ids, attention_mask=am, mm_token_type_ids=(ids == IMG).int(),
                pixel_values=torch.cat([s[1] for s in samples]), image_grid_thw=torch.cat([s[2] for s in samples]))


def single(h=4, w=6, **kw):
    ids, pv, grid = sample(h, w, **kw)
    ids = ids.unsqueeze(0)
    return dict(input_ids=ids, mm_token_type_ids=(ids == IMG).int(), pixel_values=pv, image_grid_thw=grid)


def greedy(model, kw, n=4):
    return model.generate(**kw, max_new_tokens=n, do_sample=False)


# ---- identity and restoration -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen2", "qwen25"])
def test_keep_all_is_bit_identical(kind, request):
    model = request.getfixturevalue(kind)
    kw = single()
    with torch.no_grad():
        ref = model(**kw).logits
        gen = greedy(model, kw)
        mmc.apply(model, "uniform", keep=1.0)
        assert torch.equal(model(**kw).logits, ref)
        assert torch.equal(greedy(model, kw), gen)
        st = mmc.stats(model)
    assert st["tokens_in"] == st["tokens_out"] == [6]


def test_remove_restores_and_apply_twice_is_noop(qwen2):
    kw = single()
    with torch.no_grad():
        ref = qwen2(**kw).logits
        mmc.apply(qwen2, "uniform", keep=2)
        once = qwen2(**kw).logits
        mmc.apply(qwen2, "uniform", keep=2)
        assert torch.equal(qwen2(**kw).logits, once)
        assert once.shape[1] == ref.shape[1] - 4
        with mmc.disabled(qwen2):
            assert torch.equal(qwen2(**kw).logits, ref)
        mmc.remove(qwen2)
        assert "forward" not in qwen2.__dict__
        assert torch.equal(qwen2(**kw).logits, ref)


def test_other_instance_untouched_and_sdpa_kept(qwen2):
    other = build("qwen2_vl", seed=1)
    kw = single()
    with torch.no_grad():
        ref = other(**kw).logits
        mmc.apply(qwen2, "uniform", keep=2)
        assert torch.equal(other(**kw).logits, ref)
    assert "forward" not in other.__dict__
    assert qwen2.config._attn_implementation == "sdpa"


# ---- positions and reference construction ------------------------------------------------------------------
def reference_compressed(model, kw, keep: int):
    """Build the compressed prompt by hand on the UNWRAPPED model: kept placeholder columns + original 3D ids."""
    inner = model.model
    ids, grid = kw["input_ids"], kw["image_grid_thw"]
    feats = inner.get_image_features(kw["pixel_values"], grid, return_dict=True).pooler_output[0]  # [N, C]
    t, h, w = grid[0].tolist()
    out = mmc.create("uniform", keep=keep)(feats.unsqueeze(0), grid=(t, h // MERGE, w // MERGE))
    pos, _ = inner.get_rope_index(ids, mm_token_type_ids=kw["mm_token_type_ids"], image_grid_thw=grid)  # [3, 1, L]
    img_cols = (ids[0] == IMG).nonzero().squeeze(1)
    keep_col = torch.ones(ids.shape[1], dtype=torch.bool)
    keep_col[img_cols] = False
    keep_col[img_cols[out.rep[0]]] = True
    new_ids = ids[:, keep_col]
    emb = inner.get_input_embeddings()(new_ids)
    emb[new_ids == IMG] = out.x[0]
    return emb, pos[:, :, keep_col], pos, keep_col


def test_compressed_forward_and_generate_match_hand_built_reference(qwen2):
    kw = single()
    with torch.no_grad():
        emb, pos_new, pos, _ = reference_compressed(qwen2, kw, keep=2)
        ref = qwen2(inputs_embeds=emb, position_ids=pos_new, use_cache=True)
        # greedy decode by hand: text after the prompt continues at the ORIGINAL max position + 1
        toks, cache, nxt = [], ref.cache, int(pos.max()) + 1
        tok = ref.logits[:, -1].argmax(-1, keepdim=True)
        for s in range(4):
            toks.append(tok)
            o = qwen2(input_ids=tok, position_ids=torch.full((3, 1, 1), nxt + s), cache=cache, use_cache=True)
            cache, tok = o.cache, o.logits[:, -1].argmax(-1, keepdim=True)
        mmc.apply(qwen2, "uniform", keep=2)
        got = qwen2(**kw).logits
        gen = greedy(qwen2, kw, n=4)
    torch.testing.assert_close(got, ref.logits, rtol=0, atol=1e-6)
    assert torch.equal(gen[:, kw["input_ids"].shape[1]:], torch.cat(toks, 1))
    assert mmc.stats(qwen2)["tokens_out"] == [2] and mmc.stats(qwen2)["seq_len_out"] == pos_new.shape[-1]


def test_bare_model_without_lm_head(qwen2):
    kw = single()
    bare = qwen2.model
    with torch.no_grad():
        emb, pos_new, _, _ = reference_compressed(qwen2, kw, keep=3)
        want = bare(inputs_embeds=emb, position_ids=pos_new).last_hidden_state
        try:
            mmc.apply(bare, "uniform", keep=3)
            got = bare(**kw).last_hidden_state
        finally:
            mmc.remove(bare)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert "forward" not in bare.__dict__


@pytest.mark.parametrize("kind", ["qwen2", "qwen25"])
def test_mrope_ids_of_kept_tokens_are_the_original_ones(kind, request):
    model = request.getfixturevalue(kind)
    kw = single(h=8, w=8)  # 16 image tokens
    seen = {}

    def grab(_mod, args, kwargs):
        seen["pos"] = kwargs["position_ids"]

    _, _, pos, keep_col = reference_compressed(model, kw, keep=5)
    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        mmc.apply(model, "uniform", keep=5)
        with torch.no_grad():
            model(**kw)
    finally:
        handle.remove()
    got = seen["pos"][-3:]  # [3, 1, L']
    assert torch.equal(got, pos[:, :, keep_col])
    # text after the image keeps its uncompressed positions (original max + 1 onwards)
    assert torch.equal(got[:, 0, -4:], pos[:, 0, -4:])


# ---- batches ----------------------------------------------------------------------------------------------
class _PerSampleUniform(UniformSelect):
    """`uniform` whose keep="auto" budget is 1 or 3 depending on the sample's content: ragged outputs."""

    def auto_keep(self, inp):
        return torch.where(inp.x[:, 0, 0] > inp.x[:, 1, 0], 3, 1)


@pytest.mark.parametrize("name,keep,side", [("uniform", 0.5, "left"), ("test_qwen_ragged_uniform", "auto", "left"),
                                            ("uniform", 0.5, "right")])
def test_ragged_batch_equals_single_runs(qwen2, registered, name, keep, side):
    samples = [sample(4, 6, seed=0), sample(4, 4, pre=3, seed=1), sample(4, 6, post=2, seed=4)]
    mmc.apply(qwen2, name, keep=keep)
    with torch.no_grad():
        kb = batch(samples, side)
        out = qwen2(**kb)
        # the batch result's valid rows, per sample, equal the single-sample result
        singles = []
        for s in samples:
            ks = batch([s])
            singles.append((qwen2(**ks).logits[0], list(mmc.stats(qwen2)["tokens_out"])))
        qwen2(**kb)
        st = mmc.stats(qwen2)
    assert st["tokens_out"] == [n[0] for _, n in singles]
    if keep == "auto":
        assert st["tokens_out"][0] != st["tokens_out"][2]  # same grid, different budgets: a ragged group
    L_out = out.logits.shape[1]
    for b, (ref, _) in enumerate(singles):
        rows = out.logits[b, L_out - ref.shape[0]:] if side == "left" else out.logits[b, : ref.shape[0]]
        torch.testing.assert_close(rows, ref, rtol=0, atol=1e-5)
    if side == "left":
        with torch.no_grad():
            gen = greedy(qwen2, kb, n=3)
            for b, s in enumerate(samples):
                g1 = greedy(qwen2, batch([s]), n=3)
                assert torch.equal(gen[b, -3:], g1[0, -3:])


def test_right_padded_labels_give_the_single_sample_loss(qwen2):
    samples = [sample(4, 6, seed=3), sample(4, 4, seed=4)]
    mmc.apply(qwen2, "uniform", keep=0.5)
    with torch.no_grad():
        kb = batch(samples, "right")
        labels = kb["input_ids"].masked_fill(kb["attention_mask"] == 0, -100)
        labels = labels.masked_fill(kb["input_ids"] == IMG, -100)
        out = qwen2(**kb, labels=labels)
        k0 = batch(samples[:1])
        l0 = k0["input_ids"].masked_fill(k0["input_ids"] == IMG, -100)
        ref = qwen2(**k0, labels=l0)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits[0, : ref.logits.shape[1]], ref.logits[0], rtol=0, atol=1e-5)


def test_generate_uses_fewer_tokens_and_a_shorter_cache(qwen2):
    kw = single(h=8, w=8)
    mmc.apply(qwen2, "uniform", keep=4)
    with torch.no_grad():
        out = qwen2.generate(**kw, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    st = mmc.stats(qwen2)
    assert st["tokens_in"] == [16] and st["tokens_out"] == [4]
    assert out.sequences.shape[1] == kw["input_ids"].shape[1] + 3
    assert out.cache.get_seq_length() == st["seq_len_out"] + 2  # prompt L' + 2 decoded tokens cached


@pytest.mark.parametrize("kind", ["qwen2", "qwen25"])
def test_video_is_compressed(kind, request):
    model = request.getfixturevalue(kind)
    g = torch.Generator().manual_seed(5)
    t, h, w = 2, 4, 4
    n = t * h * w // MERGE**2
    ids = torch.tensor([[3, 4, VS] + [VID] * n + [VE, 7, 8]])
    kw = dict(input_ids=ids, mm_token_type_ids=(ids == VID).int() * 2, video_grid_thw=torch.tensor([[t, h, w]]),
              pixel_values_videos=torch.randn(t * h * w, PIX_DIM, generator=g))
    with torch.no_grad():
        ref = model(**kw).logits
        gen = greedy(model, kw, n=2)
        mmc.apply(model, "uniform", keep=1.0)
        assert torch.equal(model(**kw).logits, ref)
        assert torch.equal(greedy(model, kw, n=2), gen)
        mmc.apply(model, "pool", keep=4)
        out = model(**kw).logits
        assert greedy(model, kw, n=2).shape == gen.shape
    assert out.shape[1] == ref.shape[1] - (n - 4)
    assert mmc.stats(model)["tokens_out"] == [4]


def test_images_only_option_leaves_video_alone(qwen2):
    mmc.apply(qwen2, "uniform", keep=2, modalities=("image",))
    kw = single()
    with torch.no_grad():
        assert qwen2(**kw).logits.shape[1] == kw["input_ids"].shape[1] - 4


class _TextProbe(UniformSelect):
    """`uniform` that needs `text=` and remembers what it got."""

    needs = ("text",)
    seen: list[torch.Tensor] = []

    def plan(self, inp, k):
        _TextProbe.seen.append(inp.text)
        return super().plan(inp, k)


@pytest.fixture
def registered():
    """Register test-only compressors for one test, then take them out of the registry again."""
    from mmcompress.registry import _REGISTRY

    names = {"test_qwen_ragged_uniform": _PerSampleUniform, "test_qwen_text_probe": _TextProbe,
             "test_qwen_scores_probe": _ScoresProbe}
    for n, cls in names.items():
        mmc.register(n)(cls)
    yield
    for n in names:
        _REGISTRY.pop(n, None)


def test_text_guided_compressors_get_the_question_embeddings(qwen2, registered):
    samples = [sample(4, 6, seed=6), sample(4, 4, post=3, seed=7)]
    kb = batch(samples)
    _TextProbe.seen.clear()
    mmc.apply(qwen2, "test_qwen_text_probe", keep=2)
    with torch.no_grad():
        qwen2(**kb)
        emb = qwen2.get_input_embeddings()
        for got, (ids, _, _) in zip(_TextProbe.seen, samples, strict=True):
            post = ids[(ids == VE).nonzero().item() + 1:]  # the question: the tokens after the image
            assert torch.equal(got, emb(post).unsqueeze(0))


class _ScoresProbe(UniformSelect):
    """`uniform` that needs `scores=` and remembers what it got."""

    needs = ("scores",)
    seen: list[torch.Tensor] = []

    def plan(self, inp, k):
        _ScoresProbe.seen.append(inp.scores)
        return super().plan(inp, k)


@pytest.mark.parametrize("kind", ["qwen2", "qwen25"])
def test_attention_scores_match_an_explicit_softmax(kind, request, registered):
    """Scores = mean attention received in the last vision block, per merged token, in the order the LLM sees."""
    model = request.getfixturevalue(kind)
    visual = model.model.visual
    cap = {}

    def grab_attn(_m, args, kwargs):
        cap["x"], cap["cu"], cap["pe"] = args[0], kwargs["cu_seqlens"], kwargs["position_embeddings"]

    def grab_merger(_m, _args, out):
        cap["merged"] = out  # [S / 4, C] rows in the blocks' order

    kw = single(h=8, w=12)  # 24 merged tokens: several 2x2 windows in Qwen2.5-VL
    _ScoresProbe.seen.clear()
    mmc.apply(model, "test_qwen_scores_probe", keep=5)
    hs = [visual.blocks[-1].attn.register_forward_pre_hook(grab_attn, with_kwargs=True),
          visual.merger.register_forward_hook(grab_merger)]
    try:
        with torch.no_grad():
            feats = model.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"]).pooler_output[0]
            model(**kw)
    finally:
        for h in hs:
            h.remove()
    attn = visual.blocks[-1].attn
    with torch.no_grad():
        S = cap["x"].shape[0]
        q, k, _ = attn.qkv(cap["x"]).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        host = __import__(type(attn).__module__, fromlist=["x"])
        q, k = host.apply_rotary_pos_emb_vision(q, k, *cap["pe"])
        want = torch.zeros(S, dtype=torch.float64)
        cu = cap["cu"].tolist()
        for s, e in zip(cu[:-1], cu[1:], strict=True):
            a = (q[s:e].double().transpose(0, 1) @ k[s:e].double().transpose(0, 1).transpose(1, 2)) * attn.scaling
            want[s:e] = a.softmax(-1).mean(dim=(0, 1))  # [n]: mean over heads and queries
        want = want.view(-1, 4).mean(1)  # per merged token, blocks' order
        # map to the LLM's order by matching merger rows to the final features (independent of window_index)
        order = [int((cap["merged"] == row).all(1).nonzero()[0]) for row in feats]
        want = want[order].float()
    got = _ScoresProbe.seen[-1][0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["qwen2", "qwen25"])
def test_visionzip_runs_with_generate(kind, request):
    model = request.getfixturevalue(kind)
    kw = single(h=8, w=8)
    mmc.apply(model, "visionzip", keep=6)
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == kw["input_ids"].shape[1] + 2
    assert mmc.stats(model)["tokens_out"] == [6]


def test_fastv_option_prunes_inside_the_llm(qwen2):
    model = qwen2
    samples = [sample(8, 8, seed=8), sample(4, 8, seed=9)]  # 16 and 8 image tokens
    kb = batch(samples)
    with torch.no_grad():
        ref = model(**kb).logits
        gen_ref = greedy(model, kb, n=3)
        mmc.apply(model, "uniform", keep=1.0, fastv_k=1, fastv_r=0.0)  # R = 0 prunes nothing
        assert torch.equal(model(**kb).logits, ref)
        assert torch.equal(greedy(model, kb, n=3), gen_ref)
        mmc.apply(model, "uniform", keep=0.5, fastv_k=1, fastv_r=0.5)
        out = model(**kb).logits
        gen = greedy(model, kb, n=3)
        st = mmc.stats(model)
        single = [greedy(model, batch([s]), n=3) for s in samples]  # ragged FastV: each sample as alone
    assert st["tokens_out"] == [8, 4] and st["inllm_removed"] == [4, 2]
    assert torch.isfinite(out).all() and gen.shape == gen_ref.shape
    for b in range(2):
        assert torch.equal(gen[b, -3:], single[b][0, -3:])
    mmc.remove(model)
    with torch.no_grad():
        assert torch.equal(model(**kb).logits, ref)


def test_errors_name_the_argument(qwen2):
    with pytest.raises(ValueError, match="modalities"):
        mmc.apply(qwen2, "uniform", keep=2, modalities=("audio",))
    with pytest.raises(ValueError, match="fastv_k"):
        mmc.apply(qwen2, "uniform", keep=2, fastv_k=5)
    mmc.apply(qwen2, "uniform", keep=2)
    kw = single()
    kw["input_ids"][0, 5] = 7  # one image placeholder fewer than the features
    kw["mm_token_type_ids"] = (kw["input_ids"] == IMG).int()
    with pytest.raises(ValueError, match="input_ids"), torch.no_grad():
        qwen2(**kw)
