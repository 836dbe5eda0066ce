"""The README's generated tables equal what `scripts/readme_tables.py` writes from `mmcompress list` and the bench."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
from script_module import load_script

ROOT = Path(__file__).resolve().parents[1]
rt = load_script("scripts/readme_tables.py")


def test_readme_catalogue_is_what_mmcompress_list_prints():
    listed = rt.run_list()
    block = rt.get_block((ROOT / "README.md").read_text(), "catalogue")
    assert block == rt.catalogue_markdown(listed), "README out of date: run python scripts/readme_tables.py"
    names = {row[0] for row in rt.list_rows(listed) if row[1] != "third-party"}
    assert {ln.split("`")[1] for ln in block.splitlines()[2:]} == names  # every listed name, nothing else


def test_readme_headline_is_the_make_bench_table_pivoted():
    doc = (ROOT / "docs/benchmark.md").read_text()
    block = rt.get_block((ROOT / "README.md").read_text(), "headline")
    assert block == rt.headline_markdown(rt.get_block(doc, "make-bench table"))


def test_check_mode_reports_a_stale_readme(tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    shutil.copy(ROOT / "docs/benchmark.md", tmp_path / "benchmark.md")
    monkeypatch.setattr(rt, "ROOT", tmp_path)
    monkeypatch.setattr(rt, "README", readme)
    monkeypatch.setattr(rt, "BENCH_DOC", tmp_path / "benchmark.md")
    assert rt.main(["--check"]) == 0
    readme.write_text(readme.read_text().replace("| `tome` |", "| `tomee` |"))
    assert rt.main(["--check"]) == 1
    assert "out of date: README.md" in capsys.readouterr().out
    assert rt.main([]) == 0 and rt.main(["--check"]) == 0  # a rewrite repairs it


def _summary_md(rows):
    from mmcompress.evals import report

    full = []
    for r in rows:
        d = {"task": "easyvqa", "metric": "accuracy", "n": 4, "complete": True, "encode_ms": 1.0, "decode_ms": 1.0,
             "peak_mem_mb": 0.0, "metrics": "", "value": r["accuracy"], "within_2se_of_random": False,
             "delta_vs_random": float("nan"), "at_budget": "" if r["method"] == "none" else True,
             "prefill_gflops": float("nan"), "flops_ratio": float("nan"), "budget_tokens": r["tokens"], **r}
        full.append(d)
    base = full[0]
    rand = {r["keep"]: r for r in full if r["method"] == "random"}
    for r in full:
        r["pct_of_none"] = r["accuracy"] / base["accuracy"]
        r["prefill_ratio"] = r["prefill_ms"] / base["prefill_ms"]
        if r["method"] not in ("none", "random"):
            d = r["accuracy"] - rand[r["keep"]]["accuracy"]
            r["delta_vs_random"] = d
            r["within_2se_of_random"] = abs(d) < 2 * math.hypot(r["stderr"], rand[r["keep"]]["stderr"])
    return report._markdown(full, {}, {}, "ref-vlm")


def test_bench_run_rewrites_the_doc_table_and_the_headline(tmp_path, monkeypatch):
    """A new `make bench` (any method list) flows into docs/benchmark.md and the README's headline by one command."""
    rows = [
        {"method": "none", "keep": "1", "tokens": 64.0, "accuracy": 0.9, "stderr": 0.01, "prefill_ms": 100.0,
         "compress_ms": 0.0},
        {"method": "random", "keep": "0.5", "tokens": 32.0, "accuracy": 0.7, "stderr": 0.02, "prefill_ms": 50.0,
         "compress_ms": 0.1},
        {"method": "random", "keep": "0.25", "tokens": 16.0, "accuracy": 0.6, "stderr": 0.02, "prefill_ms": 30.0,
         "compress_ms": 0.1},
        {"method": "newmethod", "keep": "0.5", "tokens": 32.0, "accuracy": 0.89, "stderr": 0.01, "prefill_ms": 60.0,
         "compress_ms": 0.2},
        {"method": "newmethod", "keep": "0.25", "tokens": 16.0, "accuracy": 0.62, "stderr": 0.02,
         "prefill_ms": 40.0, "compress_ms": 0.2},
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.md").write_text(_summary_md(rows))
    (run / "pareto.png").write_bytes(b"png")
    (tmp_path / "docs").mkdir()
    readme, doc, plot = tmp_path / "README.md", tmp_path / "docs/benchmark.md", tmp_path / "docs/plot.png"
    shutil.copy(ROOT / "README.md", readme)
    shutil.copy(ROOT / "docs/benchmark.md", doc)
    for k, v in {"ROOT": tmp_path, "README": readme, "BENCH_DOC": doc, "PLOT": plot}.items():
        monkeypatch.setattr(rt, k, v)
    assert rt.main(["--bench", str(run)]) == 0
    table = rt.get_block(doc.read_text(), "make-bench table")
    row = next(line for line in table.splitlines() if line.startswith("| newmethod | 0.5 |"))
    assert row.startswith("| newmethod | 0.5 | 32.0 | yes |") and "| 0.890 ± 0.010 |" in row, row
    head = rt.get_block(readme.read_text(), "headline").splitlines()
    assert head[0] == ("| method (none: 0.900 ± 0.010 at 64 tokens) | 50%: 32 tokens, prefill ×0.55 | "
                       "25%: 16 tokens, prefill ×0.35 |")
    assert head[2:] == ["| random | 0.700 ± 0.020 | 0.600 ± 0.020 |",
                        "| newmethod | **0.890 ± 0.010** | 0.620 ± 0.020 |"]  # bold: > 2 SE above random
    assert plot.read_bytes() == b"png"
    assert rt.main(["--check"]) == 0


def test_missing_markers_name_the_block():
    with pytest.raises(ValueError, match="catalogue"):
        rt.get_block("no markers here", "catalogue")


# pages other pages link to that are written alongside them; a link to one of these may precede the page itself
PENDING: set[str] = set()  # pages linked before they exist (none now)


def test_links_between_readme_and_docs_resolve():
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
            if not dest.exists():
                if rel not in PENDING:
                    broken.append(f"{page.name}: {target}")
                continue
            if anchor and dest.suffix == ".md":
                from tests.test_docs_methods import anchors  # GitHub's slugs, duplicates numbered -1, -2, ...

                if anchor not in anchors(dest):
                    broken.append(f"{page.name}: {target} (no heading #{anchor})")
    assert not broken, broken


def test_replot_reads_back_the_doc_table(tmp_path):
    doc = (ROOT / "docs/benchmark.md").read_text()
    rows = rt.table_rows(rt.get_block(doc, "make-bench table"))
    none = next(r for r in rows if r["method"] == "none")
    line = next(ln for ln in rt.get_block(doc, "make-bench table").splitlines() if ln.startswith("| none |"))
    acc, se = re.search(r"\| ([\d.]+) ± ([\d.]+) \|", line).groups()  # the first table's none row, read by hand
    tokens = float(line.split("|")[3])  # method | keep | tokens | ...
    assert tokens == 144.0  # ref-vlm-mini's image tokens uncompressed
    assert (none["tokens"], none["accuracy"], none["stderr"]) == (tokens, float(acc), float(se))
    assert len(rows) == len(rt.first_table(rt.get_block(doc, "make-bench table")).splitlines()) - 2
    rt.replot(doc, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_headline_bolds_only_rows_at_their_budget():
    """An in-LLM row whose mean tokens over the layers exceed the budget is never bold (it shows its tokens), even
    when it beats random; a skipped setting says so (was: bold, and a blank cell)."""
    base = {"stderr": 0.01, "prefill_ms": 50.0, "compress_ms": 0.0}
    rows = [{"method": "none", "keep": "1", "tokens": 64.0, "accuracy": 0.9, **base},
            {"method": "random", "keep": "0.5", "tokens": 32.0, "accuracy": 0.6, **base},
            {"method": "random", "keep": "0.25", "tokens": 16.0, "accuracy": 0.5, **base},
            {"method": "inllm", "keep": "0.5", "tokens": 48.0, "accuracy": 0.85, **base, "at_budget": False},
            {"method": "inllm", "keep": "0.25", "tokens": 16.0, "accuracy": 0.8, **base},
            {"method": "other", "keep": "0.5", "tokens": 32.0, "accuracy": 0.8, **base}]
    head = rt.headline_markdown(rt.bench_table(_summary_md(rows))).splitlines()
    assert head[3] == "| inllm | 0.850 ± 0.010 (↑48 tokens) | **0.800 ± 0.010** |", head
    assert head[4] == "| other | **0.800 ± 0.010** | skipped |", head
