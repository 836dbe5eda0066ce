"""Where `merge_tokens` should switch from `merge_reference` to `merge_bags` on CPU: both timed in one loop.

    python benchmarks/merge_paths.py --out runs/speed/merge_paths.csv

One ToMe merge (float32 tokens of 768 channels after a CLS row, a real matching of a 64-d metric) at shapes from the
in-ViT case (ViT-B/16, batch 8, 196 patch tokens, r = 16) to the issue-13 case ([16, 577, 768], r up to N/2), with
and without sizes. Every repetition copies a 28 MB tensor first (caches as cold as in a real call), then times both
paths back to back. Rows: p50 ms of each and the median of per-repetition ratios reference / bags; `merge_tokens`
takes `merge_bags` where 12 r >= n - r, i.e. where (n - r) / r <= 12.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from mmcompress.kernels.merge import merge_bags, merge_reference

import mmcompress as mmc
from mmcompress.compressors.tome import match_round

sys.path.insert(0, str(Path(__file__).resolve().parent))
from csv_rows import quantiles, write_rows  # noqa: E402

CASES = [(8, 196, 10), (8, 196, 16), (16, 300, 16), (16, 576, 16), (16, 576, 36), (16, 576, 48), (16, 576, 64),
         (16, 576, 144), (16, 576, 288)]  # (B, n, r)


def time_paths(B: int, n: int, r: int, weighted: bool, reps: int, evict: torch.Tensor) -> dict[str, list[float]]:
    """ms of `merge_reference` and `merge_bags` on the same inputs, `reps` repetitions after two warm-up ones."""
    g = torch.Generator().manual_seed(B * n + r)
    full = torch.randn(B, 1 + n, 768, generator=g)
    x, head = full[:, 1:], full[:, :1]  # as the base class slices a prefix off
    size = torch.rand(B, n, generator=g) + 1 if weighted else None
    node_idx, src_a = match_round(torch.randn(B, n, 64, generator=g), r)
    buf = torch.empty_like(evict)
    t = {"reference": [], "bags": []}
    for rep in range(reps + 2):
        for name, fn in (("reference", merge_reference), ("bags", merge_bags)):
            buf.copy_(evict)
            t0 = time.perf_counter()
            fn(x, size, node_idx, src_a, head)
            if rep >= 2:
                t[name].append((time.perf_counter() - t0) * 1e3)
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/speed/merge_paths.csv"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    evict = torch.randn(16, 577, 768)
    rows = []
    for B, n, r in CASES:
        for weighted in (False, True):
            t = time_paths(B, n, r, weighted, a.reps, evict)
            ratio = statistics.median(x / y for x, y in zip(t["reference"], t["bags"], strict=True))
            rows.append({"shape": f"{B}x{n}x768", "r": r, "kept_per_merged": round((n - r) / r, 1),
                         "weighted": int(weighted), "reference_p50_ms": quantiles(t["reference"])[1],
                         "bags_p50_ms": quantiles(t["bags"])[1], "reference_over_bags_p50": ratio,
                         "merge_tokens_takes": "bags" if 12 * r >= n - r else "reference", "threads": a.threads,
                         "device": platform.processor() or platform.machine(), "torch": torch.__version__,
                         "mmcompress": mmc.__version__})
            print(f"[{B}, {n}] r={r:3d} (n-r)/r={(n - r) / r:5.1f} sizes={int(weighted)}: reference "
                  f"{rows[-1]['reference_p50_ms']:.2f} ms, bags {rows[-1]['bags_p50_ms']:.2f} ms, "
                  f"reference/bags {ratio:.2f}x (merge_tokens takes {rows[-1]['merge_tokens_takes']})",
                  file=sys.stderr, flush=True)
    write_rows(a.out, rows, digits=3)
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
