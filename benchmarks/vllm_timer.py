"""Wall-clock timers on vLLM's encoder step and on the model's layers inside vLLM's processes (for
benchmarks/vllm_serving.py); nothing the model computes is changed.

vLLM's CPU build starts its engine and worker processes with `spawn`, so the timers are installed at interpreter
start: `sitecustomize_dir(folder)` writes a `sitecustomize.py` there that calls `install()`; a server started with
`PYTHONPATH=<folder>:benchmarks` and `MMC_VLLM_TIMES=<prefix>` in its environment (every process it spawns inherits
both) appends one line `kind start_unix_s seconds n` per timed call to `<prefix>.<pid>`:
- `encoder`: vLLM's encoder step (`GPUModelRunner._execute_mm_encoder`: the model's `embed_multimodal`, i.e. the
  vision tower AND, with the mmcompress plugin, the compressor), n = items (images) encoded in that step;
- `vit`, `vit_block`, `merger`: the Qwen2-VL vision tower, each of its blocks, its patch merger; n = patches in;
- `llm_layer`: each decoder layer of the LLM; n = tokens in that step (prefill: the prompt; decode: 1 per request).
On CPU every kernel is synchronous, so a call's wall time is its compute time. The encoder step is patched when vLLM
imports its module (an import hook), the layers by torch's global forward hooks, which time only the classes below.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from pathlib import Path

_RUNNER = "vllm.v1.worker.gpu_model_runner"
_KINDS = {"Qwen2VisionTransformer": "vit", "Qwen2VisionBlock": "vit_block", "Qwen2VisionPatchMerger": "merger",
          "Qwen2DecoderLayer": "llm_layer"}
_kind_of: dict[type, str | None] = {}
_start: dict[int, tuple[float, float]] = {}
_file = None


def _write(kind: str, t0: float, dt: float, n: int) -> None:
    global _file
    if _file is None:  # one file per process, opened where the first call is timed
        _file = open(f"{os.environ['MMC_VLLM_TIMES']}.{os.getpid()}", "a", buffering=1)
    _file.write(f"{kind} {t0:.6f} {dt:.6f} {n}\n")


def _kind(mod) -> str | None:
    t = type(mod)
    if t not in _kind_of:
        _kind_of[t] = next((_KINDS[c.__name__] for c in t.__mro__ if c.__name__ in _KINDS), None)
    return _kind_of[t]


def _pre(mod, args):
    if _kind(mod) is not None:
        _start[id(mod)] = (time.time(), time.perf_counter())


def _post(mod, args, out):
    kind = _kind(mod)
    if kind is None or id(mod) not in _start:
        return
    t0, p0 = _start.pop(id(mod))
    x = args[1] if kind == "llm_layer" else args[0]  # decoder layer(positions, hidden [T, C], residual)
    _write(kind, t0, time.perf_counter() - p0, int(x.shape[0]) if hasattr(x, "shape") else -1)


def _patch(gmr) -> None:
    """Time `GPUModelRunner._execute_mm_encoder` (module `gmr`) and register the global layer hooks."""
    import torch

    run = gmr.GPUModelRunner._execute_mm_encoder

    def timed(self, scheduler_output):
        t0, p0 = time.time(), time.perf_counter()
        out = run(self, scheduler_output)
        if out:
            _write("encoder", t0, time.perf_counter() - p0, len(out))
        return out

    gmr.GPUModelRunner._execute_mm_encoder = timed
    torch.nn.modules.module.register_module_forward_pre_hook(_pre)
    torch.nn.modules.module.register_module_forward_hook(_post)


class _Finder(importlib.abc.MetaPathFinder):
    """Patches vLLM's model-runner module right after it is executed (once per process)."""

    def find_spec(self, name, path, target=None):
        if name != _RUNNER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Arm the timers in this process if `MMC_VLLM_TIMES` is set (vLLM's runner module not imported yet)."""
    if "MMC_VLLM_TIMES" in os.environ and not any(isinstance(f, _Finder) for f in sys.meta_path):
        if _RUNNER in sys.modules:
            _patch(sys.modules[_RUNNER])
        else:
            sys.meta_path.insert(0, _Finder())


def sitecustomize_dir(folder: Path) -> Path:
    """Write `folder`/sitecustomize.py, which installs the timers in every process started with it on PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text("import vllm_timer\n\nvllm_timer.install()\n")
    return folder
