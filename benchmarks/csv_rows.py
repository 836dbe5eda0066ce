"""What the benchmarks share: the p20/p50/p80 of timings, and one writer for their CSV rows (floats at a fixed
precision, the folder created)."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any


def write_rows(path: Path, rows: list[dict[str, Any]], digits: int = 3) -> None:
    """Write `rows` (dicts with the same keys) to `path` as CSV; floats with `digits` decimals."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: f"{v:.{digits}f}" if isinstance(v, float) else v for k, v in row.items()})


def quantiles(v: list[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) of timings `v` (inclusive method: the extremes are data points)."""
    q = statistics.quantiles(v, n=10, method="inclusive")
    return q[1], statistics.median(v), q[7]
