"""Task registry of the eval suite: what a benchmark is to `mmcompress bench`.

A task turns a benchmark's files into `Sample`s (the benchmark's own ids, the prompt lmms-eval uses by default, the
references), scores one prediction, and aggregates the per-sample records into the benchmark's own metrics.

    >>> from mmcompress.evals.tasks import get_task, available_tasks
    >>> task = get_task("easyvqa")
    >>> samples = task.samples(data=None, split=None, limit=500, seed=0)
    >>> rec = task.score("circle", samples[0])           # {"score": 1.0, ...}
    >>> task.aggregate([...records...])                  # {"accuracy": 0.87, "stderr": 0.015, ...}

A task module registers itself with `@register_task("name")`; `get_task` imports the built-in modules on first use.
"""

from __future__ import annotations

import importlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Sample",
    "Task",
    "available_tasks",
    "get_task",
    "register_task",
    "seeded_subset",
    "mean_stderr",
    "BadSampleError",
]

# name -> module under mmcompress.evals that registers it (imported lazily, so `bench --help` stays light).
BUILTIN_TASKS: dict[str, str] = {
    "easyvqa": "easyvqa",
    "detail": "detail",
    "detail_all": "detail",
    "detail_relation": "detail",
    "vqav2": "benchmarks",
    "textvqa": "benchmarks",
    "gqa": "benchmarks",
    "pope": "benchmarks",
    "mme": "benchmarks",
    "scienceqa_img": "benchmarks",
    "mmbench": "benchmarks",
    "asr": "asr",
    "knn": "knn",
}

_TASKS: dict[str, type[Task]] = {}


class BadSampleError(ValueError):
    """A malformed row of a benchmark file; the message names the file and the row."""


@dataclass
class Sample:
    """One evaluation item.

    Attributes:
        id: The benchmark's own id (``question_id``, ``index``, ...), unique within a task; a string.
        prompt: The text the model receives after the media (the task's default prompt already applied).
        answer: Reference(s): a string, or a list of strings (e.g. the 10 VQAv2 annotator answers).
        image: ``PIL.Image``, a path, encoded bytes, or a zero-argument callable returning a ``PIL.Image``;
            ``None`` for non-image tasks.
        audio: 1-D float waveform at 16 kHz (numpy), a path to a WAV file, or ``None``.
        meta: Whatever the task's metric needs besides the answer (category, question type, options, ...);
            JSON-serialisable, copied into the per-sample record.
    """

    id: str
    prompt: str
    answer: Any
    image: Any = None
    audio: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Any:
        """The image as an RGB ``PIL.Image``."""
        from PIL import Image

        img = self.image
        if callable(img):
            img = img()
        if isinstance(img, (str, Path)):
            img = Image.open(img)
        elif isinstance(img, (bytes, bytearray)):
            import io

            img = Image.open(io.BytesIO(img))
        if img is None:
            raise ValueError(f"sample {self.id!r}: has no image")
        return img.convert("RGB")


class Task:
    """Base class of a benchmark.

    Subclasses set the class attributes and implement `samples`, `score` and (unless plain mean accuracy is right)
    `aggregate`.

    Attributes:
        name: Registry name (set by `register_task`).
        modality: ``"image"`` (a VLM answers), ``"audio"`` (an ASR model transcribes) or ``"encoder"`` (features
            only, e.g. kNN).
        default_split: The split lmms-eval scores by default.
        max_new_tokens: Generation budget that fits the task's answers.
        primary: Name of the headline metric in `aggregate`'s result (``"accuracy"`` unless said otherwise).
        higher_is_better: Whether a larger primary metric is better (False for WER).
    """

    name: str = ""
    modality: str = "image"
    default_split: str = "test"
    max_new_tokens: int = 16
    primary: str = "accuracy"
    higher_is_better: bool = True

    def samples(self, data: Path | None, split: str | None, limit: int | None, seed: int = 0,
                skip_bad: bool = False) -> list[Sample]:
        """Load the evaluation items.

        Args:
            data: Dataset folder (``--data``); ``None`` for tasks whose data is installed or generated.
            split: Split name; ``None`` means `default_split`.
            limit: At most this many samples, a seeded random subset (`seeded_subset`); ``None`` = all.
            seed: Subset seed.
            skip_bad: Skip malformed rows (counted in ``self.skipped``) instead of raising `BadSampleError`.

        Returns:
            Samples in a fixed order (the same for the same arguments).
        """
        raise NotImplementedError

    def score(self, prediction: str, sample: Sample) -> dict[str, Any]:
        """Score one prediction. Returns at least ``{"score": float}`` (extra keys go into the record)."""
        raise NotImplementedError

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Benchmark metrics from per-sample records (each has ``id``, ``prediction``, ``answer``, ``score``,
        ``meta``). Default: mean of ``score`` as ``accuracy`` with its standard error ``stderr``."""
        acc, se = mean_stderr([float(r["score"]) for r in records])
        return {"accuracy": acc, "stderr": se, "n": len(records)}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator registering a `Task` subclass under `name`."""

    def deco(cls: type[Task]) -> type[Task]:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"register_task({name!r}): expected a Task subclass, got {cls!r}")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return deco


def available_tasks() -> list[str]:
    """Names of the built-in and registered tasks."""
    return sorted(set(BUILTIN_TASKS) | set(_TASKS))


def get_task(name: str, **options: Any) -> Task:
    """An instance of task `name` (a registered name, or ``"package.module:TaskClass"`` for a task of your own).

    Raises:
        ValueError: Unknown name (the message lists the known ones).
    """
    if name not in _TASKS and name in BUILTIN_TASKS:
        importlib.import_module(f"mmcompress.evals.{BUILTIN_TASKS[name]}")
    if name not in _TASKS and ":" in name:  # "package.module:TaskClass": a task of your own, no registration needed
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"task: cannot import {name!r}: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ValueError(f"task: {name!r} is not a Task subclass")
        inst = cls(**options)
        inst.name = inst.name or name
        return inst
    if name not in _TASKS:
        raise ValueError(f"task: unknown task {name!r}; available: {', '.join(available_tasks())}")
    return _TASKS[name](**options)


def seeded_subset(items: list[Any], limit: int | None, seed: int = 0) -> list[Any]:
    """``random.Random(seed).sample(items, limit)``; all items in file order when ``limit`` is None or too big."""
    if limit is None or limit >= len(items):
        return list(items)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"limit: expected a positive int or None, got {limit!r}")
    return random.Random(seed).sample(items, limit)


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n); 0 for n < 2)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)
