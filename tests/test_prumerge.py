"""prumerge / prumerge+: the release's rules on small hand-computed cases (IQR count per sample, K + 1 outputs,
unnormalised attention-weighted sums over overlapping neighbourhoods, descending-score order, raster stride), the
former behaviour behind named options, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.prumerge import iqr_outlier_count, lattice_indices, release_keep_count


def reference_iqr_count(s: torch.Tensor) -> int:
    """numpy-free reference: quartiles by linear interpolation on the sorted values."""
    v = sorted(s.double().tolist())
    n = len(v)

    def q(p):
        pos = p * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    thr = q(0.75) + 1.5 * (q(0.75) - q(0.25))
    return sum(x > thr for x in v)


def _angles(deg: list[float]) -> torch.Tensor:
    """[1, N, 2] metric: unit vectors at the given angles (cosine similarity = cos of the angle between)."""
    r = torch.tensor(deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([r.cos(), r.sin()], -1)[None].float()


@pytest.mark.parametrize("seed", range(3))
def test_auto_count_is_per_sample_iqr(seed):
    g = torch.Generator().manual_seed(seed)
    B, N = 3, 80
    scores = torch.rand(B, N, generator=g)
    n_out = [2, 5, 0]
    for b, n in enumerate(n_out):
        scores[b, torch.randperm(N, generator=g)[:n]] += 10.0  # clear outliers
    x = torch.randn(B, N, 8, generator=g)
    counts = iqr_outlier_count(scores)
    assert counts.tolist() == [reference_iqr_count(scores[b]) for b in range(B)]
    assert counts.tolist() == [2, 5, 0]  # per sample: the batch is not pooled
    assert release_keep_count(counts, N).tolist() == [int(N * (c / N)) for c in counts.tolist()]
    out = mmc.create("prumerge", keep="auto")(x, scores=scores)
    assert out.counts.tolist() == [3, 6, 1]  # K outliers + the summary token
    for b in range(B):  # the kept tokens are the outliers, by descending score, then the summary
        seq = out.rep[b].gather(0, out.order[b])[: counts[b]]
        assert seq.tolist() == scores[b].topk(int(counts[b])).indices.tolist()
        assert int(out.size[b].sum()) == N


def test_k_plus_one_outputs_with_unnormalised_neighbour_sums():
    # keep 3: K = 2 kept (tokens 1 then 3 by score) + 1 summary; knn 2 by metric angle:
    # token 1 (12 deg): nearest 3 (8 deg), 0 (12 deg); token 3 (20 deg): nearest 1 (8 deg), 0 (20 deg)
    x = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.02, 0.03]])
    metric = _angles([0.0, 12.0, 80.0, 20.0, 90.0, 85.0])
    out = mmc.create("prumerge", keep=3, knn=2)(x, scores=s, metric=metric)
    assert out.x.shape[1] == 3
    w = s[0]
    want = torch.stack([
        x[0, 1] + w[3] * x[0, 3] + w[0] * x[0, 0],  # kept tokens are each other's neighbours
        x[0, 3] + w[1] * x[0, 1] + w[0] * x[0, 0],  # neighbourhoods overlap (token 0 in both)
        w[0] * x[0, 0] + w[2] * x[0, 2] + w[4] * x[0, 4] + w[5] * x[0, 5],  # all pruned tokens, unnormalised
    ])
    torch.testing.assert_close(out.ordered()[0], want)
    assert out.assign[0].tolist() == [0, 1, 0, 2, 0, 0]  # source order: summary (first pruned token 0), 1, 3
    assert out.order[0].tolist() == [1, 2, 0]
    assert out.size[0].tolist() == [4.0, 1.0, 1.0]
    src = mmc.create("prumerge", keep=3, knn=2, order="source")(x, scores=s, metric=metric)
    assert src.order is None and torch.equal(src.x, out.x)


def test_former_nearest_merge_is_an_option():
    # token 0 is kept; tokens 1, 2 join it; weights = size * score; each slot a weighted mean
    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [-1.0, 0.0]]])
    scores = torch.tensor([[5.0, 1.0, 2.0, 4.0]])
    out = mmc.create("prumerge", keep=2, merge="nearest", knn=None)(x, scores=scores)
    assert out.assign[0].tolist() == [0, 0, 0, 1] and out.order is None
    torch.testing.assert_close(out.x[0, 0], (5 * x[0, 0] + 1 * x[0, 1] + 2 * x[0, 2]) / 8)
    torch.testing.assert_close(out.x[0, 1], x[0, 3])
    some = mmc.create("prumerge", keep=2, merge="nearest", knn=1)(x, scores=scores)
    assert some.assign[0].tolist() == [0, 0, 1, 1]  # token 2 is only in token 3's 1-neighbourhood


def test_prumerge_plus_auto_takes_the_raster_stride():
    # N = 24, outliers at 5 and 17 -> K = 2, step int(1 / (2 / 24)) = 12, stride int(12 / 3) = 4:
    # positions 0, 4, ..., 20 (< N - 1) not among the kept: 6 more, then the summary: 2 + 6 + 1 outputs
    scores = torch.full((1, 24), 0.01)
    scores[0, 5], scores[0, 17] = 1.0, 2.0
    x = torch.randn(1, 24, 4)
    out = mmc.create("prumerge+", keep="auto")(x, scores=scores)
    seq = out.rep[0].gather(0, out.order[0]).tolist()
    assert seq[:-1] == [17, 5, 0, 4, 8, 12, 16, 20]
    assert out.x.shape[1] == 9
    # 3 outliers: step int(1 / (3 / 24)) = 8, stride 2; position 8 is kept already and not repeated
    scores[0, 8] = 3.0
    again = mmc.create("prumerge+", keep="auto")(x, scores=scores)
    assert again.rep[0].gather(0, again.order[0]).tolist()[:-1] == [8, 17, 5, 0, 2, 4, 6, 10, 12, 14, 16, 18, 20, 22]
    # batch 2 (the release crashes there): each sample its own outliers and stride
    both = mmc.create("prumerge+", keep="auto")(torch.cat([x, x]), scores=torch.cat([scores, s0 := scores.clone()]))
    assert both.counts.tolist() == [15, 15]
    s0[0, 8] = 0.01
    mixed = mmc.create("prumerge+", keep="auto")(torch.cat([x, x]), scores=torch.cat([scores, s0]))
    assert mixed.counts.tolist() == [15, 9]


def test_prumerge_plus_fixed_budget_and_former_lattice():
    # keep 9: 8 kept + summary; k_u = round(0.75 * 8) = 6 stride positions 0, 3, ..., 15 (stride 23 // 6 = 3),
    # then the 2 top-scored tokens not among them
    scores = torch.rand(1, 24, generator=torch.Generator().manual_seed(0))
    scores[0, 0] = 5.0  # on the stride: not counted twice
    x = torch.randn(1, 24, 4)
    out = mmc.create("prumerge+", keep=9)(x, scores=scores)
    seq = out.rep[0].gather(0, out.order[0]).tolist()[:-1]
    s = scores[0].clone()
    s[[0, 3, 6, 9, 12, 15]] = -1
    assert seq == s.topk(2).indices.tolist() + [0, 3, 6, 9, 12, 15]
    lat = lattice_indices(64, 12, (8, 8), torch.device("cpu"))
    assert set((lat // 8).tolist()) == {1, 4, 6} and set((lat % 8).tolist()) == {1, 3, 5, 7}  # 3 x 4 lattice
    old = mmc.create("prumerge+", keep=13, lattice="2d")(torch.randn(1, 64, 4), scores=torch.rand(1, 64),
                                                            grid=(8, 8))
    ku = round(0.75 * 12)  # 12 kept tokens beside the summary
    assert set(lattice_indices(64, ku, (8, 8), torch.device("cpu")).tolist()) <= set(old.rep[0].tolist())


def test_missing_scores_and_bad_options():
    with pytest.raises(ValueError, match="scores"):
        mmc.create("prumerge", keep=3)(torch.randn(1, 9, 4))
    with pytest.raises(ValueError, match="scores"):
        mmc.create("prumerge+", keep=3)(torch.randn(1, 9, 4))
    for name, bad in (("prumerge", {"knn": 0}), ("prumerge", {"knn": None}), ("prumerge", {"merge": "mean"}),
                      ("prumerge", {"order": "score"}), ("prumerge+", {"lattice": "3d"}),
                      ("prumerge+", {"uniform": 1.0})):
        with pytest.raises(ValueError, match=next(iter(bad))):
            mmc.create(name, keep=3, **bad)


def _release_rules(feats: torch.Tensor, q: torch.Tensor, k: torch.Tensor, K: int | None, plus: bool, knn: int):
    """Plain per-sample reference of the release's rules: feats [N, C] patches, q/k [N + 1, C] the LAST block's q/k
    Linear outputs (CLS first); K None: the IQR count (keep="auto") -> [K (+ U) + 1, C] tokens in the release's order.
    """
    N, C = feats.shape
    s = torch.softmax(q[0] @ k.T / math.sqrt(C), dim=0)[1:]  # one head over all channels, CLS row, CLS column dropped
    n_out = reference_iqr_count(s)
    if K is None:
        K = int(N * (n_out / N))
    kept = s.topk(K).indices.tolist()  # descending score
    if plus:  # raster stride int(int(1 / r) / 3), positions < N - 1, those not kept already
        kept += [i for i in range(0, N - 1, int(int(1 / (n_out / N)) / 3)) if i not in kept]
    unit = k[1:] / k[1:].norm(dim=-1, keepdim=True)
    out = []
    for i in kept:
        sim = unit @ unit[i]
        sim[i] = float("-inf")
        nb = sim.topk(knn).indices
        out.append(feats[i] + (s[nb, None] * feats[nb]).sum(0))
    pruned = [j for j in range(N) if j not in kept]
    out.append((s[pruned, None] * feats[pruned]).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize(("name", "keep", "batch"), [("prumerge", 6, [0, 1]), ("prumerge", "auto", [1]),
                                                     ("prumerge+", "auto", [0]), ("prumerge+", "auto", [1])])
def test_through_apply_equals_the_release_rules_on_eager_maps(name, keep, batch):
    """`mmc.apply` on a tiny eager LLaVA hands the compressor the release's inputs (hidden_states[-2] patches, the
    LAST block's q/k as one all-channel head, its keys as metric): the LLM receives the projected release output."""
    import llava_tiny as lt

    from mmcompress.hf.llava import vision_layers

    model = lt.build("llava", seed=4, attn="eager")  # seed 4: 1 and 2 IQR outliers among the 16 patches
    pv = lt.images(2, seed=4)[batch]
    B = len(batch)
    n = lt.image_tokens(model, pv, None)[0]
    ids = torch.tensor([lt.prompt([n], [11, 12], [13, 14])] * B)
    core = model.model
    with torch.no_grad():  # the release's inputs: hooked q/k Linear outputs of the last block, hidden_states[-2]
        qk = []
        blk = vision_layers(core.vision_tower)[-1]
        hooks = [lin.register_forward_hook(lambda m, a, o: qk.append(o)) for lin in (blk.self_attn.q_proj,
                                                                                    blk.self_attn.k_proj)]
        vo = core.vision_tower(pv, output_hidden_states=True)
        for h in hooks:
            h.remove()
        K = None if keep == "auto" else keep - 1
        want = [core.multi_modal_projector(_release_rules(vo.hidden_states[-2][b, 1:], qk[0][b], qk[1][b], K,
                                                          name == "prumerge+", 4)) for b in range(B)]
    got = []
    lm = core.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: got.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        mmc.apply(model, name, keep=keep, knn=4)
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pv)
    finally:
        hook.remove()
        mmc.remove(model)
    emb = got[0]  # [B, L', C]: bos, 2 words, the image's tokens, 2 words
    for b in range(B):
        M = want[b].shape[0]
        assert emb.shape[1] == 5 + M and M < n
        torch.testing.assert_close(emb[b, 3:3 + M], want[b], rtol=1e-5, atol=1e-5)
