"""Agreement of two `mmcompress bench` runs' time columns: the prefill ratio of every setting both runs timed.

    python scripts/compare_timing.py runs/bench runs/bench_timing2            # prints a table and the largest gap

A run's ``summary.csv`` holds, per task x method x keep, ``prefill_ratio`` (fastest setting / fastest uncompressed
prefill, interleaved; `mmcompress.evals.timing`). The relative gap of a setting is |a - b| / a; the script prints
every shared setting, then the median and the largest gap and how many settings lie within ±10 %.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path


def ratios(run: Path) -> dict[tuple[str, str, str], float]:
    """{(task, method, keep): prefill_ratio} of a run's summary.csv (uncompressed rows and missing ratios left out)."""
    path = run / "summary.csv"
    if not path.is_file():
        raise SystemExit(f"compare_timing: no summary.csv in {run}")
    out = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            try:
                r = float(row.get("prefill_ratio", "nan"))
            except ValueError:
                continue
            if row["method"] != "none" and math.isfinite(r):
                out[(row["task"], row["method"], row["keep"])] = r
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    ap.add_argument("--within", type=float, default=0.10, help="the agreement bar (default %(default)s)")
    a = ap.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
