"""The shared in-LLM pruning stage (mmcompress/inllm/stage.py) on tiny random decoders and VLM families.

Checked against plain-PyTorch references written here: a loop over the decoder layers that drops the same columns
by hand (original or renumbered positions), and the unpruned model where nothing is dropped.
"""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.inllm.stage import InLLM, PruneContext

transformers = pytest.importorskip("transformers")

from family_tiny import SPECS, batch  # noqa: E402
from family_tiny import build as build_family  # noqa: E402


class FixedDrop:
    """A test rule: at each point, drop the live image tokens whose ORIGINAL column is in `cols[stage]`."""

    name = "fixed"

    def __init__(self, points, cols, compact=False, own_layer=False):
        self.points, self.cols, self.compact_positions, self.own = tuple(points), cols, compact, own_layer

    active = True

    def score_layer(self, point):
        return point if self.own else point - 1

    def drop(self, ctx: PruneContext) -> torch.Tensor:
        want = torch.zeros_like(ctx.img)
        for c in self.cols[ctx.stage]:
            want |= ctx.positions == c
        return want & ctx.img


def llama(layers=5, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="sdpa")).eval()


def reference(lm, ids, points, cols, compact):
    """Layers run one by one; before points[s] the columns cols[s] are removed by hand (no hooks)."""
    m = lm.model
    h = m.embed_tokens(ids)
    orig = torch.arange(ids.shape[1])
    for i, layer in enumerate(m.layers):
        if i in points:
            keep = torch.tensor([c not in cols[points.index(i)] for c in orig.tolist()])
            h, orig = h[:, keep], orig[keep]
        pos = (torch.arange(h.shape[1]) if compact else orig)[None]
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=m.rotary_emb(h, pos))
        h = h[0] if isinstance(h, tuple) else h
    return lm.lm_head(m.norm(h))


def run_stage(lm, ids, img, rule, **kw):
    st = InLLM(lm.model.layers, rule, decoder=lm.model)
    st.attach()
    try:
        with torch.no_grad(), st.armed(img):
            out = lm(ids, **kw)
    finally:
        st.detach()
    return out, st


@pytest.mark.parametrize("compact", [False, True])
def test_several_prune_points_equal_a_hand_pruned_layer_loop(compact):
    lm = llama()
    ids = torch.randint(3, 64, (1, 24), generator=torch.Generator().manual_seed(1))
    img = torch.zeros(1, 24, dtype=torch.bool)
    img[0, 4:16] = True
    points, cols = [1, 3], [[4, 7, 8], [5, 15]]
    out, st = run_stage(lm, ids, img, FixedDrop(points, cols, compact), use_cache=True)
    with torch.no_grad():
        ref = reference(lm, ids, points, cols, compact)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [24, 21, 21, 19, 19]
    assert st.last_removed == [5] and st.last_kept_per_layer == [[12, 9, 9, 7, 7]]
    assert st.last_pruned[0].tolist() == [4, 5, 7, 8, 15]


def test_nothing_dropped_is_bit_identical_and_detach_restores():
    lm = llama()
    ids = torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    img = torch.zeros(2, 20, dtype=torch.bool)
    img[:, 3:12] = True
    with torch.no_grad():
        ref = lm(ids).logits
    hooks = sum(len(m._forward_pre_hooks) for m in lm.modules())
    for compact in (False, True):
        out, _ = run_stage(lm, ids, img, FixedDrop([2, 3], [[], []], compact))
        assert torch.equal(out.logits, ref)
    assert sum(len(m._forward_pre_hooks) for m in lm.modules()) == hooks
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, ref)


@pytest.mark.parametrize("compact", [False, True])
def test_decode_steps_on_the_shorter_caches_equal_a_full_recompute(compact):
    """Prefill + one cached decode step == the same drops applied to prompt + token in one forward."""
    lm = llama()
    ids = torch.randint(3, 64, (1, 22), generator=torch.Generator().manual_seed(3))
    img = torch.zeros(1, 22, dtype=torch.bool)
    img[0, 2:14] = True
    rule = FixedDrop([1, 3], [[2, 3, 9], [10, 13]], compact)
    out, st = run_stage(lm, ids, img, rule, use_cache=True)
    nxt = torch.tensor([[7]])
    st.attach()
    try:
        with torch.no_grad():
            step = lm(nxt, past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    finally:
        st.detach()
    full = torch.cat([ids, nxt], 1)
    with torch.no_grad():
        ref = reference(lm, full, [1, 3], rule.cols, compact)[:, -1]
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)


def test_ragged_multi_stage_batch_equals_single_runs():
    """Left-padded batch, different drops per sample at two points, renumbered positions: rows == solo runs."""
    lm = llama()
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(3, 64, (20,), generator=g), torch.randint(3, 64, (16,), generator=g)
    ia, ib = torch.zeros(20, dtype=torch.bool), torch.zeros(16, dtype=torch.bool)
    ia[2:14], ib[1:9] = True, True

    class Lowest:
        name, points, compact_positions, active = "lowest", (1, 3), True, True

        def score_layer(self, p):
            return p - 1

        def drop(self, ctx):
            s = ctx.last_token_attention()
            n = ctx.img.sum(1)
            from mmcompress.inllm.stage import drop_lowest
            return drop_lowest(s, ctx.img, n // 3)

    ids = torch.zeros(2, 20, dtype=torch.long)
    am = torch.zeros(2, 20, dtype=torch.long)
    img = torch.zeros(2, 20, dtype=torch.bool)
    ids[0], am[0], img[0] = a, 1, ia
    ids[1, 4:], am[1, 4:], img[1, 4:] = b, 1, ib
    st = InLLM(lm.model.layers, Lowest(), decoder=lm.model)
    st.attach()
    try:
        with torch.no_grad():
            with st.armed(img, am):
                out = lm(ids, attention_mask=am).logits
            removed = st.last_removed
            solos = []
            for x, m in ((a, ia), (b, ib)):
                with st.armed(m[None]):
                    solos.append(lm(x[None]).logits)
                solos.append(st.last_removed)
    finally:
        st.detach()
    assert removed == [solos[1][0], solos[3][0]] and removed[0] != removed[1]
    torch.testing.assert_close(out[0, -1], solos[0][0, -1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1, -1], solos[2][0, -1], atol=1e-5, rtol=1e-4)


def test_bad_rules_are_refused():
    lm = llama(layers=3)
    with pytest.raises(ValueError, match="increasing"):
        InLLM(lm.model.layers, FixedDrop([2, 1], [[], []]))
    with pytest.raises(ValueError, match="increasing"):
        InLLM(lm.model.layers, FixedDrop([3], [[]]))
    st = InLLM(lm.model.layers, FixedDrop([1], [[]]))
    with pytest.raises(ValueError, match="image_mask"), st.armed(torch.zeros(3, dtype=torch.bool)):
        pass


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "internvl"])
@pytest.mark.parametrize("name,keep,opts", [("pdrop", 0.6, {}), ("dart", 0.5, {"dart_k": 1}), ("sparsevlm", 0.6, {})])
def test_methods_run_on_families_through_apply(family, name, keep, opts):
    spec = SPECS[family]
    model = build_family(family)
    kw = batch(spec, [spec.sample(5), spec.sample(6, pre=4)])
    with torch.no_grad():
        ref = model(**kw).logits
    mmc.apply(model, name, keep=keep, **opts)
    try:
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == kw["input_ids"].shape[1] + 3
        st = mmc.stats(model)
        assert all(r > 0 for r in st["inllm_removed"])
        assert all(row[-1] < row[0] for row in st["inllm_layer_tokens"])
    finally:
        mmc.remove(model)
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, ref)


@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3", "qwen2_vl"])
def test_fastv_scores_equal_the_eager_attention_row(family):
    """The stage recomputes layer K - 1's queries and keys (Qwen3 and Gemma 3 normalise each head's q and k before
    the rotary embedding): the pruned set equals the least attended image tokens of the eager attention map."""
    spec = SPECS[family]
    sdpa, eager = build_family(family), build_family(family, attn="eager")
    kw = batch(spec, [spec.sample(3, post=5)])
    with torch.no_grad():
        att = eager(**kw, output_attentions=True).attentions[1]  # [1, H, L, L] of layer K - 1 = 1
    row = att[0, :, -1].mean(0)  # [L] the last token's row, mean over heads
    pos = (kw["input_ids"][0] == spec.token).nonzero().squeeze(1)
    n = pos.numel() - round(pos.numel() * 0.5)  # FastV keeps round(n (1 - R))
    expect = pos[row[pos].argsort()[: pos.numel() - n]].sort().values
    mmc.apply(sdpa, "fastv", keep=0.5, fastv_k=2)
    with torch.no_grad():
        sdpa(**kw)
    assert torch.equal(sdpa._mmcompress_adapter.inllm.last_pruned[0].sort().values, expect)
