"""`mmcompress` command line. `list` and `--version` never import torch (well under a second).

    mmcompress list
    mmcompress bench --model ref-vlm --task easyvqa --methods tome,visionzip --keep 0.5,0.25 --limit 500 --out runs/x
    torchrun --nproc-per-node 2 -m mmcompress bench ...      # samples sharded by rank, merged by rank 0
    mmcompress demo [--model ref-vlm] [--port 7860]          # Gradio app on 127.0.0.1
"""

from __future__ import annotations

import argparse
import sys

from mmcompress._version import __version__


def _cmd_list(args: argparse.Namespace) -> int:
    from importlib.metadata import entry_points

    from mmcompress.catalog import BUILTINS, IN_LLM
    from mmcompress.registry import ENTRY_POINT_GROUP, _builtin_available

    rows = [("name", "family", "modality", "needs", "method")]
    for name, (_, family, modality, needs, summary) in sorted(BUILTINS.items()):
        if _builtin_available(name):
            rows.append((name, family, modality, ",".join(needs) or "-", summary))
    for name, (_, family, modality, needs, summary) in sorted(IN_LLM.items()):  # through mmc.apply only
        rows.append((name, family, modality, ",".join(needs) or "-", summary))
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        rows.append((ep.name, "third-party", "?", "?", ep.value))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 0


def _parse_option(text: str) -> tuple[str, str, object]:
    """``method:key=value`` -> (method, key, value parsed as JSON when it parses, else the string)."""
    import json

    head, sep, value = text.partition("=")
    method, colon, key = head.partition(":")
    if not sep or not colon or not method or not key:
        raise argparse.ArgumentTypeError(f"--option: expected METHOD:KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return method, key, parsed


def _listed_methods() -> list[str]:
    """The names `mmcompress list` prints (its first column), so that bench accepts exactly what list shows."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _cmd_list(argparse.Namespace())
    lines = [ln.split()[0] for ln in buf.getvalue().splitlines() if ln.strip()]
    return [n for n in lines if n != "name"]


def _adapter_options() -> set[str]:
    """Option names that some model adapter accepts (which adapter applies is known only once the model loads)."""
    from mmcompress.hf import adapter, supported_model_types

    supported_model_types()  # imports the built-in adapters
    return {k for cls in set(adapter._ADAPTERS.values()) for k in getattr(cls, "options", {})}


def check_methods(methods: list[str], options: dict[str, dict[str, object]]) -> None:
    """Check method names and ``--option`` keys before any model loads.

    A name must be one that `mmcompress list` prints, ``none``, or ``fastv``; an option key must be a parameter of
    the method's compressor or an option of some model adapter (whether this model's adapter takes it is checked
    when the setting runs: a setting it cannot run is reported under "Skipped settings").

    Raises:
        ValueError: an unknown method (with the closest names), an option for a method not in ``methods``, or an
            unknown option key (with the accepted ones).
    """
    import difflib
    import inspect

    import mmcompress as mmc

    known = list(dict.fromkeys(["none", "fastv", *_listed_methods(), *mmc.available()]))
    for m in methods:
        if m not in known:
            close = difflib.get_close_matches(m, known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"methods: unknown method {m!r}{hint} (`mmcompress list` shows them all)")
    adapter_keys: set[str] | None = None
    for m, opts in options.items():
        if m not in methods and m not in ("none", "random"):
            raise ValueError(f"option: {m!r} is not among --methods ({','.join(methods)})")
        if m == "none" or (m != "fastv" and m not in mmc.available()):
            continue  # no compressor class to read its parameters from (in-LLM methods: checked when they run)
        comp = mmc.get("uniform" if m == "fastv" else m)
        params = set(inspect.signature(comp.__init__).parameters) - {"self", "keep", "args", "kwargs"}
        if adapter_keys is None:
            adapter_keys = _adapter_options()
        accepted = params | adapter_keys
        for key in opts:
            if key not in accepted:
                close = difflib.get_close_matches(key, sorted(accepted), n=3, cutoff=0.6)
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(f"option: {m} has no option {key!r}{hint} (its own: "
                                 f"{', '.join(sorted(params)) or 'none'}; model adapters: "
                                 f"{', '.join(sorted(adapter_keys))})")


def check_device(device: str) -> None:
    """Check that torch can use `device` here, before any model loads.

    Raises:
        ValueError: Not a torch device string, or a device this torch build or machine does not have.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cpu":
        return
    backend = getattr(torch, dev.type, None)
    is_available = getattr(backend, "is_available", None)
    if dev.type == "mps":
        is_available = torch.backends.mps.is_available
    if not callable(is_available) or not is_available():
        why = ("this torch is a CPU-only build" if dev.type == "cuda" and torch.version.cuda is None
               else f"no {dev.type} device is available")
        raise ValueError(f"device: {device!r} asked, but {why}; use --device cpu")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise ValueError(f"device: {device!r} asked, but there are only {count()} {dev.type} devices")


def _check_numbers(args: argparse.Namespace) -> None:
    """The numeric flags whose bad values would otherwise fail deep inside a run."""
    if args.limit < 0:
        raise ValueError(f"limit: expected 0 (all) or a positive number of samples per task, got {args.limit}")
    if args.threads < 0:
        raise ValueError(f"threads: expected 0 (leave as is) or a positive number of torch threads, got {args.threads}")
    if args.batch_size < 1:
        raise ValueError(f"batch_size: expected a positive number of samples per model call, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive number of tokens, got {args.max_new_tokens}")
    if args.timing_repeats < 0:
        raise ValueError(f"timing_repeats: expected 0 (off) or a positive number of pairs, got {args.timing_repeats}")
    for name in ("timing_threads", "timing_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: expected a positive number, got {getattr(args, name)}")


def _gen_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """``--gen-kwargs`` checked (`mmcompress.evals.generation`); a ``max_new_tokens`` there is ``--max-new-tokens``."""
    from mmcompress.evals.generation import GenerationSettings, parse_gen_kwargs

    kw = parse_gen_kwargs(args.gen_kwargs)
    GenerationSettings.from_kwargs(kw)
    if "max_new_tokens" in kw:
        if args.max_new_tokens is not None:
            raise ValueError("gen_kwargs: max_new_tokens given twice (--max-new-tokens and --gen-kwargs)")
        args.max_new_tokens = kw.pop("max_new_tokens")
    return kw


def _cmd_bench(args: argparse.Namespace) -> int:
    """`mmcompress bench`; Ctrl-C ends it with one line saying how to continue."""
    try:
        return _bench(args)
    except KeyboardInterrupt:
        again = "run the same command (with --resume) again" if args.resume else "add --resume to the same command"
        print(f"\nmmcompress bench: interrupted; the finished samples are kept in {args.out}; {again} to continue",
              file=sys.stderr)
        return 130


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmcompress.evals.runner import BenchConfig, parse_keeps, run

    try:
        keeps = parse_keeps(args.keep)
        methods = [m for m in args.methods.split(",") if m]
        options: dict[str, dict[str, object]] = {}
        for method, key, value in args.option:
            options.setdefault(method, {})[key] = value
        check_methods(methods, options)
        _check_numbers(args)
        gen_kwargs = _gen_kwargs(args)
        check_device(args.device)
    except ValueError as e:
        print(f"mmcompress bench: {e}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.no_progress:  # transformers' weight-loading bar too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    cfg = BenchConfig(
        model=args.model, tasks=[t for t in args.task.split(",") if t], keeps=keeps,
        methods=methods, limit=args.limit or None, seed=args.seed,
        batch_size=args.batch_size, out=Path(args.out), data=Path(args.data) if args.data else None,
        split=args.split, device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
        gen_kwargs=gen_kwargs, resume=args.resume, skip_bad=args.skip_bad, options=options,
        progress=not args.no_progress, timing_repeats=args.timing_repeats, timing_threads=args.timing_threads,
        timing_samples=args.timing_samples, encoder_memo=not args.no_encoder_memo,
    )
    try:
        result = run(cfg)
    except ValueError as e:
        print(f"mmcompress bench: {e}", file=sys.stderr)
        return 2
    if "summary" in result:
        print((Path(cfg.out) / "summary.md").read_text())
        print(f"wrote {cfg.out}/summary.csv, summary.md, pareto.png, samples.jsonl")
    return 0


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option with its default, where it has one worth saying (not None, False or [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or d == [] or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="accuracy vs tokens vs time of compressors on VQA/ASR/kNN tasks",
                       formatter_class=_DefaultsFormatter,
                       description="Run tasks x methods x budgets; per-sample JSONL (resumable), summary CSV/markdown "
                                   "and a Pareto plot. `none` (uncompressed) and `random` are always included. "
                                   "Method names and options are checked before the model loads.")
    b.add_argument("--model", default="ref-vlm",
                   help="ref-vlm | ref-vlm-mini | whisper-tiny.en | dinov2-s14 | local HF dir | hub id")
    b.add_argument("--task", default="easyvqa", help="comma list: easyvqa, detail, vqav2, textvqa, gqa, pope, mme, "
                                                     "scienceqa_img, mmbench, asr, knn, or package.module:TaskClass")
    b.add_argument("--methods", default="none,random,tome,visionzip",
                   help="comma list of names from `mmcompress list`, fastv, none")
    b.add_argument("--keep", default="0.5,0.25,0.125", help="comma list: fractions in (0, 1], token counts, auto")
    b.add_argument("--limit", type=int, default=500, help="samples per task, a seeded subset (0: all)")
    b.add_argument("--seed", type=int, default=0, help="seed of the subset")
    b.add_argument("--batch-size", type=int, default=16, help="samples per model call (fixed batches: resumable)")
    b.add_argument("--out", default="runs/bench", help="output folder")
    b.add_argument("--data", default=None, help="dataset folder (lmms-lab parquet export or original layout)")
    b.add_argument("--split", default=None, help="split (default: the one lmms-eval scores)")
    b.add_argument("--device", default="cpu", help="torch device")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    b.add_argument("--max-new-tokens", type=int, default=None, help="answer length (default: each task's own)")
    b.add_argument("--gen-kwargs", default="", metavar="KEY=VALUE,...",
                   help="decoding of image tasks, lmms-eval's keys: temperature, top_p, top_k, num_beams, do_sample, "
                        "until, max_new_tokens (e.g. temperature=0.7,top_p=0.9; default: greedy)")
    b.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished samples")
    b.add_argument("--skip-bad", action="store_true", help="skip malformed dataset rows (counted) instead of failing")
    b.add_argument("--option", type=_parse_option, action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="extra option for one method, e.g. tome:match_dtype=... or fastv:fastv_k=3 (repeatable)")
    b.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--timing-repeats", type=int, default=7,
                   help="interleaved (none, setting) prefill pairs per task x setting for the time columns; 0: no "
                        "interleaved timing (default %(default)s)")
    b.add_argument("--timing-threads", type=int, default=1,
                   help="torch threads while the time columns are measured (default %(default)s)")
    b.add_argument("--timing-samples", type=int, default=8,
                   help="the timing batch: each task's first N samples (default %(default)s)")
    b.add_argument("--no-encoder-memo", action="store_true",
                   help="encode every batch again for every setting (default: a batch's vision tower runs once and "
                        "later settings replay it, re-running only the blocks a method hooks; the answers are the "
                        "same either way)")
    b.set_defaults(fn=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcompress", description="Compress multimodal tokens of VLMs.")
    p.add_argument("--version", action="version", version=f"mmcompress {__version__}")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("list", help="compressors with family, modality and what they need").set_defaults(fn=_cmd_list)
    _add_bench_parser(sub)
    from mmcompress.demos.cli_demo import add_demo_parser  # light: gradio/torch load only when the demo runs

    add_demo_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmcompress` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
