#!/usr/bin/env python
"""Uncompressed baselines of the real models, on CPU.

* ref-vlm easy-VQA test accuracy (greedy, exact match) on a fixed seeded subset (``random.Random(seed).sample``
  of the 9,673 test questions; ``--vqa-limit 0`` = all of them).
* Whisper tiny.en corpus WER on the 5 LibriVox clips of ``pocketsphinx-testdata``.
* DINOv2-S/14 10-NN accuracy (cosine, CLS after the final layernorm) on Fashion-MNIST, 112 px, fixed seeded
  subset (2,000 train / 500 test by default).

Prints the results and writes ``baselines.json`` and ``baselines.md`` to ``--out``.

Usage::

    python scripts/measure_baselines.py                       # all three, 2,000 easy-VQA questions
    python scripts/measure_baselines.py --vqa-limit 0         # the full easy-VQA test split (9,673 questions)
    python scripts/measure_baselines.py --only vqa --vqa-limit 500
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mmcompress import zoo  # noqa: E402
from mmcompress.zoo._cache import atomic_write_bytes, atomic_write_json  # noqa: E402

TASKS = ("vqa", "wer", "knn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(TASKS), help=f"comma-separated subset of {TASKS}")
    p.add_argument("--vqa-limit", type=int, default=2000, help="easy-VQA test questions (0 = all 9,673)")
    p.add_argument("--vqa-batch-size", type=int, default=16)
    p.add_argument("--knn-train", type=int, default=2000)
    p.add_argument("--knn-test", type=int, default=500)
    p.add_argument("--knn-size", type=int, default=112, help="DINOv2 input side for kNN (multiple of 14)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "mmcompress" / "zoo" / "assets")
    args = p.parse_args(argv)
    args.only = [t.strip() for t in args.only.split(",") if t.strip()]
    bad = [t for t in args.only if t not in TASKS]
    if bad:
        p.error(f"--only: unknown task(s) {bad}; choose from {TASKS}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the selected measurements; returns the results dict."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_json = args.out / "baselines.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    results["machine"] = f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads"

    if "vqa" in args.only:
        from mmcompress.evals import easyvqa

        from mmcompress.zoo.refvlm import projector_info

        t = time.perf_counter()
        model, processor = zoo.load("ref-vlm")
        samples = easyvqa.subset("test", args.vqa_limit or None, seed=args.seed)
        r = easyvqa.evaluate(model, processor, samples, batch_size=args.vqa_batch_size)
        info = projector_info()
        results["easyvqa"] = {
            "accuracy": r["accuracy"],
            "n": r["n"],
            "subset": f"random.Random({args.seed}).sample(test questions, {r['n']})" if args.vqa_limit else "all",
            "projector_step": info.get("step"),
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(f"ref-vlm easy-VQA accuracy: {r['accuracy']:.4f} on {r['n']} test questions", flush=True)
        del model

    if "wer" in args.only:
        from mmcompress.zoo.baselines import librivox_wer

        t = time.perf_counter()
        model, processor = zoo.load("whisper-tiny.en")
        r = librivox_wer(model, processor)
        results["librivox_wer"] = {k: r[k] for k in ("wer", "n_clips", "n_words", "hypotheses")}
        results["librivox_wer"]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"whisper-tiny.en LibriVox WER: {r['wer']:.4f} ({r['n_clips']} clips, {r['n_words']} words)", flush=True)
        del model

    if "knn" in args.only:
        from mmcompress.zoo.baselines import fashion_mnist_knn

        t = time.perf_counter()
        model, _ = zoo.load("dinov2-s14")
        r = fashion_mnist_knn(model, args.knn_train, args.knn_test, args.knn_size, seed=args.seed)
        r["seconds"] = round(time.perf_counter() - t, 1)
        results["fashion_mnist_knn"] = r
        print(
            f"dinov2-s14 Fashion-MNIST {r['k']}-NN accuracy: {r['knn_acc']:.4f} "
            f"({r['n_train']} train / {r['n_test']} test, {r['size']} px)",
            flush=True,
        )

    atomic_write_json(out_json, results)
    lines = ["| model | task | metric | value | subset |", "|---|---|---|---|---|"]
    if "easyvqa" in results:
        e = results["easyvqa"]
        lines.append(
            f"| ref-vlm (step {e['projector_step']}) | easy-VQA test | accuracy | {e['accuracy']:.3f} | "
            f"{e['n']} questions, seed {args.seed} |"
        )
    if "librivox_wer" in results:
        w = results["librivox_wer"]
        lines.append(
            f"| whisper-tiny.en | LibriVox | WER | {w['wer']:.3f} | {w['n_clips']} clips, {w['n_words']} words |"
        )
    if "fashion_mnist_knn" in results:
        k = results["fashion_mnist_knn"]
        lines.append(
            f"| dinov2-s14 | Fashion-MNIST | {k['k']}-NN acc | {k['knn_acc']:.3f} | "
            f"{k['n_train']}/{k['n_test']}, {k['size']} px, seed {k['seed']} |"
        )
    atomic_write_bytes(args.out / "baselines.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
