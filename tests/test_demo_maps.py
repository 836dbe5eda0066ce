"""Demo token maps beyond one grid: the in-LLM methods (fastv, pdrop, dart, sparsevlm) are offered and show what the
last LLM layers see and how many image tokens each layer saw; tiled families show every tile (InternVL/SmolVLM:
one item per tile; LLaVA-NeXT anyres: the base tile and the high-res grid of one 1-D item)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from demos.maps import anyres_grid, inllm_assign, item_panels, items_map, layer_counts, mosaic, tile_views, token_map

Q = "what colour is the shape"
from mmcompress.catalog import IN_LLM  # noqa: E402

FOUR = ("fastv", "pdrop", "dart", "sparsevlm")  # the in-LLM methods whose maps this file pins


def save_tiny_llava_next(path: Path, seed: int = 0) -> Path:
    """A tiny random `LlavaNextForConditionalGeneration` + `LlavaNextProcessor` (32 px tiles of 4 x 4 tokens, anyres
    pinpoints up to 64 px) saved as a local HF folder."""
    import torch
    import transformers

    from tests.bench_fixtures import word_tokenizer

    tok = word_tokenizer()
    pins = [[32, 64], [64, 32], [64, 64]]
    improc = transformers.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                  image_grid_pinpoints=pins)
    proc = transformers.LlavaNextProcessor(image_processor=improc, tokenizer=tok, patch_size=8,
                                           vision_feature_select_strategy="default", image_token="<image>",
                                           num_additional_image_tokens=1)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
    tc = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = transformers.LlavaNextConfig(vision_config=vc, text_config=tc, image_token_id=4, image_grid_pinpoints=pins,
                                       vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = transformers.LlavaNextForConditionalGeneration._from_config(cfg).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def test_layer_counts_and_inllm_assign():
    assert layer_counts([64, 64, 32, 32, 32]) == "layers 0-1: 64, 2-4: 32"
    assert layer_counts([16, 8, 4, 2]) == "layers 0: 16, 1: 8, 2: 4, 3: 2"
    cols = np.array([3, 4, 5, 6, 7])  # image tokens at columns 3..7 of the LLM input
    assert inllm_assign(cols, np.array([4, 6])).tolist() == [0, -1, 1, -1, 2]


def test_in_llm_methods_are_offered():
    pytest.importorskip("gradio")
    from demos.app import image_methods

    offered = image_methods()
    assert set(IN_LLM) <= set(offered) and set(offered[-len(IN_LLM):]) == set(IN_LLM)  # listed last


def test_in_llm_methods_run_with_per_layer_counts_and_maps(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import demos.image as image_mod
    from demos.app import run_image
    from tests.bench_fixtures import save_tiny_llava

    backend = image_mod.ImageBackend(str(save_tiny_llava(tmp_path / "m", layers=4)), max_new_tokens=2)
    seen = []
    real = image_mod.items_map
    monkeypatch.setattr(image_mod, "items_map", lambda items, *a: seen.append(items) or real(items, *a))
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(img).save(path)
    rows, gallery = run_image(backend, {}, str(path), None, Q, list(FOUR), 0.5)
    by = {r[0]: r for r in rows}
    for m in FOUR:
        assert by[m][2] == 16 and 0 < by[m][3] < 16, by[m]  # tokens the last layers see
        assert by[m][6].startswith("layers 0-1: 16") or by[m][6].startswith("layers 0: 16"), by[m]
    assert by["fastv"][6].startswith("layers 0-1: 16, 2-3: 8")  # FastV: half of them from layer 2 on
    assert "no map" in by["sparsevlm"][6]
    assert [c.split(":")[0] for _, c in gallery] == ["fastv", "pdrop", "dart"]
    for (pic, caption), items, m in zip(gallery, seen, ("fastv", "pdrop", "dart"), strict=True):
        assert pic.shape == (224, 224, 3) and "layers" in caption and "last layers see" in caption
        (assign, grid), = items
        assert grid == (4, 4) and int((assign < 0).sum()) == 16 - by[m][3]  # the dropped ones are dimmed
        assert sorted(assign[assign >= 0].tolist()) == list(range(by[m][3]))


def test_tiles_each_get_their_panel():
    """InternVL/SmolVLM: one item per tile, each drawn over the tile the tower saw (was: the first item only)."""
    rng = np.random.default_rng(0)
    views = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    items = [(rng.permutation(np.r_[np.arange(4), np.full(12, -1)]), (4, 4)) for _ in range(5)]
    pic = items_map(items, views, np.zeros((10, 10, 3), np.uint8), None)
    panels = [token_map(v, a, g) for v, (a, g) in zip(views, items, strict=True)]
    assert np.array_equal(pic, mosaic(panels)) and pic.shape == (2 * 224 + 6, 4 * 224 + 3 * 6, 3)
    for i, p in enumerate(panels):
        r, c = divmod(i, 4)
        assert np.array_equal(pic[r * 230:r * 230 + 224, c * 230:c * 230 + 224], p)
    assert np.array_equal(items_map(items[:1], views[:1], views[0], None), panels[0])  # one item: its map alone


def test_tile_views_follow_the_pixel_layouts():
    import torch

    t = torch.rand(1, 3, 3, 8, 8)
    t[0, 2] = 0  # SmolVLM pads with all-zero tiles, which the model leaves out
    assert len(tile_views(t, None)) == 2 and tile_views(t, None)[0].shape == (8, 8, 3)
    assert len(tile_views(torch.rand(5, 3, 8, 8), None)) == 5  # InternVL
    assert tile_views(torch.rand(40, 1176), None) == [] and tile_views(None, None) == []  # Qwen2-VL patches


def test_anyres_item_shows_base_tile_and_high_res_grid(tmp_path, monkeypatch):
    """LLaVA-NeXT: one 1-D item (base tile, then the unpadded high-res grid): no map at all before."""
    pytest.importorskip("transformers")
    import demos.image as image_mod

    assert anyres_grid(32, 40 / 80) == (4, 8) and anyres_grid(48, 1.0) in ((6, 8), (8, 6))
    backend = image_mod.ImageBackend(str(save_tiny_llava_next(tmp_path / "next")), max_new_tokens=2)
    seen = []
    real = image_mod.items_map
    monkeypatch.setattr(image_mod, "items_map", lambda *a: seen.append(a) or real(*a))
    img = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    r = backend.answer(img, Q, "tome", 0.5)
    (items, views, image, tile), = seen
    (assign, grid), = items
    assert grid is None and assign.size == 16 + 32 and tile == (4, 4) and len(views) == 3  # base + 2 tiles
    base, hi = item_panels(assign, grid, views[0], image, tile)
    assert base.shape == (224, 224, 3) and hi.shape == (112, 224, 3)  # 4 x 4 base, 4 x 8 high-res
    assert np.array_equal(r["overlay"], mosaic([base, hi]))
    assert r["tokens_in"] == 52 and r["tokens_out"] < 30  # the LLM's image run: 48 + 4 row newlines
    fastv = backend.answer(img, Q, "fastv", 0.5)  # the LLM's run holds row newlines: counts, no map
    assert fastv["overlay"] is None and "no map" in fastv["note"] and fastv["note"].startswith("layers")


def test_internvl_tiles_each_reach_the_map():
    """A tiny InternVL with two tiles: the recorded compressor call holds both tiles, and both get a panel."""
    pytest.importorskip("transformers")
    import torch
    from family_tiny import SPECS, batch, build

    import mmcompress as mmc
    from demos.image import _items, record_compressions

    spec = SPECS["internvl"]
    model = build("internvl")
    kw = batch(spec, [spec.sample(0)])
    mmc.apply(model, "tome", keep=0.5)
    rec = record_compressions(model)
    with torch.no_grad():
        model(**kw)
    items = _items(rec, mmc.stats(model))
    mmc.remove(model)
    assert [(a.size, g) for a, g in items] == [(16, (4, 4)), (16, (4, 4))]  # one item per tile
    views = tile_views(kw["pixel_values"], None)
    pic = items_map(items, views, views[0], None)
    assert len(views) == 2 and pic.shape == (224, 2 * 224 + 6, 3)
    assert np.array_equal(pic[:, 230:], token_map(views[1], *items[1]))  # the second tile, not only the first
