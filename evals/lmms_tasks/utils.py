"""lmms-eval task functions of our tasks (``--include_path`` this folder): the documents, prompts and scores of
`mmcompress bench`'s tasks, so both tools ask the same questions and score answers the same way.

Each task YAML names a tiny local JSON file holding one row: which of our tasks, split, ``limit`` (0 = all) and
``seed``. `process_docs` turns that row into the documents ``task.samples(split=..., limit=..., seed=...)`` gives
`mmcompress bench` (same questions, same order), read from the installed packages (easy-VQA) or generated
(``detail``): nothing comes from the hub.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=8)
def _samples(task: str, split: str, limit: int, seed: int) -> tuple[Any, ...]:
    from mmcompress.evals.tasks import get_task

    return tuple(get_task(task).samples(None, split, limit or None, seed))


def _sample(doc: dict[str, Any]) -> Any:
    return _samples(doc["task"], doc["split"], int(doc["limit"]), int(doc["seed"]))[int(doc["index"])]


def process_docs(dataset: Any) -> Any:
    """The spec row of the YAML's data file -> one document per sample, in `mmcompress bench`'s order."""
    import datasets

    if len(dataset) != 1:
        raise ValueError(f"data file: expected one spec row (task, split, limit, seed), got {len(dataset)} rows")
    spec = dataset[0]
    task, split, limit, seed = str(spec["task"]), str(spec["split"]), int(spec["limit"] or 0), int(spec["seed"])
    rows = [{"index": i, "id": str(s.id), "question": s.prompt,
             "answer": s.answer if isinstance(s.answer, str) else json.dumps(s.answer),
             "task": task, "split": split, "limit": limit, "seed": seed}
            for i, s in enumerate(_samples(task, split, limit, seed))]
    return datasets.Dataset.from_list(rows)


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The document's image (RGB PIL), read from the package files or rendered."""
    return [_sample(doc).load_image()]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The prompt `mmcompress bench` gives the model (the bare question: ref-vlm's processor adds its template)."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_target(doc: dict[str, Any]) -> str:
    return doc["answer"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Our task's own score of the answer (easy-VQA / detail: exact match after `normalize_answer`)."""
    from mmcompress.evals.tasks import get_task

    return {"accuracy": float(get_task(doc["task"]).score(results[0], _sample(doc))["score"])}
