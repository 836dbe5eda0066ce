"""`python -m mmcompress.lmms_eval_plugin --tasks-dir` prints the lmms-eval task folder without lmms-eval (e.g. to
check an installed wheel), and the folder holds every shipped task."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TASKS = ("mmc_easyvqa", "mmc_easyvqa_32", "mmc_easyvqa_500", "mmc_detail", "mmc_detail_32", "mmc_detail_500")
# runs the module as `python -m` does, with lmms_eval unimportable whether or not this venv has it
BLOCKED = ("import runpy, sys; sys.modules['lmms_eval'] = None; sys.argv = [{module!r}] + sys.argv[1:]; "
           "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")


@pytest.mark.parametrize("module", ["mmcompress.lmms_eval_plugin", "mmcompress.integrations.lmms_eval"])
def test_tasks_dir_prints_without_lmms_eval(module):
    r = subprocess.run([sys.executable, "-c", BLOCKED.format(module=module), "--tasks-dir"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    folder = Path(r.stdout.strip())
    assert folder == REPO / "evals" / "lmms_tasks"
    for task in TASKS:
        assert (folder / f"{task}.yaml").is_file() and (folder / f"{task}.json").is_file(), task
    bad = subprocess.run([sys.executable, "-c", BLOCKED.format(module=module), "--bogus"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "usage" in bad.stderr, bad.stderr[-2000:]
