"""Every placeholder-pattern family on tiny random models: the same guarantees as the LLaVA and Qwen adapters.

Identity (keep = all) is bit-identical, `remove()` restores, `disabled()` works, forward and `generate()` run
compressed with a shorter cache, ragged batches equal single runs (left and right padding), SDPA stays SDPA,
attention-based methods get scores, text-guided ones get the question's embeddings, FastV prunes inside the LLM.
"""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.baselines import UniformSelect
from mmcompress.registry import _REGISTRY

pytest.importorskip("transformers")
from family_tiny import BOS, END, SPECS, batch, build  # noqa: E402

FAMILIES = list(SPECS)


@pytest.fixture(scope="module")
def models():
    return {}


@pytest.fixture(params=FAMILIES)
def fam(request, models):
    name = request.param
    if name not in models:
        models[name] = build(name)
    model = models[name]
    yield SPECS[name], model
    mmc.remove(model)


def greedy(model, kw, n=3):
    return model.generate(**kw, max_new_tokens=n, do_sample=False)


class _PerSampleUniform(UniformSelect):
    """`uniform` whose keep="auto" budget depends on the item's content (1 or 3 tokens): ragged outputs."""

    def auto_keep(self, inp):
        return torch.where(inp.x[:, 0, 0] > inp.x[:, 1, 0], 3, 1)


class _Probe(UniformSelect):
    """`uniform` that needs `text=` and `scores=` and remembers them."""

    needs = ("text", "scores")
    seen: list = []

    def plan(self, inp, k):
        _Probe.seen.append((inp.text, inp.scores, inp.x.shape))
        return super().plan(inp, k)


@pytest.fixture
def registered():
    names = {"test_fam_ragged": _PerSampleUniform, "test_fam_probe": _Probe}
    for n, cls in names.items():
        mmc.register(n)(cls)
    yield
    for n in names:
        _REGISTRY.pop(n, None)


def test_keep_all_is_bit_identical_and_remove_restores(fam):
    spec, model = fam
    kw = batch(spec, [spec.sample(0)])
    with torch.no_grad():
        ref, gen = model(**kw).logits, greedy(model, kw)
        mmc.apply(model, "uniform", keep=1.0)
        assert torch.equal(model(**kw).logits, ref)
        assert torch.equal(greedy(model, kw), gen)
        mmc.apply(model, "tome", keep=0.5)
        assert model(**kw).logits.shape[1] < ref.shape[1]
        with mmc.disabled(model):
            assert torch.equal(model(**kw).logits, ref)
        mmc.remove(model)
        assert torch.equal(model(**kw).logits, ref)
        assert "forward" not in model.__dict__


def test_compressed_generate_uses_a_shorter_cache(fam):
    spec, model = fam
    kw = batch(spec, [spec.sample(1)])
    mmc.apply(model, "uniform", keep=0.25)
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    st = mmc.stats(model)
    assert st["tokens_out"][0] < st["tokens_in"][0]
    assert out.sequences.shape[1] == kw["input_ids"].shape[1] + 3
    assert out.cache.get_seq_length() == st["seq_len_out"] + 2
    # decoding after the shorter prefill equals a prefill-free re-run of the compressed prompt token by token
    with torch.no_grad():
        ids = out.sequences
        full = model(**{**kw, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                        **spec.per_token(ids)}).logits
    assert torch.equal(full[0, -3:-1].argmax(-1), out.sequences[0, -2:])


@pytest.mark.parametrize("name,keep,side", [("uniform", 0.5, "left"), ("test_fam_ragged", "auto", "left"),
                                            ("uniform", 0.5, "right")])
def test_ragged_batch_equals_single_runs(fam, registered, name, keep, side):
    spec, model = fam
    if not spec.batch_invariant:  # the unwrapped model's SDPA path couples padded rows: test on eager attention
        model = build(spec.name, attn="eager")
    samples = [spec.sample(0), spec.sample(1, pre=3), spec.sample(4, post=2)]
    mmc.apply(model, name, keep=keep)
    with torch.no_grad():
        kb = batch(spec, samples, side)
        out = model(**kb)
        st = mmc.stats(model)
        singles = []
        for s in samples:
            singles.append((model(**batch(spec, [s])).logits[0], mmc.stats(model)["tokens_out"][0]))
    assert st["tokens_out"] == [n for _, n in singles]
    L_out = out.logits.shape[1]
    for b, (ref, _) in enumerate(singles):
        rows = out.logits[b, L_out - ref.shape[0]:] if side == "left" else out.logits[b, : ref.shape[0]]
        torch.testing.assert_close(rows, ref, rtol=0, atol=1e-5)
    if side == "left":
        with torch.no_grad():
            gen = greedy(model, kb)
            for b, s in enumerate(samples):
                assert torch.equal(gen[b, -3:], greedy(model, batch(spec, [s]))[0, -3:])


def test_sdpa_stays_and_other_instances_untouched(fam):
    spec, model = fam
    other = build(spec.name)
    kw = batch(spec, [spec.sample(2)])
    mmc.apply(model, "tome", keep=0.5)
    impls = {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    assert impls == {"sdpa"}
    with torch.no_grad():
        assert other(**kw).logits.shape[1] == kw["input_ids"].shape[1]


def test_scores_and_question_embeddings_reach_the_compressor(fam, registered):
    spec, model = fam
    s = spec.sample(3, post=5)
    kw = batch(spec, [s])
    _Probe.seen.clear()
    mmc.apply(model, "test_fam_probe", keep=0.5)
    with torch.no_grad():
        model(**kw)
    assert _Probe.seen
    ids = s[0]
    last = max(int(i) for i in (ids == spec.token).nonzero()) + 1
    q = ids[last:]
    q = q[(q != END) & (q != BOS)]  # BOS is excluded; END only where the family names it (text otherwise)
    emb = model.get_input_embeddings()
    for text, scores, shape in _Probe.seen:
        assert scores.shape == shape[:2] and bool(torch.isfinite(scores).all()) and bool((scores >= 0).all())
        assert text.shape[-1] == shape[-1]
        assert text.shape[1] in (q.numel(), q.numel() + 1)  # END is text for families that do not name it
        assert torch.equal(text[0, -q.numel():], emb(q))


@pytest.mark.parametrize("name", ["visionzip", "text_recovery", "adaptive", "fastv"])
def test_catalogue_methods_run_with_generate(fam, name):
    spec, model = fam
    kw = batch(spec, [spec.sample(5)])
    mmc.apply(model, name, keep=0.5)
    with torch.no_grad():
        out = greedy(model, kw)
    assert out.shape[1] == kw["input_ids"].shape[1] + 3
    st = mmc.stats(model)
    if name == "fastv":
        assert st["inllm_removed"] and st["inllm_removed"][0] > 0
    else:
        assert st["tokens_out"][0] < st["tokens_in"][0] or name == "adaptive"


def test_wrong_placeholder_count_is_a_clear_error(fam):
    spec, model = fam
    ids, media = spec.sample(0)
    ids = torch.cat([ids[:1], torch.tensor([spec.token]), ids[1:]])  # one placeholder too many
    kw = batch(spec, [(ids, media)])
    mmc.apply(model, "uniform", keep=0.5)
    with pytest.raises(ValueError, match="placeholder|features and"), torch.no_grad():
        model(**kw)


def test_two_items_in_one_prompt(fam):
    from family_tiny import two_items

    spec, model = fam
    ids, media = two_items(spec)
    kw = batch(spec, [(ids, media)])
    with torch.no_grad():
        ref = model(**kw).logits
        mmc.apply(model, "uniform", keep=1.0)
        assert torch.equal(model(**kw).logits, ref)
        mmc.apply(model, "uniform", keep=0.5)
        out = model(**kw).logits
        st = mmc.stats(model)
        assert greedy(model, kw).shape[1] == ids.numel() + 3
    n_items = 4 if spec.name == "internvl" else 2  # InternVL: two tiles per image
    per_item = st["tokens_in"][0] // n_items
    one = mmc.create("uniform", keep=0.5)(torch.randn(1, per_item, 4)).x.shape[1]  # the budget of one item
    assert st["tokens_out"] == [n_items * one]
    assert out.shape[1] == ref.shape[1] - (st["tokens_in"][0] - st["tokens_out"][0])


def test_qwen3_vl_video(models):
    from family_tiny import VID, qwen3_video_sample

    spec = SPECS["qwen3_vl"]
    model = models.setdefault("qwen3_vl", build("qwen3_vl"))
    ids, media = qwen3_video_sample()
    kw = batch(spec, [(ids, media)])
    kw["mm_token_type_ids"] = (kw["input_ids"] == VID).int() * 2
    try:
        with torch.no_grad():
            ref = model(**kw).logits
            mmc.apply(model, "uniform", keep=1.0)
            assert torch.equal(model(**kw).logits, ref)
            mmc.apply(model, "temporal", keep=0.5)
            out = model(**kw).logits
            assert mmc.stats(model)["tokens_out"] == [4] and out.shape[1] == ref.shape[1] - 4
            assert greedy(model, kw).shape[1] == ids.numel() + 3
    finally:
        mmc.remove(model)


def test_stats_assign_is_each_items_provenance(fam):
    spec, model = fam
    kw = batch(spec, [spec.sample(0)])
    mmc.apply(model, "tome", keep=0.5)
    with torch.no_grad():
        model(**kw)
    st = mmc.stats(model)
    items = st["assign"]
    assert items and all(s == 0 for _, s, _ in items)
    n_out = sum(int(a.max()) + 1 for _, _, a in items)
    assert n_out == st["tokens_out"][0]  # every output slot is some token's slot
    assert sum(a.numel() for _, _, a in items) == st["tokens_in"][0]
