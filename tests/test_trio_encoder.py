"""TRIO's encoder stage (`trio_encoder`) and the encoder-attention mechanism reading several vision blocks.

Hand-computed cases for the window blocks, the local/global selection and the merge; through `mmc.apply` on a tiny
LLaVA whose tower's own eager attention maps give the reference scores; the one-call schedule `trio` +
`trio_encoder_keep`; refusals (bad options, a family that reads one block).
"""

from __future__ import annotations

import copy

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.base import EncoderNeeds
from mmcompress.compressors.trio_encoder import trio_encoder_select, window_blocks

transformers = pytest.importorskip("transformers")


def test_window_blocks_by_hand():
    # 4 x 5 grid, window 2: 2 x 2 blocks (the last column belongs to none), blocks and tokens row-major
    assert window_blocks((4, 5), 2).tolist() == [[0, 1, 5, 6], [2, 3, 7, 8], [10, 11, 15, 16], [12, 13, 17, 18]]
    assert window_blocks((7,), 3).tolist() == [[0, 1, 2], [3, 4, 5]]  # 1-D: consecutive tokens
    assert window_blocks((2, 2, 2), 2).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # (T, H, W): per frame
    assert window_blocks((3, 3), 4).shape == (0, 16)  # grid smaller than a block


# 4 x 4 grid, window 2: blocks {0,1,4,5} {2,3,6,7} {8,9,12,13} {10,11,14,15}
SHALLOW = torch.zeros(16)
SHALLOW[[5, 2, 12, 15]] = 1.0  # each block's top
SHALLOW[[0, 3, 8, 14]] = 0.5  # each block's second
DEEP = torch.arange(16, 0, -1).float() / 16  # decreasing with the index
DEEP[5] = 2.0  # the deep top is a local token: skipped by the global step
KEPT8 = [0, 1, 2, 3, 4, 5, 12, 15]  # locals 2, 5, 12, 15 + the global top of the rest: 0, 1, 3, 4


def test_selection_by_hand():
    blocks = window_blocks((4, 4), 2)
    # k = 8: floor(8 * 0.5) // 4 = 1 per block, 4 global
    assert trio_encoder_select(SHALLOW[None], DEEP[None], blocks, 8).tolist() == [KEPT8]
    # k = 10: 5 // 4 = 1 per block (4 locals); the global step takes the remaining 6 (the release: 10 - 5 = 5,
    # so it keeps 9 tokens; docs/fidelity_frontier.md)
    assert trio_encoder_select(SHALLOW[None], DEEP[None], blocks, 10).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 12, 15]]
    # k = 16 with local 1.0: 4 per block = every token
    assert trio_encoder_select(SHALLOW[None], DEEP[None], blocks, 16, local=1.0).tolist() == [list(range(16))]
    # local = 0: the global top only
    assert trio_encoder_select(SHALLOW[None], DEEP[None], blocks, 3, local=0.0).tolist() == [[0, 1, 5]]
    # k = 8, local 1.0: 2 per block (the two best of each), nothing global
    two = trio_encoder_select(SHALLOW[None], DEEP[None], blocks, 8, local=1.0)
    assert two.tolist() == [[0, 2, 3, 5, 8, 12, 14, 15]]


def test_merge_into_the_most_similar_kept_by_hand():
    """Kept token t is e_s (s its slot); a dropped token is 0.9 e_s + 0.1 e_(s+1) of the slot s it should join."""
    slot = {t: s for s, t in enumerate(KEPT8)}
    target = {6: 2, 7: 3, 8: 12, 9: 12, 10: 15, 11: 15, 13: 12, 14: 15}  # dropped -> kept token it joins
    x = torch.zeros(16, 8)
    for t, s in slot.items():
        x[t, s] = 1.0
    for i, t in target.items():
        x[i, slot[t]], x[i, (slot[t] + 1) % 8] = 0.9, 0.1
    out = mmc.create("trio_encoder", keep=8, window=2)(x[None], grid=(4, 4),
                                                        scores=torch.stack([SHALLOW, DEEP], -1)[None])
    assert out.rep[0].tolist() == KEPT8  # source order
    want_assign = [slot.get(i, slot.get(target.get(i, -1), -1)) for i in range(16)]
    assert out.assign[0].tolist() == want_assign
    exp = torch.zeros(8, 8)
    for t, s in slot.items():
        members = [x[t]] + [x[i] for i, tt in target.items() if tt == t]
        exp[s] = torch.stack(members).mean(0)  # the plain mean of the kept token and those that joined it
    assert exp[slot[12], slot[12]] == pytest.approx((1 + 0.9 * 3) / 4)  # 12 took three tokens
    torch.testing.assert_close(out.x[0], exp)
    assert out.size[0].tolist() == [1, 1, 2, 2, 1, 1, 4, 4]


def test_one_score_row_serves_both_steps_and_bad_input():
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(2, 36, 8, generator=g), torch.rand(2, 36, generator=g)
    comp = mmc.create("trio_encoder", keep=8, window=3)
    a = comp(x, grid=(6, 6), scores=s)
    b = comp(x, grid=(6, 6), scores=torch.stack([s, s], -1))
    assert torch.equal(a.x, b.x) and torch.equal(a.assign, b.assign)
    with pytest.raises(ValueError, match="scores"):
        comp(x, grid=(6, 6), scores=torch.rand(2, 36, 3))
    with pytest.raises(ValueError, match="scores"):
        comp(x, grid=(6, 6))
    with pytest.raises(ValueError, match="grid"):
        comp(x, scores=s)
    for kw, name in (({"window": 0}, "window"), ({"local": 1.5}, "local"), ({"shallow_layer": "deep"}, "shallow_layer"),
                     ({"deep_layer": 1.0}, "deep_layer")):
        with pytest.raises(ValueError, match=name):
            mmc.create("trio_encoder", keep=8, **kw)
    assert comp.encoder_needs.layers == (5, "feature")
    assert mmc.create("trio_encoder", shallow_layer=2, deep_layer=-1).encoder_needs.layer == (2, -1)


def test_encoder_needs_layers():
    assert EncoderNeeds().layers == ("feature",) and EncoderNeeds(layer=[3, "last"]).layer == (3, "last")
    for bad in ((5,), (5, "middle"), (True, 2)):
        with pytest.raises(ValueError, match="layer"):
            EncoderNeeds(layer=bad)


def _llava(layers: int = 6, side: int = 48, patch: int = 4, text_layers: int = 4, seed: int = 0):
    """A tiny random LLaVA whose CLIP tower has `layers` blocks and a (side / patch)^2 grid."""
    torch.manual_seed(seed)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                       num_attention_heads=4, image_size=side, patch_size=patch, projection_dim=32)
    tc = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=text_layers,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=5, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    return transformers.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()


def _llm_inputs(m, kw):
    got = {}
    h = m.model.language_model.register_forward_pre_hook(
        lambda mod, a, k: got.__setitem__("e", k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            m(**kw)
    finally:
        h.remove()
    return got["e"]


def test_apply_reads_two_blocks_as_the_release():
    """Through apply: the [CLS] rows of block 5 and of the feature block (-2), from the tower's own eager maps,
    heads averaged, CLS column dropped; compression after the projector; 12 x 12 grid, 2 x 2 blocks of 6."""
    m = _llava()
    pv = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 11] + [5] * 144 + [12, 13]] * 2)
    tower = copy.deepcopy(m.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        o = tower(pv, output_attentions=True, output_hidden_states=True)
        feats = m.model.multi_modal_projector(o.hidden_states[-2][:, 1:])  # [2, 144, 48]
    a = torch.stack(o.attentions)[:, :, :, 0, 1:].mean(2)  # [6 blocks, 2, 144]
    ref = mmc.create("trio_encoder", keep=24)(feats, grid=(12, 12), scores=torch.stack([a[5], a[-2]], -1))
    mmc.apply(m, "trio_encoder", keep=24)
    got = _llm_inputs(m, {"input_ids": ids, "pixel_values": pv})
    assert mmc.stats(m)["tokens_out"] == [24, 24] and got.shape[1] == 2 + 24 + 2
    torch.testing.assert_close(got[:, 2:26], ref.x, rtol=1e-5, atol=1e-5)
    # one block instead of two would pick another set: the two blocks' rows matter
    one = mmc.create("trio_encoder", keep=24)(feats, grid=(12, 12), scores=a[-2])
    assert not torch.equal(one.rep, ref.rep)
    with pytest.raises(ValueError, match="block 6 asked"):
        mmc.apply(m, "trio_encoder", keep=24, shallow_layer=6)
        _llm_inputs(m, {"input_ids": ids, "pixel_values": pv})
    mmc.remove(m)


def test_trio_schedule_in_one_call():
    """`trio` + `trio_encoder_keep`: 24 tokens enter the LLM (the encoder stage), 8 from layer 2 of 4 on."""
    m = _llava()
    pv = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    kw = {"input_ids": torch.tensor([[1, 11] + [5] * 144 + [12, 13, 14, 15, 16]]), "pixel_values": pv}
    mmc.apply(m, "trio_encoder", keep=24)
    enc = _llm_inputs(m, kw)
    mmc.apply(m, "trio", keep=8, trio_encoder_keep=24)
    both = _llm_inputs(m, kw)
    st = mmc.stats(m)
    assert torch.equal(both, enc)  # the LLM gets the encoder stage's tokens, then prunes inside
    assert st["method"] == "trio" and st["tokens_out"] == [24]
    assert st["inllm_layer_tokens"] == [[24, 24, 8, 8]]
    with pytest.raises(ValueError, match="trio_encoder_keep"):
        mmc.apply(m, "trio", keep=8, trio_encoder_keep=1.5)
    with pytest.raises(TypeError, match="window"):  # encoder options need the encoder stage
        mmc.apply(m, "trio", keep=8, window=3)
    mmc.remove(m)


def test_a_family_reading_one_block_refuses():
    from family_tiny import _gemma3, _square_sample

    m = _gemma3().eval()
    ids, media = _square_sample(16, (1, 3, 32, 32))()
    mmc.apply(m, "trio_encoder", keep=4)
    with pytest.raises(ValueError, match="reads attention at 2 encoder blocks"):
        with torch.no_grad():
            m(input_ids=ids[None], **media)
    mmc.remove(m)
