"""ASR for `mmcompress bench`: Whisper on the LibriVox clips (Debian ``pocketsphinx-testdata``), scored by WER.

    mmcompress bench --model whisper-tiny.en --task asr --methods audio_merge,pool,tome --keep 0.75,0.5,0.33,0.25

The compressed tokens are the encoder frames the decoder cross-attends to (1,500 per 30 s window). The summary's
``accuracy`` is 1 - WER (clipped at 0) so that every task reads "higher is better" there; ``value`` is the WER.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmcompress.evals import metrics as M
from mmcompress.evals.backends import per_sample, timed_generate
from mmcompress.evals.tasks import Sample, Task, mean_stderr, register_task, seeded_subset

__all__ = ["ASRTask", "WhisperBackend", "load_backend"]


@register_task("asr")
class ASRTask(Task):
    """LibriVox clips with their transcripts; ``--data`` may point at another folder of ``*.wav`` + a
    ``transcription`` file in the same ``<s> text </s> (id)`` format."""

    modality = "audio"
    default_split = "test"
    max_new_tokens = 128
    primary = "wer"
    higher_is_better = False

    def samples(self, data=None, split=None, limit=None, seed=0, skip_bad=False) -> list[Sample]:
        from mmcompress.zoo.data import load_librivox

        clips = load_librivox(Path(data) if data is not None else None)
        if not clips:
            raise ValueError(f"data: no clips with transcripts under {data or 'the pocketsphinx-testdata folder'}")
        samples = [Sample(id=c.id, prompt="", answer=c.text, audio=c.audio,
                          meta={"sampling_rate": c.sampling_rate, "seconds": len(c.audio) / c.sampling_rate})
                   for c in clips]
        return seeded_subset(samples, limit, seed)

    def score(self, prediction, sample):
        errors, words = M.word_errors(sample.answer, prediction)
        return {"score": max(0.0, 1.0 - errors / max(words, 1)), "errors": errors, "words": words}

    def aggregate(self, records):
        errors = sum(int(r["errors"]) for r in records)
        words = sum(int(r["words"]) for r in records)
        wer = errors / words if words else float("nan")
        _, se = mean_stderr([int(r["errors"]) / max(int(r["words"]), 1) for r in records])
        return {"wer": wer, "accuracy": max(0.0, 1.0 - wer), "stderr": se, "n": len(records), "words": words}


class WhisperBackend:
    """Whisper (``WhisperForConditionalGeneration`` + processor) transcribing clips greedily, optionally compressed
    with `mmcompress.apply` (needs the Whisper adapter; a method it cannot run is reported as skipped)."""

    def __init__(self, model: Any, processor: Any, device: str = "cpu") -> None:
        self.model, self.processor, self.device = model, processor, device
        self.encoder = model.get_encoder()
        self.method = "none"

    def configure(self, method: str, keep: float | int | str, options: dict[str, Any] | None = None) -> None:
        import mmcompress as mmc

        mmc.remove(self.model)
        self.method = method
        if method != "none":
            mmc.apply(self.model, method, keep=keep, **(options or {}))

    def predict(self, samples: Sequence[Sample], max_new_tokens: int) -> list[dict[str, Any]]:
        import mmcompress as mmc

        rate = {int(s.meta.get("sampling_rate", 16000)) for s in samples}
        if rate != {16000}:
            raise ValueError(f"samples: Whisper needs 16 kHz audio, got {sorted(rate)}")
        feats = self.processor([s.audio for s in samples], sampling_rate=16000, return_tensors="pt").input_features
        inputs = {"input_features": feats.to(self.device)}
        out, t = timed_generate(self.model, inputs, self.encoder, self.device, max_new_tokens=max_new_tokens)
        texts = [x.strip() for x in self.processor.batch_decode(out, skip_special_tokens=True)]
        st = mmc.stats(self.model) if self.method != "none" else {}
        n_frames = self.model.config.max_source_positions  # encoder frames per 30 s window (1,500)
        tokens = st.get("tokens_out", [n_frames] * len(samples))
        if len(tokens) != len(samples):
            tokens = [sum(tokens) / len(samples)] * len(samples)
        return [{"prediction": x, "tokens": n, **per_sample(t, len(samples), st)}
                for x, n in zip(texts, tokens, strict=True)]


def load_backend(model: str = "whisper-tiny.en", device: str = "cpu", dtype: str = "float32") -> WhisperBackend:
    """The Whisper backend: ``whisper-tiny.en`` (built-in, offline) or a local HF Whisper directory."""
    from mmcompress.evals.backends import _dtype

    if model == "whisper-tiny.en":
        from mmcompress import zoo

        m, proc = zoo.load("whisper-tiny.en")
    elif Path(model).is_dir():
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        m, proc = WhisperForConditionalGeneration.from_pretrained(model), WhisperProcessor.from_pretrained(model)
    else:
        raise ValueError(f"model: the asr task needs whisper-tiny.en or a local Whisper directory, got {model!r}")
    return WhisperBackend(m.to(device=device, dtype=_dtype(dtype)).eval(), proc, device)
