"""Input checks for the demo: images only, pixel cap (decompression bombs), audio length cap."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_PIXELS = 40_000_000
MAX_AUDIO_S = 60.0


def load_image_safely(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Open an uploaded file as an RGB image, refusing non-images and oversized ones.

    Args:
        path: uploaded file.
        max_pixels: largest width * height accepted (checked from the header, before decoding).

    Returns:
        uint8 [H, W, 3].

    Raises:
        ValueError: not an image, or too many pixels.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:  # lazy: reads the header only
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"image is {w}x{h} = {w * h} pixels, over the cap of {max_pixels}")
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"the uploaded file is not an image ({Path(path).name})") from e


def check_audio(samples: np.ndarray, sample_rate: int, max_seconds: float = MAX_AUDIO_S) -> None:
    """Refuse audio longer than the cap.

    Args:
        samples: [T] or [T, C] samples.
        sample_rate: Hz.
        max_seconds: longest clip accepted.

    Raises:
        ValueError: empty or too long.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    n = int(np.asarray(samples).shape[0])
    if n == 0:
        raise ValueError("audio is empty")
    if n / sample_rate > max_seconds:
        raise ValueError(f"audio is {n / sample_rate:.1f} s, over the cap of {max_seconds:.0f} s")
