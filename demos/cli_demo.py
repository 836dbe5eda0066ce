"""``mmcompress demo`` subcommand (parser and handler; gradio is imported only when it runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = ("A browser app (Gradio, on 127.0.0.1) that shows what token compression does to a VLM: for an image "
               "and a question, each method's answer, tokens in -> out, compress and generate times, and a token map "
               "of which patches were merged, kept or dropped; the same for Whisper's audio frames; and the plots "
               "of a `mmcompress bench` folder. The model loads (and warms up) before the server starts.")


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo`` on the CLI's subparsers.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The ``demo`` parser.
    """
    p = subparsers.add_parser("demo", help="Gradio app: token maps, answers and costs of compressors side by side",
                              description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="bind address (never shared publicly)")
    p.add_argument("--port", type=int, default=7860, help="port")
    p.add_argument("--model", default="ref-vlm",
                   help="image tab model: ref-vlm (free-form questions), ref-vlm-mini (easy-VQA and detail questions "
                        "only: the benchmark host) or a local HF VLM directory")
    p.add_argument("--bench-dir", default="runs/bench", help="default folder of the results tab")
    p.set_defaults(fn=run_demo)
    return p


BUILTIN_VLMS = ("ref-vlm", "ref-vlm-mini")


def check_model(model: str) -> None:
    """Fail at start, not at the first Run: ``model`` must be a built-in VLM or a model directory with a config.json.

    Raises:
        ValueError: naming the argument and what was expected.
    """
    if model in BUILTIN_VLMS:
        return
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"--model: {model!r} is neither a built-in VLM ({', '.join(BUILTIN_VLMS)}) nor an existing "
                         f"model directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model: {model!r} has no config.json (expected a Hugging Face model directory)")


def run_demo(args: argparse.Namespace) -> int:
    """Check the model, load it, then start the app (blocks until interrupted)."""
    try:
        check_model(args.model)
    except ValueError as e:
        print(f"mmcompress demo: {e}", file=sys.stderr)
        return 2
    from .app import APP_CSS, build_app
    from .image import ImageBackend

    backend = ImageBackend(args.model)
    print(f"mmcompress demo: loading {args.model} ...", file=sys.stderr, flush=True)
    try:
        backend.load()
    except (ValueError, OSError) as e:
        print(f"mmcompress demo: --model: cannot load {args.model!r}: {e}", file=sys.stderr)
        return 2
    app = build_app(args.model, args.bench_dir, image_backend=backend)
    app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, share=False,
                                                  css=APP_CSS)
    return 0
