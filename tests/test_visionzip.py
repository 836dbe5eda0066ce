"""visionzip: the release's rules on small hand-computed cases (CLS in the dominant budget, stride targets,
target + mean, dominant-then-contextual order), the former behaviour behind named options, bad input."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.merge_ops import segment_mean


def _two_directions(labels: list[int]) -> torch.Tensor:
    """[1, N, 2] metric: token i points along axis labels[i] (cosine 1 within a direction, 0 across)."""
    m = torch.zeros(1, len(labels), 2)
    m[0, torch.arange(len(labels)), torch.tensor(labels)] = 1.0
    return m


def test_cls_counts_in_the_dominant_budget():
    # keep 8 with a CLS prefix: round(0.5 * 8) = 4 dominant = CLS + 3 patches, 4 contextual; 8 tokens out in all
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1 + 12, 4, generator=g)
    scores = torch.zeros(1, 13)
    scores[0, [3, 7, 11, 12]] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # patches 2, 6, 10 are the top 3 (12th is 4th)
    comp = mmc.create("visionzip", keep=8, dominant=0.5)
    assert comp.split(7, 1) == (3, 4)
    out = comp(x, prefix=1, scores=scores)
    assert out.x.shape[1] == 8 and int(out.counts[0]) == 8
    first = out.rep.gather(1, out.order)[0, :4].tolist()  # CLS, then the dominant patches in source order
    assert first == [0, 3, 7, 11]
    torch.testing.assert_close(out.ordered()[0, :4], x[0, [0, 3, 7, 11]])
    # the paper's split: 64 -> 54 + 10 with the CLS among the 54
    assert mmc.create("visionzip", keep=64).split(63, 1) == (53, 10)
    assert mmc.create("visionzip", keep=64).split(64, 0) == (54, 10)


def test_contextual_targets_take_the_release_stride():
    # 20 tokens, keep 6 = 2 dominant (tokens 5, 11) + 4 contextual; R = 18 remaining, stride 18 // 4 = 4:
    # remaining positions 0, 4, 8, 12 = tokens 0, 4, 9, 14
    x = torch.randn(1, 20, 3)
    scores = torch.zeros(1, 20)
    scores[0, 5], scores[0, 11] = 2.0, 1.0
    out = mmc.create("visionzip", keep=6, contextual=4)(x, scores=scores)
    seq = out.rep.gather(1, out.order)[0].tolist()
    assert seq == [5, 11, 0, 4, 9, 14]
    centred = mmc.create("visionzip", keep=6, contextual=4, targets="centred")(x, scores=scores)
    # former: floor((i + 0.5) * 18 / 4) = 2, 6, 11, 15 -> tokens 2, 7, 13, 17
    assert centred.rep.gather(1, centred.order)[0, 2:].tolist() == [2, 7, 13, 17]


def test_contextual_token_is_target_plus_mean_and_order_is_release():
    # token 5 dominant; remaining 0..4, stride 5 // 2 = 2: targets 0 and 2; by metric 1 joins 0, 3 and 4 join 2
    x = torch.arange(6 * 2, dtype=torch.float32).view(1, 6, 2)
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    metric = _two_directions([0, 0, 1, 1, 1, 0])
    out = mmc.create("visionzip", keep=3, contextual=2)(x, scores=scores, metric=metric)
    assert out.assign[0].tolist() == [0, 0, 1, 1, 1, 2]  # source order: slots headed by tokens 0, 2, 5
    assert out.size[0].tolist() == [2.0, 3.0, 1.0]
    want = torch.stack([x[0, 5], x[0, 0] + x[0, 1], x[0, 2] + (x[0, 3] + x[0, 4]) / 2])  # release order
    assert out.order[0].tolist() == [2, 0, 1]
    torch.testing.assert_close(out.ordered()[0], want)
    # a target nobody joins is itself; former merge: the size-weighted mean of the whole group
    lone = mmc.create("visionzip", keep=3, contextual=2)(x, scores=scores, metric=_two_directions([0, 1, 1, 1, 1, 0]))
    torch.testing.assert_close(lone.ordered()[0, 1], x[0, 0])
    mean = mmc.create("visionzip", keep=3, contextual=2, merge="mean", order="source")(x, scores=scores,
                                                                                     metric=metric)
    assert mean.order is None
    torch.testing.assert_close(mean.x, segment_mean(x, None, mean.assign, 3))


def test_prefix_outside_the_budget_is_an_option():
    x = torch.randn(2, 1 + 16, 4)
    scores = torch.rand(2, 17)
    assert mmc.create("visionzip", keep=8)(x, prefix=1, scores=scores).x.shape[1] == 8
    assert mmc.create("visionzip", keep=8, prefix_in_budget=False)(x, prefix=1, scores=scores).x.shape[1] == 9
    assert mmc.create("visionzip", keep=0.5)(x, prefix=1, scores=scores).x.shape[1] == round(0.5 * 17)


def test_dominant_one_is_top_k_selection_and_k1():
    x = torch.randn(1, 10, 4)
    scores = torch.arange(10.0)[None]
    out = mmc.create("visionzip", keep=3, dominant=1.0)(x, scores=scores)
    assert out.rep[0].tolist() == [7, 8, 9] and (out.assign[0, :7] == -1).all()
    one = mmc.create("visionzip", keep=1)(x, scores=scores)
    assert one.rep[0].tolist() == [9]


def test_ties_and_bad_inputs():
    x = torch.randn(1, 12, 4)
    out = mmc.create("visionzip", keep=4, dominant=0.5)(x, scores=torch.ones(1, 12))
    assert out.rep.gather(1, out.order)[0, :2].tolist() == [0, 1]  # equal scores: the lowest indices dominate
    with pytest.raises(ValueError, match="scores"):
        mmc.create("visionzip", keep=4)(x)
    with pytest.raises(ValueError, match="dominant"):
        mmc.create("visionzip", keep=4, dominant=1.5)
    for bad in ({"targets": "grid"}, {"merge": "sum"}, {"order": "random"}, {"contextual": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            mmc.create("visionzip", keep=4, **bad)
    with pytest.raises(ValueError, match="keep"):
        mmc.create("visionzip", keep=14)(torch.randn(1, 13, 4), prefix=1, scores=torch.rand(1, 13))


def _release_rules(hs: torch.Tensor, attn: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int):
    """Plain per-sample reference of the release's rules: hs [N+1, C] with CLS, attn [H, N+1, N+1] eager map,
    keys [N+1, D] head-averaged keys -> [dominant + contextual, C] tokens in the release's order."""
    cls_row = attn[:, 0, 1:].sum(0)  # heads summed
    top = (cls_row.topk(dominant - 1).indices + 1).tolist()
    dom = sorted([0] + top)
    rest = [i for i in range(hs.shape[0]) if i not in dom]
    step = max(1, len(rest) // contextual)
    tgt = rest[::step][:contextual]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    groups = {t: [] for t in tgt}
    for i in rest:
        if i not in tgt:
            groups[tgt[int((unit[tgt] @ unit[i]).argmax())]].append(i)
    ctx = [hs[t] + (hs[g].mean(0) if g else 0.0) for t, g in groups.items()]
    return torch.stack([hs[i] for i in dom] + ctx)


def test_through_apply_equals_the_release_rules_on_eager_maps():
    import llava_tiny as lt

    from mmcompress.hf.llava import vision_layers

    model = lt.build("llava", seed=3, attn="eager")
    pv = lt.images(2, seed=3)
    n = lt.image_tokens(model, pv, None)[0]
    ids = torch.tensor([lt.prompt([n], [11, 12], [13, 14])] * 2)
    core = model.model
    with torch.no_grad():  # the release's inputs: hidden_states[-2] with CLS, attentions[-2], keys of layers[-2]
        keys = []
        blk = vision_layers(core.vision_tower)[-2]
        h = blk.self_attn.k_proj.register_forward_hook(lambda m, a, o: keys.append(o))
        vo = core.vision_tower(pv, output_hidden_states=True, output_attentions=True)
        h.remove()
        heads = model.config.vision_config.num_attention_heads
        k_mean = keys[0].view(2, n + 1, heads, -1).mean(2)
        want = [core.multi_modal_projector(_release_rules(vo.hidden_states[-2][b], vo.attentions[-2][b], k_mean[b],
                                                          4, 2)) for b in range(2)]
    got = []
    lm = core.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: got.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        mmc.apply(model, "visionzip", keep=6, dominant=4 / 6)
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pv)
    finally:
        hook.remove()
        mmc.remove(model)
    emb = got[0]  # [2, L', C]: bos, 2 words, then the 6 image tokens
    for b in range(2):
        torch.testing.assert_close(emb[b, 3:9], want[b], rtol=1e-5, atol=1e-5)
