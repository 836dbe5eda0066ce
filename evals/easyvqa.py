"""easy-VQA (PyPI ``easy-vqa``): data loading and answer scoring.

The package ships ``easy_vqa/data/{train,test}/{questions.json,images/<id>.png}`` and ``data/answers.txt``;
``questions.json`` is a list of ``[question, answer, image_id]``. The package is located without importing it.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EasyVQASample", "answers", "data_root", "image_path", "load_split", "normalize_answer", "score", "subset"]

INSTALL = "pip install --no-deps easy-vqa==1.0"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class EasyVQASample:
    """One easy-VQA question."""

    question: str
    answer: str
    image_id: int
    split: str

    @property
    def image_path(self) -> Path:
        """Path of the 64 x 64 PNG of this question."""
        return image_path(self.split, self.image_id)


def data_root() -> Path:
    """Return ``easy_vqa/data`` of the installed package.

    Raises:
        ImportError: If ``easy-vqa`` is not installed (the message names the install command).
    """
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"easy-VQA data not installed; install it with: {INSTALL}")
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not (root / "answers.txt").is_file():
        raise ImportError(f"easy-VQA data missing under {root}; reinstall with: {INSTALL}")
    return root


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def image_path(split: str, image_id: int) -> Path:
    """Return the PNG path of ``image_id`` in ``split``."""
    _check_split(split)
    return data_root() / split / "images" / f"{int(image_id)}.png"


def answers() -> list[str]:
    """Return the 13 possible answers."""
    return [a.strip() for a in (data_root() / "answers.txt").read_text().splitlines() if a.strip()]


def load_split(split: str) -> list[EasyVQASample]:
    """Load every question of a split (38,575 train / 9,673 test), in file order.

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        List of samples.
    """
    _check_split(split)
    rows = json.loads((data_root() / split / "questions.json").read_text())
    return [EasyVQASample(str(q), str(a), int(i), split) for q, a, i in rows]


def subset(split: str, n: int | None, seed: int = 0) -> list[EasyVQASample]:
    """A fixed, seeded random subset of a split (``random.Random(seed).sample`` over file order).

    Args:
        split: ``"train"`` or ``"test"``.
        n: Number of questions; ``None`` or ``>= len(split)`` returns the whole split in file order.
        seed: Sampling seed.

    Returns:
        The chosen samples, in sampled order.
    """
    data = load_split(split)
    if n is None or n >= len(data):
        return data
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return random.Random(seed).sample(data, n)


_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and surrounding whitespace, keep the first word (easy-VQA answers are one word)."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return words[0] if words else ""


def score(prediction: str, answer: str) -> float:
    """Exact-match accuracy (1.0 or 0.0) of a generated answer after ``normalize_answer``."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def image_features(
    split: str,
    vision_tower: object,
    image_processor: object,
    vision_feature_layer: int = -1,
    drop_cls: bool = True,
    batch_size: int = 50,
    cache: bool = True,
) -> object:
    """DINOv2 features ``[n_images, N, C]`` of every image of `split` (``"train"``: 4,000, ``"test"``: 1,000), row
    ``i`` = image id ``i``, cached; see `mmcompress.evals.features.tower_features` for the other arguments."""
    from mmcompress.evals.features import tower_features
    from PIL import Image

    _check_split(split)
    n_images = len(list((data_root() / split / "images").glob("*.png")))
    return tower_features(
        f"easyvqa_{split}", n_images,
        lambda a, b: [Image.open(image_path(split, i)).convert("RGB") for i in range(a, b)],
        vision_tower, image_processor, vision_feature_layer, drop_cls, batch_size, cache,
    )


def evaluate(
    model: object,
    processor: object,
    samples: list[EasyVQASample],
    batch_size: int = 16,
    max_new_tokens: int = 5,
    progress: bool = True,
) -> dict[str, object]:
    """Greedy-decode answers with ``model.generate(**processor(images=..., text=questions))`` and score them.

    Args:
        model: A VLM with ``generate`` (e.g. ref-vlm).
        processor: Its processor (``images=``, ``text=`` -> left-padded batch; ``batch_decode``).
        samples: Questions to answer.
        batch_size: Questions per ``generate`` call.
        max_new_tokens: Generation budget (easy-VQA answers are one word).
        progress: Show a tqdm bar when tqdm is importable.

    Returns:
        ``{"accuracy": float, "n": int, "predictions": [{"question", "answer", "prediction", "correct"}...]}``.
    """
    import torch
    from PIL import Image

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not samples:
        raise ValueError("samples must not be empty")
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(samples), desc="easy-VQA")
        except ImportError:  # pragma: no cover
            bar = None
    preds: list[dict[str, object]] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = [Image.open(s.image_path).convert("RGB") for s in chunk]
        inputs = processor(images=images, text=[s.question for s in chunk])
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for s, t in zip(chunk, texts, strict=True):
            preds.append(
                {
                    "question": s.question,
                    "answer": s.answer,
                    "image_id": s.image_id,
                    "prediction": t,
                    "correct": score(t, s.answer),
                }
            )
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    acc = sum(p["correct"] for p in preds) / len(preds)
    return {"accuracy": acc, "n": len(preds), "predictions": preds}


from mmcompress.evals.tasks import Sample, Task, register_task  # noqa: E402  (after the loaders it wraps)


@register_task("easyvqa")
class EasyVQATask(Task):
    """easy-VQA (installed with the ``easy-vqa`` package): one-word answers, exact match after `normalize_answer`.

    Sample ids are ``"<split>/<question index in questions.json>"`` (easy-VQA has no question ids of its own).
    The prompt is the bare question: ref-vlm's processor applies its template (``Question: {q} Answer:``).
    """

    modality = "image"
    default_split = "test"
    max_new_tokens = 5

    def samples(self, data=None, split=None, limit=None, seed=0, skip_bad=False) -> list[Sample]:
        split = split or self.default_split
        if data is not None:
            raise ValueError("data: easyvqa reads the installed easy-vqa package; do not pass --data")
        rows = load_split(split)
        picked = subset_indices(len(rows), limit, seed)
        return [
            Sample(id=f"{split}/{i}", prompt=rows[i].question, answer=rows[i].answer, image=rows[i].image_path,
                   meta={"image_id": rows[i].image_id})
            for i in picked
        ]

    def score(self, prediction: str, sample: Sample) -> dict[str, float]:
        return {"score": score(prediction, sample.answer)}


def subset_indices(n_items: int, limit: int | None, seed: int) -> list[int]:
    """Indices of `subset` (the same questions, in the same order, as ``subset(split, limit, seed)``)."""
    if limit is None or limit >= n_items:
        return list(range(n_items))
    if limit <= 0:
        raise ValueError(f"limit: expected a positive int, got {limit}")
    return random.Random(seed).sample(range(n_items), limit)
