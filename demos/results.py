"""Results tab: read a ``mmcompress bench`` summary.csv and plot accuracy vs tokens and vs prefill ms."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

REQUIRED = ("task", "method", "keep", "n", "accuracy", "stderr", "tokens", "prefill_ms", "compress_ms")
NUMERIC = ("n", "accuracy", "stderr", "tokens", "prefill_ms", "compress_ms")


def read_summary(folder: str | Path) -> list[dict[str, Any]]:
    """Rows of ``folder/summary.csv`` with numeric columns parsed.

    Args:
        folder: a ``mmcompress bench`` output folder.

    Returns:
        One dict per task x method x keep row.

    Raises:
        ValueError: the folder has no summary.csv, or it lacks a required column.
    """
    path = Path(folder) / "summary.csv"
    if not path.is_file():
        raise ValueError(f"folder {str(folder)!r} has no summary.csv (run `mmcompress bench` first)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"summary.csv in {str(folder)!r} lacks columns {missing}")
        rows = []
        for r in reader:
            for c in NUMERIC:
                r[c] = float(r[c]) if r[c] not in ("", None) else float("nan")
            rows.append(r)
    return rows


def plot_summary(rows: list[dict[str, Any]], task: str | None = None) -> Any:
    """The figure of ``pareto.png`` (`mmcompress.evals.report.pareto_figure`) for one task: accuracy vs tokens
    entering the LLM and vs LLM prefill ms, one legend, methods dodged sideways so that equal budgets stay visible.

    Args:
        rows: output of :func:`read_summary`.
        task: task to plot; the first task in the rows when None.

    Returns:
        A matplotlib Figure.
    """
    from mmcompress.evals.report import pareto_figure

    if not rows:
        raise ValueError("rows is empty")
    task = task or rows[0]["task"]
    if not any(r["task"] == task for r in rows):
        raise ValueError(f"task {task!r} not in the summary")
    return pareto_figure(rows, [task])


TABLE_HEADERS = ["task", "method", "keep", "accuracy ± s.e.", "tokens", "prefill ms", "compress ms"]


def summary_table(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows for the Results tab's table (`TABLE_HEADERS`): accuracy with its standard error, times rounded."""

    def num(x: float, nd: int) -> str:
        return "n/a" if x != x else f"{x:.{nd}f}"  # NaN: a column the run did not fill

    return [[r["task"], r["method"], r["keep"], f"{num(r['accuracy'], 3)} ± {num(r['stderr'], 3)}",
             num(r["tokens"], 1), num(r["prefill_ms"], 1), num(r["compress_ms"], 2)] for r in rows]
