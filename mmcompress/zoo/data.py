"""Loaders of the real evaluation data installed from Debian packages (see ASSETS.md).

* LibriVox speech clips with transcripts: ``pocketsphinx-testdata`` (16 kHz mono 16-bit WAV).
* Fashion-MNIST: ``dataset-fashion-mnist`` (IDX files, gzip).
"""

from __future__ import annotations

import gzip
import os
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["LIBRIVOX_DIR", "FASHION_MNIST_DIR", "SpeechClip", "load_fashion_mnist", "load_librivox"]

LIBRIVOX_DIR = Path(os.environ.get("MMCOMPRESS_LIBRIVOX_DIR", "/usr/share/pocketsphinx/test/data/librivox"))
FASHION_MNIST_DIR = Path(os.environ.get("MMCOMPRESS_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
_TRANSCRIPT_LINE = re.compile(r"^\s*(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\(([^)]+)\)\s*$")


@dataclass(frozen=True)
class SpeechClip:
    """One utterance: 16 kHz float32 mono waveform in [-1, 1] and its reference transcript."""

    id: str
    audio: np.ndarray
    sampling_rate: int
    text: str


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a PCM WAV file (8/16/32-bit integer) as float32 mono in [-1, 1].

    Args:
        path: WAV file.

    Returns:
        ``(audio [n_samples], sampling_rate)``.
    """
    with wave.open(str(path), "rb") as w:
        width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
        raw = w.readframes(w.getnframes())
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        dt = np.int16 if width == 2 else np.int32
        x = np.frombuffer(raw, dt).astype(np.float32) / float(np.iinfo(dt).max + 1)
    else:
        raise ValueError(f"{path}: unsupported sample width {width} bytes")
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return x, rate


def load_librivox(root: str | Path | None = None) -> list[SpeechClip]:
    """Load the LibriVox clips of ``pocketsphinx-testdata`` with their transcripts.

    Args:
        root: Folder with ``*.wav`` and ``transcription`` (default ``LIBRIVOX_DIR``).

    Returns:
        Clips in ``transcription`` order.

    Raises:
        FileNotFoundError: If the data is not installed (message names the apt package).
    """
    root = Path(root) if root is not None else LIBRIVOX_DIR
    tfile = root / "transcription"
    if not tfile.is_file():
        raise FileNotFoundError(f"{tfile} not found; install it with: apt-get install pocketsphinx-testdata")
    clips = []
    for line in tfile.read_text().splitlines():
        m = _TRANSCRIPT_LINE.match(line)
        if not m:
            continue
        text, cid = m.group(1), m.group(2)
        audio, rate = read_wav(root / f"{cid}.wav")
        clips.append(SpeechClip(cid, audio, rate, text))
    return clips


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_fashion_mnist(split: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split.

    Args:
        split: ``"train"`` (60,000) or ``"test"`` (10,000).
        root: Folder with the ``*-idx?-ubyte.gz`` files (default ``FASHION_MNIST_DIR``).

    Returns:
        ``(images [N, 28, 28] uint8, labels [N] int64)``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not img_path.is_file():
        raise FileNotFoundError(f"{img_path} not found; install it with: apt-get install dataset-fashion-mnist")
    images = _read_idx(img_path, 16).reshape(-1, 28, 28)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels
