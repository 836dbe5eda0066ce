"""Generation settings (mmcompress/evals/generation.py): one decoding path for `mmcompress bench --gen-kwargs` and the
lmms-eval model, through `VLMBackend.predict`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mmcompress.evals.generation import GenerationSettings, batch_seed, parse_gen_kwargs

from tests.bench_fixtures import ToyTask, save_tiny_llava

REPO = Path(__file__).resolve().parent.parent


def test_lmms_eval_keys_read_as_lmms_eval_means_them():
    greedy = GenerationSettings.from_kwargs({"max_new_tokens": 5, "temperature": 0, "top_p": 1.0, "num_beams": 1,
                                             "do_sample": False, "until": []})
    assert greedy.greedy and greedy.max_new_tokens == 5 and greedy.top_p is None  # top_p beside temperature 0: greedy
    assert greedy.generate_kwargs() == {"do_sample": False, "num_beams": 1}
    sampled = GenerationSettings.from_kwargs({"temperature": 0.7, "top_p": 0.9, "top_k": 5, "until": "\n"})
    assert sampled.do_sample and not sampled.greedy and sampled.until == ("\n",)
    assert sampled.generate_kwargs() == {"do_sample": True, "num_beams": 1, "temperature": 0.7, "top_p": 0.9,
                                         "top_k": 5}
    assert GenerationSettings.from_kwargs({"do_sample": "true"}).generate_kwargs()["temperature"] == 1.0
    assert GenerationSettings.from_kwargs({"num_beams": 3}).generate_kwargs() == {"do_sample": False, "num_beams": 3}
    assert GenerationSettings.from_kwargs(None) == GenerationSettings()
    assert sampled.cut("red. blue\nno") == "red. blue" and GenerationSettings(until=(".", " ")).cut("red. x") == "red"


@pytest.mark.parametrize(("kwargs", "word"), [
    ({"temprature": 0.7}, "temprature"), ({"num_beams": 0}, "num_beams"), ({"num_beams": 1.5}, "num_beams"),
    ({"top_p": 1.5, "temperature": 1}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"do_sample": "maybe"}, "do_sample"), ({"temperature": "hot"}, "temperature"), ({"top_k": 0, "do_sample": 1},
                                                                                     "top_k"),
])
def test_bad_settings_name_the_key(kwargs, word):
    with pytest.raises(ValueError, match=word):
        GenerationSettings.from_kwargs(kwargs)


def test_gen_kwargs_text_is_lmms_evals_format():
    assert parse_gen_kwargs("temperature=0.7,top_p=0.9,do_sample=true,until=.") == {
        "temperature": 0.7, "top_p": 0.9, "do_sample": True, "until": "."}
    assert parse_gen_kwargs("") == {}
    with pytest.raises(ValueError, match="gen_kwargs"):
        parse_gen_kwargs("temperature")


def test_batch_seed_depends_on_the_batch_and_the_settings():
    s = GenerationSettings.from_kwargs({"temperature": 0.7})
    assert batch_seed(["a", "b"], s) == batch_seed(["a", "b"], s)
    assert batch_seed(["a", "b"], s) != batch_seed(["b", "a"], s)
    assert batch_seed(["a", "b"], s) != batch_seed(["a", "b"], GenerationSettings.from_kwargs({"temperature": 0.8}))


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from mmcompress.evals.backends import load_backend

    return load_backend(str(save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))), "image")


def test_predict_decodes_as_the_settings_say(backend):
    """Greedy by default; beams with `random` (each beam's row keyed by its sample: one id per row) count one
    sample's tokens; sampling is seeded per batch: the same answers on a rerun, whatever ran before."""
    import torch

    samples = ToyTask(4).samples()
    backend.configure("random", 0.5, {})
    try:
        greedy = backend.predict(samples, 3)
        assert [r["prediction"] for r in backend.predict(samples, 3, GenerationSettings())] == \
               [r["prediction"] for r in greedy]
        beams = backend.predict(samples, 3, GenerationSettings(num_beams=2))
        assert [r["tokens"] for r in beams] == [r["tokens"] for r in greedy]
        hot = GenerationSettings.from_kwargs({"temperature": 50.0})
        torch.manual_seed(1)
        first = [r["prediction"] for r in backend.predict(samples, 3, hot)]
        torch.manual_seed(2)
        again = [r["prediction"] for r in backend.predict(samples, 3, hot)]
        assert first == again
        assert torch.initial_seed() == 2  # the caller's generator is left as it was
        one = backend.predict(samples, 1, GenerationSettings(max_new_tokens=3, until=(" ",)))
        assert all(" " not in r["prediction"] for r in one)
    finally:
        backend.configure("none", 1.0, {})


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mmcompress", "bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_bench_gen_kwargs_refused_by_name_before_the_model_loads(tmp_path):
    r = _cli(["--model", "ref-vlm-mini", "--gen-kwargs", "temprature=0.7", "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "temprature: not a generation setting" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    r = _cli(["--model", "ref-vlm-mini", "--gen-kwargs", "max_new_tokens=3", "--max-new-tokens", "4",
              "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "max_new_tokens given twice" in r.stderr, r.stderr


def test_bench_gen_kwargs_run_and_join_the_identity(tmp_path):
    model = save_tiny_llava(tmp_path / "m")
    out = tmp_path / "run"
    args = ["--model", str(model), "--task", "tests.bench_fixtures:ToyTask", "--methods", "tome", "--keep", "0.5",
            "--limit", "4", "--batch-size", "2", "--out", str(out), "--no-progress", "--threads", "1"]
    r = _cli([*args, "--gen-kwargs", "num_beams=2,until=.,max_new_tokens=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["identity"]["generation"] == {"num_beams": 2, "until": ["."]}
    assert cfg["identity"]["max_new_tokens"] == 2
    r = _cli([*args, "--resume"])  # greedy now: another run
    assert r.returncode == 2 and "different settings" in r.stderr, r.stderr
