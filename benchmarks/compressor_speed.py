"""Speed of compressors against a tensor copy timed in the same run (rows as data: one CSV row per case).

Each repeat times `x.clone()` and the compressor back to back, so the reported ratio (median over repeats of
op / clone) is robust to this machine's noise; p20/p50/p80 are over the repeats.

Issue-13 rows (`--only tome-peer` runs just these): `tome` with a 64-d metric on [16, 577, 768] at keep N - 16 and
N / 2, against `x.clone()` and against a straight PyTorch transcription of the ToMe paper's round
(benchmarks/tome_paper_reference.py), all timed back to back in every repeat; targets: tome <= 3x the clone,
peer / tome >= 2. The clone allocates (on this glibc machine a fresh 28 MB block often pays first-touch page faults,
as tome's own output does), so `copy_into` (the same copy into reused memory) and `tome[checks=0]` (without the
finiteness pass over x) are timed too, and every op's ratio to both copies is in its row.

    python benchmarks/compressor_speed.py --out runs/bench/speed.csv
    python benchmarks/compressor_speed.py --only tome-peer --threads 1 --out runs/speed/tome_peer.csv
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296 \
        python benchmarks/compressor_speed.py --only tome-peer --out runs/speed/tome_peer_warm_malloc.csv

Fidelity rows (`--only fidelity`): each paper-named method (visionzip, prumerge, prumerge+, dycoke, divprune,
visiontrim, idpruner, trio_encoder, prunesid, flashvid)
against a plain per-sample implementation of its release's rules (benchmarks/paper_references.py) on the same input,
at batch 1 and 2, interleaved; each row checks the outputs agree (max abs difference in `agree_max_abs`; prumerge+
and flashvid budgets differ per sample, so both sides are zero-padded to the longest).

    python benchmarks/compressor_speed.py --only fidelity --out runs/speed/fidelity.csv
    python benchmarks/compressor_speed.py --only fidelity --threads 1 --cpu-time --out runs/speed/fidelity.csv

The second tome-peer form keeps freed memory mapped (no first-touch page faults for any op, clone included); the
rows record GLIBC_TUNABLES.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

import mmcompress as mmc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from csv_rows import quantiles  # noqa: E402
from paper_references import (  # noqa: E402
    divprune_plain,
    dycoke_plain,
    flashvid_plain,
    idpruner_plain,
    prumerge_plain,
    prumerge_plus_plain,
    prunesid_plain,
    trio_encoder_plain,
    visiontrim_plain,
    visionzip_plain,
)
from tome_paper_reference import paper_tome  # noqa: E402

# (label, shape, prefix, grid)
SHAPES = [("vit-b 577", (16, 577, 768), 1, (24, 24)), ("llava-next 2880", (4, 2880, 1024), 0, (5, 24, 24))]
# (name, options, keep as a fraction of N - prefix, label)
CASES = [
    ("tome", {}, 0.5, "tome"),
    ("tome", {"match_dtype": torch.bfloat16}, 0.5, "tome[match=bf16]"),
    ("pool", {}, 0.25, "pool[avg]"),
    ("pool", {"mode": "bilinear"}, 0.25, "pool[bilinear]"),
    ("uniform", {}, 0.25, "uniform"),
]


def bench_case(x, comp, kw, repeats: int, inner: int):
    """Median-of-repeats timing; each repeat runs `inner` calls of the clone and of the op."""
    for _ in range(2):
        comp(x, **kw)
        x.clone()
    t_op, t_clone, ratios = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            x.clone()
        t1 = time.perf_counter()
        for _ in range(inner):
            comp(x, **kw)
        t2 = time.perf_counter()
        c, o = (t1 - t0) / inner * 1e3, (t2 - t1) / inner * 1e3
        t_clone.append(c)
        t_op.append(o)
        ratios.append(o / c)
    return t_op, t_clone, ratios


# (label, shape, metric channels): the issue-13 case, keeps N - 16 and N / 2
PEER_SHAPE = ("vit-b 577, 64-d metric", (16, 577, 768), 64)


def unchecked(comp, x: torch.Tensor, metric: torch.Tensor):
    """`comp(x, metric=metric)` with MMCOMPRESS_CHECKS=0 (no finiteness pass over x)."""
    old = os.environ.get("MMCOMPRESS_CHECKS")
    os.environ["MMCOMPRESS_CHECKS"] = "0"
    try:
        return comp(x, metric=metric)
    finally:
        if old is None:
            del os.environ["MMCOMPRESS_CHECKS"]
        else:
            os.environ["MMCOMPRESS_CHECKS"] = old


def bench_peer(repeats: int, inner: int, threads: int) -> list[dict]:
    """tome vs x.clone() vs the paper transcription, interleaved in every repeat; one row per op and keep."""
    label, shape, d = PEER_SHAPE
    x = torch.randn(*shape)
    metric = torch.randn(shape[0], shape[1], d)
    buf = torch.empty_like(x)  # reused memory: the copy without the allocator's first-touch page faults
    N = shape[1]
    rows = []
    for keep in (N - 16, N // 2):
        comp = mmc.create("tome", keep=keep)
        r = N - keep
        ops = {"clone": lambda: x.clone(), "copy_into": lambda: buf.copy_(x),
               "tome": lambda comp=comp: comp(x, metric=metric),
               "tome[checks=0]": lambda comp=comp: unchecked(comp, x, metric),
               "tome_paper_peer": lambda r=r: paper_tome(x, metric, r)}
        for f in ops.values():  # warm-up
            f()
        t = {k: [] for k in ops}
        for _ in range(repeats):
            for k, f in ops.items():
                t0 = time.perf_counter()
                for _ in range(inner):
                    f()
                t[k].append((time.perf_counter() - t0) / inner * 1e3)
        to_clone = {k: statistics.median(a / c for a, c in zip(v, t["clone"], strict=True)) for k, v in t.items()}
        to_copy = {k: statistics.median(a / c for a, c in zip(v, t["copy_into"], strict=True)) for k, v in t.items()}
        peer_over = statistics.median(p / o for p, o in zip(t["tome_paper_peer"], t["tome"], strict=True))
        for k, v in t.items():
            p20, p50, p80 = quantiles(v)
            rows.append({"op": k, "provider": "torch", "shape": "x".join(map(str, shape)), "dtype": "float32",
                         "keep": keep, "checks": os.environ.get("MMCOMPRESS_CHECKS", "1"), "metric_d": d,
                         "p20_ms": f"{p20:.3f}", "p50_ms": f"{p50:.3f}", "p80_ms": f"{p80:.3f}",
                         "clone_p50_ms": f"{statistics.median(t['clone']):.3f}",
                         "ratio_to_clone_p50": f"{to_clone[k]:.2f}",
                         "copy_p50_ms": f"{statistics.median(t['copy_into']):.3f}",
                         "ratio_to_copy_p50": f"{to_copy[k]:.2f}",
                         "peer_over_tome_p50": f"{peer_over:.2f}" if k == "tome" else "", "threads": threads,
                         "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                         "device": platform.processor() or platform.machine(), "torch": torch.__version__,
                         "mmcompress": mmc.__version__, "python": platform.python_version()})
        print(f"{label} keep={keep}: tome {statistics.median(t['tome']):.2f} ms = {to_clone['tome']:.2f}x clone "
              f"({statistics.median(t['clone']):.2f} ms) = {to_copy['tome']:.2f}x copy into reused memory "
              f"({statistics.median(t['copy_into']):.2f} ms); checks off {to_copy['tome[checks=0]']:.2f}x copy; "
              f"peer / tome {peer_over:.2f}x (peer {statistics.median(t['tome_paper_peer']):.2f} ms)",
              file=sys.stderr, flush=True)
    return rows


def _fidelity_cases(B: int) -> list[tuple[str, object, object]]:
    """(label, ours, plain reference) closures on one random input of batch B; each returns [B, M, C]."""
    g = torch.Generator().manual_seed(B)
    N, C, d = 576, 384, 64
    x = torch.randn(B, 1 + N, C, generator=g)
    sc = torch.rand(B, 1 + N, generator=g)
    me = torch.randn(B, 1 + N, d, generator=g)
    sa = torch.randn(B, N, generator=g).mul(1.5).softmax(-1)  # attention-like scores: ~10% IQR outliers
    vz = mmc.create("visionzip", keep=64)
    pm = mmc.create("prumerge", keep=64)
    pp = mmc.create("prumerge+", keep="auto")
    dv = mmc.create("divprune", keep=64)
    dy = mmc.create("dycoke", keep="auto")
    v = torch.randn(B, 16 * 196, 896, generator=g)  # 16 frames of 14 x 14 LLM-space tokens
    vt = mmc.create("visiontrim", keep=64)  # 48 dominant + 16 complement
    te = torch.randn(B, 12, C, generator=g) + x[:, 1:13]  # a 12-token question about a few tokens
    idp = mmc.create("idpruner", keep=64)
    tri = mmc.create("trio_encoder", keep=96)
    s2 = torch.rand(B, N, 2, generator=g)  # the shallow and deep [CLS] rows (24 x 24 grid)
    # prunesid: patches around 24 centres (NMS suppresses within them), keep 128 = CLS + 127 (32 groups: some caps
    # cut a group's share and the shortfall is filled)
    cen = torch.randn(B, 24, C, generator=g)
    lab = torch.randint(0, 24, (B, N, 1), generator=g).expand(B, N, C)
    xs = torch.cat([x[:, :1], cen.gather(1, lab) + 0.8 * torch.randn(B, N, C, generator=g)], dim=1)  # [B, 1 + N, C]
    sid = mmc.create("prunesid", keep=128)
    # flashvid: 8 frames of 7 x 7 x 128, a near-static scene (frames 0-3: its trees span the segment and the merge
    # threshold is lowered to keep b tokens per frame) then a noisier one (frames 4-7); attention per scene
    T, S, Cv = 8, 49, 128
    scene = torch.randn(B, 2, S, Cv, generator=g) + 0.3 * torch.randn(B, 1, 1, Cv, generator=g)
    noise = torch.cat([0.01 + 0.09 * torch.rand(B, 4, S, 1, generator=g),
                       0.2 + 0.6 * torch.rand(B, 4, S, 1, generator=g)], dim=1)  # [B, T, S, 1]
    fv_x = (scene.repeat_interleave(4, dim=1) + noise * torch.randn(B, T, S, Cv, generator=g)).view(B, T * S, Cv)
    fv_a = (torch.randn(B, 2, S, generator=g).repeat_interleave(4, dim=1) + 0.1 * torch.randn(B, T, S, generator=g))
    fv_a = fv_a.mul(1.5).softmax(-1).view(B, T * S)
    fv = mmc.create("flashvid", keep="auto", retention=0.5, min_segments=3)  # ceil(49 * 0.5 * 1.25) = 31 per frame
    return [
        ("visionzip", lambda: vz(x, prefix=1, scores=sc, metric=me).ordered(),
         lambda: torch.stack([visionzip_plain(x[b], sc[b], me[b], 53, 10) for b in range(B)])),
        ("prumerge", lambda: pm(x[:, 1:], scores=sc[:, 1:], metric=me[:, 1:]).ordered(),
         lambda: torch.stack([prumerge_plain(x[b, 1:], sc[b, 1:], me[b, 1:], 63) for b in range(B)])),
        ("prumerge+", lambda: pp(x[:, 1:], scores=sa, metric=me[:, 1:]).ordered(),
         lambda: pad_sequence([prumerge_plus_plain(x[b, 1:], sa[b], me[b, 1:]) for b in range(B)], batch_first=True)),
        ("divprune", lambda: dv(x[:, 1:]).x,
         lambda: torch.stack([x[b, 1:][divprune_plain(x[b, 1:], 64).sort().values] for b in range(B)])),
        ("dycoke", lambda: dy(v, grid=(16, 14, 14)).ordered(),
         lambda: torch.stack([dycoke_plain(v[b], 16) for b in range(B)])),
        ("visiontrim", lambda: vt(x[:, 1:], scores=sc[:, 1:], text=te).ordered(),
         lambda: torch.stack([visiontrim_plain(x[b, 1:], sc[b, 1:], te[b], 48, 16) for b in range(B)])),
        ("idpruner", lambda: idp(x[:, 1:], scores=sc[:, 1:]).x,
         lambda: torch.stack([idpruner_plain(x[b, 1:], sc[b, 1:], 64) for b in range(B)])),
        ("trio_encoder", lambda: tri(x[:, 1:], grid=(24, 24), scores=s2).x,
         lambda: torch.stack([trio_encoder_plain(x[b, 1:], s2[b, :, 0], s2[b, :, 1], 96) for b in range(B)])),
        ("prunesid", lambda: sid(xs, prefix=1, scores=sc).ordered(),
         lambda: torch.stack([prunesid_plain(xs[b], sc[b, 1:], 128) for b in range(B)])),
        ("flashvid", lambda: fv(fv_x, grid=(T, 7, 7), scores=fv_a).x,
         lambda: pad_sequence([flashvid_plain(fv_x[b].view(T, S, Cv), fv_a[b].view(T, S), 31, min_seg=3)
                               for b in range(B)], batch_first=True)),
    ]


def bench_fidelity(repeats: int, inner: int, threads: int, cpu_time: bool = False) -> list[dict]:
    """Ours vs the plain per-sample reference, interleaved per repeat, at batch 1 and 2; one row per op and batch.
    cpu_time: time with `time.process_time` (this process's CPU time: steadier than wall time when other jobs share
    the cores; meaningful with threads=1)."""
    clock = time.process_time if cpu_time else time.perf_counter
    rows = []
    for B in (1, 2):
        for label, ours, ref in _fidelity_cases(B):
            diff = (ours() - ref()).abs().max().item()
            t = {"ours": [], "plain": []}
            for _ in range(repeats):
                for k, f in (("ours", ours), ("plain", ref)):
                    t0 = clock()
                    for _ in range(inner):
                        f()
                    t[k].append((clock() - t0) / inner * 1e3)
            speedup = statistics.median(p / o for p, o in zip(t["plain"], t["ours"], strict=True))
            for k, v in t.items():
                p20, p50, p80 = quantiles(v)
                rows.append({"op": f"{label}[{k}]", "provider": "torch", "shape": f"batch {B}", "dtype": "float32",
                             "p20_ms": f"{p20:.3f}", "p50_ms": f"{p50:.3f}", "p80_ms": f"{p80:.3f}",
                             "plain_over_ours_p50": f"{speedup:.2f}", "agree_max_abs": f"{diff:.2e}",
                             "threads": threads, "clock": "process_time" if cpu_time else "perf_counter",
                             "device": platform.processor() or platform.machine(),
                             "torch": torch.__version__, "mmcompress": mmc.__version__,
                             "python": platform.python_version()})
            print(f"{label:10s} batch {B}: ours {statistics.median(t['ours']):8.2f} ms  plain "
                  f"{statistics.median(t['plain']):8.2f} ms  plain/ours {speedup:.2f}x  max|diff| {diff:.1e}",
                  file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/speed.csv")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--only", choices=["all", "tome-peer", "fidelity"], default="all",
                    help="tome-peer: only the issue-13 rows; fidelity: only the paper-named methods vs plain peers")
    ap.add_argument("--cpu-time", action="store_true",
                    help="fidelity rows: time with process_time (CPU time of this process; use with --threads 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["op", "provider", "shape", "dtype", "keep", "checks", "metric_d", "p20_ms", "p50_ms", "p80_ms",
              "clone_p50_ms", "ratio_to_clone_p50", "copy_p50_ms", "ratio_to_copy_p50", "peer_over_tome_p50",
              "plain_over_ours_p50", "agree_max_abs", "threads", "clock", "glibc_tunables", "device", "torch",
              "mmcompress", "python"]
    rows = [] if args.only == "fidelity" else bench_peer(args.repeats, args.inner, args.threads)
    if args.only in ("all", "fidelity"):
        rows += bench_fidelity(args.repeats, args.inner, args.threads, args.cpu_time)
    total = 0 if args.only != "all" else len(SHAPES) * len(CASES) * 2
    i = 0
    for label, shape, prefix, grid in SHAPES if total else []:
        x = torch.randn(*shape)
        Nb = shape[1] - prefix
        for name, opts, frac, op in CASES:
            keep = max(1, round(frac * Nb))
            comp = mmc.create(name, keep=keep, **opts)
            kw = {"prefix": prefix, "grid": grid}
            for checks in ("1", "0"):
                i += 1
                os.environ["MMCOMPRESS_CHECKS"] = checks
                t_op, t_clone, ratios = bench_case(x, comp, kw, args.repeats, args.inner)
                p20, p50, p80 = quantiles(t_op)
                row = {"op": op, "provider": "torch", "shape": "x".join(map(str, shape)), "dtype": "float32",
                       "keep": keep, "checks": checks, "p20_ms": f"{p20:.3f}", "p50_ms": f"{p50:.3f}",
                       "p80_ms": f"{p80:.3f}", "clone_p50_ms": f"{statistics.median(t_clone):.3f}",
                       "ratio_to_clone_p50": f"{statistics.median(ratios):.2f}", "threads": args.threads,
                       "device": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "mmcompress": mmc.__version__, "python": platform.python_version()}
                rows.append(row)
                print(f"[{i}/{total}] {op:18s} {label:16s} checks={checks} p50 {p50:8.2f} ms  "
                      f"clone {float(row['clone_p50_ms']):6.2f} ms  ratio {row['ratio_to_clone_p50']}x",
                      file=sys.stderr, flush=True)
    os.environ.pop("MMCOMPRESS_CHECKS", None)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
