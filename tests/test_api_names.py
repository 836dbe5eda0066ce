"""Names at the Python API: `mmc.create` of an in-LLM method points to `mmc.apply`; the "did you mean" lists of
`mmc.create` and `mmc.apply` include the in-LLM methods; `mmc.apply` twice keeps only the last method, and
`mmc.stats` names it."""

from __future__ import annotations

import pytest
import torch
from llava_tiny import IMG, images, module_model_fixtures, pad, prompt

import mmcompress as mmc
from mmcompress.catalog import IN_LLM

model, _unwrap = module_model_fixtures()


@pytest.mark.parametrize("name", sorted(IN_LLM))
def test_create_of_an_in_llm_method_points_to_apply(name):
    with pytest.raises(ValueError, match=rf"^name: {name} runs inside the LLM: use mmc\.apply\(model, '{name}', "
                                         r"\.\.\.\)"):
        mmc.create(name, keep=0.5)


@pytest.mark.parametrize("typo, meant", [("fastvv", "fastv"), ("pdorp", "pdrop"), ("sparsevml", "sparsevlm"),
                                         ("tomee", "tome")])
def test_did_you_mean_covers_every_method(model, typo, meant):
    for call in (lambda: mmc.create(typo, keep=0.5), lambda: mmc.apply(model, typo, keep=0.5)):
        with pytest.raises(ValueError, match=rf"did you mean '{meant}'") as e:
            call()
        assert all(n in str(e.value) for n in [*IN_LLM, *mmc.available()]), str(e.value)


def _batch() -> dict:
    ids, mask = pad([prompt([16], [10, 11], [12, 13])], "left")
    assert int((ids == IMG).sum()) == 16
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": images(1)}


def test_apply_twice_keeps_the_last_method_and_stats_names_it(model):
    kw = _batch()
    with torch.no_grad():
        mmc.apply(model, "tome", keep=8)
        assert mmc.stats(model)["method"] == "tome"  # named before any forward too
        mmc.apply(model, "uniform", keep=4)  # replaces tome: applying twice equals applying the second once
        twice = model(**kw).logits
        st = mmc.stats(model)
        assert st["method"] == "uniform" and st["keep"] == 4 and st["tokens_out"] == [4], st
        mmc.remove(model)
        mmc.apply(model, "uniform", keep=4)
        assert torch.equal(model(**kw).logits, twice)
        mmc.apply(model, "fastv", keep=0.5)  # an in-LLM method is named as called, not by its encoder-side identity
        model(**kw)
        assert mmc.stats(model)["method"] == "fastv" and mmc.stats(model)["keep"] == 0.5
    assert "applying twice" in mmc.apply.__doc__ and "replaces" in mmc.apply.__doc__
    assert "method" in mmc.stats.__doc__
