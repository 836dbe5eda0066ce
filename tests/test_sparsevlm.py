"""SparseVLM v1.5 (`mmc.apply(model, "sparsevlm", ...)`): text raters, per-layer counts, recycling, on tiny LLaVA."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.inllm.sparsevlm import (
    SPARSEVLM_COUNTS,
    dpc_knn_merge,
    sparsevlm_counts_for,
    sparsevlm_default_layers,
    text_raters,
)

pytest.importorskip("transformers")

from llava_tiny import (  # noqa: E402
    IMG,
    assert_generate_equals_solo_runs,
    build,
    image_tokens,
    images,
    module_model_fixtures,
    pad,
    prompt,
)

model, _unwrap = module_model_fixtures()


def two_images(model, seed=0, post=(11, 12, 13, 14, 15)):
    pv = images(2, seed)
    n = image_tokens(model, pv, None)
    return {"input_ids": torch.tensor([prompt(n, [20], list(post))]), "pixel_values": pv}


def test_release_table_and_layers():
    assert SPARSEVLM_COUNTS[192] == (300, 200, 110) and SPARSEVLM_COUNTS[64] == (66, 30, 17)
    assert sparsevlm_default_layers(32) == (2, 6, 15)
    assert sparsevlm_default_layers(4) == (0, 1)
    # the 192 row's own share: (2 + 4 * 300/576 + 9 * 200/576 + 17 * 110/576) / 32 on 576 tokens
    share = (2 + 4 * 300 / 576 + 9 * 200 / 576 + 17 * 110 / 576) / 32
    assert sparsevlm_counts_for(share, 576, (2, 6, 15), 32) == (300, 200, 110)
    with pytest.raises(ValueError, match="keep"):
        sparsevlm_counts_for(0.01, 576, (2, 6, 15), 32)


def test_text_raters_by_hand():
    """Image rows (1, 0) and (0, 1); text rows after them a = (4, 0), b = (0, 4), c = (0, 0): softmax over the text
    of each image row, mean over the image rows: a and b get (e^4 / (e^4 + 2)) / 2 each, c less; mean is 1/3."""
    h = torch.tensor([[9.0, 9.0], [1, 0], [0, 1], [4, 0], [0, 4], [0, 0]])
    img = torch.tensor([False, True, True, False, False, False])
    valid = torch.ones(6, dtype=torch.bool)
    assert text_raters(h, img, valid).nonzero().squeeze(1).tolist() == [3, 4]


def test_text_raters_when_all_tie_are_every_token_after_the_image():
    """One token after the image (a question asked before the image): m = [1], nothing is above its mean, so the
    one token rates (the release would have no rater); three equal text rows tie the same way; nothing after the
    image: no rater."""
    img = torch.tensor([False, True, True, False])
    valid = torch.ones(4, dtype=torch.bool)
    h = torch.tensor([[2.0, 0.0], [1, 0], [0, 1], [3, 3]])
    assert text_raters(h, img, valid).nonzero().squeeze(1).tolist() == [3]
    h6 = torch.tensor([[2.0, 0.0], [1, 0], [0, 1], [1, 1], [1, 1], [1, 1]])
    img6 = torch.tensor([False, True, True, False, False, False])
    assert text_raters(h6, img6, torch.ones(6, dtype=torch.bool)).nonzero().squeeze(1).tolist() == [3, 4, 5]
    assert not text_raters(h[:3], img[:3], valid[:3]).any()
    padded = torch.tensor([True, True, True, False])  # the token after the image is padding: no rater
    assert not text_raters(h, img, padded).any()


def test_density_peak_merge_by_hand():
    """Two tight pairs far apart, 2 clusters: each output is its pair's sum times 1 / (2 + 1e-6)."""
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.2]])
    out = dpc_knn_merge(x, 2)
    want = [((x[0] + x[1]) / (2 + 1e-6)).tolist(), ((x[2] + x[3]) / (2 + 1e-6)).tolist()]
    torch.testing.assert_close(torch.tensor(sorted(out.tolist())), torch.tensor(sorted(want)))
    torch.testing.assert_close(dpc_knn_merge(x, 1), x.sum(0, keepdim=True) / (4 + 1e-6))


def test_counts_and_recycling_per_layer(model):
    """32 image tokens, counts 20 then 10 after layers 0 and 1: 12 pruned -> int(0.3 * 12) + 1 = 4 recycled into
    int(4 / 10) + 1 = 1 token (21), then 11 pruned of 21 -> 4 -> 1 token (11). Without recycling: 20, 10."""
    kw = two_images(model)
    L = kw["input_ids"].shape[1]
    mmc.apply(model, "sparsevlm", keep=None, sparsevlm_layers=[0, 1], sparsevlm_counts=[20, 10])
    with torch.no_grad():
        out = model(**kw, use_cache=True)
    assert mmc.stats(model)["inllm_layer_tokens"] == [[32, 21, 11, 11]]
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [L, L - 11, L - 21, L - 21]
    mmc.apply(model, "sparsevlm", keep=None, sparsevlm_layers=[0, 1], sparsevlm_counts=[20, 10],
              sparsevlm_recycle=False)
    with torch.no_grad():
        model(**kw)
    assert mmc.stats(model)["inllm_layer_tokens"] == [[32, 20, 10, 10]]


def test_first_stage_keeps_what_the_raters_attend_in_an_eager_map(model):
    """Independent check: raters from the unpruned input embeddings, layer 1's eager attention map (separate eager
    copy), mean over heads then raters, top 12 of the 32 image tokens."""
    kw = two_images(model, seed=4)
    eager = build("llava", attn="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        o = eager(**kw, output_attentions=True, output_hidden_states=True)
    ids = kw["input_ids"][0]
    img = ids == IMG
    raters = text_raters(o.hidden_states[0][0], img, torch.ones_like(img)).nonzero().squeeze(1)
    rel = o.attentions[1][0].mean(0)[raters].mean(0)  # [L]
    pos = img.nonzero().squeeze(1)
    keep = pos[rel[pos].topk(12).indices]
    mmc.apply(model, "sparsevlm", keep=None, sparsevlm_layers=[1], sparsevlm_counts=[12], sparsevlm_recycle=False)
    with torch.no_grad():
        model(**kw)
    st = model._mmcompress_adapter.inllm
    assert torch.equal(st.last_pruned[0], pos[~torch.isin(pos, keep)])


def test_keep_fraction_runs_generate_and_remove_restores(model):
    kw = two_images(model, seed=2)
    with torch.no_grad():
        ref = model(**kw).logits
    mmc.apply(model, "sparsevlm", keep=0.5)
    with torch.no_grad():
        g = model.generate(**kw, max_new_tokens=3, do_sample=False)
    assert g.shape[1] == kw["input_ids"].shape[1] + 3
    row = mmc.stats(model)["inllm_layer_tokens"][0]
    assert row[0] == 32 and row[-1] < 32
    mmc.remove(model)
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, ref)


def test_ragged_batch_generate_equals_single_runs(model):
    pv = images(3, seed=7)
    n = image_tokens(model, pv, None)
    seqs = [prompt(n[:1], [20], [11, 12, 13, 16]), prompt(n[1:], [21, 22], [14, 15, 17])]
    ids, am = pad(seqs, "left")
    mmc.apply(model, "sparsevlm", keep=None, sparsevlm_layers=[0, 2], sparsevlm_counts=[9, 5])
    st = assert_generate_equals_solo_runs(model, ids, am, pv, seqs, [pv[:1], pv[1:]], stat="inllm_layer_tokens")
    rows = st["inllm_layer_tokens"]
    assert rows[0][0] == 16 and rows[1][0] == 32


def test_options_are_checked(model):
    with pytest.raises(ValueError, match="keep"):
        mmc.apply(model, "sparsevlm", keep=100)  # not one of the release's budgets
    with pytest.raises(ValueError, match="sparsevlm_counts"):
        mmc.apply(model, "sparsevlm", keep=0.5, sparsevlm_counts=[4, 2])
    with pytest.raises(ValueError, match="sparsevlm_layers"):
        mmc.apply(model, "sparsevlm", keep=0.5, sparsevlm_layers=[3])
    with pytest.raises(ValueError, match="sparsevlm_counts"):
        mmc.apply(model, "sparsevlm", keep=None, sparsevlm_layers=[0, 1], sparsevlm_counts=[4])
    with pytest.raises(TypeError, match="sparsevlm_nosuch"):
        mmc.apply(model, "sparsevlm", keep=0.5, sparsevlm_nosuch=1)
