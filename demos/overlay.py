"""Token map overlay: which patch tokens were kept, merged (coloured by slot) or dropped."""

from __future__ import annotations

import numpy as np


def slot_colours(n_slots: int, seed: int = 0) -> np.ndarray:
    """Distinct RGB colours, one per output slot.

    Args:
        n_slots: number of output slots M.
        seed: colour permutation seed.

    Returns:
        uint8 array [M, 3].
    """
    if not isinstance(n_slots, int) or n_slots < 0:
        raise ValueError(f"n_slots must be a non-negative int, got {n_slots!r}")
    rng = np.random.default_rng(seed)
    hues = (np.arange(n_slots) * 0.618033988749895 + rng.random()) % 1.0  # golden-ratio hue spacing
    h6 = hues * 6.0
    c = 0.85
    x = c * (1 - np.abs(h6 % 2 - 1))
    z = np.zeros_like(h6)
    sector = np.floor(h6).astype(int) % 6
    table = [(c, x, z), (x, c, z), (z, c, x), (z, x, c), (x, z, c), (c, z, x)]
    rgb = np.zeros((n_slots, 3))
    for s, (r, g, b) in enumerate(table):
        m = sector == s
        rgb[m] = np.stack([np.broadcast_to(r, h6.shape)[m], np.broadcast_to(g, h6.shape)[m],
                           np.broadcast_to(b, h6.shape)[m]], -1)
    return (np.clip(rgb + 0.1, 0, 1) * 255).astype(np.uint8)


def token_classes(assign: np.ndarray) -> np.ndarray:
    """Class of each input token from the provenance map.

    Args:
        assign: int [N]; slot index each input token went to, -1 = dropped.

    Returns:
        int8 [N]: 0 dropped, 1 kept alone in its slot, 2 merged with others.
    """
    assign = np.asarray(assign)
    if assign.ndim != 1:
        raise ValueError(f"assign must be 1-D [N], got shape {assign.shape}")
    out = np.zeros(assign.shape, dtype=np.int8)
    live = assign >= 0
    if live.any():
        counts = np.bincount(assign[live])
        out[live] = np.where(counts[assign[live]] == 1, 1, 2)
    return out


def overlay_token_map(image: np.ndarray, assign: np.ndarray, grid: tuple[int, int], alpha: float = 0.45,
                      classes: np.ndarray | None = None) -> np.ndarray:
    """Draw the token map over an image.

    Dropped tokens are dimmed, merged tokens tinted with their slot's colour, tokens kept alone outlined in white.
    Every input token is painted by its own slot, so the map shows exactly what ``assign`` says.

    Args:
        image: uint8 [H, W, 3]; H and W multiples of the grid.
        assign: int [N] with N = gh * gw (row-major patches); -1 = dropped.
        grid: (gh, gw) patch grid.
        alpha: tint strength for merged tokens.
        classes: int [N] `token_classes` of these tokens when they are part of a larger item (a slot merged with
            tokens drawn elsewhere is still "merged"); default: computed from ``assign``.

    Returns:
        uint8 [H, W, 3] overlay.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {img.shape}")
    gh, gw = grid
    assign = np.asarray(assign).reshape(-1)
    if assign.size != gh * gw:
        raise ValueError(f"assign has {assign.size} tokens but grid {grid} has {gh * gw}")
    h, w = img.shape[:2]
    if h % gh or w % gw:
        raise ValueError(f"image size {h}x{w} is not a multiple of the grid {grid}")
    ph, pw = h // gh, w // gw
    cls = (token_classes(assign) if classes is None else np.asarray(classes)).reshape(gh, gw)
    a2 = assign.reshape(gh, gw)
    colours = slot_colours(int(assign.max()) + 1 if (assign >= 0).any() else 0)
    out = img.astype(np.float32).copy()
    for i in range(gh):
        for j in range(gw):
            tile = out[i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]  # [ph, pw, 3]
            if cls[i, j] == 0:
                tile *= 0.25
            elif cls[i, j] == 2:
                tile[:] = (1 - alpha) * tile + alpha * colours[a2[i, j]]
            else:
                tile[0, :] = tile[-1, :] = 255
                tile[:, 0] = tile[:, -1] = 255
    return out.clip(0, 255).astype(np.uint8)
