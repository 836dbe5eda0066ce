"""Prefill time and easy-VQA accuracy of ref-vlm at several token budgets, compressed with `mmcompress.apply`.

Prefill = one forward over the prompt (vision tower + compression + LLM, KV cache on), the cost that token
compression cuts. Budgets are timed interleaved (keep 1.0, 0.5, 0.25, 1.0, 0.5, ... per repeat) so that machine load
drifts hit every budget alike; the ratio is p50(keep) / p50(uncompressed) from the same run. Accuracy: greedy answers
on a fixed seeded subset of easy-VQA test (`mmcompress.evals.easyvqa.subset("test", n, seed)`).

    python scripts/measure_prefill.py --methods uniform,fastv --keep 1,0.5,0.25 --repeats 15 --vqa 200

Writes CSV rows (method, keep, image tokens into the LLM, p20/p50/p80 ms, ratio, accuracy) to stdout and `--out`.
Without the trained projector (mmcompress/zoo/assets/refvlm_projector.safetensors) the model is assembled with an
untrained one: timings are valid, accuracy is reported as n/a.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import mmcompress as mmc


def load() -> tuple[Any, Any, bool]:
    """(model, processor, trained) for ref-vlm."""
    from mmcompress import zoo

    try:
        model, proc = zoo.load("ref-vlm")
        return model, proc, True
    except FileNotFoundError:
        from mmcompress.zoo.refvlm import build_refvlm

        model, proc = build_refvlm(None)
        return model, proc, False


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """p20, p50, p80 (inclusive method); a single sample is its own p20/p50/p80."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return q[1], statistics.median(xs), q[7]


def prefill_inputs(proc: Any, batch: int, seed: int) -> dict[str, torch.Tensor]:
    from mmcompress.evals import easyvqa
    from PIL import Image

    samples = easyvqa.subset("test", batch, seed=seed)
    images = [Image.open(s.image_path).convert("RGB") for s in samples]
    return proc(images=images, text=[s.question for s in samples])


def apply_budget(model: Any, method: str, keep: float, fastv_k: int) -> None:
    mmc.remove(model)
    if keep >= 1.0:
        return
    if method == "fastv":
        mmc.apply(model, "fastv", keep=keep, fastv_k=fastv_k)
    else:
        mmc.apply(model, method, keep=keep)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="uniform", help="comma list of compressors, or 'fastv'")
    ap.add_argument("--keep", default="1,0.5,0.25", help="comma list of fractions kept (1 = uncompressed)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="prompts per prefill")
    ap.add_argument("--vqa", type=int, default=200, help="easy-VQA test questions for accuracy (0: skip)")
    ap.add_argument("--vqa-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fastv-k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", type=Path, default=None, help="CSV file to write")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    keeps = sorted({float(k) for k in args.keep.split(",")} | {1.0}, reverse=True)

    model, proc, trained = load()
    inp = prefill_inputs(proc, args.batch, args.seed)
    rows = []
    acc_cache: dict[str, Any] = {}
    steps = ""
    if trained:
        from mmcompress.zoo.refvlm import projector_info

        steps = projector_info().get("step", "")
    for method in methods:
        times: dict[float, list[float]] = {k: [] for k in keeps}
        tokens: dict[float, float] = {}
        for r in range(args.warmup + args.repeats):
            for k in keeps:
                apply_budget(model, method, k, args.fastv_k)
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    model(**inp, use_cache=True)
                    dt = (time.perf_counter() - t0) * 1e3
                if r >= args.warmup:
                    times[k].append(dt)
                    print(f"# {method} keep={k} repeat {r - args.warmup}: {dt:.0f} ms", file=sys.stderr, flush=True)
                if k < 1.0:
                    st = mmc.stats(model)
                    removed = st.get("fastv_removed", [0] * len(st["tokens_out"]))
                    tokens[k] = statistics.mean(o - f for o, f in zip(st["tokens_out"], removed, strict=True))
                else:
                    tokens[k] = float(inp["input_ids"].eq(model.config.image_token_id).sum(1).float().mean())
        base = quantiles(times[1.0])[1]
        for k in keeps:
            acc: Any = "n/a"
            if args.vqa and trained:
                if k >= 1.0 and "base" in acc_cache:
                    acc = acc_cache["base"]
                else:
                    from mmcompress.evals import easyvqa

                    apply_budget(model, method, k, args.fastv_k)
                    t0 = time.perf_counter()
                    res = easyvqa.evaluate(model, proc, easyvqa.subset("test", args.vqa, seed=args.seed),
                                           batch_size=args.vqa_batch, progress=False)
                    acc = round(res["accuracy"], 4)
                    print(f"# {method} keep={k}: easy-VQA {acc} on {args.vqa} ({time.perf_counter() - t0:.0f} s)",
                          file=sys.stderr, flush=True)
                    if k >= 1.0:
                        acc_cache["base"] = acc
            p20, p50, p80 = quantiles(times[k])
            rows.append({"method": method if k < 1.0 else "none", "keep": k, "image_tokens": round(tokens[k], 1),
                         "p20_ms": round(p20, 1), "p50_ms": round(p50, 1), "p80_ms": round(p80, 1),
                         "ratio_p50": round(p50 / base, 3), "easyvqa_acc": acc,
                         "vqa_n": args.vqa if acc != "n/a" else 0, "batch": args.batch,
                         "threads": torch.get_num_threads(), "trained_projector": trained,
                         "projector_steps": steps})
        mmc.remove(model)
    w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as f:
            wf = csv.DictWriter(f, fieldnames=list(rows[0]))
            wf.writeheader()
            wf.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
