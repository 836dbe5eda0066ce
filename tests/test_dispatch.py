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


# ---- every kernel: which path runs under each flag, through the public entry points --------------------------------
from mmcompress.kernels import attention_rows as rows_mod  # noqa: E402
from mmcompress.kernels import merge as merge_mod  # noqa: E402

from mmcompress.compressors.attention_scores import attention_row_scores  # noqa: E402


def _spy(monkeypatch, module, name, calls, tag):
    """Replace module.name by a wrapper that records `tag` and calls the real function."""
    real = getattr(module, name)

    def wrapper(*a, **kw):
        calls.append(tag)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapper)


def _spy_all(monkeypatch):
    calls = []
    _spy(monkeypatch, tome_mod, "best_match_triton", calls, "match:triton")
    _spy(monkeypatch, merge_mod, "merge_triton", calls, "merge:triton")
    _spy(monkeypatch, merge_mod, "merge_reference", calls, "merge:torch")
    _spy(monkeypatch, merge_mod, "merge_bags", calls, "merge:torch")  # PyTorch too: embedding_bag on CPU
    _spy(monkeypatch, rows_mod, "attention_rows_triton", calls, "rows:triton")
    _spy(monkeypatch, rows_mod, "attention_rows_reference", calls, "rows:torch")
    return calls


def _run_public(seed=0):
    """tome single round (keep > N/2), tome several rounds (keep < N/2), the attention-row scorer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1 + 30, 20, generator=g)
    one = mmc.create("tome", keep=20)(x, prefix=1)
    many = mmc.create("tome", keep=6)(x, prefix=1, size=torch.rand(2, 31, generator=g) + 0.5)
    q, k = torch.randn(2, 31, 2 * 12, generator=g), torch.randn(2, 31, 2 * 12, generator=g)
    scores = attention_row_scores(q, k, rows=[0, 3], num_heads=2)
    return one, many, scores


@pytest.mark.parametrize("flag", ["auto", "torch"])
def test_cpu_auto_and_torch_take_the_references(monkeypatch, flag):
    monkeypatch.setenv("MMCOMPRESS_KERNELS", flag)
    calls = _spy_all(monkeypatch)
    _run_public()
    assert set(calls) == {"merge:torch", "rows:torch"}  # no Triton function was entered
    assert calls.count("merge:torch") >= 3  # one single-round merge + one per round of the multi-round call


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_triton_flag_takes_every_kernel_and_agrees(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("MMCOMPRESS_KERNELS", "torch")
    want = _run_public()
    monkeypatch.setenv("MMCOMPRESS_KERNELS", "triton")
    calls = _spy_all(monkeypatch)
    got = _run_public()
    assert set(calls) == {"match:triton", "merge:triton", "rows:triton"}  # no reference was entered
    for g, w in zip(got[:2], want[:2], strict=True):
        assert torch.equal(g.assign, w.assign) and torch.equal(g.rep, w.rep)
        torch.testing.assert_close(g.x, w.x)
        torch.testing.assert_close(g.size, w.size)
    torch.testing.assert_close(got[2], want[2])


def test_auto_takes_triton_for_cuda_tensors_at_every_entry(monkeypatch):
    """Where use_triton says yes (auto on a CUDA tensor, tested above) each dispatcher calls its Triton function."""
    for mod in (merge_mod, rows_mod):
        monkeypatch.setattr(mod, "use_triton", lambda *t: True)
    calls = []
    monkeypatch.setattr(merge_mod, "merge_triton", lambda *a, **k: calls.append("merge") or "m")
    monkeypatch.setattr(rows_mod, "attention_rows_triton", lambda *a, **k: calls.append("rows") or "r")
    x = torch.zeros(1, 4, 3)
    assert merge_mod.merge_tokens(x, None, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 1).long()) == "m"
    assert merge_mod.merge_tokens(x.double(), None, torch.zeros(1, 2).long(), torch.zeros(1, 1).long()) != "m"
    assert rows_mod.attention_rows(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1).long(),
                                   0.5) == "r"
    assert calls == ["merge", "rows"]  # float64 tokens stay on the reference (the kernel accumulates in float32)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_vit_merging_goes_through_the_merge_kernel(monkeypatch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2,
                                                           num_heads=2, num_classes=0).eval()
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("MMCOMPRESS_KERNELS", "torch")
    with torch.no_grad():
        mmc.apply(vit, "tome", keep=6)
        want = vit.forward_features(px)
        monkeypatch.setenv("MMCOMPRESS_KERNELS", "triton")
        calls = _spy_all(monkeypatch)
        got = vit.forward_features(px)
    mmc.remove(vit)
    assert calls.count("merge:triton") == 2 and "merge:torch" not in calls  # one merge per block
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
