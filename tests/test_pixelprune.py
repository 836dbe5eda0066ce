"""PixelPrune (mmcompress/compressors/pixelprune.py + the pixel stage, mmcompress/hf/pixels.py).

The rule against hand-computed group grids (LOCO-I predictor, anchored scan, lossless reconstruction at tau = 0),
then `mmc.apply` on tiny Qwen2/2.5/3-VL: the tower runs on the kept patches at their original positions, the LLM
sees one token per kept group at its original M-RoPE ids, batches equal solo runs, nothing removable is
bit-identical, `remove` restores, other families refuse. Agreement with the release (OPPO-Mente-Lab/PixelPrune
@ a870e31, `compute_merged_keep_indices`) was checked beside it: docs/fidelity_frontier.md.
"""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.pixelprune import (
    QWEN2_MEAN,
    QWEN2_STD,
    QWEN3_MEAN,
    QWEN3_STD,
    group_pixels,
    patch_rows,
    pixelprune_select,
)
from tests import family_tiny as ft


def qwen_pixels(img: torch.Tensor, patch: int = 4, merge: int = 2, mean=QWEN3_MEAN, std=QWEN3_STD, T: int = 2):
    """[3, H, W] image in [0, 1] -> Qwen processor rows [N, 3 * T * P * P] (normalised, T frames) and grid [1, 3]."""
    C, H, W = img.shape
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    x = ((img - m) / s).unsqueeze(0).repeat(T, 1, 1, 1)  # [T, C, H, W]
    gh, gw = H // patch, W // patch
    x = x.view(T, C, gh // merge, merge, patch, gw // merge, merge, patch).permute(2, 5, 3, 6, 1, 0, 4, 7)
    return x.reshape(gh * gw, C * T * patch * patch), torch.tensor([[1, gh, gw]])


def from_groups(values: list[list[float]], patch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose merge groups (2 x 2 patches of `patch` px) are flat at the given grey values."""
    v = torch.tensor(values, dtype=torch.float32)
    img = v.repeat_interleave(2 * patch, 0).repeat_interleave(2 * patch, 1).expand(3, -1, -1)
    return qwen_pixels(img.contiguous(), patch=patch)


def kept_of(values, **kw) -> list[int]:
    pv, grid = from_groups(values)
    return pixelprune_select(pv, grid, **kw)[0].tolist()


def decode(g: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Reconstruct [gh, gw, D] groups from the kept ones with the LOCO-I predictor (what a decoder would do)."""
    gh, gw, _ = g.shape
    rec = torch.zeros_like(g)
    keep = torch.zeros(gh * gw, dtype=torch.bool)
    keep[kept] = True
    keep = keep.view(gh, gw)
    for r in range(gh):
        for c in range(gw):
            if keep[r, c]:
                rec[r, c] = g[r, c]
            elif r > 0 and c > 0:
                A, B, C = rec[r, c - 1], rec[r - 1, c], rec[r - 1, c - 1]
                rec[r, c] = B if torch.equal(C, A) and not torch.equal(C, B) else A
            else:
                rec[r, c] = rec[r, c - 1] if c > 0 else rec[r - 1, c]
    return rec


# ---- the rule ----------------------------------------------------------------------------------------------------
def test_flat_keeps_one_group():
    assert kept_of([[0.3] * 5] * 4) == [0]


def test_vertical_stripes_keep_first_row():
    # each column differs from its left neighbour; rows repeat: C ~ A, not C ~ B -> predict from above
    assert kept_of([[0.0, 1.0, 0.0, 1.0, 0.0]] * 4) == [0, 1, 2, 3, 4]


def test_horizontal_stripes_keep_first_column():
    assert kept_of([[0.0] * 5, [1.0] * 5, [0.0] * 5, [1.0] * 5]) == [0, 5, 10, 15]


def test_square_keeps_its_corners():
    # 4 x 4 zeros, a 2 x 2 square of ones at (1..2, 1..2); worked by hand with the LOCO-I rule:
    # (1,1) predicted 0 (A) -> kept; (1,3) predicted 1 (A, horizontal edge above) -> kept;
    # (3,1) predicted 1 (B, vertical edge left) -> kept; everything else reproduced
    v = [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert kept_of(v) == [0, 5, 7, 13]


def test_anchored_scan_does_not_drift():
    # a ramp of 0.04 steps with tau = 0.05: each step alone is within tau (the sliding form keeps only the
    # first), the anchored scan compares with the reconstructed value and re-anchors every 0.08
    ramp = [[0.0, 0.04, 0.08, 0.12, 0.16]]
    assert kept_of(ramp, tau=0.05) == [0, 2, 4]
    assert kept_of(ramp, tau=0.05, anchored=False) == [0]
    assert kept_of(ramp, tau=0.0) == [0, 1, 2, 3, 4]


def test_metrics_and_threshold_units():
    # one pixel of one group differs by 0.2 (in [0, 1]): max sees 0.2, mae sees 0.2 / D
    pv, grid = from_groups([[0.5, 0.5]])
    g = group_pixels(pv, grid)[0]
    D = g.shape[-1]
    img = torch.full((3, 4, 8), 0.5)  # 1 x 2 groups of 4 x 4 px
    img[0, 0, 4] = 0.7
    pv, grid = qwen_pixels(img, patch=2)
    assert pixelprune_select(pv, grid, metric="max", tau=0.19)[0].tolist() == [0, 1]
    assert pixelprune_select(pv, grid, metric="max", tau=0.21)[0].tolist() == [0]
    assert pixelprune_select(pv, grid, metric="mae", tau=0.2 / D * 1.01)[0].tolist() == [0]
    assert pixelprune_select(pv, grid, metric="exact", tau=0.5)[0].tolist() == [0, 1]  # exact ignores tau


def test_lossless_at_tau0_on_a_page():
    page = _page(64, 96)
    pv, grid = qwen_pixels(page, patch=4)
    kept = pixelprune_select(pv, grid)[0]
    g = group_pixels(pv, grid)[0]
    assert 0 < kept.numel() < g.shape[0] * g.shape[1] // 2  # a page is mostly background
    assert torch.equal(decode(g, kept), g)


def _photo(name: str):
    """A real photo from an installed wheel: matplotlib's (a test dependency) or scikit-image's (skipped without it)."""
    import numpy as np

    if name == "grace_hopper":
        import matplotlib.cbook
        from PIL import Image

        return np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    return pytest.importorskip("skimage.data").astronaut()


@pytest.mark.parametrize("name", ["grace_hopper", "astronaut"])
def test_natural_photo_loses_nothing(name):
    img = torch.tensor(_photo(name)[:224, :224] / 255.0, dtype=torch.float32).permute(2, 0, 1).contiguous()
    pv, grid = qwen_pixels(img, patch=14, mean=QWEN2_MEAN, std=QWEN2_STD)
    kept = pixelprune_select(pv, grid, mean=QWEN2_MEAN, std=QWEN2_STD)[0]
    g = group_pixels(pv, grid, mean=QWEN2_MEAN, std=QWEN2_STD)[0]
    assert torch.equal(decode(g, kept), g)  # lossless; on a photo no group is reproduced exactly
    assert kept.numel() == g.shape[0] * g.shape[1]


def test_batch_of_images_and_patch_rows():
    (pa, ga), (pb, gb) = from_groups([[0.0] * 3] * 2), from_groups([[0.0, 1.0]] * 3)
    kept = pixelprune_select(torch.cat([pa, pb]), torch.cat([ga, gb]))
    assert [k.tolist() for k in kept] == [[0], [0, 1]]
    assert patch_rows(kept, torch.cat([ga, gb])).tolist() == [0, 1, 2, 3, 24, 25, 26, 27, 28, 29, 30, 31]


def test_bad_arguments():
    pv, grid = from_groups([[0.0, 1.0]])
    with pytest.raises(ValueError, match="metric"):
        pixelprune_select(pv, grid, metric="l2")
    with pytest.raises(ValueError, match="tau"):
        pixelprune_select(pv, grid, tau=-1.0)
    with pytest.raises(ValueError, match="grid_thw"):
        pixelprune_select(pv, torch.tensor([[1, 2, 8]]))
    with pytest.raises(ValueError, match="grid_thw"):
        pixelprune_select(pv, torch.tensor([[2, 2, 2]]))
    with pytest.raises(ValueError, match="tau"):
        mmc.create("pixelprune", tau="big")


def test_token_level_call():
    x = torch.zeros(2, 12, 4)
    x[1, 5] = 1.0
    out = mmc.create("pixelprune", keep="auto")(x, grid=(3, 4))
    # row 1: (0, 0), the odd token (1, 1), and its right (1, 2) and lower (2, 1) neighbours, both predicted from it
    assert out.counts.tolist() == [1, 4]
    assert (out.assign[1] >= 0).nonzero().squeeze(1).tolist() == [0, 5, 6, 9]
    assert mmc.create("pixelprune", keep=2)(x, grid=(3, 4)).counts.tolist() == [2, 2]


# ---- through mmc.apply on tiny Qwen-VL models ---------------------------------------------------------------------
QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _page(H: int, W: int, seed: int = 0) -> torch.Tensor:
    """A white page with dark 'text' runs in lines (a document-like image), values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    img = torch.ones(3, H, W)
    for y in range(10, H - 10, 24):  # lines of 'words' (random dark strokes), wide margins and line spacing
        x = 10
        while x < W - 26:
            w = int(torch.randint(4, 14, (1,), generator=g))
            img[:, y : y + 6, x : x + w] = (torch.rand(1, 6, w, generator=g) * 0.5).round(decimals=2)
            x += w + int(torch.randint(3, 10, (1,), generator=g))
    return img


def _inputs(name: str, imgs: list[torch.Tensor]):
    spec = ft.SPECS[name]
    mean, std = (QWEN3_MEAN, QWEN3_STD) if name.startswith("qwen3") else (QWEN2_MEAN, QWEN2_STD)
    samples = []
    for img in imgs:
        pv, grid = qwen_pixels(img, patch=4, mean=mean, std=std)
        n = int(grid.prod()) // 4
        ids = torch.tensor([ft.BOS, 5, 6, ft.START] + [ft.IMG] * n + [ft.END, 7, 8])
        samples.append((ids, {"pixel_values": pv, "image_grid_thw": grid}))
    return ft.batch(spec, samples)


class _Seen:
    """Records the tower's input rows and its first block's inputs."""

    def __init__(self, visual):
        self.rows, self.blk = [], []
        self.h = [visual.patch_embed.register_forward_pre_hook(lambda m, a: self.rows.append(a[0].shape[0])),
                  visual.blocks[0].register_forward_pre_hook(lambda m, a, k: self.blk.append((a, k)),
                                                             with_kwargs=True)]

    def close(self):
        for h in self.h:
            h.remove()


@pytest.mark.parametrize("name", QWEN)
def test_apply_encoder_runs_on_kept_patches_at_original_positions(name):
    model = ft.build(name)
    img = torch.zeros(3, 32, 48)
    img[:, 8:16, 16:32] = 1.0
    img[0, 24:32, 0:8] = 0.5
    inp = _inputs(name, [img])
    visual = model.model.visual
    seen = _Seen(visual)
    with torch.no_grad():
        full = model(**inp).logits
        mmc.apply(model, "pixelprune")
        out = model(**inp).logits
    seen.close()
    mean, std = (QWEN3_MEAN, QWEN3_STD) if name.startswith("qwen3") else (QWEN2_MEAN, QWEN2_STD)
    kept = pixelprune_select(inp["pixel_values"], inp["image_grid_thw"], mean=mean, std=std)
    M = kept[0].numel()
    assert 1 < M < 24
    assert seen.rows == [96, 4 * M]  # the tower's input: every patch, then the kept groups' patches only
    st = mmc.stats(model)
    assert st["tokens_out"] == [M] and st["encoder_patches_out"] == 4 * M and st["encoder_patches_in"] == 96
    assert out.shape[1] == full.shape[1] - (24 - M)
    rows = patch_rows(kept, inp["image_grid_thw"])
    (fa, fk), (pa, pk) = seen.blk
    hf, hp = (fa[0] if fa else fk["hidden_states"]), (pa[0] if pa else pk["hidden_states"])
    cf, cp = fk["position_embeddings"], pk["position_embeddings"]
    if name == "qwen2_5_vl":  # blocks see window order: undo the full run's, compare the kept rows as sets
        from transformers.vision_utils import get_vision_window_index

        widx, _ = get_vision_window_index(inp["image_grid_thw"], 2, visual.window_size, visual.patch_size)

        def raster(t):  # [N, C] window order -> processor order
            return t.view(-1, 4, t.shape[-1])[torch.argsort(widx)].reshape(-1, t.shape[-1])

        want = torch.cat([raster(hf), raster(cf[0])], 1)[rows]
        got = torch.cat([hp, cp[0]], 1)
        key = torch.randn(got.shape[1], dtype=got.dtype)
        assert torch.equal(got[torch.argsort(got @ key)], want[torch.argsort(want @ key)])
    else:  # the release's ViT input: the full run's rows of the kept patches (embedding + rotary of their places)
        assert torch.equal(hp, hf[rows])
        assert torch.equal(cp[0], cf[0][rows]) and torch.equal(cp[1], cf[1][rows])
    if name != "qwen2_5_vl":  # (Qwen2.5-VL's block 0 attends within windows: test_qwen2_5_windows_...)
        assert pk["cu_seqlens"].tolist() == [0, 4 * M]
    mmc.remove(model)
    with torch.no_grad():
        assert torch.equal(model(**inp).logits, full)


def test_qwen2_5_windows_hold_their_kept_patches():
    name = "qwen2_5_vl"
    model = ft.build(name)
    img = torch.zeros(3, 64, 64)  # 16 x 16 patches, 8 x 8 groups, windows of 16 px = 2 x 2 groups
    img[:, 8:40, 24:56] = torch.linspace(0, 1, 32).view(1, 32, 1)  # a gradient: every row of it differs
    inp = _inputs(name, [img])
    kept = pixelprune_select(inp["pixel_values"], inp["image_grid_thw"], mean=QWEN2_MEAN, std=QWEN2_STD)[0]
    seen = _Seen(model.model.visual)
    cu = []
    blk = model.model.visual.blocks[0]
    h = blk.register_forward_pre_hook(lambda m, a, k: cu.append(k["cu_seqlens"].tolist()), with_kwargs=True)
    mmc.apply(model, "pixelprune")
    with torch.no_grad():
        model(**inp)
    h.remove()
    seen.close()
    # expected windows: group (r, c) is in window (r // 2, c // 2); windows in raster order, empty ones vanish
    win = torch.tensor([(int(k) // 8 // 2) * 4 + (int(k) % 8) // 2 for k in kept])
    counts = torch.bincount(win, minlength=16)
    expect = [0] + (counts[counts > 0] * 4).cumsum(0).tolist()
    assert cu[-1] == expect
    assert 1 < kept.numel() < 64


@pytest.mark.parametrize("name", QWEN)
def test_apply_batch_equals_solo(name):
    model = ft.build(name)
    a = torch.zeros(3, 32, 48)
    a[:, 8:16, 16:32] = 1.0
    b = _page(32, 48, seed=1)
    mmc.apply(model, "pixelprune")
    both = _inputs(name, [a, b])
    with torch.no_grad():
        out = model(**both).logits
        counts = mmc.stats(model)["tokens_out"]
        solo = [model(**_inputs(name, [im])).logits for im in (a, b)]
    assert counts[0] != counts[1]
    for i, s in enumerate(solo):
        torch.testing.assert_close(out[i, -1], s[0, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", QWEN)
def test_apply_nothing_removable_is_bit_identical(name):
    model = ft.build(name)
    g = torch.Generator().manual_seed(0)
    inp = _inputs(name, [(torch.rand(3, 32, 48, generator=g) * 255).round() / 255])
    with torch.no_grad():
        ref = model(**inp).logits
        mmc.apply(model, "pixelprune")
        out = model(**inp).logits
    assert mmc.stats(model)["tokens_out"] == [24]
    assert torch.equal(out, ref)


def test_apply_generate_runs_on_the_short_sequence():
    name = "qwen2_vl"
    model = ft.build(name)
    img = torch.zeros(3, 32, 48)
    img[:, 8:16, 16:32] = 1.0
    inp = _inputs(name, [img])
    mmc.apply(model, "pixelprune")
    with torch.no_grad():
        gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
        again = model.generate(**inp, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == inp["input_ids"].shape[1] + 3 and torch.equal(gen, again)
    assert mmc.stats(model)["encoder_patches_out"] < 96


@pytest.mark.parametrize("name", ["glm4v", "gemma3"])
def test_other_families_refuse(name):
    model = ft.build(name)
    with pytest.raises(ValueError, match="BEFORE the vision encoder"):
        mmc.apply(model, "pixelprune")


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl"])
def test_apply_llm_sees_kept_tokens_at_their_original_mrope_positions(name):
    model = ft.build(name)
    img = torch.zeros(3, 32, 48)
    img[:, 8:16, 16:32] = 1.0
    inp = _inputs(name, [img])
    got = []
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, k: got.append((k["position_ids"], k["inputs_embeds"])),
                                     with_kwargs=True)
    with torch.no_grad():
        model(**inp)
        mmc.apply(model, "pixelprune")
        model(**inp)
    h.remove()
    (pf, ef), (pp, ep) = got
    mean, std = (QWEN3_MEAN, QWEN3_STD) if name.startswith("qwen3") else (QWEN2_MEAN, QWEN2_STD)
    kept = pixelprune_select(inp["pixel_values"], inp["image_grid_thw"], mean=mean, std=std)[0]
    ids = inp["input_ids"][0]
    img_cols = (ids == ft.IMG).nonzero().squeeze(1)
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[img_cols] = False
    keep[img_cols[kept]] = True
    assert torch.equal(pp[-3:], pf[-3:][..., keep])  # (t, h, w) ids of the kept columns, unchanged
    text = keep & (ids != ft.IMG)
    assert torch.equal(ep[0][(ids[keep] != ft.IMG)], ef[0][text])  # text embeddings where they were
