"""In-encoder ToMe merging (vit_merge adapter) on tiny random HF, timm and open_clip ViTs."""

from __future__ import annotations

import copy

import pytest
import torch

import mmcompress as mmc

transformers = pytest.importorskip("transformers")

IMG, PATCH = 32, 8  # 16 patches


def hf_vision(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=IMG, patch_size=PATCH)
    if kind == "dinov2":
        return transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=2, **common)).eval()
    if kind == "dinov2_reg":
        cfg = transformers.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **common)
        return transformers.Dinov2WithRegistersModel(cfg).eval()
    if kind == "clip_vision":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(intermediate_size=64, **common)).eval()
    if kind == "siglip_vision":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(intermediate_size=64, **common)).eval()
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16)
    vision = dict(intermediate_size=64, **common)
    if kind == "clip":
        cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        return transformers.CLIPModel(cfg).eval()
    cfg = transformers.SiglipConfig(text_config=text, vision_config=vision)
    return transformers.SiglipModel(cfg).eval()


def timm_vit(seed: int = 0) -> torch.nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    return timm.models.vision_transformer.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=2,
                                                            num_heads=2, num_classes=10).eval()


def open_clip_vit(seed: int = 0) -> torch.nn.Module:
    oc = pytest.importorskip("open_clip.transformer")
    torch.manual_seed(seed)
    return oc.VisionTransformer(image_size=IMG, patch_size=PATCH, width=32, layers=2, heads=2, mlp_ratio=2.0,
                                output_dim=16).eval()


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    if kind == "timm":
        return timm_vit(seed)
    if kind == "open_clip":
        return open_clip_vit(seed)
    return hf_vision(kind, seed)


def pixels(B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def outputs(model, x) -> tuple[torch.Tensor, ...]:
    """(token states, pooled) of the vision path of any test model."""
    with torch.no_grad():
        if isinstance(model, (transformers.CLIPModel, transformers.SiglipModel)):
            o = model.vision_model(pixel_values=x)
            return o.last_hidden_state, o.pooler_output, model.get_image_features(pixel_values=x).pooler_output
        if hasattr(model, "config"):
            o = model(pixel_values=x)
            return o.last_hidden_state, o.pooler_output
        if hasattr(model, "forward_features"):  # timm
            return model.forward_features(x), model(x)
        model.output_tokens = True  # open_clip: (pooled, tokens)
        pooled, tokens = model(x)
        return tokens, pooled


KINDS = ["dinov2", "dinov2_reg", "clip_vision", "siglip_vision", "clip", "siglip", "timm", "open_clip"]
PREFIX = {"siglip_vision": 0, "siglip": 0, "dinov2_reg": 3}  # CLS (+ registers); 1 unless listed


@pytest.mark.parametrize("kind", KINDS)
def test_keep_all_identical_merge_shrinks_and_remove_restores(kind):
    model = build(kind)
    x = pixels()
    ref = outputs(model, x)
    mmc.apply(model, "tome", keep=1.0)
    assert all(torch.equal(a, b) for a, b in zip(ref, outputs(model, x), strict=True))

    mmc.apply(model, "tome", keep=4)
    once = outputs(model, x)
    st = mmc.stats(model)
    P = PREFIX.get(kind, 1)
    assert st["tokens_in"] == [16 + P] * 2 and st["tokens_out"] == [4 + P] * 2
    assert st["per_block"] == [10 + P, 4 + P] and st["r"] == [6, 6]
    tokens = once[0]
    assert tokens.shape[1] == (4 if kind == "open_clip" else 4 + P)  # open_clip returns patch tokens only
    assert all(bool(torch.isfinite(t).all()) for t in once)
    assert once[1].shape == ref[1].shape  # pooled output still works
    mmc.apply(model, "tome", keep=4)  # idempotent
    assert all(torch.equal(a, b) for a, b in zip(once, outputs(model, x), strict=True))

    with mmc.disabled(model):
        assert all(torch.equal(a, b) for a, b in zip(ref, outputs(model, x), strict=True))
    mmc.remove(model)
    assert all(torch.equal(a, b) for a, b in zip(ref, outputs(model, x), strict=True))
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_full_model_routes_to_vision_tower_and_leaves_text_alone(kind):
    model = build(kind)
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        ref = model.get_text_features(input_ids=ids).pooler_output
        mmc.apply(model, "tome", keep=0.25)
        assert torch.equal(model.get_text_features(input_ids=ids).pooler_output, ref)
        out = model(input_ids=ids, pixel_values=pixels(1))
    assert torch.isfinite(out.logits_per_image).all()
    assert mmc.stats(model)["tokens_out"] == [4 + PREFIX.get(kind, 1)]


def test_other_instance_untouched_and_sdpa_kept():
    a, b = hf_vision("dinov2"), hf_vision("dinov2")
    x = pixels()
    ref = outputs(b, x)
    mmc.apply(a, "tome", keep=4)
    assert all(torch.equal(p, q) for p, q in zip(ref, outputs(b, x), strict=True))
    assert a.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in b.modules())


def test_proportional_attention_sdpa_matches_eager():
    sdpa = hf_vision("dinov2")
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    x = pixels()
    mmc.apply(sdpa, "tome", keep=3)
    mmc.apply(eager, "tome", keep=3)
    for p, q in zip(outputs(sdpa, x), outputs(eager, x), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    mmc.apply(sdpa, "tome", keep=3, prop_attn=False)
    assert not torch.allclose(outputs(sdpa, x)[0], outputs(eager, x)[0], atol=1e-5)  # the bias matters


def reference_tome_timm(vit, x: torch.Tensor, plan: list[int]) -> torch.Tensor:
    """Hand-written ToMe forward of a timm ViT: explicit softmax with + log(size), merge between attn and MLP."""
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    size = None
    for blk, r in zip(vit.blocks, plan, strict=True):
        at = blk.attn
        y = blk.norm1(h)
        B, N, C = y.shape
        q, k, v = at.qkv(y).reshape(B, N, 3, at.num_heads, -1).permute(2, 0, 3, 1, 4)  # each [B, H, N, d]
        logits = (q * at.scale) @ k.transpose(-1, -2)
        if size is not None:
            logits = logits + size.log()[:, None, None, :]
        a = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        h = h + blk.ls1(at.proj(a))
        if r:
            out = mmc.create("tome", keep=N - 1 - r)(h, prefix=1, size=size, metric=k.mean(1))
            h, size = out.x, out.size
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return vit.norm(h)


@pytest.mark.parametrize("keep,r,plan", [(4, None, [6, 6]), (1, 5, [5, 5]), (9, 5, [5, 2])])
def test_timm_matches_hand_written_tome(keep, r, plan):
    vit = timm_vit()
    x = pixels()
    with torch.no_grad():
        want = reference_tome_timm(vit, x, plan)
        mmc.apply(vit, "tome", keep=keep, r=r)
        got = vit.forward_features(x)
    assert mmc.stats(vit)["r"] == plan
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_open_clip_sequence_first_blocks():
    vit = open_clip_vit()
    x = pixels()
    mmc.apply(vit, "tome", keep=4)
    want = outputs(vit, x)
    vit.transformer.batch_first = False  # older open_clip layout: [N, B, C] through the blocks
    for blk in vit.transformer.resblocks:
        blk.attn.batch_first = False
    got = outputs(vit, x)
    for p, q in zip(got, want, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


def test_siglip_head_proportional_attention_equals_duplicated_tokens():
    """Pooling head with log(size) on its keys == the plain head over tokens repeated `size` times."""
    from mmcompress.hf.adapter import ATTR

    model = hf_vision("siglip_vision")
    head = getattr(model, "vision_model", model).head
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    size = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0], [2.0, 1.0, 1.0, 1.0, 4.0]])
    with torch.no_grad():
        want = torch.stack([head(h[b:b + 1].repeat_interleave(size[b].long(), dim=1))[0] for b in range(2)])
        mmc.apply(model, "tome", keep=4)
        model.__dict__[ATTR]._size = size  # as left by the last block of a merged forward
        got = head(h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_errors_name_the_argument():
    vit = timm_vit()
    with pytest.raises(ValueError, match="keep"):
        mmc.apply(vit, "tome", keep="auto")
    with pytest.raises(ValueError, match="scores"):
        mmc.apply(vit, "visionzip", keep=4)
    with pytest.raises(ValueError, match="r:"):
        mmc.apply(vit, "tome", keep=4, r=-1)
    mmc.apply(vit, "tome", keep=40)
    with pytest.raises(ValueError, match="keep"), torch.no_grad():
        vit(pixels())
    with pytest.raises(ValueError, match="unsupported"):
        mmc.apply(torch.nn.Linear(2, 2), "tome", keep=4)


@pytest.mark.parametrize("kind", ["timm", "dinov2"])
def test_training_through_merged_blocks_has_true_gradients(kind):
    """Fine-tuning with in-encoder merging: autograd's directional derivatives of a loss on the pooled (CLS) output and
    on the tokens, w.r.t. the first block's weights and the pixels, equal central finite differences (float64; the
    matching does not move for steps of 1e-6)."""
    model = build(kind).double()
    mmc.apply(model, "tome", keep=4)
    x = pixels().double().requires_grad_()
    first = model.blocks[0].attn.qkv.weight if kind == "timm" else model.encoder.layer[0].attention.q_proj.weight

    def loss(m, px):
        if kind == "timm":
            tokens = m.forward_features(px)
            pooled = tokens[:, 0]
        else:
            o = m(pixel_values=px)
            tokens, pooled = o.last_hidden_state, o.pooler_output
        return (pooled ** 2).sum() + tokens[:, 1:].sin().sum()

    g_w, g_x = torch.autograd.grad(loss(model, x), (first, x))
    gen = torch.Generator().manual_seed(0)
    for param, grad in ((first, g_w), (x, g_x)):
        v = torch.randn(param.shape, dtype=param.dtype, generator=gen)
        with torch.no_grad():
            base = param.detach().clone()
            param.copy_(base + 1e-6 * v)
            up = loss(model, x)
            param.copy_(base - 1e-6 * v)
            down = loss(model, x)
            param.copy_(base)
        torch.testing.assert_close((up - down) / 2e-6, (grad * v).sum(), rtol=1e-5, atol=1e-6)
