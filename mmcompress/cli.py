"""`mmcompress` command line. `list` and `--version` never import torch (well under a second).

`bench` and `demo` arrive with the eval-suite and demo issues.
"""

from __future__ import annotations

import argparse
import sys

from mmcompress._version import __version__


def _cmd_list(args: argparse.Namespace) -> int:
    from importlib.metadata import entry_points

    from mmcompress.catalog import BUILTINS
    from mmcompress.registry import ENTRY_POINT_GROUP, _builtin_available

    rows = [("name", "family", "modality", "needs", "method")]
    for name, (_, family, modality, needs, summary) in sorted(BUILTINS.items()):
        if _builtin_available(name):
            rows.append((name, family, modality, ",".join(needs) or "-", summary))
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        rows.append((ep.name, "third-party", "?", "?", ep.value))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcompress", description="Compress multimodal tokens of VLMs.")
    p.add_argument("--version", action="version", version=f"mmcompress {__version__}")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("list", help="compressors with family, modality and what they need").set_defaults(fn=_cmd_list)
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
