"""CLI (`mmcompress list`, `--version`) and the registry (decorator, entry points, did-you-mean).

`list` answers fast because it never imports torch; that is what is asserted (timings belong in benchmarks).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import mmcompress as mmc
from mmcompress import registry
from mmcompress.compressors.base import Compressor, Plan


def test_list_prints_every_compressor_without_torch():
    code = ("import sys; from mmcompress.cli import main; main(['list']); "
            "assert 'torch' not in sys.modules, 'list imported torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names = [line.split()[0] for line in r.stdout.splitlines()[1:]]
    assert set(names) >= {"random", "uniform", "pool", "tome"}
    from mmcompress.catalog import IN_LLM
    assert set(names) == set(mmc.available()) | set(IN_LLM)
    header = r.stdout.splitlines()[0].split()
    assert header[:4] == ["name", "family", "modality", "needs"]


def test_list_prints_the_in_llm_methods_as_their_own_family():
    """fastv, pdrop, dart, sparsevlm prune inside the LLM (through `mmc.apply` only): listed with family "in-LLM"."""
    r = subprocess.run([sys.executable, "-m", "mmcompress", "list"], capture_output=True, text=True, check=True)
    fam = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[1:]}
    for name in ("fastv", "pdrop", "dart", "sparsevlm"):
        assert fam[name] == "in-LLM", r.stdout
    from mmcompress.catalog import IN_LLM
    from mmcompress.hf import IN_LLM as DISPATCHED

    assert set(IN_LLM) == set(DISPATCHED)  # every listed in-LLM name is accepted by mmc.apply, and only those
    assert not set(IN_LLM) & set(mmc.available())  # not compressors: mmc.create does not take them


def test_module_entry_point_and_version():
    r = subprocess.run([sys.executable, "-m", "mmcompress", "--version"], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == f"mmcompress {mmc.__version__}"


def test_register_decorator_makes_a_usable_compressor():
    @mmc.register("test_first_k")
    class FirstK(Compressor):
        family, modality = "baseline", "any"
        select_only = True

        def plan(self, inp, k):
            B, N, _ = inp.x.shape
            idx = torch.arange(k).expand(B, k)
            assign = torch.full((B, N), -1, dtype=torch.long)
            assign[:, :k] = idx
            return Plan(assign=assign, rep=idx)

    try:
        assert "test_first_k" in mmc.available()
        out = mmc.create("test_first_k", keep=3)(torch.randn(2, 10, 4))
        assert out.assign[0].tolist() == [0, 1, 2] + [-1] * 7
    finally:
        registry._REGISTRY.pop("test_first_k")


def test_entry_point_group_is_honoured(monkeypatch):
    class FakeEP:
        name, value = "ext_uniform", "ext:Uniform"

        def load(self):
            return mmc.get("uniform")

    monkeypatch.setattr(registry, "_third_party", lambda: {"ext_uniform": FakeEP()})
    assert "ext_uniform" in mmc.available()
    assert mmc.get("ext_uniform") is mmc.get("uniform")
    registry._REGISTRY.pop("ext_uniform", None)


def test_register_rejects_a_second_class_under_a_taken_name():
    with pytest.raises(ValueError, match="tome"):
        mmc.register("tome")(type("Other", (Compressor,), {}))
