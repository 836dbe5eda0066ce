"""Where `tome`'s CPU time goes: its public call split into stages, each timed in the same loop as a tensor copy.

    python benchmarks/tome_stages.py --out runs/speed/tome_stages.csv

The issue-13 case ([16, 577, 768] float32 tokens, a 64-d metric, no prefix) at keep N - 16 and N / 2. Every
repetition times, back to back: a copy of x into reused memory, then the stages of one call as `ToMe.__call__` runs
them (input checks, matching, merge, `_finish`, the finiteness check on the output), then the whole public call, then
(after another copy and a matching) the same merge through `merge_reference` instead of `merge_tokens`' CPU path.
Rows: p20/p50/p80 ms per stage and its median ratio to the copy of the same repetition.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from mmcompress.kernels.merge import merge_reference, merge_tokens

import mmcompress as mmc
from mmcompress.compressors.base import Plan, _check_finite
from mmcompress.compressors.tome import match_round

sys.path.insert(0, str(Path(__file__).resolve().parent))
from csv_rows import quantiles, write_rows  # noqa: E402

STAGES = ("copy_into", "inputs", "match", "merge", "finish", "check_output", "sum_of_stages", "public_call",
          "merge_via_reference")


def staged_call(comp, x: torch.Tensor, metric: torch.Tensor):
    """`comp(x, metric=metric)` (one matching round) run stage by stage as `ToMe.__call__` runs it.

    Returns the output and the perf_counter() time at the start and after each stage (6 values).
    """
    t = [time.perf_counter()]
    inp, head, head_size = comp._inputs(x, None, 0, None, None, None, metric)
    t.append(time.perf_counter())
    node_idx, src_a = match_round(inp.sim, x.shape[1] - comp.keep)
    t.append(time.perf_counter())
    out, size, assign, keep_pos = merge_tokens(inp.x, inp.size, node_idx, src_a, inp.head)
    t.append(time.perf_counter())
    res = comp._finish(inp, Plan(assign=assign, rep=keep_pos, x=out, size=size), head, head_size)
    t.append(time.perf_counter())
    _check_finite(x, res.x)
    t.append(time.perf_counter())
    return res, t


def time_stages(x: torch.Tensor, metric: torch.Tensor, keep: int, reps: int) -> dict[str, list[float]]:
    """ms of every stage in each of `reps` repetitions (two warm-up calls first)."""
    comp = mmc.create("tome", keep=keep)
    buf = torch.empty_like(x)
    t = {k: [] for k in STAGES}
    for rep in range(reps + 2):
        c0 = time.perf_counter()
        buf.copy_(x)
        res, (t0, t1, t2, t3, t4, t5) = staged_call(comp, x, metric)
        del res
        p0 = time.perf_counter()
        comp(x, metric=metric)
        p1 = time.perf_counter()
        buf.copy_(x)  # caches as cold as before the staged merge
        node_idx, src_a = match_round(metric, x.shape[1] - keep)
        r0 = time.perf_counter()
        merge_reference(x, None, node_idx, src_a)  # the plain reference, for what merge_tokens' CPU path saves
        r1 = time.perf_counter()
        if rep < 2:
            continue
        for k, a, b in (("copy_into", c0, t0), ("inputs", t0, t1), ("match", t1, t2), ("merge", t2, t3),
                        ("finish", t3, t4), ("check_output", t4, t5), ("sum_of_stages", t0, t5),
                        ("public_call", p0, p1), ("merge_via_reference", r0, r1)):
            t[k].append((b - a) * 1e3)
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/speed/tome_stages.csv"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    shape, d = (16, 577, 768), 64
    x, metric = torch.randn(*shape), torch.randn(shape[0], shape[1], d)
    rows = []
    for keep in (shape[1] - 16, shape[1] // 2):
        t = time_stages(x, metric, keep, a.reps)
        for k, v in t.items():
            p20, p50, p80 = quantiles(v)
            ratio = statistics.median(s / c for s, c in zip(v, t["copy_into"], strict=True))
            rows.append({"stage": k, "shape": "x".join(map(str, shape)), "metric_d": d, "keep": keep,
                         "p20_ms": p20, "p50_ms": p50, "p80_ms": p80, "ratio_to_copy_p50": ratio,
                         "threads": a.threads, "device": platform.processor() or platform.machine(),
                         "torch": torch.__version__, "mmcompress": mmc.__version__})
        print(f"keep {keep}: " + ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in t.items()),
              file=sys.stderr, flush=True)
    write_rows(a.out, rows, digits=3)
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
