"""Small, dependency-free metrics used by the zoo checks and baselines: WER with a Whisper-style English
normaliser, and k-nearest-neighbour classification accuracy on embeddings."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["edit_distance", "knn_accuracy", "knn_predict", "normalize_text", "wer"]

# Spoken forms of common written abbreviations (LibriVox transcripts spell them out).
_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint", "mme": "madame"}
_NUMBERS = {
    "0": "zero",
    "1": "one",
    "2": "two",
    "3": "three",
    "4": "four",
    "5": "five",
    "6": "six",
    "7": "seven",
    "8": "eight",
    "9": "nine",
    "10": "ten",
}


def normalize_text(text: str) -> list[str]:
    """Normalise an English transcript into words for WER.

    Lower-cases, removes bracketed annotations and ``<s>``-style tags, turns hyphens/dashes into spaces, drops other
    punctuation (keeping in-word apostrophes), expands ``mr``/``mrs``/``dr``/``st`` and single-digit numbers.

    Args:
        text: Transcript.

    Returns:
        List of words.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    t = text.lower()
    t = re.sub(r"<[^>]*>|\[[^\]]*\]|\([^)]*\)", " ", t)
    t = re.sub(r"[-\u2010-\u2015]", " ", t)
    t = re.sub(r"[^\w\s']", " ", t)
    t = re.sub(r"(?<!\w)'|'(?!\w)", " ", t)
    words = []
    for w in t.split():
        w = _ABBREVIATIONS.get(w, w)
        words.append(_NUMBERS.get(w, w))
    return words


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (substitutions, insertions, deletions cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate: total edit distance / total reference words, after ``normalize_text``.

    Args:
        references: Reference transcripts.
        hypotheses: Hypotheses, same length.

    Returns:
        WER in [0, inf).
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"hypotheses: expected {len(references)} transcripts, got {len(hypotheses)}")
    errors = words = 0
    for r, h in zip(references, hypotheses, strict=True):
        rw, hw = normalize_text(r), normalize_text(h)
        errors += edit_distance(rw, hw)
        words += len(rw)
    if words == 0:
        raise ValueError("references contain no words")
    return errors / words


def knn_predict(train_emb: torch.Tensor, train_labels: torch.Tensor, test_emb: torch.Tensor, k: int = 10,
                tie: str = "similarity") -> torch.Tensor:
    """Cosine k-NN labels by majority vote.

    Args:
        train_emb: ``[N, D]`` reference embeddings.
        train_labels: ``[N]`` int labels.
        test_emb: ``[M, D]`` query embeddings.
        k: Number of neighbours (at most N).
        tie: How a tied vote is broken: ``"similarity"`` (the class with the larger summed similarity) or
            ``"label"`` (the smallest label).

    Returns:
        ``[M]`` int64 predicted labels.
    """
    import torch

    if train_emb.ndim != 2 or test_emb.ndim != 2 or train_emb.shape[1] != test_emb.shape[1]:
        raise ValueError(f"train_emb/test_emb must be [N, D] and [M, D], got {train_emb.shape} and {test_emb.shape}")
    if not 0 < k <= len(train_emb):
        raise ValueError(f"k must be in [1, {len(train_emb)}], got {k}")
    if tie not in ("similarity", "label"):
        raise ValueError(f"tie: expected 'similarity' or 'label', got {tie!r}")
    a = torch.nn.functional.normalize(train_emb.float(), dim=-1)
    b = torch.nn.functional.normalize(test_emb.float(), dim=-1)
    top = (b @ a.T).topk(k, dim=1)  # [M, k]
    votes = train_labels.long()[top.indices]  # [M, k]
    n_cls = int(train_labels.max()) + 1
    counts = torch.zeros(len(b), n_cls).scatter_add_(1, votes, torch.ones_like(top.values))
    if tie == "similarity":  # a sum of at most k cosines, scaled below one vote
        counts += 1e-3 * torch.zeros(len(b), n_cls).scatter_add_(1, votes, top.values)
    return counts.argmax(dim=1)


def knn_accuracy(
    train_emb: torch.Tensor, train_labels: torch.Tensor, test_emb: torch.Tensor, test_labels: torch.Tensor, k: int = 10
) -> float:
    """k-NN classification accuracy with cosine similarity and majority vote (ties -> smallest label).

    Args:
        train_emb: ``[N, D]`` reference embeddings.
        train_labels: ``[N]`` int labels.
        test_emb: ``[M, D]`` query embeddings.
        test_labels: ``[M]`` int labels.
        k: Number of neighbours.

    Returns:
        Accuracy in [0, 1].
    """
    pred = knn_predict(train_emb, train_labels, test_emb, k, tie="label")
    return float((pred == test_labels.long()).float().mean())
