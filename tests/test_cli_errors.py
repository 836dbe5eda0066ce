"""`mmcompress bench` mistakes end in one line (exit 2) and leave `--out` as it was: a misspelt model, a hub id the
machine cannot reach, a folder without a model, `--limit -5`, `--device cuda` on a CPU-only torch, and budgets that no
setting can run. A folder holding only the config of a run that never got to its first sample counts as empty."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mmcompress.evals.runner import BenchConfig, run

from mmcompress.cli import check_device
from mmcompress.zoo import check_model
from tests.bench_fixtures import save_tiny_llava

REPO = Path(__file__).resolve().parents[1]
TASK = "tests.bench_fixtures:ToyTask"
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


def _bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env = {**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_ENDPOINT": CLOSED, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mmcompress", "bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _cfg(model, out: Path, **kw) -> BenchConfig:
    kw = {"tasks": [TASK], "methods": ["tome"], "keeps": [0.5], "batch_size": 8, "limit": 8, "progress": False, **kw}
    return BenchConfig(model=str(model), out=out, **kw)


# ---- item 1: nothing is written before the first sample; a config without samples counts as empty -------------
@pytest.mark.parametrize("case", ["no_model_dir", "folder_without_model", "limit", "device"])
def test_a_run_that_fails_before_its_first_sample_writes_nothing(tmp_path, case):
    out = tmp_path / "out"
    model = tmp_path / "no_model"
    kw = {}
    if case == "folder_without_model":
        model.mkdir()
        (model / "notes.txt").write_text("no weights here")
    elif case == "limit":
        kw["limit"] = -5
    elif case == "device":
        pytest.importorskip("transformers")
        kw["device"] = "cuda:99"
        model = save_tiny_llava(tmp_path / "tiny")
    with pytest.raises((ValueError, RuntimeError, AssertionError)):
        run(_cfg(model, out, **kw))
    assert not out.exists(), sorted(out.rglob("*"))


@pytest.mark.parametrize("resume", [False, True])
def test_a_config_without_samples_counts_as_empty(tiny_dir, tmp_path, resume):
    """What a failed run with another model left behind (config.json, an empty part file) blocks neither the
    corrected command nor --resume; the run's own config replaces it."""
    out = tmp_path / "out"
    (out / "parts" / "toy").mkdir(parents=True)
    (out / "parts" / "toy" / "none@1.rank0.jsonl").write_text("")
    (out / "config.json").write_text(json.dumps({"identity": {"model": "ref-vlm-mni", "weights": "ref-vlm-mni"}}))
    res = run(_cfg(tiny_dir, out, resume=resume))
    assert all(r["n"] == 8 for r in res["summary"])
    assert json.loads((out / "config.json").read_text())["identity"]["model"] == str(tiny_dir)
    # once it holds samples, the folder is a run: refused without --resume, and with other settings
    with pytest.raises(ValueError, match="already holds a run"):
        run(_cfg(tiny_dir, out))
    with pytest.raises(ValueError, match="different settings"):
        run(_cfg(tiny_dir, out, limit=4, resume=True))


def test_samples_without_a_config_are_refused(tiny_dir, tmp_path):
    out = tmp_path / "out"
    (out / "parts" / "toy").mkdir(parents=True)
    (out / "parts" / "toy" / "none@1.rank0.jsonl").write_text('{"id": "q0"}\n')
    with pytest.raises(ValueError, match="holds samples but no config.json"):
        run(_cfg(tiny_dir, out, resume=True))


# ---- item 4: budgets that no setting can run ---------------------------------------------------------------------
def test_keep_above_the_token_count_is_an_error_before_any_sample(tiny_dir, tmp_path):
    out = tmp_path / "out"  # the tiny LLaVA gives 16 image tokens
    with pytest.raises(ValueError, match=r"nothing to compare on toy: none of the \d+ compressed settings can run "
                                         r"\(random@100: keep: 100 tokens asked"):
        run(_cfg(tiny_dir, out, methods=["tome"], keeps=[100, 64]))
    assert not out.exists()


def test_settings_that_cannot_run_are_skipped_beside_those_that_can(tiny_dir, tmp_path, capsys):
    res = run(_cfg(tiny_dir, tmp_path / "out", keeps=[100, 0.5]))
    assert {"toy random@100", "toy tome@100"} <= set(res["skipped"])
    assert all(k.endswith("@100") for k in res["skipped"]), res["skipped"]
    rows = {(r["method"], r["keep"]) for r in res["summary"]}
    assert {("none", "1"), ("random", "0.5"), ("tome", "0.5")} <= rows
    assert not {("random", "100"), ("tome", "100")} & rows
    err = capsys.readouterr().err
    assert err.count("skipping toy random@100") == 1 and err.count("skipping toy tome@100") == 1, err


# ---- item 2: a model name that is neither built in nor a folder --------------------------------------------------
def test_check_model_names_what_it_got(tmp_path):
    assert check_model("ref-vlm-mini", ["ref-vlm", "ref-vlm-mini"]) == "builtin"
    with pytest.raises(ValueError, match=r"'ref-vlm-mni' is neither a built-in name .*did you mean 'ref-vlm-mini'"):
        check_model("ref-vlm-mni", ["ref-vlm", "ref-vlm-mini"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        check_model(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert check_model(str(tmp_path / "empty")) == "dir"
    with pytest.raises(ValueError, match="is a file"):
        check_model(str(tmp_path / "empty" / "config.json"))


def test_hub_id_offline_never_asks_the_hub(monkeypatch):
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("the hub was asked although HF_HUB_OFFLINE=1")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", boom)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set, so the hub is not asked"):
        check_model("nope/nope-model")


def test_hub_id_with_a_silent_hub_fails_within_the_timeout(monkeypatch):
    """A hub that accepts the connection and never answers: one try, bounded by `hub_timeout`, no retries."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)  # connections wait in the backlog, unanswered
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=r"hub is unreachable .*HF_HUB_OFFLINE=1") as e:
            check_model("nope/nope-model", hub_timeout=1.0)
        assert time.perf_counter() - t0 < 10
    assert len(str(e.value).splitlines()) == 1


# ---- item 3: devices ---------------------------------------------------------------------------------------------
def test_check_device():
    check_device("cpu")
    with pytest.raises(ValueError, match="device: 'cdua' is not a torch device"):
        check_device("cdua")
    with pytest.raises(ValueError, match="device: 'cuda:99'"):
        check_device("cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' asked, but"):
            check_device("cuda")


# ---- the command line: one line, exit 2, --out untouched ---------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--model", "ref-vlm-mni"], "mmcompress bench: model: 'ref-vlm-mni' is neither a built-in name (ref-vlm, "
                                 "ref-vlm-mini, whisper-tiny.en, dinov2-s14), an existing folder, nor a hub id "
                                 "(owner/name); did you mean 'ref-vlm-mini'"),
    (["--model", "nope/nope-model"], "the Hugging Face hub is unreachable"),
    (["--limit", "-5"], "mmcompress bench: limit: expected 0 (all) or a positive number of samples per task, got -5"),
    (["--device", "cuda:99"], "mmcompress bench: device: 'cuda:99'"),
    (["--threads", "-1"], "mmcompress bench: threads:"),
])
def test_cli_mistakes_are_one_line_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = _bench("--model", "ref-vlm-mini", "--task", TASK, "--methods", "tome", "--out", str(out), *args)
    assert r.returncode == 2, r.stderr
    assert len(_lines(r.stderr)) == 1 and message in r.stderr, r.stderr
    assert not out.exists()
    assert time.perf_counter() - t0 < 120  # no minutes of hub retries (a loaded 2-core machine imports slowly)


def test_cli_keep_that_nothing_can_run_is_one_line(tiny_dir, tmp_path):
    out = tmp_path / "out"
    r = _bench("--model", str(tiny_dir), "--task", TASK, "--methods", "tome", "--keep", "100", "--limit", "4",
               "--no-progress", "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert len(_lines(r.stderr)) == 1, r.stderr  # --no-progress: no loading bar either
    assert re.match(r"mmcompress bench: nothing to compare on toy: none of the \d+ compressed settings can run "
                    r"\(random@100: keep: 100 tokens asked but x has only ", r.stderr), r.stderr
    assert not out.exists()
