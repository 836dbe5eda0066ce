"""The bench's encoder memo changes nothing but the time: the same answers, kept sets and FLOPs with and without
it, for methods that hook the tower (their blocks are replayed) and methods that do not."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from tests.bench_fixtures import ToyTask, save_tiny_llava

METHODS = [("none", 1.0), ("visionzip", 0.5), ("prumerge+", 0.5), ("vispruner", 0.25), ("tome", 0.5),
           ("fastv", 0.5), ("resize", 0.5)]


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    from mmcompress.evals.backends import VLMBackend

    d = save_tiny_llava(tmp_path_factory.mktemp("memo"), layers=4)
    plain, memo = VLMBackend.load(str(d)), VLMBackend.load(str(d))
    memo.use_encoder_memo()
    return plain, memo


def _run(be, method, keep, samples):
    be.configure(method, keep, {})
    rows = be.predict(samples, 2)
    st = mmc.stats(be.model) if method not in ("none", "resize") else {}
    assign = [a.clone() for (_, _, a) in st.get("assign", [])]
    return rows, assign


def test_memo_gives_the_same_rows_and_kept_sets(backends):
    plain, memo = backends
    samples = ToyTask().samples()[:3]
    for method, keep in METHODS:  # after `none` (and resize's first batch) every batch is a hit
        want, want_assign = _run(plain, method, keep, samples)
        got, got_assign = _run(memo, method, keep, samples)
        for w, g in zip(want, got, strict=True):
            assert (w["prediction"], w["tokens"], w.get("prefill_flops")) == \
                   (g["prediction"], g["tokens"], g.get("prefill_flops")), method
        assert len(want_assign) == len(got_assign) and all(
            torch.equal(a, b) for a, b in zip(want_assign, got_assign, strict=True)), method
    m = memo.encoder_memo
    assert m.misses == 2 and m.hits == len(METHODS) - 2  # one miss per pixel batch (full, resized)


def test_replayed_hooks_see_the_full_forwards_tensors(backends):
    _, memo = backends
    tower, m = memo.vision, memo.encoder_memo
    pix = torch.randn(2, 3, 32, 32)
    with m:
        first = tower(pix, output_hidden_states=True)
        got = []
        h = m.blocks[1].self_attn.register_forward_pre_hook(lambda mod, a, kw: got.append(kw.get(
            "hidden_states", a[0] if a else None).clone()), with_kwargs=True)
        again = tower(pix, output_hidden_states=True)
        h.remove()
    assert torch.equal(first.last_hidden_state, again.last_hidden_state) and again is not first
    want = []
    h = m.blocks[1].self_attn.register_forward_pre_hook(lambda mod, a, kw: want.append(kw.get(
        "hidden_states", a[0] if a else None).clone()), with_kwargs=True)
    tower(pix, output_hidden_states=True)
    h.remove()
    assert len(got) == 1 and torch.equal(got[0], want[0])


def test_anything_it_cannot_replay_runs_the_tower(backends):
    _, memo = backends
    tower, m = memo.vision, memo.encoder_memo
    pix = torch.randn(1, 3, 32, 32)
    seen = []
    with m:
        tower(pix)
        before = m.bypassed
        norm = next(mod for name, mod in tower.named_modules() if name.endswith("post_layernorm"))
        h = norm.register_forward_hook(lambda *a: seen.append(1))
        tower(pix)
        h.remove()
        assert m.bypassed == before + 1 and seen == [1]
        blk = m.blocks[0]
        blk.forward = blk.forward  # an instance-level forward (a ViT-internal merge patches like this)
        tower(pix)
        del blk.forward
        assert m.bypassed == before + 2
    with pytest.raises(TypeError, match="tower"):
        type(m)("not a module")
