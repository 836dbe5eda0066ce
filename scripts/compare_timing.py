"""Agreement of two `mmcompress bench` runs' time columns: the prefill ratio of every setting both runs timed.

    python scripts/compare_timing.py runs/bench runs/bench2                  # prints a table and the largest gap
    python scripts/compare_timing.py runs/bench runs/bench2 --export docs/timing_runs --plot docs/timing_agreement.png

A run is a bench output folder (its ``summary.csv``) or a CSV with the same columns (what ``--export`` writes).
``prefill_ratio`` is, per task x method x keep, the fastest setting / the fastest uncompressed prefill, interleaved
(`mmcompress.evals.timing`). The relative gap of a setting is |a - b| / a; the script prints every shared setting,
then the median and the largest gap and how many settings lie within ±10 %. ``--export DIR`` keeps both runs' timing
columns as ``DIR/first.csv`` and ``DIR/second.csv`` (small enough to commit); ``--plot`` draws second vs first with
the ±10 % band.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

KEPT = ["task", "method", "keep", "tokens", "prefill_gflops", "flops_ratio", "prefill_ms", "prefill_ratio",
        "ratio_spread", "timing"]


def summary_path(run: Path) -> Path:
    """The CSV of a run: ``run/summary.csv`` for a folder, else `run` itself."""
    path = run / "summary.csv" if run.is_dir() else run
    if not path.is_file():
        raise SystemExit(f"compare_timing: no summary.csv in {run}")
    return path


def ratios(run: Path) -> dict[tuple[str, str, str], float]:
    """{(task, method, keep): prefill_ratio} of a run (uncompressed rows and missing ratios left out)."""
    out = {}
    with summary_path(run).open() as f:
        for row in csv.DictReader(f):
            try:
                r = float(row.get("prefill_ratio", "nan"))
            except ValueError:
                continue
            if row["method"] != "none" and math.isfinite(r):
                out[(row["task"], row["method"], row["keep"])] = r
    return out


def export(run: Path, dest: Path) -> None:
    """The timing columns (`KEPT`) of a run's rows that carry a prefill ratio, as a CSV at `dest`."""
    with summary_path(run).open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("prefill_ratio") not in (None, "", "nan")]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=KEPT, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot(x: dict, y: dict, shared: list, path: Path, within: float, names: tuple[str, str]) -> None:
    """Second run's ratio vs the first's, one point per setting, the ±`within` band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = [x[k] for k in shared]
    b = [y[k] for k in shared]
    out = [abs(bb - aa) / aa > within for aa, bb in zip(a, b, strict=True)]
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=120)
    top = max(a + b) * 1.08
    line = [0, top]
    ax.fill_between(line, [v * (1 - within) for v in line], [v * (1 + within) for v in line], color="#cfe3f3",
                    label=f"±{100 * within:.0f}%")
    ax.plot(line, line, color="#4a7fb0", lw=0.8)
    for flag, size, colour, label in ((False, 14, "#1b4f7a", "setting"), (True, 22, "#c0392b", "outside the band")):
        pts = [(aa, bb) for aa, bb, o in zip(a, b, out, strict=True) if o == flag]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=size, color=colour, label=label)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel(f"prefill ratio, {names[0]}")
    ax.set_ylabel(f"prefill ratio, {names[1]}")
    ax.set_title(f"{sum(not o for o in out)} of {len(shared)} settings within ±{100 * within:.0f}%", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("first", type=Path, help="a bench output folder or a CSV of its rows")
    ap.add_argument("second", type=Path)
    ap.add_argument("--within", type=float, default=0.10, help="the agreement bar (default %(default)s)")
    ap.add_argument("--export", type=Path, help="keep both runs' timing columns as DIR/first.csv, DIR/second.csv")
    ap.add_argument("--plot", type=Path, help="draw second vs first (PNG)")
    a = ap.parse_args(argv)
    if not a.within > 0:
        ap.error(f"--within: expected a number > 0, got {a.within}")
    x, y = ratios(a.first), ratios(a.second)
    shared = sorted(set(x) & set(y))
    if not shared:
        print("compare_timing: the runs share no timed setting", file=sys.stderr)
        return 2
    gaps = []
    print("| task | method | keep | prefill ratio, first | second | gap |")
    print("|---|---|---|---|---|---|")
    for k in shared:
        gap = abs(x[k] - y[k]) / x[k]
        gaps.append(gap)
        print(f"| {k[0]} | {k[1]} | {k[2]} | {x[k]:.3f} | {y[k]:.3f} | {100 * gap:.1f}% |")
    ok = sum(g <= a.within for g in gaps)
    print(f"\n{len(shared)} settings: median gap {100 * statistics.median(gaps):.1f}%, largest "
          f"{100 * max(gaps):.1f}%, {ok}/{len(shared)} within ±{100 * a.within:.0f}%")
    if a.export:
        export(a.first, a.export / "first.csv")
        export(a.second, a.export / "second.csv")
    if a.plot:
        plot(x, y, shared, a.plot, a.within, ("first run", "second run"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
