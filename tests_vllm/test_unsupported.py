"""An architecture the plugin does not compress (a tiny random LLaVA-NeXT-Video) refuses active settings instead of
serving uncompressed: a server setting fails at engine start, a per-request one fails that request while the engine
keeps serving; both name the architecture and list the supported ones. Inactive settings (keep 1) serve as plain
vLLM."""

from __future__ import annotations

import pytest
import tiny
from conftest import run_engine

from mmcompress.vllm_plugin import SUPPORTED

ARCH = "LlavaNextVideoForConditionalGeneration"
A = {"prompt": tiny.prompt(seed=0, placeholder="<|video_pad|>"), "videos": [[5, 4, 224, 224]]}


kw = tiny.request_kw


CALLS = {"plain": [A], "tome": [dict(A, **kw("tome", 0.25))], "keep1": [dict(A, **kw("tome", 1.0))],
         "after": [A]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    assert ARCH not in SUPPORTED, "pick another unsupported family for this test"
    return str(tiny.build_llava_next(tmp_path_factory.mktemp("nv") / "model", family="llava_next_video"))


def _names_arch_and_supported(msg: str) -> None:
    assert ARCH in msg and "does not support" in msg, msg[-2000:]
    for arch in SUPPORTED:
        assert arch in msg, arch


def test_request_setting_refused_and_engine_keeps_serving(model, tmp_path):
    got = dict(zip(CALLS, run_engine(tmp_path, model, list(CALLS.values()))["results"], strict=True))
    assert "error" in got["tome"]
    _names_arch_and_supported(got["tome"]["error"])
    assert got["after"] == got["plain"]  # served after the refusal, unchanged
    assert got["keep1"] == got["plain"]  # keep 1 is no compression: served
    assert tiny.token_id("<|video_pad|>") in got["plain"][0]["prompt_token_ids"]


def test_server_setting_refused_at_engine_start(model, tmp_path):
    with pytest.raises(RuntimeError) as e:
        run_engine(tmp_path, model, [[A]], engine={"hf_overrides": {"mmcompress": {"method": "tome", "keep": 0.5}}})
    _names_arch_and_supported(str(e.value))
