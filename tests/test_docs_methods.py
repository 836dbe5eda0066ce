"""docs/methods.md ("every compressor in detail") covers every catalogue method, with its paper, its options, what
`keep` means for it and a fidelity link, and cites only files that the repository holds (links and anchors
resolve)."""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import pytest

from mmcompress import catalog

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methods.md"
LABELS = ("**Paper:**", "**Options:**", "**`keep`:**", "**Fidelity:**")
# In-LLM methods take their options through `mmc.apply` (named after the method), not a class signature.
INLLM_OPTIONS = {
    "fastv": ("fastv_k",),
    "pdrop": ("pdrop_layers", "pdrop_lambda"),
    "dart": ("dart_k", "dart_pivot_image", "dart_pivot_text"),
    "sparsevlm": ("sparsevlm_layers", "sparsevlm_counts", "sparsevlm_recycle"),
}


def sections(text: str) -> dict[str, str]:
    """`### \\`name\\`` heading -> the text up to the next heading of level <= 3."""
    out, name, buf = {}, None, []
    for line in text.splitlines():
        m = re.match(r"^(#{1,3}) ", line)
        if m:
            if name is not None:
                out[name] = "\n".join(buf)
            h = re.match(r"^### `([^`]+)`\s*$", line)
            name, buf = (h.group(1) if h else None), []
        elif name is not None:
            buf.append(line)
    if name is not None:
        out[name] = "\n".join(buf)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading text."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"^#{1,6} (.+)$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    return out


def tracked() -> set[str] | None:
    try:
        r = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(r.stdout.splitlines())


SECTIONS = sections(DOC.read_text())


@pytest.mark.parametrize("name", sorted(catalog.BUILTINS) + sorted(catalog.IN_LLM))
def test_every_catalogue_method_has_its_section(name):
    assert name in SECTIONS, f"docs/methods.md: no `### \\`{name}\\`` section"
    body = SECTIONS[name]
    for label in LABELS:
        assert label in body, f"docs/methods.md, {name}: no {label} line"
    fid = body[body.index("**Fidelity:**"):]
    assert re.search(r"\]\([\w./#-]+\)|`tests/test_\w+\.py", fid), f"{name}: the fidelity line links nothing"


@pytest.mark.parametrize("name", sorted(catalog.BUILTINS))
def test_every_compressor_option_is_documented_with_its_name(name):
    from mmcompress.registry import get

    params = inspect.signature(get(name).__init__).parameters
    opts = [p for p in params if params[p].kind is inspect.Parameter.KEYWORD_ONLY and p != "epsilon"]
    body = SECTIONS.get(name, "")
    for opt in opts:
        assert f"`{opt}=" in body, f"docs/methods.md, {name}: option `{opt}=` is not described"


@pytest.mark.parametrize("name", sorted(INLLM_OPTIONS))
def test_every_inllm_option_is_documented(name):
    body = SECTIONS.get(name, "")
    for opt in INLLM_OPTIONS[name]:
        assert f"`{opt}" in body, f"docs/methods.md, {name}: option `{opt}` is not described"


def test_cited_files_are_in_the_repository_and_links_resolve():
    text = DOC.read_text()
    files = tracked()
    cited = set(re.findall(r"`((?:[\w.-]+/)+[\w.-]+\.(?:md|py|pt|json|csv|png))`", text))
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for target in links:
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        full = (DOC.parent / path).resolve() if path else DOC
        assert full.is_file(), f"docs/methods.md links {target}, which does not exist"
        if anchor:
            assert anchor in anchors(full), f"docs/methods.md links {target}: no such heading in {full.name}"
        cited.add(str(full.relative_to(ROOT)))
    for rel in sorted(cited):
        assert not rel.startswith("runs/"), f"docs/methods.md cites {rel}, a run output the checkout lacks"
        if files is not None:
            assert rel in files, f"docs/methods.md cites {rel}, which the repository does not hold"
        else:
            assert (ROOT / rel).is_file(), f"docs/methods.md cites {rel}, which does not exist"
