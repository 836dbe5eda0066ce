"""PyramidDrop (`mmc.apply(model, "pdrop", ...)`): the release's stages, counts and ranking, on tiny LLaVA models."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.inllm.pdrop import pdrop_average, pdrop_default_layers, pdrop_lambda_for

pytest.importorskip("transformers")

from llava_tiny import assert_generate_equals_solo_runs, build, image_tokens, images, module_model_fixtures, pad, prompt  # noqa: E402

model, _unwrap = module_model_fixtures()


def one(model, n_images=1, seed=0, post=(11, 12, 13)):
    pv = images(n_images, seed)
    n = image_tokens(model, pv, None)
    return {"input_ids": torch.tensor([prompt(n, [20], list(post))]), "pixel_values": pv}


def test_defaults_and_the_average_budget_by_hand():
    assert pdrop_default_layers(32) == (8, 16, 24)  # the release's layer_list
    assert pdrop_default_layers(4) == (1, 2, 3) and pdrop_default_layers(3) == (1, 2)
    # release lambda = 0.5 on 32 layers: (8 * 576 + 8 * 288 + 8 * 144 + 8 * 72) / 32 / 576 = 0.46875
    assert pdrop_average((8, 16, 24), (0.5, 0.25, 0.125), 32) == 0.46875
    assert abs(pdrop_lambda_for(0.46875, (8, 16, 24), 32) - 0.5) < 1e-9
    assert pdrop_lambda_for(0.25, (8, 16, 24), 32) < 1e-9  # lambda = 0: only the first stage sees the image
    with pytest.raises(ValueError, match="keep"):
        pdrop_lambda_for(0.2, (8, 16, 24), 32)


def test_release_setting_counts_per_layer(model):
    """lambda = 0.5 at layers 1, 2, 3 of 4: int(16 * 0.5), int(16 * 0.25), int(16 * 0.125) image tokens."""
    kw = one(model)
    L = kw["input_ids"].shape[1]
    mmc.apply(model, "pdrop", keep=None, pdrop_lambda=0.5)
    with torch.no_grad():
        out = model(**kw, use_cache=True)
    st = mmc.stats(model)
    assert st["inllm_layer_tokens"] == [[16, 8, 4, 2]] and st["inllm_removed"] == [14]
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [L, L - 8, L - 12, L - 14]
    assert model.config.text_config._attn_implementation == "sdpa"


def test_keep_is_the_average_over_layers(model):
    kw = one(model, n_images=2, seed=3)  # 32 image tokens
    mmc.apply(model, "pdrop", keep=0.5)
    with torch.no_grad():
        model(**kw)
    row = mmc.stats(model)["inllm_layer_tokens"][0]
    lam = pdrop_lambda_for(0.5, (1, 2, 3), 4)
    assert row == [32] + [int(32 * lam ** s) for s in (1, 2, 3)]
    assert abs(sum(row) / (4 * 32) - 0.5) < 2 / 32  # floors only


def test_first_stage_keeps_the_most_attended_by_the_last_token_in_layer_p(model):
    """Independent check: layer p's eager attention map on the unpruned input (a separate eager copy)."""
    kw = one(model, seed=5)
    eager = build("llava", attn="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        att = eager(**kw, output_attentions=True).attentions[1]  # layer 1 = the first prune layer of 4
    row = att[0, :, -1].mean(0)
    img = kw["input_ids"][0] == 5
    pos = img.nonzero().squeeze(1)
    keep = pos[row[pos].topk(8).indices]  # int(16 * 0.5)
    mmc.apply(model, "pdrop", keep=None, pdrop_lambda=0.5, pdrop_layers=[1])
    with torch.no_grad():
        model(**kw)
    st = model._mmcompress_adapter.inllm
    assert torch.equal(st.last_pruned[0], pos[~torch.isin(pos, keep)])


def test_ragged_batch_generate_equals_single_runs(model):
    pv = images(3, seed=7)
    n = image_tokens(model, pv, None)
    seqs = [prompt(n[:1], [20], [11, 12, 13]), prompt(n[1:], [21, 22], [14])]
    ids, am = pad(seqs, "left")
    mmc.apply(model, "pdrop", keep=0.6)
    st = assert_generate_equals_solo_runs(model, ids, am, pv, seqs, [pv[:1], pv[1:]])
    rows = st["inllm_layer_tokens"]
    assert rows[0][0] == 16 and rows[1][0] == 32 and rows[0][-1] < 16


def test_options_are_checked(model):
    with pytest.raises(ValueError, match="keep"):
        mmc.apply(model, "pdrop", keep=0.1)  # below l1 / N = 0.25 with the default layers
    with pytest.raises(ValueError, match="keep"):
        mmc.apply(model, "pdrop", keep=8)
    with pytest.raises(ValueError, match="pdrop_lambda"):
        mmc.apply(model, "pdrop", keep=0.5, pdrop_lambda=0.5)
    with pytest.raises(ValueError, match="pdrop_layers"):
        mmc.apply(model, "pdrop", keep=0.5, pdrop_layers=[2, 1])
    with pytest.raises(ValueError, match="pdrop_layers"):
        mmc.apply(model, "pdrop", keep=0.5, pdrop_layers=[4])
    with pytest.raises(TypeError, match="pdrop_nosuch"):
        mmc.apply(model, "pdrop", keep=0.5, pdrop_nosuch=1)
    with pytest.raises(TypeError, match="fastv_k"):
        mmc.apply(model, "pdrop", keep=0.5, fastv_k=2)
