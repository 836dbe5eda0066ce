"""DART (`mmc.apply(model, "dart", ...)`): pivots by key L1 norm, least-duplicated picks, at layer K (release 2)."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.inllm.dart import DARTRule, dart_quota

pytest.importorskip("transformers")

from llava_tiny import IMG, assert_generate_equals_solo_runs, image_tokens, images, module_model_fixtures, pad, prompt  # noqa: E402

model, _unwrap = module_model_fixtures()


def test_quota_by_hand():
    assert dart_quota(576, 128, 0.778, 8) == 16  # the scripts' budget: 4 + 8 * 16 = 132 tokens kept
    assert dart_quota(576, None, 0.778, 8) == 15  # ceil(127.87 // 8)
    assert dart_quota(32, 8, 0.0, 4) == 2


def test_selection_by_hand():
    """Columns 0..7: text, image 1-5, text 6-7. Pivots: image 3 (largest key L1), text 7 (largest after the image).
    Pivot 3 (1, 0) picks the least similar image token, 2 (-1, 0); pivot 7 (0, -1) then picks 4 (0, 1) among the
    rest. Kept: 2, 3, 4; dropped: 1, 5."""
    rule = DARTRule(k=1, max_num_trunction=2, pivot_image=1, pivot_text=1)
    l1 = torch.tensor([9.0, 1.0, 2.0, 5.0, 1.5, 1.2, 0.5, 3.0])
    hid = torch.tensor([[0, 0], [1, 0.1], [-1, 0], [1, 0], [0, 1], [0.7, 0.7], [1, 1], [0, -1]])
    img = torch.tensor([False, True, True, True, True, True, False, False])
    valid = torch.ones(8, dtype=torch.bool)
    assert rule._drop_one(l1, hid, img, valid).nonzero().squeeze(1).tolist() == [1, 5]
    # left padding (3 columns) changes nothing
    pad3 = torch.zeros(3, dtype=torch.bool)
    got = rule._drop_one(torch.cat([torch.zeros(3), l1]), torch.cat([torch.zeros(3, 2), hid]),
                         torch.cat([pad3, img]), torch.cat([pad3, valid]))
    assert got.nonzero().squeeze(1).tolist() == [4, 8]


@pytest.mark.parametrize("K", [1, 2])  # 2: the paper's layer; 1: the earliest its rule is defined at (layer 0's keys)
def test_through_apply_equals_the_rule_on_independent_inputs(model, K):
    """Layer K - 1's keys from the unpruned model's cache and its output through the final norm feed the rule."""
    pv = images(2, seed=2)
    n = image_tokens(model, pv, None)
    kw = {"input_ids": torch.tensor([prompt(n, [20], [11, 12, 13, 14, 15])]), "pixel_values": pv}
    with torch.no_grad():
        ref = model(**kw, use_cache=True, output_hidden_states=True)
        lm = model.model.language_model
        keys = ref.past_key_values.layers[K - 1].keys  # [1, Hk, L, D], rotary applied
        H = model.config.text_config.num_attention_heads
        keys = keys.repeat_interleave(H // keys.shape[1], 1).transpose(1, 2).reshape(1, keys.shape[2], -1)
        hid = lm.norm(ref.hidden_states[K])[0]
    img = kw["input_ids"][0] == IMG
    rule = DARTRule(k=K, max_num_trunction=8, pivot_image=2, pivot_text=2)
    expect = rule._drop_one(torch.norm(keys[0], p=1, dim=-1), hid, img, torch.ones_like(img)).nonzero().squeeze(1)
    mmc.apply(model, "dart", keep=8, dart_k=K, dart_pivot_image=2, dart_pivot_text=2)
    with torch.no_grad():
        out = model(**kw, use_cache=True)
    st = model._mmcompress_adapter.inllm
    assert torch.equal(st.last_pruned[0], expect)
    assert mmc.stats(model)["inllm_removed"] == [32 - (2 + 4 * 2)]  # 2 image pivots + 4 pivots x quota 2
    L = kw["input_ids"].shape[1]
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [L] * K + [L - 22] * (4 - K)


def test_keep_all_is_bit_identical(model):
    pv = images(1, seed=1)
    n = image_tokens(model, pv, None)
    kw = {"input_ids": torch.tensor([prompt(n, [20], [11, 12, 13])]), "pixel_values": pv}
    with torch.no_grad():
        ref = model(**kw).logits
    mmc.apply(model, "dart", keep=1.0)  # budget n: every image token is a pivot or a pick
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, ref)
    assert mmc.stats(model)["inllm_removed"] == [0]


def test_ragged_batch_generate_equals_single_runs(model):
    pv = images(3, seed=7)
    n = image_tokens(model, pv, None)
    seqs = [prompt(n[:1], [20], [11, 12, 13, 16]), prompt(n[1:], [21, 22], [14, 15])]
    ids, am = pad(seqs, "left")
    mmc.apply(model, "dart", keep=0.25)
    st = assert_generate_equals_solo_runs(model, ids, am, pv, seqs, [pv[:1], pv[1:]], stat="inllm_removed")
    removed = st["inllm_removed"]
    assert removed[0] != removed[1]


def test_options_are_checked(model):
    with pytest.raises(ValueError, match="dart_k"):
        mmc.apply(model, "dart", keep=8, dart_k=4)
    with pytest.raises(ValueError, match="dart_k: expected K >= 1.*no variant before the LLM"):
        mmc.apply(model, "dart", keep=8, dart_k=0)  # the paper prunes inside the LLM only (docs/fidelity_inllm.md)
    with pytest.raises(ValueError, match="keep"):
        mmc.apply(model, "dart", keep=1.5)
    with pytest.raises(ValueError, match="keep"):
        mmc.apply(model, "dart", keep=0)
    with pytest.raises(ValueError, match="dart_pivot_image"):
        mmc.apply(model, "dart", keep=8, dart_pivot_image=-1)
    with pytest.raises(TypeError, match="dart_nosuch"):
        mmc.apply(model, "dart", keep=8, dart_nosuch=1)
