"""Token maps of the image tab beyond one 2-D grid: every tile of a tiled family (InternVL, SmolVLM/Idefics3: one item
per tile; LLaVA-NeXT/OneVision anyres: a base tile then the unpadded high-res grid in one 1-D item), and what the
last LLM layers see after an in-LLM method (fastv, pdrop, dart) dropped image tokens inside the LLM.

Letters: N tokens of an item, S tile side in pixels, h/w token grid, L LLM input length.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .overlay import overlay_token_map, token_classes

VIEW_SIDE = 224  # a panel is upscaled (nearest) to about this side, so small grids stay readable
GAP = 6  # white pixels between panels of a mosaic
PER_ROW = 4  # panels per mosaic row


def image_grid(grid: Any, n: int) -> tuple[int, int] | None:
    """The (h, w) patch grid of one image's `n` tokens from the grid its compressor got: ``(h, w)`` (LLaVA), or
    ``(1, h, w)`` (Qwen2-VL and other M-RoPE families record images as one frame); None when the tokens are not one
    2-D grid (several frames, a 1-D anyres sequence, audio)."""
    if grid is None:
        return None
    g = tuple(int(v) for v in grid)
    while len(g) > 2 and g[0] == 1:
        g = g[1:]
    return g if len(g) == 2 and g[0] * g[1] == n else None


def token_map(view: np.ndarray, assign: np.ndarray, grid: tuple[int, int],
              classes: np.ndarray | None = None) -> np.ndarray:
    """Overlay of ``assign`` [gh * gw] on ``view`` [H, W, 3], resized to a multiple of the grid near `VIEW_SIDE`."""
    from PIL import Image

    gh, gw = grid
    p = max(1, round(VIEW_SIDE / max(gh, gw)))
    img = np.asarray(Image.fromarray(np.asarray(view, np.uint8)).resize((gw * p, gh * p), Image.BICUBIC))
    return overlay_token_map(img, assign, (gh, gw), classes=classes)


def unnormalise(pixels: Any, image_processor: Any) -> np.ndarray:
    """[3, S, S] normalised pixels -> uint8 [S, S, 3], with the processor's mean/std (min-max when it has none)."""
    x = pixels.float().permute(1, 2, 0).cpu().numpy()  # [S, S, 3]
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is not None and std is not None:
        x = x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    else:
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
    return (x.clip(0, 1) * 255).round().astype(np.uint8)


def tile_views(pixel_values: Any, image_processor: Any) -> list[np.ndarray]:
    """The pictures the vision tower saw, one per tile, in the model's order: [1, 3, S, S] (one image), [T, 3, S, S]
    (InternVL tiles), [1, T, 3, S, S] (LLaVA-NeXT base + high-res tiles; SmolVLM tiles, all-zero padding tiles
    left out as the model leaves them out). [] for other layouts (Qwen2-VL's flattened patches)."""
    if pixel_values is None or not hasattr(pixel_values, "ndim"):
        return []
    pv = pixel_values
    if pv.ndim == 5 and pv.shape[0] == 1:
        pv = pv[0]
    if pv.ndim != 4 or pv.shape[1] != 3:
        return []
    return [unnormalise(t, image_processor) for t in pv if bool(t.abs().sum() > 0)]


def anyres_grid(m: int, aspect: float) -> tuple[int, int]:
    """(h, w) with h * w = m closest (in log scale) to the aspect h / w: the unpadded high-res grid of an anyres image
    (unpadding crops the padded tile grid back to the image's aspect ratio)."""
    pairs = [(h, m // h) for h in range(1, m + 1) if m % h == 0]
    return min(pairs, key=lambda p: abs(np.log(p[0] / p[1]) - np.log(aspect)))


def item_panels(assign: np.ndarray, grid: Any, view: np.ndarray | None, image: np.ndarray,
                tile_grid: tuple[int, int] | None) -> list[np.ndarray]:
    """Token-map panels of one compressed item ([N] assign): its grid over its tile's view; a 1-D anyres item as its
    base tile (the first h * w tokens, `tile_grid`) over the base view and the rest as the high-res grid over the
    whole image. [] when the item has no picture to draw on."""
    n = assign.size
    g = image_grid(grid, n)
    if g is not None:
        return [token_map(image if view is None else view, assign, g)]
    if grid is None and tile_grid is not None and n > tile_grid[0] * tile_grid[1]:
        t = tile_grid[0] * tile_grid[1]
        cls = token_classes(assign)  # over the whole item: a slot merged across both parts stays "merged"
        base = token_map(image if view is None else view, assign[:t], tile_grid, classes=cls[:t])
        hi = anyres_grid(n - t, image.shape[0] / image.shape[1])
        return [base, token_map(image, assign[t:], hi, classes=cls[t:])]
    return []


def mosaic(panels: list[np.ndarray]) -> np.ndarray:
    """Panels side by side, `PER_ROW` a row, `GAP` white pixels apart (one panel: itself)."""
    if len(panels) == 1:
        return panels[0]
    rows = [panels[i:i + PER_ROW] for i in range(0, len(panels), PER_ROW)]
    cw = max(p.shape[1] for p in panels)
    heights = [max(p.shape[0] for p in r) for r in rows]
    width = min(len(panels), PER_ROW) * (cw + GAP) - GAP
    out = np.full((sum(heights) + GAP * (len(rows) - 1), width, 3), 255, np.uint8)
    y = 0
    for r, h in zip(rows, heights, strict=True):
        for j, p in enumerate(r):
            x = j * (cw + GAP)
            out[y:y + p.shape[0], x:x + p.shape[1]] = p
        y += h + GAP
    return out


def items_map(items: list[tuple[np.ndarray, Any]], views: list[np.ndarray], image: np.ndarray,
              tile_grid: tuple[int, int] | None) -> np.ndarray | None:
    """One picture of every compressed item of an image: each tile's map over the tile the tower saw (when the views
    pair up with the items), else over the whole image; None when no item can be drawn."""
    paired = len(views) == len(items)
    panels = []
    for i, (assign, grid) in enumerate(items):
        view = views[i] if paired else (views[0] if len(items) == 1 and views else None)
        panels += item_panels(np.asarray(assign), grid, view, image, tile_grid)
    return mosaic(panels) if panels else None


def inllm_assign(image_columns: np.ndarray, dropped_columns: np.ndarray) -> np.ndarray:
    """[N] assign of the N image tokens of the LLM input after an in-LLM method: each kept token its own slot (in
    order), -1 for the tokens the method dropped (their columns in the LLM input)."""
    drop = np.isin(np.asarray(image_columns), np.asarray(dropped_columns))
    out = np.full(drop.shape, -1, np.int64)
    out[~drop] = np.arange(int((~drop).sum()))
    return out


def layer_counts(counts: list[int]) -> str:
    """Image tokens per LLM layer as runs: [64, 64, 32, 32] -> "layers 0-1: 64, 2-3: 32"."""
    runs: list[list[int]] = []
    for i, c in enumerate(counts):
        if runs and runs[-1][2] == c:
            runs[-1][1] = i
        else:
            runs.append([i, i, c])
    parts = [f"{a}-{b}: {c}" if a != b else f"{a}: {c}" for a, b, c in runs]
    return "layers " + ", ".join(parts)
