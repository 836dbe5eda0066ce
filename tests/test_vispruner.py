"""vispruner: important tokens by [CLS] attention, the rest by rounds of alternate-split de-duplication.

Also holds `apply_matches_direct_call`, used by the other frontier methods' tests: through `mmc.apply` on a tiny
LLaVA, the kept set equals the compressor called by hand on the features, scores and question embeddings its
release uses, recomputed independently (eager attention of the feature layer, the projector, the embedding table).
"""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.vispruner import deduplicate

transformers = pytest.importorskip("transformers")

from family_tiny import SPECS  # noqa: E402
from family_tiny import batch as family_batch  # noqa: E402
from family_tiny import build as family_build  # noqa: E402
from llava_tiny import build, image_tokens, images, prompt  # noqa: E402


def onehots(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).unsqueeze(0)


def test_important_then_deduplicated_by_hand():
    # tokens 0,1 are the top-scored; among the rest (order by score: 2,3,4,5), A = {2, 4}, B = {3, 5}:
    # 2 duplicates 3 (cos 1), 4 is orthogonal to both B tokens -> the round removes 2; kept {0, 1} + {4, 3, 5}
    x = onehots([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]])
    s = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    out = mmc.create("vispruner", keep=5)(x, scores=s)
    assert out.rep.tolist() == [[0, 1, 3, 4, 5]]
    assert torch.equal(out.x, x[:, [0, 1, 3, 4, 5]])
    # important = 0: pure de-duplication; important = 1: pure top-k
    assert mmc.create("vispruner", keep=2, important=1.0)(x, scores=s).rep.tolist() == [[0, 1]]


def test_round_order_follows_duplication_scores():
    # 8 candidates; after one round of r = 2 the survivors of A come by descending duplication, then B
    u = torch.nn.functional.normalize(torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    cand = torch.arange(8).unsqueeze(0)
    got = deduplicate(u, cand, 6)
    a, b = cand[:, ::2], cand[:, 1::2]
    dup = (u[0, a[0]] @ u[0, b[0]].T).max(1).values
    survivors = a[0, dup.argsort(descending=True)[2:]]
    assert got.tolist() == [survivors.tolist() + b[0].tolist()]
    assert deduplicate(u, cand, 0).shape == (1, 0)


def test_odd_counts_and_every_budget_work():
    g = torch.Generator().manual_seed(1)
    x, s = torch.randn(2, 37, 8, generator=g), torch.rand(2, 37, generator=g)
    for k in range(1, 38):
        out = mmc.create("vispruner", keep=k)(x, scores=s)
        assert out.x.shape == (2, k, 8) and (out.rep[:, 1:] > out.rep[:, :-1]).all()
        top = s.argsort(1, descending=True)[:, : k // 2]
        for b in range(2):
            assert set(top[b].tolist()) <= set(out.rep[b].tolist())


def test_bad_options_and_missing_scores():
    with pytest.raises(ValueError, match="important"):
        mmc.create("vispruner", important=1.5)
    with pytest.raises(ValueError, match="scores"):
        mmc.create("vispruner", keep=2)(torch.randn(1, 6, 4))


# ---- through apply --------------------------------------------------------------------------------------------
def apply_matches_direct_call(name: str, keep: int, stage: str, stage_option: bool = False, **options) -> None:
    """Run `name` through `mmc.apply` on a tiny LLaVA (CLIP tower, feature layer -2, CLS dropped) and check its kept
    set equals the compressor called by hand on independently recomputed inputs: the feature layer's hidden states
    (projected at stage "projector"), its eager [CLS] attention row averaged over heads, the question's embeddings.
    `stage_option`: pass `stage=` to apply explicitly (else apply must pick it by default).
    """
    m = build("llava", seed=3, attn="eager")
    pv = images(2, seed=4)
    n = image_tokens(m, pv, None)
    question = [[40, 41, 42], [43, 44, 45]]
    ids = torch.tensor([prompt([n[b]], [30], question[b] + [2]) for b in range(2)])  # question, then eos
    am = torch.ones_like(ids)
    with torch.no_grad():
        vt = m.model.vision_tower(pv, output_hidden_states=True, output_attentions=True)
        feats = vt.hidden_states[-2][:, 1:]  # [B, 16, C'] LLaVA's "default" strategy drops the CLS
        scores = vt.attentions[-2].mean(1)[:, 0, 1:]  # [B, 16] feature block's CLS row, heads averaged
        if stage == "projector":
            feats = m.model.multi_modal_projector(feats)
        comp = mmc.create(name, keep=keep, **options)
        direct = []
        for b in range(2):
            kw = {"scores": scores[b : b + 1]} if "scores" in comp.needs else {}
            if "text" in comp.needs:
                kw["text"] = m.get_input_embeddings()(torch.tensor([question[b]]))
            direct.append(comp(feats[b : b + 1], grid=(4, 4), **kw))
        mmc.apply(m, name, keep=keep, **options, **({"stage": stage} if stage_option else {}))
        assert m.__dict__["_mmcompress_adapter"].opts["stage"] == stage
        m(input_ids=ids, attention_mask=am, pixel_values=pv)
        st = mmc.stats(m)
        mmc.remove(m)
    assert st["tokens_out"] == [keep, keep]
    for b in range(2):
        assert torch.equal(st["assign"][b][2], direct[b].assign[0]), (name, b)


def apply_runs_on_qwen2_vl(name: str, keep: int) -> None:
    """`name` through apply on a tiny Qwen2-VL batch: forward runs, every sample keeps `keep` tokens."""
    spec = SPECS["qwen2_vl"]
    m = family_build("qwen2_vl")
    kb = family_batch(spec, [spec.sample(0), spec.sample(1, post=3)])
    mmc.apply(m, name, keep=keep)
    try:
        with torch.no_grad():
            out = m(**kb).logits
        assert torch.isfinite(out).all()
        assert mmc.stats(m)["tokens_out"] == [keep, keep]
    finally:
        mmc.remove(m)


def test_apply_llava_gets_what_the_release_uses():
    apply_matches_direct_call("vispruner", keep=6, stage="vision")


def test_apply_qwen2_vl():
    apply_runs_on_qwen2_vl("vispruner", keep=5)
