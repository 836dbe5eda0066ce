"""MMCOMPRESS_KERNELS dispatch: each path is taken where it should be, and tome's result does not depend on it."""

import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from mmcompress.kernels import dispatch  # noqa: E402

import mmcompress as mmc  # noqa: E402
from mmcompress.compressors import tome as tome_mod  # noqa: E402


def test_auto_is_torch_on_cpu_and_torch_flag_wins(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.setenv("MMCOMPRESS_KERNELS", "auto")
    assert dispatch.use_triton(x) is False
    monkeypatch.setenv("MMCOMPRESS_KERNELS", "torch")
    assert dispatch.use_triton(x) is False
    monkeypatch.delenv("MMCOMPRESS_KERNELS")
    assert dispatch.kernel_mode() == "auto"


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    monkeypatch.setenv("MMCOMPRESS_KERNELS", "auto")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    fake_cuda = SimpleNamespace(device=torch.device("cuda"))  # only .device is read
    assert dispatch.use_triton(fake_cuda) is True
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.use_triton(fake_cuda) is False


def test_bad_flag_names_the_variable(monkeypatch):
    monkeypatch.setenv("MMCOMPRESS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MMCOMPRESS_KERNELS"):
        dispatch.use_triton(torch.zeros(1))


def test_triton_flag_on_cpu_without_interpreter_refuses(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("MMCOMPRESS_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.use_triton(torch.zeros(1))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_tome_takes_the_flagged_path_and_agrees(monkeypatch):
    pytest.importorskip("triton")
    calls = []
    real = tome_mod.best_match_triton
    monkeypatch.setattr(tome_mod, "best_match_triton", lambda a, b: calls.append(a.shape) or real(a, b))
    x = torch.randn(2, 37, 24, generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("MMCOMPRESS_KERNELS", "torch")
    ref = mmc.create("tome", keep=9)(x)
    assert calls == []
    monkeypatch.setenv("MMCOMPRESS_KERNELS", "triton")
    got = mmc.create("tome", keep=9)(x)
    assert len(calls) >= 2  # keep < N/2: several rounds, each through the kernel
    assert torch.equal(got.assign, ref.assign)
    torch.testing.assert_close(got.x, ref.x)
    torch.testing.assert_close(got.size, ref.size)
