"""visiontrim: the release's rules on small hand-computed cases (DVTS score, 48:16 split, text-chosen targets, three
rounds of target += mean with re-assignment, dominant-then-complement order), the normalised merge behind an
option, agreement with a plain per-sample reference of the rules, and the LLM input through `mmc.apply`."""

from __future__ import annotations

import math

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.attention_scores import encoder_signals, received_row_scores
from mmcompress.compressors.base import EncoderNeeds
from mmcompress.compressors.merge_ops import segment_mean
from mmcompress.compressors.visiontrim import dvts_scores
from tests.script_module import load_script


# ---- DVTS score ------------------------------------------------------------------------------------------------
def test_dvts_score_by_hand():
    # one head, CLS + 3 patches; rows sum to 1
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4],
                      [0.0, 0.5, 0.3, 0.2],
                      [0.0, 0.1, 0.8, 0.1],
                      [0.0, 0.6, 0.2, 0.2]])[None, None]
    row = torch.tensor([0.2, 0.3, 0.4])  # CLS row over the patches
    recv = torch.tensor([0.1 + 0.6, 0.3 + 0.2, 0.2 + 0.1])  # column sums of patch queries, diagonal left out
    want = 0.5 * row / row.norm() + 0.5 * recv / recv.norm()
    torch.testing.assert_close(dvts_scores(a)[0], want)
    # heads are averaged before anything else: two heads (a, a') give the score of their mean
    b = torch.softmax(torch.randn(1, 1, 4, 4), -1)
    torch.testing.assert_close(dvts_scores(torch.cat([a, b], 1)), dvts_scores((a + b) / 2))
    # without a CLS: the mean attention received (all rows) stands in for the CLS row; every token is a patch
    no_cls = dvts_scores(a, cls=False)[0]
    row2 = a[0, 0].mean(0)
    recv2 = a[0, 0].sum(0) - a[0, 0].diagonal()
    torch.testing.assert_close(no_cls, 0.5 * row2 / row2.norm() + 0.5 * recv2 / recv2.norm())
    with pytest.raises(ValueError, match="attn"):
        dvts_scores(torch.rand(2, 4, 4))


@pytest.mark.parametrize("cls", [True, False])
def test_dvts_from_q_k_equals_the_eager_map(cls):
    # what apply computes from hooked q/k (SDPA-safe), chunked over query rows, grouped-query heads too
    g = torch.Generator().manual_seed(0)
    B, H, Hk, N, D = 2, 4, 2, 37, 8
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, Hk, N, D, generator=g)
    attn = (q @ k.repeat_interleave(H // Hk, 1).transpose(-1, -2) / math.sqrt(D)).softmax(-1)
    got = received_row_scores(q, k, cls, chunk=5)  # [B, N]
    want = dvts_scores(attn, cls=cls)
    if cls:
        assert (got[:, 0] == 0).all()
        got = got[:, 1:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # through the declaration apply reads: rows 0 = CLS row, all rows = no CLS
    needs = EncoderNeeds(layer="feature", heads="mean", scores="row+received")
    q3, k3 = q.transpose(1, 2).reshape(B, N, H * D), k.transpose(1, 2).reshape(B, N, Hk * D)
    rows = 0 if cls else torch.arange(N)
    s, m = encoder_signals(q3, k3, needs, rows, num_heads=H, num_kv_heads=Hk)
    torch.testing.assert_close(s[:, 1:] if cls else s, want, rtol=1e-5, atol=1e-6)
    assert m is None
    with pytest.raises(ValueError, match="heads"):
        EncoderNeeds(heads="single", scores="row+received")
    with pytest.raises(ValueError, match="scores"):
        EncoderNeeds(scores="received")


# ---- the budget and the selection ----------------------------------------------------------------------------
def test_split_is_the_release_48_16():
    comp = mmc.create("visiontrim", keep=64)
    assert comp.split(64) == (48, 16)
    assert comp.split(128) == (96, 32) and comp.split(192) == (144, 48)
    assert comp.split(1) == (1, 0) and comp.split(2) == (1, 1)  # at least one complement token when k >= 2
    assert mmc.create("visiontrim", keep=64, complement=10).split(64) == (54, 10)
    assert mmc.create("visiontrim", keep=64, dominant=1.0).split(64) == (64, 0)


def _case():
    """Hand case: 6 tokens in 2-D, token 5 dominant, text along axis 0; targets 0 and 4 (most aligned with the
    text among the rest), tokens 1, 2, 3 merged. Every merged token has cos > 0 with the text, so each round they
    all join the target whose current value is most aligned with the text."""
    x = torch.tensor([[1.0, 0.0], [0.2, 1.0], [1.0, 1.0], [0.5, 1.0], [1.0, 0.2], [3.0, 3.0]])[None]
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    text = torch.tensor([[[1.0, 0.0]]])
    return x, scores, text


def test_three_rounds_of_target_plus_mean_reassign_each_round():
    x, scores, text = _case()
    m = (x[0, 1] + x[0, 2] + x[0, 3]) / 3  # [0.5667, 1]: the mean of the merged tokens
    # round 1: cos(t, A=x0) = 1 > cos(t, B=x4) = 0.98 -> all join A; A = x0 + m, cos 0.84 < B's 0.98
    # round 2: all join B; B = x4 + m, cos 0.79 < A's 0.84;  round 3: all join A again; A = x0 + 2 m
    out = mmc.create("visiontrim", keep=3, complement=2)(x, scores=scores, text=text)
    assert out.order[0].tolist() == [2, 0, 1]  # source slots 0 (A), 1 (B), 2 (dominant): dominant first
    want = torch.stack([x[0, 5], x[0, 0] + 2 * m, x[0, 4] + m])
    torch.testing.assert_close(out.ordered()[0], want)
    assert out.assign[0].tolist() == [0, 0, 0, 0, 1, 2]  # the last round's groups
    assert out.size[0].tolist() == [4.0, 1.0, 1.0]
    one = mmc.create("visiontrim", keep=3, complement=2, rounds=1)(x, scores=scores, text=text)
    torch.testing.assert_close(one.ordered()[0], torch.stack([x[0, 5], x[0, 0] + m, x[0, 4]]))
    two = mmc.create("visiontrim", keep=3, complement=2, rounds=2)(x, scores=scores, text=text)
    torch.testing.assert_close(two.ordered()[0], torch.stack([x[0, 5], x[0, 0] + m, x[0, 4] + m]))
    assert two.assign[0].tolist() == [0, 1, 1, 1, 1, 2]


def test_mean_option_same_groups_normalised_values_and_source_order():
    x, scores, text = _case()
    rel = mmc.create("visiontrim", keep=3, complement=2)(x, scores=scores, text=text)
    mean = mmc.create("visiontrim", keep=3, complement=2, merge="mean", order="source")(x, scores=scores, text=text)
    assert torch.equal(mean.assign, rel.assign) and mean.order is None
    torch.testing.assert_close(mean.x[0], torch.stack([x[0, :4].mean(0), x[0, 4], x[0, 5]]))
    # sizes weigh the mean (chained merges); the release's merge ignores them except in its per-round means
    size = torch.tensor([[1.0, 3.0, 1.0, 1.0, 1.0, 1.0]])
    ws = mmc.create("visiontrim", keep=3, complement=2, merge="mean")(x, size=size, scores=scores, text=text)
    torch.testing.assert_close(ws.x, segment_mean(x, size, ws.assign, 3))


def test_targets_are_the_most_text_relevant_of_the_rest():
    # mean over the text tokens of the cosine: two text tokens along the axes; token 3 (diagonal) is the best
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 0.2], [5.0, 5.0]])[None]
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    text = torch.tensor([[[2.0, 0.0], [0.0, 0.5]]])
    out = mmc.create("visiontrim", keep=2, complement=1)(x, scores=scores, text=text)
    assert out.rep[0].tolist() == [3, 5]
    # ties in the relevance (tokens 0 and 1 equally relevant): the lower index
    out = mmc.create("visiontrim", keep=2, complement=1)(x[:, [0, 1, 4, 5]], scores=scores[:, [0, 1, 4, 5]],
                                                         text=text)
    assert out.rep[0].tolist() == [0, 3]


def test_dominant_by_scores_ties_to_the_lower_index():
    x = torch.randn(1, 12, 4)
    out = mmc.create("visiontrim", keep=4, complement=1)(x, scores=torch.ones(1, 12), text=torch.randn(1, 2, 4))
    assert out.rep.gather(1, out.order)[0, :3].tolist() == [0, 1, 2]
    only = mmc.create("visiontrim", keep=3, dominant=1.0)(x, scores=torch.arange(12.0)[None], text=x[:, :1])
    assert only.rep[0].tolist() == [9, 10, 11] and (only.assign[0, :9] == -1).all()


# ---- a plain per-sample reference of the release's rules (benchmarks/paper_references.py) ----------------------
_release_rules = load_script("benchmarks/paper_references.py").visiontrim_plain


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_a_plain_reference_of_the_rules(seed):
    g = torch.Generator().manual_seed(seed)
    B, N, C, L = 2, 50, 16, 5
    x = torch.randn(B, N, C, generator=g)
    scores = torch.rand(B, N, generator=g)
    text = torch.randn(B, L, C, generator=g) + x[:, :L]  # a question about a few tokens
    for kd, kc in ((9, 3), (4, 8), (1, 1)):
        out = mmc.create("visiontrim", keep=kd + kc, complement=kc)(x, scores=scores, text=text)
        for b in range(B):
            want = _release_rules(x[b], scores[b], text[b], kd, kc)
            torch.testing.assert_close(out.ordered()[b], want, rtol=1e-5, atol=1e-5)


def test_half_precision_and_bad_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 30, 8, generator=g)
    kw = {"scores": torch.rand(2, 30, generator=g), "text": torch.randn(2, 3, 8, generator=g)}
    # half inputs are computed in float32 and rounded once: the float32 result on the same (rounded) values
    xb, tb = x.bfloat16(), kw["text"].bfloat16()
    ref = mmc.create("visiontrim", keep=8)(xb.float(), scores=kw["scores"], text=tb.float())
    half = mmc.create("visiontrim", keep=8)(xb, scores=kw["scores"], text=tb)
    assert half.x.dtype == torch.bfloat16 and torch.equal(half.assign, ref.assign)
    assert torch.equal(half.x, ref.x.bfloat16())
    with pytest.raises(ValueError, match="text"):
        mmc.create("visiontrim", keep=4)(x, scores=kw["scores"])
    with pytest.raises(ValueError, match="scores"):
        mmc.create("visiontrim", keep=4)(x, text=kw["text"])
    for bad in ({"dominant": 1.5}, {"complement": -1}, {"rounds": 0}, {"merge": "sum"}, {"order": "random"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            mmc.create("visiontrim", keep=4, **bad)


# ---- through apply -------------------------------------------------------------------------------------------
def test_through_apply_equals_the_release_rules_on_eager_maps():
    # the release's inputs on a tiny eager LLaVA: hidden_states[-2] without the CLS, attentions[-2] (DVTS), the
    # question; after the projector, with the question's LLM input embeddings as the text
    import llava_tiny as lt

    model = lt.build("llava", seed=3, attn="eager")
    pv = lt.images(2, seed=5)
    n = lt.image_tokens(model, pv, None)[0]
    question = [[40, 41, 42], [43, 44, 45, 46]]
    seqs = [lt.prompt([n], [30], q + [lt.EOS]) for q in question]
    ids, am = lt.pad(seqs, "left")
    core = model.model
    with torch.no_grad():
        vo = core.vision_tower(pv, output_hidden_states=True, output_attentions=True)
        feats = core.multi_modal_projector(vo.hidden_states[-2][:, 1:])  # [2, 16, C]
        scores = dvts_scores(vo.attentions[-2])  # [2, 16]
        want = []
        for b in range(2):
            text = model.get_input_embeddings()(torch.tensor(question[b]))
            want.append(_release_rules(feats[b], scores[b], text, 4, 2))
    got = []
    hook = core.language_model.register_forward_pre_hook(lambda m, a, kw: got.append(kw["inputs_embeds"]),
                                                         with_kwargs=True)
    try:
        mmc.apply(model, "visiontrim", keep=6, complement=2)
        assert model.__dict__["_mmcompress_adapter"].opts["stage"] == "projector"
        with torch.no_grad():
            model(input_ids=ids, attention_mask=am, pixel_values=pv)
        assert mmc.stats(model)["tokens_out"] == [6, 6]
    finally:
        hook.remove()
        mmc.remove(model)
    emb = got[0]  # [2, L', C] left padded: the 6 image tokens follow bos and one word
    for b in range(2):
        start = emb.shape[1] - (len(seqs[b]) - n + 6) + 2
        torch.testing.assert_close(emb[b, start : start + 6], want[b], rtol=1e-5, atol=1e-5)


def test_apply_qwen2_vl():
    from test_vispruner import apply_runs_on_qwen2_vl

    apply_runs_on_qwen2_vl("visiontrim", keep=5)
