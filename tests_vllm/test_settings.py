"""The plugin's settings and budgets (no engine): precedence, refusals, and the budget equal to the compressors' own
output count."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
import mmcompress.vllm_plugin as vp


@pytest.mark.parametrize("keep", [1, 3, 7, 0.1, 0.25, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("n", [1, 5, 16, 37])
def test_budget_is_the_compressors_count(n, keep):
    if isinstance(keep, int) and keep > n:
        assert vp.budget(n, keep) == n
        return
    out = mmc.create("uniform", keep=keep)(torch.randn(1, n, 4))
    assert vp.budget(n, keep) == out.x.shape[1]


@pytest.mark.parametrize("method,prefix", [("visionzip", 1), ("prunesid", 1), ("prumerge", 0), ("tome", 1)])
@pytest.mark.parametrize("keep", [1, 6, 0.25, 0.5, 0.99])
def test_budget_with_a_prefix_is_the_compressors_count(method, prefix, keep):
    """With a CLS prefix (counted in keep by VisionZip and PruneSID), the planned placeholders equal the tokens the
    compressor outputs: prefix + budget."""
    n = 16
    k = vp.budget(n, keep, method, prefix)
    if k >= n:
        return
    x = torch.randn(1, prefix + n, 8)
    out = mmc.create(method, keep=keep)(x, grid=(4, 4), prefix=prefix, scores=torch.rand(1, prefix + n),
                                        metric=torch.randn(1, prefix + n, 4))
    assert prefix + k == out.x.shape[1]


@pytest.mark.parametrize("method", ["visionzip", "prumerge", "cdpruner", "text_recovery", "dycoke", "holitom"])
def test_scored_text_and_video_methods_are_accepted(method):
    assert vp.resolve(None, {"mmcompress_method": method, "mmcompress_keep": 0.5}) == vp.Setting(method, 0.5)


def test_precedence(monkeypatch):
    class Cfg:
        mmcompress = {"method": "divprune", "keep": 0.5}

    monkeypatch.setenv("MMCOMPRESS_METHOD", "tome")
    monkeypatch.setenv("MMCOMPRESS_KEEP", "8")
    assert vp.resolve(None) == vp.Setting("tome", 8)
    assert vp.resolve(Cfg()) == vp.Setting("divprune", 0.5)
    assert vp.resolve(Cfg(), {"mmcompress_keep": 0.25}) == vp.Setting("divprune", 0.25)
    assert vp.resolve(Cfg(), {"mmcompress_method": "pool", "mmcompress_keep": 0.25}) == vp.Setting("pool", 0.25)
    assert not vp.resolve(None, {"mmcompress_method": None, "mmcompress_keep": 1.0}).active
    monkeypatch.delenv("MMCOMPRESS_METHOD")
    monkeypatch.delenv("MMCOMPRESS_KEEP")
    assert not vp.resolve(None).active


@pytest.mark.parametrize("req,err,words", [
    ({"mmcompress_method": "tome", "mmcompress_keep": "auto"}, ValueError, "data-dependent"),
    ({"mmcompress_method": "tome", "mmcompress_keep": 0}, ValueError, ">= 1"),
    ({"mmcompress_method": "tome", "mmcompress_keep": 1.5}, ValueError, "(0, 1]"),
    ({"mmcompress_method": "tome", "mmcompress_keep": [1]}, TypeError, "keep"),
    ({"mmcompress_method": "fastv", "mmcompress_keep": 0.5}, ValueError, "inside the LLM"),
    ({"mmcompress_method": "pdrop", "mmcompress_keep": 0.5}, ValueError, "inside the LLM"),
    ({"mmcompress_method": "flashvid", "mmcompress_keep": 0.5}, ValueError, "inside the LLM"),  # its in-LLM stage
    ({"mmcompress_method": "trio_encoder", "mmcompress_keep": 96}, ValueError, "several vision blocks"),
    ({"mmcompress_method": "tomee", "mmcompress_keep": 0.5}, ValueError, "did you mean"),
    ({"mmcompress_keep": 0.5}, ValueError, "without a compressor"),
])
def test_refusals_name_the_setting(req, err, words):
    with pytest.raises(err, match="mm_processor_kwargs") as e:
        vp.resolve(None, req)
    assert words in str(e.value)


def test_hf_overrides_checked():
    class Bad:
        mmcompress = {"method": "tome", "kepp": 0.5}

    with pytest.raises(ValueError, match="unknown keys"):
        vp.resolve(Bad())


def test_method_codes_round_trip():
    for name in mmc.available():
        assert vp.method_name(vp.method_code(name)) == name
    assert vp.method_code(None) == -1 and vp.method_name(-1) is None


def test_pixel_stage_setting(monkeypatch):
    """PixelPrune's count comes from the pixels: active without a keep (keep unused, "auto" accepted), its options
    (tau, ...) from the request, the server config or MMCOMPRESS_OPTIONS, checked by the compressor itself; options
    for any other method are refused (its compressor is built in the model from (method, budget) alone)."""
    for k in ("MMCOMPRESS_METHOD", "MMCOMPRESS_KEEP", "MMCOMPRESS_OPTIONS"):
        monkeypatch.delenv(k, raising=False)
    s = vp.resolve(None, {"mmcompress_method": "pixelprune"})
    assert s.active and s.pixels and s.options == ()
    s = vp.resolve(None, {"mmcompress_method": "pixelprune", "mmcompress_keep": "auto",
                          "mmcompress_options": {"tau": 0.05}})
    assert s == vp.Setting("pixelprune", "auto", (("tau", 0.05),), True)

    class Cfg:
        mmcompress = {"method": "pixelprune", "options": {"tau": 0.1, "metric": "mae"}}

    assert vp.resolve(Cfg()).options == (("metric", "mae"), ("tau", 0.1))
    monkeypatch.setenv("MMCOMPRESS_METHOD", "pixelprune")
    monkeypatch.setenv("MMCOMPRESS_OPTIONS", '{"tau": 0.02}')
    assert vp.resolve(None) == vp.Setting("pixelprune", 1.0, (("tau", 0.02),), True)
    with pytest.raises(ValueError, match="before the vision encoder"):
        vp.resolve(None, {"mmcompress_method": "tome", "mmcompress_keep": 0.5, "mmcompress_options": {"tau": 0.1}})
    with pytest.raises(ValueError, match="mmcompress_options|mm_processor_kwargs.*tauu"):
        vp.resolve(None, {"mmcompress_method": "pixelprune", "mmcompress_options": {"tauu": 0.1}})
    with pytest.raises(ValueError, match="tau"):
        vp.resolve(None, {"mmcompress_method": "pixelprune", "mmcompress_options": {"tau": -1}})
    monkeypatch.setenv("MMCOMPRESS_OPTIONS", "{tau: 1")
    with pytest.raises(ValueError, match="JSON"):
        vp.resolve(None)
