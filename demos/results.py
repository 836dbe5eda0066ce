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
    """Two panels: accuracy vs tokens and accuracy vs prefill ms, one line per method.

    Args:
        rows: output of :func:`read_summary`.
        task: task to plot; the first task in the rows when None.

    Returns:
        A matplotlib Figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows is empty")
    task = task or rows[0]["task"]
    sel = [r for r in rows if r["task"] == task]
    if not sel:
        raise ValueError(f"task {task!r} not in the summary")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    methods = sorted({r["method"] for r in sel})
    for m in methods:
        pts = sorted((r for r in sel if r["method"] == m), key=lambda r: r["tokens"])
        for ax, x in zip(axes, ("tokens", "prefill_ms"), strict=True):
            style = "k*" if m == "none" else "o-"
            ax.errorbar([p[x] for p in pts], [p["accuracy"] for p in pts], yerr=[p["stderr"] for p in pts],
                        fmt=style, label=m, capsize=2)
    axes[0].set_xlabel("visual tokens")
    axes[1].set_xlabel("prefill ms")
    for ax in axes:
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(task)
    fig.tight_layout()
    return fig
