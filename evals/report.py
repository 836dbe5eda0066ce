"""Reports of `mmcompress bench`: ``summary.csv``, ``summary.md`` and ``pareto.png`` from the per-sample records.

Every table holds the uncompressed row (method ``none``, keep 1), ``random`` and (image tasks) the ``resize``
reference at the same budgets, the number of samples and a standard error; ratios (accuracy, prefill FLOPs and
prefill time relative to uncompressed) come from the same run.

Cost columns: ``tokens`` is the mean number of image tokens the LLM's layers processed (for in-LLM methods the mean
over the layers, from what the stage really removed); ``at_budget`` says whether that stays within the column's
budget (``mmcompress.evals.cost.at_budget``); ``prefill_gflops`` is the exact LLM prefill cost per sample
(`mmcompress.evals.cost.prefill_flops`, deterministic). Times come from the interleaved measurement of
`mmcompress.evals.timing` where the backend supports it (per sample, the fastest of the interleaved repeats;
``prefill_ratio`` fastest setting / fastest none; ``ratio_spread`` its split-half check), else from each sample's
share of its batch (batch time / batch size), medians.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmcompress.evals.cost import at_budget

__all__ = ["keep_label", "summarize", "write_reports", "pareto_figure", "budget_pivot", "COLUMNS", "X_LABELS",
           "Y_LABEL", "STABLE"]

COLUMNS = [
    "task", "method", "keep", "n", "complete", "accuracy", "stderr", "metric", "value", "pct_of_none",
    "delta_vs_random", "within_2se_of_random", "tokens", "budget_tokens", "at_budget", "text_tokens",
    "prefill_gflops", "flops_ratio", "encode_ms", "compress_ms", "prefill_ms", "decode_ms", "prefill_ratio",
    "ratio_spread", "timing", "peak_mem_mb", "metrics",
]
_TIMES = ("encode_ms", "compress_ms", "prefill_ms", "decode_ms")
STABLE = 0.10  # a time panel is drawn when every row's split-half ratio spread is within 10 % (`timing`)


def keep_label(method: str, keep: Any) -> str:
    """How a budget is written in file names and tables: "1" for the uncompressed row, ``0.25``, ``64``, ``auto``."""
    if method == "none":
        return "1"
    return f"{keep:g}" if isinstance(keep, float) else str(keep)


def _nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _budget(keep: str, n: float) -> float:
    """Budget in tokens of a keep label (a fraction of n or a count); NaN for ``auto``."""
    try:
        v = float(keep)
    except ValueError:
        return float("nan")
    return v * n if "." in keep or v <= 1 else v


def summarize(records: Sequence[dict[str, Any]], tasks: Sequence[Any], settings: Sequence[tuple[str, Any]],
              expected: dict[str, int] | None = None,
              timings: dict[tuple[str, str, str], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One summary row per task x setting that has records (see `COLUMNS`).

    Args:
        records: per-sample records.
        tasks: the tasks (``name``, ``aggregate``, ``primary``).
        settings: (method, keep) in table order.
        expected: samples per task (to flag incomplete rows).
        timings: `mmcompress.evals.timing.time_setting` results by (task, method, keep label).
    """
    timings = timings or {}
    rows: list[dict[str, Any]] = []
    for task in tasks:
        by: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if r["task"] == task.name:
                by.setdefault((r["method"], keep_label(r["method"], r["keep"])), []).append(r)
        task_rows = []
        for method, keep in settings:
            label = keep_label(method, keep)
            recs = by.get((method, label))
            if not recs:
                continue
            metrics = dict(task.aggregate(recs))
            value = float(metrics.get(task.primary, float("nan")))
            acc = float(metrics.get("accuracy", value))
            flops = [float(r["prefill_flops"]) for r in recs if r.get("prefill_flops") is not None]
            text = [float(r["text_tokens"]) for r in recs if r.get("text_tokens") is not None]
            row = {"task": task.name, "method": method, "keep": label, "n": len(recs),
                   "complete": expected is None or len(recs) == expected.get(task.name, len(recs)),
                   "accuracy": acc, "stderr": float(metrics.get("stderr", float("nan"))), "metric": task.primary,
                   "value": value, "tokens": statistics.fmean(float(r.get("tokens", 0)) for r in recs),
                   "text_tokens": statistics.fmean(text) if text else float("nan"),
                   "prefill_gflops": statistics.fmean(flops) / 1e9 if len(flops) == len(recs) else float("nan"),
                   "peak_mem_mb": max(float(r.get("peak_mem_mb", 0.0)) for r in recs)}
            for t in _TIMES:
                row[t] = statistics.median(float(r.get(t, 0.0)) for r in recs)
            tm = timings.get((task.name, method, label))
            row["timing"], row["prefill_ratio"], row["ratio_spread"] = "batch share", float("nan"), float("nan")
            if tm:
                for t in ("encode_ms", "compress_ms", "prefill_ms"):
                    row[t] = float(tm[t])
                row["prefill_ratio"], row["ratio_spread"] = float(tm["prefill_ratio"]), float(tm["ratio_spread"])
                # the protocol, not a measurement (extra pairs, in timing.json, would make two runs' rows differ)
                row["timing"] = f"interleaved x{tm['repeats']}, {tm['threads']} thread(s)"
            rest = {k: v for k, v in metrics.items() if k not in ("accuracy", "stderr", "n", task.primary)}
            row["metrics"] = json.dumps(rest, sort_keys=True) if rest else ""
            task_rows.append(row)
        base = next((r for r in task_rows if r["method"] == "none"), None)
        rand = {r["keep"]: r for r in task_rows if r["method"] == "random"}
        n_full = base["tokens"] if base else float("nan")
        for row in task_rows:
            row["pct_of_none"] = row["accuracy"] / base["accuracy"] if base and base["accuracy"] else float("nan")
            if _nan(row["prefill_ratio"]):  # no interleaved timing: the ratio of the medians
                row["prefill_ratio"] = row["prefill_ms"] / base["prefill_ms"] if base and base["prefill_ms"] else \
                    float("nan")
            row["flops_ratio"] = row["prefill_gflops"] / base["prefill_gflops"] if base and not _nan(
                base["prefill_gflops"]) and base["prefill_gflops"] else float("nan")
            if row["method"] == "none":
                row["budget_tokens"], row["at_budget"] = n_full, ""
            else:
                row["budget_tokens"] = _budget(row["keep"], n_full)
                row["at_budget"] = "" if _nan(row["budget_tokens"]) else at_budget(row["tokens"], row["budget_tokens"])
            r0 = rand.get(row["keep"])
            if r0 is not None and row["method"] not in ("random", "none"):
                d = row["accuracy"] - r0["accuracy"]
                se = math.sqrt(row["stderr"] ** 2 + r0["stderr"] ** 2)
                row["delta_vs_random"], row["within_2se_of_random"] = d, bool(abs(d) < 2 * se)
            else:
                row["delta_vs_random"], row["within_2se_of_random"] = float("nan"), ""
        rows.extend(task_rows)
    return rows


def time_panel_stable(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether every compressed row has an interleaved prefill ratio whose split-half spread is within `STABLE`."""
    spreads = []
    for r in rows:
        if r.get("method") != "none":
            try:
                spreads.append(float(r.get("ratio_spread")))  # a float, or its text from summary.csv
            except (TypeError, ValueError):
                spreads.append(math.nan)
    return bool(spreads) and all(not math.isnan(x) and x <= STABLE for x in spreads)


def _fmt(x: Any, nd: int = 3) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{nd}f}"
    return str(x)


def _pct(keep: str) -> str:
    try:
        v = float(keep)
    except ValueError:
        return keep
    return f"{100 * v:g}%" if "." in keep or v <= 1 else keep


def budget_pivot(rows: Sequence[dict[str, Any]]) -> str:
    """One task's rows as method x budget accuracy (markdown). A cell is bold only where the row is at the column's
    budget (its mean tokens over the LLM's layers within it) AND beats `random` there by more than two standard
    errors; a row above its budget shows its real token count after an up arrow."""
    trs = [r for r in rows if r["method"] != "none"]
    keeps = list(dict.fromkeys(r["keep"] for r in trs))
    keeps.sort(key=lambda k: -_budget(k, 1e6) if not _nan(_budget(k, 1e6)) else 0.0)
    cell = {(r["method"], r["keep"]): r for r in trs}
    head = []
    for k in keeps:
        b = next((r["budget_tokens"] for r in trs if r["keep"] == k), float("nan"))
        head.append(_pct(k) + ("" if _nan(b) else f" ({b:g} tokens)"))
    out = ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(keeps)]
    for m in dict.fromkeys(r["method"] for r in trs):
        vals = []
        for k in keeps:
            r = cell.get((m, k))
            if r is None:
                vals.append("")
                continue
            v = _fmt(r["accuracy"])
            if r["at_budget"] is False:
                v += f" ↑{r['tokens']:.1f}"
            elif m not in ("random",) and not _nan(r["delta_vs_random"]) and r["delta_vs_random"] > 0 \
                    and not r["within_2se_of_random"] and r["at_budget"] is True:
                v = f"**{v}**"
            vals.append(v)
        out.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


def _markdown(rows: list[dict[str, Any]], skipped: dict[str, str], bad_rows: dict[str, int], model: str,
              notes: Sequence[str] = ()) -> str:
    out = [f"# mmcompress bench: {model}", "",
           "accuracy ± one standard error; `≈` marks a difference from `random` at the same budget smaller than two "
           "standard errors of the difference; `tokens`: image tokens entering the LLM (in-LLM methods: the mean over "
           "its layers); `at budget`: whether that mean stays within the budget; `GFLOPs`: exact LLM prefill "
           "FLOPs per sample (matrix multiplies at the token counts each layer processed, LM head on the last "
           "position); times are per sample, medians; ratios are to the uncompressed row of the same run.", ""]
    out += [f"- {n}" for n in notes] + ([""] if notes else [])
    for task in dict.fromkeys(r["task"] for r in rows):
        trs = [r for r in rows if r["task"] == task]
        metric = trs[0]["metric"]
        extra = f" | {metric}" if metric != "accuracy" else ""
        out += [f"## {task} (n = {trs[0]['n']})", "",
                f"| method | keep | tokens | at budget | GFLOPs | FLOPs ratio | accuracy{extra} | % of none | "
                "vs random | encode ms | prefill ms | prefill ratio | compress ms |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if extra else "")]
        for r in trs:
            vs = ""
            if not _nan(r["delta_vs_random"]):
                vs = f"{r['delta_vs_random']:+.3f}" + (" ≈" if r["within_2se_of_random"] else "")
            val = f" | {_fmt(r['value'])}" if extra else ""
            n_note = "" if r["complete"] else f" (n={r['n']}, incomplete)"
            at = {True: "yes", False: "above", "": ""}[r["at_budget"]]
            out.append(f"| {r['method']}{n_note} | {r['keep']} | {r['tokens']:.1f} | {at} | "
                       f"{_fmt(r['prefill_gflops'], 4)} | {_fmt(r['flops_ratio'], 2)} | {_fmt(r['accuracy'])} ± "
                       f"{_fmt(r['stderr'])}{val} | {100 * r['pct_of_none']:.1f}% | {vs} | {r['encode_ms']:.1f} | "
                       f"{r['prefill_ms']:.2f} | {_fmt(r['prefill_ratio'], 2)} | {r['compress_ms']:.2f} |")
        out += ["", f"### {task} by budget", "",
                "bold: at the budget and above `random` by more than two standard errors; `↑x`: above the budget "
                "(x tokens on average over the LLM's layers)", "", budget_pivot(trs)]
    if skipped:
        out += ["## Skipped settings", ""] + [f"- {k}: {v}" for k, v in skipped.items()] + [""]
    bad = {k: v for k, v in bad_rows.items() if v}
    if bad:
        out += ["## Malformed rows skipped (--skip-bad)", ""] + [f"- {k}: {v}" for k, v in bad.items()] + [""]
    return "\n".join(out)


X_LABELS = {"tokens": "tokens entering the LLM",
            "prefill_gflops": "LLM prefill GFLOPs per sample (exact)", "prefill_ms": "LLM prefill ms per sample"}
Y_LABEL = "accuracy"
_MARKERS = "osD^vP<>Xhp*"
DODGE = 0.015  # horizontal offset between methods on the tokens axis, as a share of the axis width
DODGE_SPREAD = 0.08  # at most this share of the axis between the first and the last method (many methods: less)


def _has(rows: Sequence[dict[str, Any]], key: str) -> bool:
    vals = [r.get(key) for r in rows]
    return all(v not in (None, "") and not _nan(float(v)) for v in vals)


def _by_budget(r: dict[str, Any]) -> float:
    """Sort key: smallest budget first (points of a method are joined in budget order, not by x: an in-LLM row
    above its budget stays between its neighbours on the line)."""
    b = r.get("budget_tokens")
    if b in (None, "") or _nan(float(b)):
        b = _budget(str(r["keep"]), 1e6)
    return float(b) if not _nan(float(b)) else math.inf


def pareto_figure(rows: Sequence[dict[str, Any]], tasks: Sequence[str] | None = None,
                  time_panel: bool | None = None) -> Any:
    """Accuracy vs tokens, vs exact prefill FLOPs and (when stable) vs prefill ms: one row of panels per task, one
    line per method with its points joined in budget order, one legend for the figure.

    The same figure is ``pareto.png`` and the demo's Results tab. Methods share budgets, so on the tokens panel
    their points would sit on top of each other: each method is dodged sideways by a fixed step (`DODGE` of the
    axis width, less when many methods would spread over more than `DODGE_SPREAD` of it; the same for every
    budget), and every marker has its own shape and a white outline.

    Args:
        rows: summary rows (``task``, ``method``, ``keep``, ``accuracy``, ``stderr``, ``tokens``; ``prefill_gflops``,
            ``prefill_ms``, ``ratio_spread``, ``budget_tokens``, ``n`` and ``metric`` when present).
        tasks: the tasks to draw (default: every task, in order of first appearance).
        time_panel: draw the prefill-ms panel; None: when every row's pair ratios are stable (`time_panel_stable`),
            or when the rows have no FLOPs column (then time is the only cost axis).

    Returns:
        A matplotlib Figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows: expected at least one summary row")
    tasks = list(tasks) if tasks else list(dict.fromkeys(r["task"] for r in rows))
    xkeys = ["tokens"] + (["prefill_gflops"] if _has(rows, "prefill_gflops") else [])
    if time_panel is None:
        time_panel = len(xkeys) == 1 or time_panel_stable(rows)
    if time_panel and _has(rows, "prefill_ms"):
        xkeys.append("prefill_ms")
    fig, axes = plt.subplots(len(tasks), len(xkeys), figsize=(6 * len(xkeys), 4.2 * len(tasks)), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    palette = [plt.cm.tab10(i) for i in range(10) if i != 7] + [plt.cm.Dark2(i) for i in range(8)]  # no grey:
    colors = {m: palette[i % len(palette)] for i, m in enumerate(m for m in methods if m != "random")}  # random's
    handles: dict[str, Any] = {}
    for ti, task in enumerate(tasks):
        trs = [r for r in rows if r["task"] == task]
        if not trs:
            raise ValueError(f"tasks: {task!r} has no rows")
        base = next((r for r in trs if r["method"] == "none"), None)
        for ci, xkey in enumerate(xkeys):
            ax = axes[ti][ci]
            xs = [float(r[xkey]) for r in trs]
            span = (max(xs) - min(xs)) or 1.0
            for mi, m in enumerate(methods):
                pts = sorted((r for r in trs if r["method"] == m), key=_by_budget)
                if not pts:
                    continue
                step = min(DODGE, DODGE_SPREAD / max(1, len(methods) - 1))
                shift = step * span * (mi - (len(methods) - 1) / 2) if xkey == "tokens" else 0.0
                ref = m in ("random", "resize")
                h = ax.errorbar([float(p[xkey]) + shift for p in pts], [float(p["accuracy"]) for p in pts],
                                yerr=[float(p["stderr"]) for p in pts], label=m,
                                color="0.45" if m == "random" else "0.2" if m == "resize" else colors[m],
                                linestyle="--" if ref else "-", marker=_MARKERS[mi % len(_MARKERS)],
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
    fig.tight_layout(rect=(0, 0, 1 - 1.0 / (6 * len(xkeys) / 1.7), 1))
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
                  plot: bool = True, timings: dict[tuple[str, str, str], dict[str, Any]] | None = None,
                  notes: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Write ``summary.csv``, ``summary.md`` and ``pareto.png`` into `out`; returns the summary rows.

    Args:
        timings: interleaved timings by (task, method, keep label) (`mmcompress.evals.timing`).
        notes: lines stated at the top of ``summary.md`` (the timing setting, the in-LLM schedules).
    """
    rows = summarize(records, tasks, settings, expected, timings)
    notes = list(notes)
    if timings:
        stable = time_panel_stable(rows)
        notes.append("time panel: " + ("drawn (every row's prefill ratio from the even pairs and from the odd pairs "
                                        "agree within ±10 %)" if stable else "left out (some row's prefill ratio "
                                        "from the even and from the odd pairs differ beyond ±10 %: ratio_spread in "
                                        "summary.csv)"))
    tmp = out / "summary.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(out / "summary.csv")
    (out / "summary.md").write_text(_markdown(rows, skipped or {}, bad_rows or {}, model, notes))
    if plot and rows:
        try:
            _plot(rows, out / "pareto.png")
        except ImportError:  # pragma: no cover - matplotlib is in the eval extra
            print("mmcompress bench: matplotlib not installed, no pareto.png")
    return rows
