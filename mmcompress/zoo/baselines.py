"""Uncompressed reference measurements on the real data: Whisper WER on LibriVox and DINOv2 kNN on Fashion-MNIST.

Used by ``tests/real/``; easy-VQA scoring lives in ``mmcompress.evals.easyvqa``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .data import load_fashion_mnist, load_librivox
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD
from .metrics import knn_accuracy, wer

__all__ = ["dinov2_embed_gray", "fashion_mnist_knn", "librivox_wer"]


def librivox_wer(model: Any, processor: Any, max_new_tokens: int = 128) -> dict[str, Any]:
    """Transcribe the LibriVox clips greedily and compute corpus WER.

    Args:
        model: ``WhisperForConditionalGeneration``.
        processor: ``WhisperProcessor``.
        max_new_tokens: Decoding budget per clip.

    Returns:
        ``{"wer": float, "n_clips": int, "n_words": int, "hypotheses": [...], "references": [...]}``.
    """
    import torch

    from .metrics import normalize_text

    clips = load_librivox()
    hyps = []
    for c in clips:
        feats = processor(c.audio, sampling_rate=c.sampling_rate, return_tensors="pt").input_features  # [1, 80, 3000]
        with torch.inference_mode():
            out = model.generate(feats, max_new_tokens=max_new_tokens)
        hyps.append(processor.batch_decode(out, skip_special_tokens=True)[0].strip())
    refs = [c.text for c in clips]
    return {
        "wer": wer(refs, hyps),
        "n_clips": len(clips),
        "n_words": sum(len(normalize_text(r)) for r in refs),
        "hypotheses": hyps,
        "references": refs,
    }


def dinov2_embed_gray(model: Any, images: np.ndarray, size: int = 112, batch_size: int = 100) -> Any:
    """Embed 28 x 28 grayscale images with DINOv2: bilinear resize to ``size``, 3 channels, ImageNet mean/std,
    embedding = CLS token of ``last_hidden_state`` (after the final layernorm).

    Args:
        model: HF ``Dinov2Model``.
        images: ``[N, H, W]`` uint8.
        size: Input side, a multiple of 14 (112 -> 64 patches).
        batch_size: Images per forward.

    Returns:
        ``torch.Tensor [N, 384]``.
    """
    import torch
    import torch.nn.functional as F

    if images.ndim != 3:
        raise ValueError(f"images must be [N, H, W], got shape {images.shape}")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).float().div(255).unsqueeze(1)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)  # [b,3,S,S]
            out.append(model(pixel_values=(x - mean) / std).last_hidden_state[:, 0])  # [b, 384]
    return torch.cat(out)


def fashion_mnist_knn(
    model: Any, n_train: int = 2000, n_test: int = 500, size: int = 112, k: int = 10, seed: int = 0
) -> dict[str, Any]:
    """10-NN accuracy of DINOv2 CLS embeddings on a fixed, seeded Fashion-MNIST subset.

    Subsets: ``numpy.random.default_rng(seed).choice`` of ``n_train`` train and then ``n_test`` test indices
    (without replacement).

    Returns:
        ``{"knn_acc": float, "n_train", "n_test", "size", "k", "seed"}``.
    """
    import torch

    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    itr = rng.choice(len(xtr), n_train, replace=False)
    ite = rng.choice(len(xte), n_test, replace=False)
    ftr = dinov2_embed_gray(model, xtr[itr], size)
    fte = dinov2_embed_gray(model, xte[ite], size)
    acc = knn_accuracy(ftr, torch.from_numpy(ytr[itr]), fte, torch.from_numpy(yte[ite]), k=k)
    return {"knn_acc": acc, "n_train": n_train, "n_test": n_test, "size": size, "k": k, "seed": seed}
