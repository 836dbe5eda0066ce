"""``mmcompress demo`` subcommand (parser and handler; gradio is imported only when it runs)."""

from __future__ import annotations

import argparse
from typing import Any


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo`` on the CLI's subparsers.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The ``demo`` parser.
    """
    p = subparsers.add_parser("demo", help="Gradio app: token maps, answers and costs of compressors side by side")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; never shared publicly)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default="ref-vlm", help="image tab model: ref-vlm or a local HF VLM directory")
    p.add_argument("--bench-dir", default="runs/bench", help="default folder of the results tab")
    p.set_defaults(fn=run_demo)
    return p


def run_demo(args: argparse.Namespace) -> int:
    """Start the app (blocks until interrupted)."""
    from .app import build_app

    app = build_app(args.model, args.bench_dir)
    app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, share=False)
    return 0
