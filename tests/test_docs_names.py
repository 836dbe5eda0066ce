"""The docs name what the code has: every built-in `--model` in `bench --help`, docs/benchmark.md and docs/demo.md;
docs/benchmark.md's `make bench` command is the Makefile's; family words in the README's prose are those of
`mmcompress list`."""

from __future__ import annotations

import re
from pathlib import Path

from mmcompress.evals.backends import BUILTIN_MODELS

from mmcompress.catalog import BUILTINS, IN_LLM

ROOT = Path(__file__).resolve().parents[1]


def _bench_help(flag: str) -> str:
    from mmcompress.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return next(a.help for a in sub.choices["bench"]._actions if flag in a.option_strings)


def test_every_builtin_model_is_listed_where_model_is_explained():
    demo_models = ("ref-vlm", "ref-vlm-mini")  # the demo's image tab takes VLMs only
    help_text = _bench_help("--model")
    bench_doc = (ROOT / "docs/benchmark.md").read_text()
    listed = re.search(r"`--model` a built-in name \(([^)]*)\)", bench_doc.replace("\n", " ")).group(1)
    demo_doc = (ROOT / "docs/demo.md").read_text().replace("\n", " ")
    demo_sentence = re.search(r"`--model` takes (.*?) or a local Hugging Face VLM directory", demo_doc).group(1)
    for name in BUILTIN_MODELS:
        assert name in help_text.split(" | "), (name, help_text)
        assert f"`{name}`" in listed, (name, listed)
    for name in demo_models:
        assert f"`{name}`" in demo_sentence, (name, demo_sentence)


def _makefile_bench() -> tuple[str, str]:
    """(BENCH_METHODS expanded, the bench recipe's `mmcompress bench` arguments with $(BENCH_METHODS) expanded)."""
    text = (ROOT / "Makefile").read_text()
    methods = ""
    for m in re.finditer(r"^BENCH_METHODS\s*:?=\s*(.*)$", text, re.M):
        methods = m.group(1).strip().replace("$(BENCH_METHODS)", methods)
    recipe = re.search(r"^bench:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    cmd = re.search(r"mmcompress bench (.*?)(?:\n\t\$\(MAKE\)|\Z)", recipe.replace("\\\n", " "), re.S).group(1)
    return methods, " ".join(cmd.replace("$(BENCH_METHODS)", methods).split())


def test_benchmark_doc_make_bench_command_is_the_makefiles():
    methods, cmd = _makefile_bench()
    assert "sparsevlm" in methods.split(",")
    doc = (ROOT / "docs/benchmark.md").read_text()
    shown = re.search(r"`make bench` runs `mmcompress bench (.*?)`", doc, re.S).group(1)
    assert " ".join(shown.split()) == cmd


def _families() -> dict[str, set[str]]:
    return {name: set(row[1].split(", ")) for name, row in {**BUILTINS, **IN_LLM}.items()}


def test_family_words_in_the_readme_prose_are_those_of_mmcompress_list():
    """A phrase such as "the similarity- and attention-based pruners (`divprune`, `visionzip`)" uses only family
    words of the methods it names, and gives each method one of its own."""
    families = _families()
    words = set().union(*families.values())
    text = (ROOT / "README.md").read_text().replace("\n", " ")
    phrase = re.compile(r"((?:[\w-]+-,? (?:and )?)*[\w-]+)-based [\w ]*?\(((?:`[^`]+`(?:, )?)+)\)")
    checked = 0
    for m in phrase.finditer(text):
        used = {w.strip("-, ") for w in re.split(r",? (?:and )?", m.group(1))} & (words | {"diversity", "query"})
        names = re.findall(r"`([^`]+)`", m.group(2))
        if not used or not all(n in families for n in names):
            continue
        checked += 1
        for n in names:
            assert families[n] & used, f"README calls `{n}` {'/'.join(sorted(used))}; mmcompress list: {families[n]}"
        for w in used:
            assert any(w in families[n] for n in names), f"README: no method in ({m.group(2)}) is {w}-based"
    assert checked, "the README's headline sentence names the pruners' families"
