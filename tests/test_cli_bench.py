"""`mmcompress bench` as a new user meets it: typos in names and options stop it before any model loads, `--out` at
a file and Ctrl-C end in one line (Ctrl-C names --resume), `--help` shows the defaults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmcompress.cli import check_methods

REPO = Path(__file__).resolve().parents[1]
TASK = "tests.bench_fixtures:ToyTask"


def _bench(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "250"}
    return subprocess.Popen([sys.executable, "-m", "mmcompress", "bench", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


@pytest.mark.parametrize("args, message", [
    (["--methods", "tomee"], "mmcompress bench: methods: unknown method 'tomee'; did you mean 'tome'?"),
    (["--methods", "tome", "--option", "tome:nosuch=1"], "mmcompress bench: option: tome has no option 'nosuch'"),
    (["--methods", "tome", "--option", "tome:match_dtyp=1"], "did you mean 'match_dtype'?"),
    (["--methods", "tome", "--option", "visionzip:epsilon=1"], "option: 'visionzip' is not among --methods"),
])
def test_typos_exit_2_before_any_model_loads(tmp_path, args, message):
    """The model does not even exist: the names are checked first, in one line, and nothing is written (no time
    bound: importing the adapters to learn their options takes a minute on a loaded 2-core machine)."""
    p = _bench("--model", str(tmp_path / "no_model"), "--task", TASK, "--out", str(tmp_path / "out"), *args)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert len(_lines(err)) == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # (a missing model would have been the error had it been loaded first)


def test_check_methods_accepts_what_list_shows_and_the_options_that_exist():
    import mmcompress as mmc

    check_methods(["none", "fastv", *mmc.available()], {"tome": {"match_dtype": "bfloat16", "stage": "projector"},
                                                         "fastv": {"fastv_k": 3}, "random": {"seed": 1}})
    with pytest.raises(ValueError, match="did you mean 'visionzip'"):
        check_methods(["visonzip"], {})
    with pytest.raises(ValueError, match="unknown method 'zzz' \\(`mmcompress list`"):
        check_methods(["zzz"], {})  # nothing close: no suggestion, where to look instead
    with pytest.raises(ValueError, match="fastv has no option 'fastv_kk'; did you mean 'fastv_k'"):
        check_methods(["fastv"], {"fastv": {"fastv_kk": 3}})


def test_out_at_a_file_is_one_line(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    p = _bench("--model", str(tmp_path / "no_model"), "--task", TASK, "--methods", "tome", "--out", str(f))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and _lines(err) == [f"mmcompress bench: out: {f} is a file; --out takes a folder (new, "
                                                 "or a run's folder with --resume)"], err


def test_ctrl_c_is_one_line_naming_resume(tmp_path):
    from tests.bench_fixtures import save_tiny_llava

    model, out = save_tiny_llava(tmp_path / "m"), tmp_path / "run"
    p = _bench("--model", str(model), "--task", "tests.bench_fixtures:SlowToyTask", "--methods", "tome,pool,uniform",
               "--keep", "0.5,0.25", "--limit", "0", "--batch-size", "1", "--threads", "1", "--no-progress",
               "--out", str(out),  # 0.2 s per image: still busy when interrupted, on any machine
               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell's `cmd &` ignores SIGINT
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not list(out.glob("parts/*/*.jsonl")):
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert _lines(err)[-1] == (f"mmcompress bench: interrupted; the finished samples are kept in {out}; add --resume "
                               "to the same command to continue"), err
    assert not (out / "summary.csv").exists()


def test_help_shows_the_defaults():
    p = _bench("--help")
    text, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    for default in ("(default: ref-vlm)", "(default: easyvqa)", "(default: none,random,tome,visionzip)",
                    "(default: 0.5,0.25,0.125)", "(default: 500)", "(default: 16)", "(default: runs/bench)"):
        assert default in text, default
    assert "(default: None)" not in text and "(default: False)" not in text
