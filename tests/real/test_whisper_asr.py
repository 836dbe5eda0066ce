"""Real Whisper tiny.en on the LibriVox clips: audio_merge at 50% of the encoder frames keeps WER within 2 points."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.real


def test_audio_merge_half_the_frames_within_two_wer_points():
    from mmcompress.evals.asr import load_backend
    from mmcompress.evals.tasks import get_task

    task = get_task("asr")
    samples = task.samples(None, None, None)
    backend = load_backend("whisper-tiny.en")

    def wer(method, keep):
        backend.configure(method, keep, {})
        rows = backend.predict(samples, task.max_new_tokens)
        recs = [{"prediction": r["prediction"], **task.score(r["prediction"], s)} for r, s in zip(rows, samples,
                                                                                                  strict=True)]
        return task.aggregate(recs)["wer"], rows

    base, _ = wer("none", 1.0)
    merged, rows = wer("audio_merge", 0.5)
    assert all(r["tokens"] == 750 for r in rows)  # 1,500 encoder frames per 30 s window -> 750
    assert base < 0.1  # measured 0.042 (3 errors in 71 words)
    assert merged <= base + 0.02
