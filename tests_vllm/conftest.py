"""vLLM engine tests: run by `make test-vllm` in their own venv (.venv-vllm); skipped where vLLM is not importable."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if not HAVE_VLLM:
    collect_ignore_glob = ["test_*.py"]
    print("tests_vllm: vllm is not importable in this environment; skipped (run `make test-vllm`)")


def run_engine(tmp: Path, model: str, calls: list, env: dict | None = None, engine: dict | None = None,
               timeout: int = 2400) -> dict:
    """One vLLM engine (tests_vllm/engine.py in a subprocess) over `calls`; returns its JSON output."""
    job, out = tmp / "job.json", tmp / "out.json"
    job.write_text(json.dumps({"model": model, "engine": engine or {}, "calls": calls}))
    e = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    # own session, so a timeout ends the engine's spawned processes too
    p = subprocess.Popen([sys.executable, str(HERE / "engine.py"), str(job), str(out)], env=e, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    if p.returncode != 0:
        raise RuntimeError(f"engine failed (rc {p.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    """Tiny random models saved once per session: {"qwen2_vl": DIR, "llava": DIR}."""
    sys.path.insert(0, str(HERE))
    import tiny

    root = tmp_path_factory.mktemp("models")
    return {"qwen2_vl": str(tiny.build_qwen2_vl(root / "qwen2_vl")), "llava": str(tiny.build_llava(root / "llava"))}
