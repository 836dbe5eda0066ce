"""Prepared GPU benchmark of the kernels vs their PyTorch references (needs a CUDA device).

Ops: best_match (fused bipartite matching of the [B, N, C] tokens), match_merge (one ToMe round at r = N/2: a 64-d
metric matched, then the [B, N, C] tokens merged: kernels/bipartite_match.py + kernels/merge.py), attention_rows
(CLS row of softmax(QK^T) for 16 heads of 64 channels, kernels/attention_rows.py).

Rows: op, provider (torch|torch_compile|triton), shape, dtype, agreement with the torch provider's result on the same
inputs (max abs difference of the float outputs; integer outputs such as indices equal or not: on random bf16 inputs
ties can make indices differ legitimately), p20/p50/p80 ms, GB/s (metric bytes read once), % of a measured
device-to-device copy bandwidth, device name, versions. Not run yet: no GPU was lent so far.

    python benchmarks/gpu_kernels.py --out runs/speed/gpu_kernels.csv

`--dry-run` runs the same code path on CPU under TRITON_INTERPRET=1 at one tiny shape (no torch.compile, wall-clock
timers, figures meaningless), so a session that is lent a GPU for minutes does not spend them on a broken script
(`tests/test_gpu_kernels_script.py` runs it).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

SHAPES = [(16, 576, 1024), (16, 2880, 1024), (64, 576, 1024)]
DRY_SHAPES = [(2, 9, 24)]


def _times_ms(fn, reps: int = 50, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if torch.cuda.is_available():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            out.append(s.elapsed_time(e))
        else:  # --dry-run on CPU
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return sorted(out)


def _agreement(got, want) -> tuple[float, bool]:
    """(max abs difference of the float outputs, whether the integer outputs are equal) between two results."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    diff, same = 0.0, True
    for g, w in zip(got, want, strict=True):
        if g.is_floating_point():
            diff = max(diff, (g.float() - w.float()).abs().max().item() if g.numel() else 0.0)
        else:
            same = same and torch.equal(g, w)
    return diff, same


def _pct(ts: list[float], q: float) -> float:
    return ts[min(len(ts) - 1, int(q * len(ts)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/speed/gpu_kernels.csv")
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, one tiny shape: checks the script")
    args = ap.parse_args(argv)
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--dry-run needs TRITON_INTERPRET=1 in the environment (read when triton is imported)",
                  file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing measured", file=sys.stderr)
        return 2
    shapes, reps, warmup = (DRY_SHAPES, 2, 1) if args.dry_run else (SHAPES, 50, 5)
    os.environ["MMCOMPRESS_KERNELS"] = "triton"
    import triton
    from mmcompress.kernels.attention_rows import attention_rows_reference, attention_rows_triton
    from mmcompress.kernels.bipartite_match import best_match_reference, best_match_triton
    from mmcompress.kernels.merge import merge_reference, merge_triton

    def match_merge(x, metric, matcher, merger):
        a, b = metric[:, ::2], metric[:, 1::2]
        val, idx = matcher(a, b)
        src_a = val.argsort(dim=-1, descending=True, stable=True)[:, : a.shape[1]]
        return merger(x, None, idx, src_a)

    dev = torch.device("cpu" if args.dry_run else "cuda")
    device_name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    big = torch.empty((1 if args.dry_run else 256) * 2**20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    copy_ms = _pct(_times_ms(lambda: dst.copy_(big), reps, warmup), 0.5)
    copy_gbs = 2 * big.numel() / copy_ms / 1e6  # read + write
    compiled = best_match_reference if args.dry_run else torch.compile(best_match_reference)
    rows = []
    want = None

    def measure(op: str, prov: str, fn, nbytes: float, shape: str, dtype: torch.dtype) -> None:
        """Time `fn`, compare its result with the torch provider's (run first for the same inputs), add a row."""
        nonlocal want
        res = fn()
        if prov == "torch":
            want = res
        diff, same = _agreement(res, want)
        ts = _times_ms(fn, reps, warmup)
        p50 = _pct(ts, 0.5)
        gbs = nbytes / p50 / 1e6
        rows.append(dict(op=op, provider=prov, shape=shape, dtype=str(dtype)[6:],
                         max_abs_diff_vs_torch=f"{diff:.3g}", indices_equal_torch=same,
                         p20_ms=f"{_pct(ts, 0.2):.4f}", p50_ms=f"{p50:.4f}", p80_ms=f"{_pct(ts, 0.8):.4f}",
                         gb_s=f"{gbs:.1f}", pct_copy_roofline=f"{100 * gbs / copy_gbs:.1f}",
                         device=device_name, torch=torch.__version__, triton=triton.__version__))
        print(rows[-1])

    for B, N, d in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            m = torch.randn(B, N, d, device=dev).to(dtype)
            a, b = m[:, ::2], m[:, 1::2]
            for prov, fn in (("torch", lambda a=a, b=b: best_match_reference(a, b)),
                             ("torch_compile", lambda a=a, b=b: compiled(a, b)),
                             ("triton", lambda a=a, b=b: best_match_triton(a, b))):
                if not (prov == "torch_compile" and args.dry_run):
                    measure("best_match", prov, fn, m.numel() * m.element_size(), f"{B}x{N}x{d}", dtype)
    compiled_merge = merge_reference if args.dry_run else torch.compile(merge_reference)
    for B, N, C in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(B, N, C, device=dev).to(dtype)
            metric = torch.randn(B, N, 64, device=dev).to(dtype)
            q = torch.randn(B, 16, N, 64, device=dev).to(dtype)
            k = torch.randn(B, 16, N, 64, device=dev).to(dtype)
            cls = torch.zeros(B, 1, dtype=torch.long, device=dev)
            xbytes = x.numel() * x.element_size() * 1.5  # read x once, write N/2 rows
            kbytes = k.numel() * k.element_size() * 2  # two sweeps over the keys
            cases = [
                ("match_merge", xbytes, "torch", lambda x=x, m=metric: match_merge(x, m, best_match_reference,
                                                                                   merge_reference)),
                ("match_merge", xbytes, "torch_compile", lambda x=x, m=metric: match_merge(x, m, best_match_reference,
                                                                                           compiled_merge)),
                ("match_merge", xbytes, "triton", lambda x=x, m=metric: match_merge(x, m, best_match_triton,
                                                                                    merge_triton)),
                ("attention_rows", kbytes, "torch", lambda q=q, k=k, c=cls: attention_rows_reference(q, k, c, 0.125)),
                ("attention_rows", kbytes, "triton", lambda q=q, k=k, c=cls: attention_rows_triton(q, k, c, 0.125)),
            ]
            for op, nbytes, prov, fn in cases:
                if not (prov == "torch_compile" and args.dry_run):
                    measure(op, prov, fn, nbytes, f"{B}x{N}x{C}", dtype)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
