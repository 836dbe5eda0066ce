"""prunesid: PCA groups + NMS within each group (Fang et al., ICLR'26), each rule pinned on small cases."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.prunesid import group_budgets, group_nms, pca_loadings


@pytest.mark.parametrize("B,m,n,q", [(1, 40, 24, 5), (2, 12, 30, 4), (3, 16, 16, 16)])
def test_pca_is_torch_pca_lowrank_under_the_same_draw(B, m, n, q):
    """The randomized PCA computes what torch.pca_lowrank (the release's call) computes when the global RNG is seeded
    like our generator; both orientations (m >= n and m < n, which transposes the problem)."""
    g = torch.Generator().manual_seed(m * n)
    a = torch.rand(B, m, n, generator=g)
    torch.manual_seed(7)
    want = torch.pca_lowrank(a, q=q)[2]  # [B, n, q]
    state = torch.get_rng_state()
    got = pca_loadings(a, q, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # one draw for every matrix of the batch: a batch of B equals B single calls
    for b in range(B):
        torch.testing.assert_close(pca_loadings(a[b : b + 1], q, seed=7), got[b : b + 1], rtol=0, atol=1e-6)


def _greedy_nms(sim, group, order, thr):
    """Plain sequential NMS: walk `order`, keep a token unless a kept token of its group is more similar than thr."""
    kept: list[int] = []
    for i in order:
        if not any(group[j] == group[i] and sim[j][i] > thr for j in kept):
            kept.append(i)
    return set(kept)


@pytest.mark.parametrize("seed", range(6))
def test_group_nms_is_the_sequential_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    B, N = 2, 30
    u = torch.nn.functional.normalize(torch.randn(B, N, 3, generator=g), dim=-1)  # 3-d: many close pairs
    sim = u @ u.transpose(1, 2)
    group = torch.randint(0, 3, (B, N), generator=g)
    order = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])  # the NMS order within each group
    perm = order.gather(1, group.gather(1, order).sort(dim=1, stable=True).indices)  # group by group, in order
    sizes = torch.stack([torch.bincount(group[b], minlength=3) for b in range(B)])
    thr = torch.tensor([0.5, 0.9])
    alive = group_nms(u, perm, sizes, thr)
    for b in range(B):
        want = _greedy_nms(sim[b].tolist(), group[b].tolist(), order[b].tolist(), float(thr[b]))
        assert set(alive[b].nonzero().squeeze(1).tolist()) == want
    # a threshold of 1 suppresses nothing, exact duplicates included
    dup = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]), dim=-1)
    assert group_nms(dup, torch.arange(3)[None], torch.tensor([[3]]), torch.tensor([1.0])).all()
    assert group_nms(dup, torch.arange(3)[None], torch.tensor([[3]]), torch.tensor([0.5])).tolist() == [
        [True, False, True]]


def test_group_budgets_by_hand():
    # sizes (5, 3, 0, 2), NMS counts (2, 3, 0, 1), K = 8 (CLS + 7). One per non-empty group (3); caps: base
    # min(sizes, 5, nms) = (2, 3, 0, 1) sums to 6 < 8, shift 1 -> (3, 3, 0, 2) = 8. Rest 4 by cumulative NMS shares
    # 4 * (2/6, 5/6, 5/6, 1) = (1.33, 3.33, 3.33, 4) -> (1, 3, 3, 4) -> (1, 2, 0, 1); plus one each, capped:
    # (2, 3, 0, 2), 7 tokens: nothing to fill.
    d = group_budgets(torch.tensor([[5, 3, 0, 2]]), torch.tensor([[2, 3, 0, 1]]), K=8, k=7)
    assert d.tolist() == [[2, 3, 0, 2]]
    # sizes (6, 1, 1), NMS (3, 1, 1): caps (3, 1, 1) + shift 3 -> (6, 1, 1); shares of 4: 4 * (0.6, 0.8, 1) = (2.4,
    # 3.2, 4) -> (2, 3, 4) -> (2, 1, 1), plus one each (3, 2, 2), capped (3, 1, 1) = 5; the 2 missing go to the
    # group with the most NMS survivors: (5, 1, 1)
    d = group_budgets(torch.tensor([[6, 1, 1]]), torch.tensor([[3, 1, 1]]), K=8, k=7)
    assert d.tolist() == [[5, 1, 1]]


def _duplicates():
    """CLS + 6 patches: three pairs of exact duplicates on orthogonal axes (mean cosine over the 15 pairs = 3/15)."""
    e = torch.eye(3)
    patches = torch.stack([e[0], e[0], e[1], e[1], e[2], e[2]])
    x = torch.cat([torch.full((1, 3), 5.0), patches])[None]  # [1, 7, 3]
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.1, 0.7, 0.3, 0.2]])
    return x, scores


def test_nms_within_one_group_by_hand():
    """keep = 4 (CLS + 3): G = 1 group, threshold (4 / 32) * 0.2 = 0.025 < 1, so a duplicate of a kept token is
    suppressed. Score order 1, 2, 4, 5, 6, 3 (patch numbering, 1-based as in x): survivors 1, 4, 5; then the
    suppressed by score: 2, 6, 3."""
    x, scores = _duplicates()
    out = mmc.create("prunesid", keep=4)(x, prefix=1, scores=scores)
    assert out.rep.tolist() == [[0, 1, 4, 5]]
    assert torch.equal(out.ordered(), x[:, [0, 1, 4, 5]])  # the release's sequence: CLS, then the ranking
    out = mmc.create("prunesid", keep=5)(x, prefix=1, scores=scores)  # one more: the best suppressed token
    assert torch.equal(out.ordered(), x[:, [0, 1, 4, 5, 2]])
    assert out.order.tolist() == [[0, 1, 3, 4, 2]]
    # without a prefix, keep counts patches only; the order follows the ranking
    out = mmc.create("prunesid", keep=3)(x[:, 1:], scores=scores[:, 1:])
    assert torch.equal(out.ordered(), x[:, [1, 4, 5]])


def test_seeded_draw_is_reproducible_and_independent_of_the_batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1 + 64, 32, generator=g) + torch.randn(3, 1, 32, generator=g)
    scores = torch.rand(3, 65, generator=g)
    comp = mmc.create("prunesid", keep=24, seed=5)
    state = torch.get_rng_state()
    out = comp(x, prefix=1, scores=scores)
    assert torch.equal(torch.get_rng_state(), state)
    for b in range(3):
        one = comp(x[b : b + 1], prefix=1, scores=scores[b : b + 1])
        assert torch.equal(one.ordered(), out.ordered()[b : b + 1])
    other = mmc.create("prunesid", keep=24, seed=6)(x, prefix=1, scores=scores)
    assert not torch.equal(other.assign, out.assign)  # the seed is the PCA's draw: a different draw, other groups


def test_small_budgets_and_bad_options():
    x, scores = _duplicates()
    for keep in (1, 2, 3):  # the release fails below K = 4 (zero PCA components); here one group
        out = mmc.create("prunesid", keep=keep)(x, prefix=1, scores=scores)
        assert out.x.shape[1] == max(keep, 2)
    with pytest.raises(TypeError, match="seed"):
        mmc.create("prunesid", seed=1.5)
    with pytest.raises(ValueError, match="variant"):
        mmc.create("prunesid", variant="qwen")
    with pytest.raises(ValueError, match="scores"):
        mmc.create("prunesid", keep=3)(x)


def _plain_qwen2vl(x: torch.Tensor, k: int, seed: int) -> list[int]:
    """The release's Qwen2-VL rule written plainly for one image x [N, C]: torch.pca_lowrank under a seeded global
    RNG, importance = own-component loading, threshold max(k / (N / 18), 1) x mean of triu(cos) (diagonal
    included, over all N^2 entries), sequential NMS per group, `group_budgets`, sorted above 150 tokens."""
    N, C = x.shape
    G = max(1, min(max(k // 4, 4), k, C, N))
    torch.manual_seed(seed)
    V = torch.pca_lowrank(torch.sigmoid(x).T, q=G)[2].abs()  # [N, G]
    imp, group = V.max(dim=1)
    u = torch.nn.functional.normalize(x, dim=-1)
    sim = u @ u.T
    thr = max(k / (N / 18), 1) * float(sim.triu().mean())
    ranked, nms = [], []
    for g in range(G):
        members = sorted((i for i in range(N) if group[i] == g), key=lambda i: (-float(imp[i]), i))
        kept: list[int] = []
        for i in members:
            if all(float(sim[j, i]) <= thr for j in kept):
                kept.append(i)
        ranked.append(kept + [i for i in members if i not in kept])
        nms.append(len(kept))
    sizes = torch.tensor([[len(r) for r in ranked]])
    d = group_budgets(sizes, torch.tensor([nms]), K=k, k=k)[0].tolist()
    seq = [i for g in range(G) for i in ranked[g][: d[g]]]
    return sorted(seq) if k > 150 else seq


@pytest.mark.parametrize("N,C,k", [(120, 48, 20), (200, 32, 40), (400, 64, 160)])
def test_qwen2vl_variant_equals_a_plain_reading_of_its_rule(N, C, k):
    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, C, generator=g) + torch.randn(1, C, generator=g)
    comp = mmc.create("prunesid", keep=k, variant="qwen2vl", seed=3)
    assert comp.needs == () and not comp.prefix_in_budget  # no attention, no CLS
    out = comp(x[None])  # no scores needed: the importance is the PCA loading
    want = _plain_qwen2vl(x, k, seed=3)
    assert torch.equal(out.ordered()[0], x[want])
    assert (out.order is None or torch.equal(out.order[0], torch.arange(k))) == (k > 150)


def test_through_apply_on_llava_the_cls_and_the_release_sequence():
    """`mmc.apply` hands the compressor the CLS of the feature layer as the prefix and that layer's CLS attention
    row; the LLM receives the projected CLS + patches in the release's sequence."""
    import llava_tiny as lt

    model = lt.build("llava", seed=3, attn="eager")
    pv = lt.images(2, seed=3)
    n = lt.image_tokens(model, pv, None)[0]
    ids = torch.tensor([lt.prompt([n], [11, 12], [13, 14])] * 2)
    core = model.model
    comp = mmc.create("prunesid", keep=9)
    with torch.no_grad():
        vo = core.vision_tower(pv, output_hidden_states=True, output_attentions=True)
        h = vo.hidden_states[-2]  # [2, 1 + n, C'] CLS first
        scores = vo.attentions[-2].mean(1)[:, 0]  # [2, 1 + n] the CLS row, heads averaged
        want = [core.multi_modal_projector(comp(h[b : b + 1], prefix=1, scores=scores[b : b + 1]).ordered()[0])
                for b in range(2)]
    got = []
    hook = core.language_model.register_forward_pre_hook(lambda m, a, kw: got.append(kw["inputs_embeds"]),
                                                         with_kwargs=True)
    try:
        mmc.apply(model, "prunesid", keep=9)
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pv)
        assert mmc.stats(model)["tokens_out"] == [9, 9]
    finally:
        hook.remove()
        mmc.remove(model)
    emb = got[0]  # [2, L', C]: bos, 2 words, then the 9 image tokens
    assert emb.shape[1] == ids.shape[1] - n + 9
    for b in range(2):
        torch.testing.assert_close(emb[b, 3:12], want[b], rtol=1e-5, atol=1e-5)


def test_apply_qwen2_vl():
    from test_vispruner import apply_runs_on_qwen2_vl

    apply_runs_on_qwen2_vl("prunesid", keep=5)


def test_apply_qwen2_vl_variant_on_the_merger_output():
    """variant="qwen2vl" through apply on a tiny Qwen2-VL: no scores asked for, each sample keeps `keep` tokens, and
    the kept set is the compressor's on the merger's output."""
    from family_tiny import SPECS
    from family_tiny import batch as family_batch
    from family_tiny import build as family_build

    spec = SPECS["qwen2_vl"]
    m = family_build("qwen2_vl")
    kb = family_batch(spec, [spec.sample(0), spec.sample(1, post=3)])
    with torch.no_grad():
        feats = m.model.get_image_features(kb["pixel_values"], kb["image_grid_thw"])  # the merger's output per image
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    comp = mmc.create("prunesid", keep=5, variant="qwen2vl")
    want = [comp(f[None]).assign[0] for f in feats]
    mmc.apply(m, "prunesid", keep=5, variant="qwen2vl")
    try:
        with torch.no_grad():
            assert torch.isfinite(m(**kb).logits).all()
        st = mmc.stats(m)
        assert st["tokens_out"] == [5, 5]
        for b in range(2):
            assert torch.equal(st["assign"][b][2], want[b])
    finally:
        mmc.remove(m)
