"""Input checks for the demo: images and audio files only, pixel cap (decompression bombs), audio length cap, keep
fractions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    _check_length(int(np.asarray(samples).shape[0]), sample_rate, max_seconds)


def _check_length(n: int, sample_rate: int, max_seconds: float) -> None:
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if n == 0:
        raise ValueError("audio is empty")
    if n / sample_rate > max_seconds:
        raise ValueError(f"audio is {n / sample_rate:.1f} s, over the cap of {max_seconds:.0f} s")


def load_audio_safely(path: str | Path, max_seconds: float = MAX_AUDIO_S, sample_rate: int = 16000) -> np.ndarray:
    """Open an uploaded file as mono audio at ``sample_rate``, refusing non-audio and clips over the cap.

    PCM WAV is read with the standard library; other formats (float WAV, FLAC, OGG) through ``soundfile`` when it is
    installed. The length is checked from the header, before the samples are decoded.

    Args:
        path: uploaded file.
        max_seconds: longest clip accepted.
        sample_rate: rate of the returned samples (resampled with an anti-aliased linear filter when it differs).

    Returns:
        float32 [T] in [-1, 1].

    Raises:
        ValueError: not audio, empty, or too long.
    """
    import wave

    name = Path(path).name
    try:
        with wave.open(str(path), "rb") as w:  # reads the header only
            frames, rate = w.getnframes(), w.getframerate()
        _check_length(frames, rate, max_seconds)
        from mmcompress.zoo.data import read_wav

        x, rate = read_wav(path)
    except (wave.Error, EOFError, OSError) as e:
        x, rate = _read_soundfile(path, max_seconds, e)
    except ValueError as e:
        if "unsupported sample width" not in str(e):
            raise
        x, rate = _read_soundfile(path, max_seconds, e)
    if not np.isfinite(x).all():
        raise ValueError(f"the uploaded audio ({name}) has non-finite samples")
    return resample(x, rate, sample_rate)


def _read_soundfile(path: str | Path, max_seconds: float, cause: Exception) -> tuple[np.ndarray, int]:
    msg = f"the uploaded file is not audio that can be read ({Path(path).name}; WAV expected)"
    try:
        import soundfile as sf
    except ImportError:
        raise ValueError(msg) from cause
    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError, sf.LibsndfileError) as e:
        raise ValueError(msg) from e
    _check_length(info.frames, info.samplerate, max_seconds)
    x, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [T, channels]
    return x.mean(axis=1), int(rate)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resample mono audio (anti-aliased linear interpolation; exact copy when the rates match).

    Args:
        x: [T] samples.
        rate: their rate (Hz).
        target: wanted rate (Hz).

    Returns:
        float32 [round(T * target / rate)].
    """
    x = np.asarray(x, dtype=np.float32)
    if rate == target:
        return x
    import torch

    n = max(1, round(x.shape[0] * target / rate))
    t = torch.from_numpy(x)[None, None, None]  # [1, 1, 1, T]: interpolate's antialias needs 2-D
    y = torch.nn.functional.interpolate(t, size=(1, n), mode="bilinear", antialias=True, align_corners=False)
    return y[0, 0, 0].numpy()


def keep_fraction(keep: Any, what: str = "tokens") -> float:
    """A keep value from the UI as a fraction: Gradio sends a whole number (``1``) as an int, which
    `mmcompress.apply` would read as ONE token, so the demo turns it into the float it means.

    Args:
        keep: the value of the keep field (int, float or numeric string).
        what: what is kept, for the message (e.g. "image tokens").

    Returns:
        float in (0, 1]; 1.0 keeps every token.

    Raises:
        ValueError: not a number, or outside (0, 1].
    """
    if isinstance(keep, bool) or keep is None:
        raise ValueError(f"keep: expected the fraction of {what} kept, in (0, 1], got {keep!r}")
    try:
        value = float(keep)
    except (TypeError, ValueError):
        raise ValueError(f"keep: expected the fraction of {what} kept, in (0, 1], got {keep!r}") from None
    if not 0 < value <= 1:  # NaN fails too
        raise ValueError(f"keep: the fraction of {what} kept must be in (0, 1] (1 keeps all of them), got {keep!r}")
    return value
