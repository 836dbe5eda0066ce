"""Write the README's generated tables, so they cannot drift from what the package and `make bench` print.

    python scripts/readme_tables.py                      # catalogue from `mmcompress list`, headline from docs
    python scripts/readme_tables.py --bench runs/bench   # also: docs/benchmark.md's table and plot from a bench run
    python scripts/readme_tables.py --check              # exit 1 when a generated block differs (what the tests do)
    python scripts/readme_tables.py --replot             # docs/bench_pareto.png redrawn from docs/benchmark.md

Blocks sit between ``<!-- BEGIN <name> ... -->`` and ``<!-- END <name> -->`` markers:

- ``catalogue`` (README.md): the rows of ``mmcompress list`` (third-party entry points left out: they depend on what
  is installed), run as a command, so the README shows exactly what the CLI prints.
- ``make-bench table`` (docs/benchmark.md): every task's table of ``runs/bench/summary.md``; only ``--bench``
  rewrites it (and copies ``runs/bench/pareto.png`` to ``docs/bench_pareto.png``).
- ``headline`` (README.md): the first task's table pivoted to method x budget accuracy, so the front page follows the
  last ``make bench`` whatever its method list.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCH_DOC = ROOT / "docs" / "benchmark.md"
PLOT = ROOT / "docs" / "bench_pareto.png"

_BLOCK = r"(<!-- BEGIN {name}\b[^\n]*-->\n)(.*?)(<!-- END {name} -->)"


def get_block(text: str, name: str) -> str:
    """The text between the BEGIN/END markers of block `name` (ValueError when the markers are missing)."""
    m = re.search(_BLOCK.format(name=re.escape(name)), text, re.S)
    if not m:
        raise ValueError(f"no '<!-- BEGIN {name} -->' ... '<!-- END {name} -->' block")
    return m.group(2)


def set_block(text: str, name: str, body: str) -> str:
    """`text` with block `name` replaced by `body` (which ends with a newline)."""
    get_block(text, name)
    pat = re.compile(_BLOCK.format(name=re.escape(name)), re.S)
    return pat.sub(lambda m: m.group(1) + body + m.group(3), text, count=1)


def list_rows(list_output: str) -> list[list[str]]:
    """Rows of `mmcompress list`'s fixed-width output, cut at the header's column starts."""
    rows: list[list[str]] = []
    starts: list[int] | None = None
    for line in list_output.splitlines():
        if not line.strip():
            continue
        if line.split()[:2] == ["name", "family"]:
            starts = [m.start() for m in re.finditer(r"\S+", line)]
            continue
        if starts is None:
            raise ValueError(f"`mmcompress list` printed a row before its header: {line!r}")
        bounds = [*starts[1:], None]
        rows.append([line[a:b].strip() for a, b in zip(starts, bounds, strict=True)])
    return rows


def catalogue_markdown(list_output: str) -> str:
    """The README's catalogue table from `mmcompress list`'s output."""
    out = ["| name | family | modality | needs | what it does |", "|---|---|---|---|---|"]
    for name, family, modality, needs, summary in list_rows(list_output):
        if family == "third-party":
            continue
        out.append(f"| `{name}` | {family} | {modality} | {needs.replace(',', ', ')} | {summary} |")
    return "\n".join(out) + "\n"


def run_list() -> str:
    """`mmcompress list`, run as the command a user runs."""
    return subprocess.run([sys.executable, "-m", "mmcompress", "list"], check=True, capture_output=True, text=True,
                          cwd=ROOT).stdout


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def bench_table(summary_md: str) -> str:
    """Every task's table of a bench ``summary.md``, each under its ``### task (n = ...)`` heading, and the skipped
    settings; a summary with one task and no headings gives its table alone."""
    lines = summary_md.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("| method | keep |")), None)
    if start is None:
        raise ValueError("summary.md has no '| method | keep |' table")
    head = next((i for i in range(start, -1, -1) if lines[i].startswith("## ")), None)
    if head is None:
        return first_table("\n".join(lines[start:]))
    body = [("#" + ln if ln.startswith("## ") else ln) for ln in lines[head:]]
    return "\n".join(body).strip("\n") + "\n"


def first_table(text: str) -> str:
    """The first markdown table of `text` (header, rule and rows)."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("| method | keep |")), None)
    if start is None:
        raise ValueError("no '| method | keep |' table")
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[start:end]) + "\n"


def headline_markdown(table: str) -> str:
    """Pivot a bench table (method, keep, tokens, accuracy ± se, ..., vs random, ..., prefill ratio) to method x keep.

    A cell is bold when its row is AT the budget and beats `random` there by more than two standard errors (no `≈`
    mark). At the budget: the table's "at budget" column says "yes" or, in tables without it, the row's tokens
    (for in-LLM methods the mean over the LLM's layers) are within 5% (+0.5) of keep x the uncompressed count. A row
    above its budget shows its mean tokens (`↑36`); a setting the run skipped says so. The header gives the
    uncompressed row's accuracy and, per budget, the mean token count and the median prefill ratio over the methods
    at that budget.
    """
    lines = [ln for ln in first_table(table).splitlines() if ln.startswith("|")]
    head = _cells(lines[0])
    col = {h: i for i, h in enumerate(head)}
    need = ("method", "keep", "tokens", "accuracy", "vs random", "prefill ratio")
    missing = [h for h in need if h not in col]
    if missing:
        raise ValueError(f"bench table lacks columns {missing}")
    rows = [_cells(ln) for ln in lines[2:]]
    none = next((r for r in rows if r[col["method"]] == "none"), None)
    keeps = list(dict.fromkeys(r[col["keep"]] for r in rows if r[col["method"]] != "none"))
    keeps.sort(key=lambda k: -float(k) if re.fullmatch(r"[\d.]+", k) else 0.0)
    methods = list(dict.fromkeys(r[col["method"]] for r in rows if r[col["method"]] != "none"))
    cell = {(r[col["method"]], r[col["keep"]]): r for r in rows}

    def label(k: str) -> str:
        at = [r for r in rows if r[col["keep"]] == k and r[col["method"]] != "none"]
        rand = [r for r in at if r[col["method"]] == "random"]  # the budget entering the LLM (in-LLM rows differ)
        tokens = round(statistics.median(float(r[col["tokens"]]) for r in (rand or at)), 1)
        ratio = statistics.median(float(r[col["prefill ratio"]]) for r in at)
        share = f"{100 * float(k):g}%" if re.fullmatch(r"0?\.\d+", k) else k
        return f"{share}: {tokens:g} tokens, prefill ×{ratio:.2f}"

    first = "method"
    if none is not None:
        first = f"method (none: {none[col['accuracy']]} at {float(none[col['tokens']]):g} tokens)"
    out = [f"| {first} | " + " | ".join(label(k) for k in keeps) + " |", "|---|" + "---|" * len(keeps)]
    n_full = float(none[col["tokens"]]) if none is not None else float("nan")

    def at_budget(r: list[str], k: str) -> bool:
        if "at budget" in col and r[col["at budget"]] in ("yes", "above"):
            return r[col["at budget"]] == "yes"
        if not re.fullmatch(r"0?\.\d+|1", k) or n_full != n_full:
            return True  # an int budget or no uncompressed row: nothing to compare with
        return float(r[col["tokens"]]) <= float(k) * n_full * 1.05 + 0.5

    for m in methods:
        vals = []
        for k in keeps:
            r = cell.get((m, k))
            if r is None:
                vals.append("skipped")
                continue
            vs = r[col["vs random"]]
            if not at_budget(r, k):
                vals.append(f"{r[col['accuracy']]} (↑{float(r[col['tokens']]):.0f} tokens)")
                continue
            better = m != "random" and vs.startswith("+") and "≈" not in vs
            vals.append(f"**{r[col['accuracy']]}**" if better else r[col["accuracy"]])
        out.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


def table_rows(table: str, task: str = "detail") -> list[dict[str, object]]:
    """Summary rows (method, keep, tokens, accuracy, stderr, prefill_ms, compress_ms) read back from the first bench
    table of `table`, enough for `mmcompress.evals.report.pareto_figure`."""
    lines = [ln for ln in first_table(table).splitlines() if ln.startswith("|")]
    col = {h: i for i, h in enumerate(_cells(lines[0]))}
    rows = []
    for cells in map(_cells, lines[2:]):
        acc, _, se = cells[col["accuracy"]].partition("±")
        rows.append({"task": task, "method": cells[col["method"]].split(" (")[0], "keep": cells[col["keep"]],
                     "tokens": float(cells[col["tokens"]]), "accuracy": float(acc), "stderr": float(se),
                     "prefill_ms": float(cells[col["prefill ms"]]), "compress_ms": float(cells[col["compress ms"]])})
    return rows


def replot(bench_doc: str, path: Path, n: int = 500) -> None:
    """Draw ``pareto.png``'s figure from docs/benchmark.md's make-bench table into `path`."""
    import matplotlib.pyplot as plt
    from mmcompress.evals.report import pareto_figure

    rows = table_rows(get_block(bench_doc, "make-bench table"))
    for r in rows:
        r["n"] = n
    fig = pareto_figure(rows)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(readme: str, bench_doc: str, list_output: str, summary_md: str | None = None) -> tuple[str, str]:
    """(README, docs/benchmark.md) with every generated block rewritten."""
    if summary_md is not None:
        bench_doc = set_block(bench_doc, "make-bench table", bench_table(summary_md))
    readme = set_block(readme, "catalogue", catalogue_markdown(list_output))
    readme = set_block(readme, "headline", headline_markdown(get_block(bench_doc, "make-bench table")))
    return readme, bench_doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", type=Path, default=None, help="a `mmcompress bench` --out folder (e.g. runs/bench)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a block is out of date")
    p.add_argument("--replot", action="store_true",
                   help="draw docs/bench_pareto.png from docs/benchmark.md's first table (no run folder at hand)")
    args = p.parse_args(argv)
    summary = None
    if args.bench is not None:
        summary = (args.bench / "summary.md").read_text()
    readme, doc = README.read_text(), BENCH_DOC.read_text()
    new_readme, new_doc = render(readme, doc, run_list(), summary)
    stale = [str(f.relative_to(ROOT)) for f, a, b in ((README, readme, new_readme), (BENCH_DOC, doc, new_doc))
             if a != b]
    if args.check:
        print("out of date: " + ", ".join(stale) if stale else "up to date")
        return 1 if stale else 0
    README.write_text(new_readme)
    BENCH_DOC.write_text(new_doc)
    if args.bench is not None and (args.bench / "pareto.png").exists():
        shutil.copyfile(args.bench / "pareto.png", PLOT)
    elif args.replot:
        replot(new_doc, PLOT)
    print("rewrote: " + ", ".join(stale) if stale else "already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
