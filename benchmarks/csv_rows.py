"""One writer for the benchmarks' CSV rows (floats at a fixed precision, the folder created)."""

from __future__ import annotations

import csv
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
