"""The `asr` task: per-clip scores and corpus WER, and (real) uncompressed Whisper tiny.en through the runner."""

from __future__ import annotations

import pytest
from mmcompress.evals.tasks import Sample, get_task


def test_asr_scores_and_corpus_wer():
    task = get_task("asr")
    a = Sample(id="a", prompt="", answer="the cat sat on the mat")  # 6 words
    b = Sample(id="b", prompt="", answer="hello world")  # 2 words
    ra = {"prediction": "the cat sit on mat", **task.score("the cat sit on mat", a)}  # 1 sub + 1 del = 2 errors
    rb = {"prediction": "hello world", **task.score("hello world", b)}
    assert (ra["errors"], ra["words"], rb["errors"]) == (2, 6, 0)
    agg = task.aggregate([ra, rb])
    assert agg["wer"] == pytest.approx(2 / 8) and agg["accuracy"] == pytest.approx(0.75)
    assert task.primary == "wer" and not task.higher_is_better


@pytest.mark.real
def test_whisper_uncompressed_wer_through_the_runner(tmp_path):
    from mmcompress.evals.runner import BenchConfig, run

    res = run(BenchConfig(model="whisper-tiny.en", tasks=["asr"], methods=[], keeps=[0.5], batch_size=5,
                          out=tmp_path / "asr", progress=False))
    none = next(r for r in res["summary"] if r["method"] == "none")
    assert none["n"] == 5 and none["tokens"] == 1500
    assert none["value"] == pytest.approx(0.042, abs=0.015)  # the zoo baseline: 3 errors in 71 words
