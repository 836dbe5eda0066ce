"""LLaVA-family adapters on tiny random models: identity, restoration, per-instance patching, generate(), ragged
batches (each sample equals its solo run), anyres tiles, video, scores/text plumbing."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.base import Compressor, Inputs, Plan
from mmcompress.compressors.baselines import UniformSelect, selection_plan

transformers = pytest.importorskip("transformers")

from llava_tiny import IMG, build, image_tokens, images, pad, prompt  # noqa: E402

KINDS = ("llava", "llava_next", "llava_onevision")


# ---- test-only compressors ---------------------------------------------------------------------------------
class RaggedUniform(UniformSelect):
    """Uniform selection with a per-sample budget that depends only on the sample (exercises `mask`)."""

    def auto_keep(self, inp: Inputs) -> torch.Tensor:
        key = (inp.x.double().abs().sum((1, 2)) * 7).floor().long()  # [B] a per-sample integer
        return 1 + key % (inp.x.shape[1] - 1)


class Record(Compressor):
    """Keeps the first k tokens and records what it was called with (text / scores / grid / prefix)."""

    family, modality, needs = "test", "any", ("scores",)
    select_only = True
    calls: list[dict] = []

    def plan(self, inp: Inputs, k: int) -> Plan:
        B = inp.x.shape[0]
        return selection_plan(torch.arange(k).expand(B, k), inp.x.shape[1])

    def __call__(self, x, **kw):
        Record.calls.append({"x": x, **kw})
        return super().__call__(x, **kw)


class RecordText(Record):
    needs = ("text",)


# ---- fixtures ----------------------------------------------------------------------------------------------
TEST_COMPRESSORS = {"_test_ragged": RaggedUniform, "_test_record": Record, "_test_text": RecordText}


@pytest.fixture(scope="module", autouse=True)
def _test_compressors():
    """Register the test-only compressors for this module only (other tests iterate `mmc.available()`)."""
    from mmcompress import registry

    for name, cls in TEST_COMPRESSORS.items():
        mmc.register(name)(cls)
    yield
    for name in TEST_COMPRESSORS:
        registry._REGISTRY.pop(name, None)


@pytest.fixture(scope="module")
def models():
    return {k: build(k) for k in KINDS}


@pytest.fixture(autouse=True)
def _unwrap(models):
    yield
    for m in models.values():
        mmc.remove(m)


def inputs(model, kind: str, texts=((11, 12), (13, 14, 15)), side: str = "left", seed: int = 0) -> dict:
    """A batch with one image per sample (anyres sizes for next/onevision)."""
    B = len(texts)
    if kind == "llava":
        pv, sizes = images(B, seed), None
    else:
        pv = torch.randn(B, 5, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        sizes = torch.tensor([[40, 60], [32, 32], [60, 40]][:B])
    n = image_tokens(model, pv, sizes)
    ids, am = pad([prompt([n[b]], [20 + b], list(texts[b])) for b in range(B)], side)
    kw = {"input_ids": ids, "attention_mask": am, "pixel_values": pv}
    if sizes is not None:
        kw["image_sizes"] = sizes
    return kw


def logits(model, kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw).logits


# ---- identity / restoration / instance rules -----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stage", ["vision", "projector"])
def test_keep_all_is_bit_identical(models, kind, stage):
    m = models[kind]
    kw = inputs(m, kind)
    ref = logits(m, kw)
    mmc.apply(m, "uniform", keep=1.0, stage=stage)
    assert torch.equal(logits(m, kw), ref)
    st = mmc.stats(m)
    assert st["tokens_in"] == st["tokens_out"] and len(st["tokens_in"]) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_remove_restores_and_apply_is_idempotent(models, kind):
    m = models[kind]
    kw = inputs(m, kind)
    ref = logits(m, kw)
    hooks = sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) for mod in m.modules())  # HF's own
    mmc.apply(m, "uniform", keep=0.25)
    once = logits(m, kw)
    assert once.shape[1] < ref.shape[1]
    mmc.apply(m, "uniform", keep=0.25)
    assert torch.equal(logits(m, kw), once)
    assert not hasattr(m.forward.__wrapped__, "_mmcompress")  # one wrapper, not two
    with mmc.disabled(m):
        assert torch.equal(logits(m, kw), ref)
    mmc.remove(m)
    assert "forward" not in m.__dict__ and "_mmcompress_adapter" not in m.__dict__
    assert torch.equal(logits(m, kw), ref)
    assert hooks == sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) for mod in m.modules())
    assert m.config._attn_implementation == "sdpa"
    assert m.config.text_config._attn_implementation == "sdpa"


def test_second_instance_untouched(models):
    a, b = models["llava"], build("llava", seed=1)
    kw = inputs(b, "llava")
    ref = logits(b, kw)
    mmc.apply(a, "uniform", keep=2)
    assert "forward" not in b.__dict__
    assert torch.equal(logits(b, kw), ref)
    with pytest.raises(ValueError, match="not wrapped"):
        mmc.stats(b)


def test_unsupported_model_lists_supported_types():
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                                num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="llava_next.*llava_onevision|llava_onevision"):
        mmc.apply(lm, "uniform", keep=0.5)


def test_bad_options(models):
    m = models["llava"]
    with pytest.raises(ValueError, match="stage"):
        mmc.apply(m, "uniform", keep=0.5, stage="llm")
    with pytest.raises(ValueError, match="stage='projector'"):  # an explicit vision stage is refused ...
        mmc.apply(m, "_test_text", keep=0.5, stage="vision")
    mmc.apply(m, "_test_text", keep=0.5)  # ... and without one, a text-guided method runs after the projector
    assert m.__dict__["_mmcompress_adapter"].opts["stage"] == "projector"
    mmc.remove(m)
    with pytest.raises(TypeError, match="unknown option"):
        mmc.apply(m, "uniform", keep=0.5, bogus=1)
    assert "forward" not in m.__dict__


# ---- generate / ragged batches -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_generate_uses_fewer_tokens_and_matches_uncached_greedy(models, kind):
    m = models[kind]
    kw = inputs(m, kind, texts=((11, 12),))
    mmc.apply(m, "uniform", keep=4)
    with torch.no_grad():
        out = m.generate(**kw, max_new_tokens=4, do_sample=False)
    st = mmc.stats(m)
    assert st["tokens_out"][0] < st["tokens_in"][0]
    # same tokens without a cache: every step re-runs the (deterministic) compressed prefill
    ids = kw["input_ids"]
    for _ in range(4):
        step = {**kw, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        nxt = logits(m, {**step, "use_cache": False})[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    assert torch.equal(out[:, -4:], ids[:, -4:])


def _ragged_batch(m, side):
    texts = [(11, 12, 13, 14, 15), (16,), (17, 18, 19)]
    pv = images(3, seed=3)
    n = image_tokens(m, pv, None)
    seqs = [prompt([n[b]], [20 + b] * (b + 1), texts[b]) for b in range(3)]
    ids, am = pad(seqs, side)
    return seqs, pv, ids, am


def test_ragged_batch_forward_equals_single_runs(models):
    """Right padding: valid logits of each sample in the batch == its solo run (different budgets)."""
    m = models["llava"]
    seqs, pv, ids, am = _ragged_batch(m, "right")
    mmc.apply(m, "_test_ragged", keep="auto")
    batch = logits(m, {"input_ids": ids, "attention_mask": am, "pixel_values": pv})
    budgets = mmc.stats(m)["tokens_out"]
    assert len(set(budgets)) == 3, budgets  # really ragged
    for b, s in enumerate(seqs):
        solo = logits(m, {"input_ids": torch.tensor([s]), "pixel_values": pv[b : b + 1]})
        assert mmc.stats(m)["tokens_out"] == [budgets[b]]
        n = solo.shape[1]
        torch.testing.assert_close(batch[b, :n], solo[0], atol=1e-5, rtol=1e-4)


def test_ragged_batch_generate_equals_single_runs(models):
    """Left padding through generate(): each sample's greedy continuation == its solo generate()."""
    m = models["llava"]
    seqs, pv, ids, am = _ragged_batch(m, "left")
    mmc.apply(m, "_test_ragged", keep="auto")
    with torch.no_grad():
        out = m.generate(input_ids=ids, attention_mask=am, pixel_values=pv, max_new_tokens=5, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
        for b, s in enumerate(seqs):
            solo = m.generate(input_ids=torch.tensor([s]), pixel_values=pv[b : b + 1], max_new_tokens=5,
                              do_sample=False, output_scores=True, return_dict_in_generate=True)
            assert torch.equal(out.sequences[b, -5:], solo.sequences[0, -5:])
            for sb, ss in zip(out.scores, solo.scores, strict=True):
                torch.testing.assert_close(sb[b], ss[0], atol=1e-5, rtol=1e-4)


def test_right_padded_batch_becomes_ragged_without_padding_input(models):
    """An unpadded batch made ragged by compression is padded on the `padding_side` option's side."""
    m = models["llava"]
    pv = images(2, seed=4)
    n = image_tokens(m, pv, None)
    ids = torch.tensor([prompt([n[0]], [20], [11, 12]), prompt([n[1]], [21], [13, 14])])
    mmc.apply(m, "_test_ragged", keep="auto", padding_side="right")
    batch = logits(m, {"input_ids": ids, "pixel_values": pv})
    for b in range(2):
        solo = logits(m, {"input_ids": ids[b : b + 1], "pixel_values": pv[b : b + 1]})
        torch.testing.assert_close(batch[b, : solo.shape[1]], solo[0], atol=1e-5, rtol=1e-4)


def test_labels_follow_the_tokens(models):
    m = models["llava"]
    kw = inputs(m, "llava", side="right")
    labels = kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100).masked_fill(kw["input_ids"] == IMG, -100)
    with torch.no_grad():
        ref = m(**kw, labels=labels).loss
        mmc.apply(m, "uniform", keep=1.0)
        assert torch.equal(m(**kw, labels=labels).loss, ref)
        mmc.apply(m, "uniform", keep=3)
        out = m(**kw, labels=labels)
    # text tokens are all kept, so the loss is over the same targets: finite and of the same order
    assert torch.isfinite(out.loss) and out.logits.shape[1] < kw["input_ids"].shape[1]


# ---- what the compressor receives ------------------------------------------------------------------------------
def test_scores_are_the_cls_attention_row(models):
    """stage vision on llava (CLIP, CLS dropped by 'default'): grid (4, 4), prefix 0, scores = CLS row of the
    selected layer (hidden_states[-2] -> encoder.layers[-2]) recomputed here in eager arithmetic."""
    m = models["llava"]
    kw = inputs(m, "llava")
    Record.calls.clear()
    mmc.apply(m, "_test_record", keep=5)
    logits(m, kw)
    call = Record.calls[-1]
    assert call["grid"] == (4, 4) and call["prefix"] == 0 and call["x"].shape == (2, 16, 32)
    vt = m.model.vision_tower
    with torch.no_grad():
        hs = vt(kw["pixel_values"], output_hidden_states=True).hidden_states
        layer = vt.encoder.layers[-2]
        h = layer.layer_norm1(hs[-3])  # input of layers[-2]
        at = layer.self_attn
        q = at.q_proj(h).view(2, 17, 4, 8).transpose(1, 2)
        k = at.k_proj(h).view(2, 17, 4, 8).transpose(1, 2)
        row = (q[:, :, :1] @ k.transpose(-1, -2) * at.scale).softmax(-1).mean(1)[:, 0]  # [2, 17]
    torch.testing.assert_close(call["scores"], row[:, 1:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(call["x"], hs[-2][:, 1:])  # features before the projector


def test_scores_without_cls_are_mean_received(models):
    m = models["llava_onevision"]  # SigLIP tower, strategy "full": no CLS
    kw = inputs(m, "llava_onevision", texts=((11,),))
    Record.calls.clear()
    mmc.apply(m, "_test_record", keep=5)
    logits(m, kw)
    call = Record.calls[-1]
    assert call["grid"] is None and call["prefix"] == 0  # anyres image: base + high-res in one 1-D sequence
    assert call["scores"].shape == call["x"].shape[:2]
    assert bool((call["scores"] > 0).all())


def test_text_is_the_question_embedding(models):
    m = models["llava"]
    pv = images(1, seed=5)
    n = image_tokens(m, pv, None)
    ids = torch.tensor([prompt([n[0]], [30, 31], [40, 41, 42, 2])])  # question 40 41 42, then eos (excluded)
    Record.calls.clear()
    mmc.apply(m, "_test_text", keep=4, stage="projector")
    logits(m, {"input_ids": ids, "pixel_values": pv})
    call = Record.calls[-1]
    emb = m.model.get_input_embeddings()(torch.tensor([[40, 41, 42]]))
    torch.testing.assert_close(call["text"], emb)
    assert call["x"].shape[-1] == 32 and call["grid"] == (4, 4)


# ---- anyres and video ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llava_next", "llava_onevision"])
def test_anyres_counts_include_one_newline(models, kind):
    m = models[kind]
    kw = inputs(m, kind)
    mmc.apply(m, "uniform", keep=6)
    logits(m, kw)
    assert mmc.stats(m)["tokens_out"] == [7, 7]  # 6 kept tokens + 1 image_newline per image


def test_onevision_video_grid_and_identity(models):
    m = models["llava_onevision"]
    pvv = torch.randn(1, 3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    ids = torch.tensor([prompt([], [11], [12, 13], video_tokens=3 * 2 * 2 + 1)])
    kw = {"input_ids": ids, "pixel_values_videos": pvv}
    ref = logits(m, kw)
    mmc.apply(m, "uniform", keep=1.0)
    assert torch.equal(logits(m, kw), ref)
    Record.calls.clear()
    mmc.apply(m, "_test_record", keep=5)
    out = logits(m, kw)
    assert Record.calls[-1]["grid"] == (3, 2, 2)
    assert mmc.stats(m)["tokens_out"] == [6] and out.shape[1] == ids.shape[1] - 7
    with torch.no_grad():
        g = m.generate(**kw, max_new_tokens=3, do_sample=False)
    assert g.shape[1] == ids.shape[1] + 3


# ---- plumbing helpers (shared with the Qwen adapter) ------------------------------------------------------------
def test_shrink_batch_left_and_right():
    from mmcompress.hf.plumbing import shrink_batch

    ids = torch.tensor([[0, 1, 5, 5, 5, 7], [1, 5, 5, 5, 8, 9]])
    am = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    keep = torch.tensor([[1, 1, 1, 0, 0, 1], [1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    lab = ids.clone()
    for side, want in (("left", [[0, 1, 5, 7], [1, 5, 5, 8, 9]]), ("right", [[1, 5, 7], [1, 5, 5, 8, 9]])):
        sh = shrink_batch(keep, am, {"input_ids": ids, "labels": lab}, {"input_ids": 0, "labels": -100}, side)
        assert sh.tensors["input_ids"].shape == (2, 5)
        got0 = sh.tensors["input_ids"][0][sh.attention_mask[0].bool()].tolist()
        assert got0 == [1, 5, 7] and sh.tensors["input_ids"][1].tolist() == want[1]
        assert sh.position_ids[0][sh.attention_mask[0].bool()].tolist() == [0, 1, 2]
        assert (sh.tensors["labels"][0][~sh.attention_mask[0].bool()] == -100).all()
        pad_at = 0 if side == "left" else -1
        assert sh.attention_mask[0, pad_at] == 0


def test_question_mask_rule():
    from mmcompress.hf.plumbing import question_mask

    ids = torch.tensor([[0, 1, 30, 5, 5, 40, 41, 2], [1, 5, 5, 50, 51, 52, 53, 54]])
    am = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8])
    qm = question_mask(ids, am, media_ids=[5], exclude_ids=[0, 1, 2, 54])
    assert ids[0][qm[0]].tolist() == [40, 41] and ids[1][qm[1]].tolist() == [50, 51, 52, 53]
    only_image = torch.tensor([[1, 30, 5, 5, 2]])  # nothing after the image: fall back to the words before it
    assert only_image[0][question_mask(only_image, None, [5], [1, 2])[0]].tolist() == [30]


def test_media_segments_checks_counts():
    from mmcompress.hf.plumbing import media_segments

    ids = torch.tensor([[1, 5, 5, 5, 5, 9], [1, 5, 5, 9, 9, 9]])
    segs = media_segments(ids, 5, [2, 2, 2])
    assert [b for b, _ in segs] == [0, 0, 1] and segs[1][1].tolist() == [3, 4]
    with pytest.raises(ValueError, match="placeholder"):
        media_segments(ids, 5, [4, 3])
    with pytest.raises(ValueError, match="straddles"):
        media_segments(ids, 5, [3, 3])


# ---- every registered compressor through the adapter -------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in mmc.available() if not n.startswith("_")
                                  and getattr(mmc.get(n).encoder_needs, "stage", None) != "pixels"])
def test_every_compressor_runs_through_llava(models, name):  # (pixelprune: Qwen-VL towers only; its own tests)
    m = models["llava"]
    kw = inputs(m, "llava")
    stage = "projector" if "text" in mmc.get(name).needs else "vision"
    # the part before the LLM (a method's own in-LLM stage, e.g. flashvid's, is tested in its own file)
    own = {"llm_layer": None} if hasattr(mmc.get(name), "inllm_stage") else {}
    if name == "trio_encoder":  # its shallow block 5 (the release's) is past this 2-block tower: read block 0
        own["shallow_layer"] = 0
    mmc.apply(m, name, keep=0.25 if name not in ("adaptive",) else "auto", stage=stage, **own)
    out = logits(m, kw)
    st = mmc.stats(m)
    assert out.shape[1] == kw["input_ids"].shape[1] - sum(st["tokens_in"]) // 2 + max(st["tokens_out"])
    assert all(o <= i for o, i in zip(st["tokens_out"], st["tokens_in"], strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_two_images_in_one_prompt(models, kind):
    """One prompt with two images: identity is bit-identical; compressed, each image keeps its own budget."""
    m = models[kind]
    full = inputs(m, kind)  # two samples of one image each: reuse their pixels as one two-image prompt
    pv = full["pixel_values"]
    sizes = full.get("image_sizes")
    n = image_tokens(m, pv, sizes)
    if kind == "llava_onevision":  # multi-image prompts use each image's base tile only, plus its newline
        side = m.config.vision_config.image_size // m.config.vision_config.patch_size
        n = [side * side + 1] * 2
    ids = torch.tensor([prompt([n[0], n[1]], [20], [11, 12])])
    kw = {"input_ids": ids, "pixel_values": pv, **({"image_sizes": sizes} if sizes is not None else {})}
    if kind == "llava_onevision":
        kw["batch_num_images"] = torch.tensor([2])
    ref = logits(m, kw)
    mmc.apply(m, "uniform", keep=1.0)
    assert torch.equal(logits(m, kw), ref)
    mmc.apply(m, "uniform", keep=3)
    out = logits(m, kw)
    newline = 0 if kind == "llava" else 1
    assert mmc.stats(m)["tokens_out"] == [2 * (3 + newline)]
    assert out.shape[1] == ids.shape[1] - (sum(n) - 2 * (3 + newline))
    with torch.no_grad():
        assert m.generate(**kw, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2
