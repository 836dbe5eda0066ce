"""Reports of `mmcompress bench`: ``summary.csv``, ``summary.md`` and ``pareto.png`` from the per-sample records.

Every table holds the uncompressed row (method ``none``, keep 1) and ``random`` at the same budgets, the number of
samples and a standard error; ratios (accuracy and prefill time relative to uncompressed) come from the same run.
Times are medians over samples of each sample's share of its batch (batch time / batch size), in ms.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["keep_label", "summarize", "write_reports", "pareto_figure", "COLUMNS", "X_LABELS", "Y_LABEL"]

COLUMNS = [
    "task", "method", "keep", "n", "complete", "accuracy", "stderr", "metric", "value", "pct_of_none",
    "delta_vs_random", "within_2se_of_random", "tokens", "encode_ms", "compress_ms", "prefill_ms", "decode_ms",
    "prefill_ratio", "peak_mem_mb", "metrics",
]
_TIMES = ("encode_ms", "compress_ms", "prefill_ms", "decode_ms")


def keep_label(method: str, keep: Any) -> str:
    """How a budget is written in file names and tables: "1" for the uncompressed row, ``0.25``, ``64``, ``auto``."""
    if method == "none":
        return "1"
    return f"{keep:g}" if isinstance(keep, float) else str(keep)


def summarize(records: Sequence[dict[str, Any]], tasks: Sequence[Any], settings: Sequence[tuple[str, Any]],
              expected: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One summary row per task x setting that has records (see `COLUMNS`)."""
    rows: list[dict[str, Any]] = []
    for task in tasks:
        by: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if r["task"] == task.name:
                by.setdefault((r["method"], keep_label(r["method"], r["keep"])), []).append(r)
        task_rows = []
        for method, keep in settings:
            recs = by.get((method, keep_label(method, keep)))
            if not recs:
                continue
            metrics = dict(task.aggregate(recs))
            value = float(metrics.get(task.primary, float("nan")))
            acc = float(metrics.get("accuracy", value))
            row = {"task": task.name, "method": method, "keep": keep_label(method, keep), "n": len(recs),
                   "complete": expected is None or len(recs) == expected.get(task.name, len(recs)),
                   "accuracy": acc, "stderr": float(metrics.get("stderr", float("nan"))), "metric": task.primary,
                   "value": value, "tokens": statistics.fmean(float(r.get("tokens", 0)) for r in recs),
                   "peak_mem_mb": max(float(r.get("peak_mem_mb", 0.0)) for r in recs)}
            for t in _TIMES:
                row[t] = statistics.median(float(r.get(t, 0.0)) for r in recs)
            rest = {k: v for k, v in metrics.items() if k not in ("accuracy", "stderr", "n", task.primary)}
            row["metrics"] = json.dumps(rest, sort_keys=True) if rest else ""
            task_rows.append(row)
        base = next((r for r in task_rows if r["method"] == "none"), None)
        rand = {r["keep"]: r for r in task_rows if r["method"] == "random"}
        for row in task_rows:
            row["pct_of_none"] = row["accuracy"] / base["accuracy"] if base and base["accuracy"] else float("nan")
            row["prefill_ratio"] = row["prefill_ms"] / base["prefill_ms"] if base and base["prefill_ms"] else float(
                "nan")
            r0 = rand.get(row["keep"])
            if r0 is not None and row["method"] not in ("random", "none"):
                d = row["accuracy"] - r0["accuracy"]
                se = math.sqrt(row["stderr"] ** 2 + r0["stderr"] ** 2)
                row["delta_vs_random"], row["within_2se_of_random"] = d, bool(abs(d) < 2 * se)
            else:
                row["delta_vs_random"], row["within_2se_of_random"] = float("nan"), ""
        rows.extend(task_rows)
    return rows


def _fmt(x: Any, nd: int = 3) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{nd}f}"
    return str(x)


def _markdown(rows: list[dict[str, Any]], skipped: dict[str, str], bad_rows: dict[str, int], model: str) -> str:
    out = [f"# mmcompress bench: {model}", "",
           "accuracy ± one standard error; `≈` marks a difference from `random` at the same budget smaller than two "
           "standard errors of the difference; times are per sample (batch time / batch size), medians; ratios are "
           "to the uncompressed row of the same run.", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        trs = [r for r in rows if r["task"] == task]
        metric = trs[0]["metric"]
        extra = f" | {metric}" if metric != "accuracy" else ""
        out += [f"## {task} (n = {trs[0]['n']})", "",
                f"| method | keep | tokens | accuracy{extra} | % of none | vs random | prefill ms | prefill ratio | "
                "compress ms |",
                "|---|---|---|---|---|---|---|---|---|" + ("---|" if extra else "")]
        for r in trs:
            vs = ""
            if not (isinstance(r["delta_vs_random"], float) and math.isnan(r["delta_vs_random"])):
                vs = f"{r['delta_vs_random']:+.3f}" + (" ≈" if r["within_2se_of_random"] else "")
            val = f" | {_fmt(r['value'])}" if extra else ""
            n_note = "" if r["complete"] else f" (n={r['n']}, incomplete)"
            out.append(f"| {r['method']}{n_note} | {r['keep']} | {r['tokens']:.1f} | {_fmt(r['accuracy'])} ± "
                       f"{_fmt(r['stderr'])}{val} | {100 * r['pct_of_none']:.1f}% | {vs} | {r['prefill_ms']:.1f} | "
                       f"{_fmt(r['prefill_ratio'], 2)} | {r['compress_ms']:.2f} |")
        out.append("")
    if skipped:
        out += ["## Skipped settings", ""] + [f"- {k}: {v}" for k, v in skipped.items()] + [""]
    bad = {k: v for k, v in bad_rows.items() if v}
    if bad:
        out += ["## Malformed rows skipped (--skip-bad)", ""] + [f"- {k}: {v}" for k, v in bad.items()] + [""]
    return "\n".join(out)


X_LABELS = {"tokens": "tokens entering the LLM", "prefill_ms": "LLM prefill ms per sample"}
Y_LABEL = "accuracy"
_MARKERS = "osD^vP<>Xhp*"
DODGE = 0.015  # horizontal offset between methods on the tokens axis, as a share of the axis width


def pareto_figure(rows: Sequence[dict[str, Any]], tasks: Sequence[str] | None = None) -> Any:
    """Accuracy vs tokens and vs prefill ms, one row of two panels per task, one legend for the figure.

    The same figure is ``pareto.png`` and the demo's Results tab. Methods share budgets, so on the tokens panel
    their points would sit on top of each other: each method is dodged sideways by a fixed step (`DODGE` of the
    axis width, the same for every budget), and every marker has its own shape and a white outline.

    Args:
        rows: summary rows (``task``, ``method``, ``accuracy``, ``stderr``, ``tokens``, ``prefill_ms``; ``n`` and
            ``metric`` when present).
        tasks: the tasks to draw (default: every task, in order of first appearance).

    Returns:
        A matplotlib Figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows: expected at least one summary row")
    tasks = list(tasks) if tasks else list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    palette = [plt.cm.tab10(i) for i in range(10) if i != 7] + [plt.cm.Dark2(i) for i in range(8)]  # no grey:
    colors = {m: palette[i % len(palette)] for i, m in enumerate(m for m in methods if m != "random")}  # random's
    handles: dict[str, Any] = {}
    for ti, task in enumerate(tasks):
        trs = [r for r in rows if r["task"] == task]
        if not trs:
            raise ValueError(f"tasks: {task!r} has no rows")
        base = next((r for r in trs if r["method"] == "none"), None)
        for ci, xkey in enumerate(("tokens", "prefill_ms")):
            ax = axes[ti][ci]
            xs = [float(r[xkey]) for r in trs]
            span = (max(xs) - min(xs)) or 1.0
            for mi, m in enumerate(methods):
                pts = sorted((r for r in trs if r["method"] == m), key=lambda r: float(r[xkey]))
                if not pts:
                    continue
                shift = DODGE * span * (mi - (len(methods) - 1) / 2) if xkey == "tokens" else 0.0
                h = ax.errorbar([float(p[xkey]) + shift for p in pts], [float(p["accuracy"]) for p in pts],
                                yerr=[float(p["stderr"]) for p in pts], label=m,
                                color="0.45" if m == "random" else colors[m],
                                linestyle="--" if m == "random" else "-", marker=_MARKERS[mi % len(_MARKERS)],
                                ms=6, mec="white", mew=0.8, capsize=2, lw=1.2, alpha=0.9)
                handles.setdefault(m, h)
            if base is not None:
                h = ax.errorbar([float(base[xkey])], [float(base["accuracy"])], yerr=[float(base["stderr"])],
                                color="black", marker="*", ms=14, mec="white", mew=0.8, capsize=2, zorder=5,
                                linestyle="none", label="none (uncompressed)")
                handles.setdefault("none (uncompressed)", h)
                ax.axhline(float(base["accuracy"]), color="black", lw=0.6, alpha=0.4)
            ax.set_xlabel(X_LABELS[xkey])
            ax.set_ylabel(Y_LABEL)
            n = trs[0].get("n")
            ax.set_title(f"{task} (n = {int(float(n))})" if n not in (None, "") else task)
            ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    return fig


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = pareto_figure(rows)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_reports(out: Path, records: Sequence[dict[str, Any]], tasks: Sequence[Any],
                  settings: Sequence[tuple[str, Any]], skipped: dict[str, str] | None = None,
                  bad_rows: dict[str, int] | None = None, model: str = "", expected: dict[str, int] | None = None,
                  plot: bool = True) -> list[dict[str, Any]]:
    """Write ``summary.csv``, ``summary.md`` and ``pareto.png`` into `out`; returns the summary rows."""
    rows = summarize(records, tasks, settings, expected)
    tmp = out / "summary.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(out / "summary.csv")
    (out / "summary.md").write_text(_markdown(rows, skipped or {}, bad_rows or {}, model))
    if plot and rows:
        try:
            _plot(rows, out / "pareto.png")
        except ImportError:  # pragma: no cover - matplotlib is in the eval extra
            print("mmcompress bench: matplotlib not installed, no pareto.png")
    return rows
