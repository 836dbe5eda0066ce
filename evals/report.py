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

__all__ = ["keep_label", "summarize", "write_reports", "COLUMNS"]

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


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
    for ti, task in enumerate(tasks):
        trs = [r for r in rows if r["task"] == task]
        base = next((r for r in trs if r["method"] == "none"), None)
        for ci, xkey in enumerate(("tokens", "prefill_ms")):
            ax = axes[ti][ci]
            for m in methods:
                pts = sorted((r for r in trs if r["method"] == m), key=lambda r: r[xkey])
                if not pts:
                    continue
                ax.errorbar([p[xkey] for p in pts], [p["accuracy"] for p in pts], yerr=[p["stderr"] for p in pts],
                            label=m, color="0.45" if m == "random" else colors[m],
                            linestyle="--" if m == "random" else "-", marker="o", ms=4, capsize=2, lw=1.4)
            if base is not None:
                ax.errorbar([base[xkey]], [base["accuracy"]], yerr=[base["stderr"]], color="black", marker="*",
                            ms=14, capsize=2, label="uncompressed", zorder=5)
                ax.axhline(base["accuracy"], color="black", lw=0.6, alpha=0.4)
            ax.set_xlabel("tokens entering the LLM" if xkey == "tokens" else "prefill ms per sample")
            ax.set_ylabel(trs[0]["metric"] if trs[0]["metric"] == "accuracy" else "accuracy")
            ax.set_title(f"{task} (n = {trs[0]['n']})")
            ax.grid(alpha=0.3)
        axes[ti][1].legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
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
