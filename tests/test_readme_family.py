"""docs/models.md's "Add a model family" example runs as written and is the description that ships."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import mmcompress as mmc

ROOT = Path(__file__).resolve().parents[1]


def _readme_block() -> str:
    text = (ROOT / "docs/models.md").read_text()
    section = text[text.index("## Add a model family"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_family_example_runs_and_matches_the_shipped_description():
    from family_tiny import SPECS, batch, build

    code = _readme_block()
    shipped = (ROOT / "mmcompress/hf/families.py").read_text()
    start = code.index("@register_family")
    assert code[start:].strip() in shipped  # the docs show the real thing, not a copy that can drift
    mmc.hf.supported_model_types()  # built-in descriptions first, so the docs' registration is the last
    ns: dict = {}
    exec(compile(code, "docs/models.md", "exec"), ns)  # registers PaliGemma's description (again)
    adapter_cls = ns["PaliGemmaFamily"].adapter
    spec = SPECS["paligemma"]
    model = build("paligemma")
    kw = batch(spec, [spec.sample(0)])
    with torch.no_grad():
        ref = model(**kw).logits
        mmc.apply(model, "visionzip", keep=0.25)  # attention scores from the description's capture
        assert type(model.__dict__["_mmcompress_adapter"]) is adapter_cls
        out = model(**kw).logits
        st = mmc.stats(model)
        assert st["tokens_in"] == [64] and st["tokens_out"] == [16] and out.shape[1] == ref.shape[1] - 48
        assert model.generate(**kw, max_new_tokens=2, do_sample=False).shape[1] == kw["input_ids"].shape[1] + 2
        mmc.remove(model)
        assert torch.equal(model(**kw).logits, ref)
