"""lmms-eval model ``mmcompress``: any model `mmcompress.apply` supports, compressed with any catalogue method.

    python -m lmms_eval --model mmcompress \\
        --model_args pretrained=ref-vlm,method=visionzip,keep=0.25 --tasks mmc_easyvqa_32 \\
        --include_path "$(python -m mmcompress.lmms_eval_plugin --tasks-dir)" --batch_size 16 --log_samples

lmms-eval finds the model through the entry point group ``lmms_eval.models`` (pyproject.toml), which names
`manifests`; this module is imported only then (it needs ``lmms_eval`` installed), except that
``python -m mmcompress.lmms_eval_plugin --tasks-dir`` prints the task folder before lmms-eval would be imported (it
works where lmms-eval is not installed, e.g. to check an installed wheel).

Model arguments (``--model_args k=v,...``):
    pretrained: ``ref-vlm`` or ``ref-vlm-mini`` (built in; ref-vlm-mini is ``make bench``'s host: with task
        ``mmc_detail_500`` / ``mmc_easyvqa_500`` it gives the README's table rows), a local Hugging Face VLM
        directory, or a hub id (default ``ref-vlm``).
    method: a compressor of ``mmcompress list``, ``fastv``, or ``none`` (the uncompressed model; default).
    keep: budget as `mmcompress bench --keep` reads it: a fraction in (0, 1] (``0.25``; ``1`` is 100%), a token
        count (``64``) or ``auto`` (default 0.25; ignored by ``none``).
    device, dtype: torch device (default ``cpu``; ``cuda`` when lmms-eval passes it) and ``float32`` / ``bfloat16`` /
        ``float16``.
    batch_size: requests per ``generate`` call (lmms-eval's ``--batch_size``; an int).
    max_new_tokens: generation budget when a task's ``generation_kwargs`` give none (default 128).
    warmup: answer the first batch once unrecorded before timing it, as ``mmcompress bench`` does (default true;
        first calls pay one-time costs that no sample should).
    anything else: an option of the method, passed to ``mmcompress.apply`` (``metric_dim=64``, ``fastv_k=2``, ...).

Generation: the task's ``generation_kwargs`` (or ``--gen_kwargs``) are read by the same code as ``mmcompress bench
--gen-kwargs`` (`mmcompress.evals.generation.GenerationSettings`: greedy unless ``temperature`` > 0 / ``do_sample``;
``max_new_tokens``, ``top_p``, ``top_k``, ``num_beams``, ``until``; an unknown key is refused by name), and every
request runs through ``mmcompress bench``'s `mmcompress.evals.backends.VLMBackend.predict`, so the same batches give
the same answers (sampled ones too: sampling is seeded from the batch's sample ids). Requests are answered in
lmms-eval's document order, in consecutive batches of ``batch_size``: the batches of ``mmcompress bench`` over the
same questions, in the same order.

Logged samples (``--log_samples``): each sample's ``token_counts`` holds ``media_tokens`` (image tokens entering the
LLM after compression, after FastV's in-LLM pruning for ``fastv``), ``encode_ms``, ``compress_ms``, ``prefill_ms``,
``decode_ms`` (this sample's share of its batch, as ``mmcompress bench`` measures them), ``peak_mem_mb``,
``method`` and ``keep``.

Not supported (they raise with the reason): ``loglikelihood`` requests (multiple-choice-by-likelihood tasks),
multi-round generation, documents with other than one image, several processes (``WORLD_SIZE`` > 1).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MMCompressLMM", "MMCompressCounts", "manifests", "tasks_dir"]

MODEL_ID = "mmcompress"


def tasks_dir() -> Path:
    """The folder of our lmms-eval task YAMLs (``--include_path``): ``mmc_easyvqa*``, ``mmc_detail*``."""
    import importlib.util

    spec = importlib.util.find_spec("mmcompress.evals")  # evals/ in a checkout, mmcompress/evals/ in the wheel
    return Path(list(spec.submodule_search_locations)[0]) / "lmms_tasks"


def _main(argv: list[str]) -> int:
    """`python -m mmcompress.lmms_eval_plugin --tasks-dir`: print the --include_path folder (no lmms-eval needed)."""
    if argv != ["--tasks-dir"]:
        print("usage: python -m mmcompress.lmms_eval_plugin --tasks-dir", file=sys.stderr)
        return 2
    print(tasks_dir())
    return 0


if __name__ == "__main__":  # before lmms-eval is imported below: printing a path must not need it
    sys.exit(_main(sys.argv[1:]))

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402


def manifests() -> list[Any]:
    """The entry point of group ``lmms_eval.models``: one `ModelManifest` naming `MMCompressLMM` by path."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path="mmcompress.lmms_eval_plugin.MMCompressLMM")]


@dataclass
class MMCompressCounts(TokenCounts):
    """lmms-eval's per-request `TokenCounts` plus what compression changes; `to_dict` is what the logged sample's
    ``token_counts`` shows."""

    media_tokens: int | None = None
    encode_ms: float | None = None
    compress_ms: float | None = None
    prefill_ms: float | None = None
    decode_ms: float | None = None
    peak_mem_mb: float | None = None
    method: str | None = None
    keep: Any = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = super().to_dict()
        for k in ("media_tokens", "encode_ms", "compress_ms", "prefill_ms", "decode_ms", "peak_mem_mb", "method",
                  "keep"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        return d


def _parse_keep(keep: Any) -> Any:
    """lmms-eval turns ``keep=1`` into int 1 and ``keep=0.25`` into a float: read it back as ``bench --keep``
    does (a number <= 1 or with a dot is a fraction, a larger int a token count, or ``auto``)."""
    from mmcompress.evals.runner import parse_keeps

    if isinstance(keep, bool):
        raise TypeError(f"keep: expected a fraction, a token count or 'auto', got {keep!r}")
    text = keep if isinstance(keep, str) else (repr(keep) if isinstance(keep, float) else str(keep))
    keeps = parse_keeps(text)
    if len(keeps) != 1:
        raise ValueError(f"keep: expected one budget, got {keep!r}")
    return keeps[0]


class MMCompressLMM(lmms):
    """lmms-eval model wrapping `mmcompress.evals.backends.VLMBackend` (ref-vlm or any HF VLM `apply` supports).

    Args:
        pretrained: ``ref-vlm``, ``ref-vlm-mini``, a local HF model directory or a hub id.
        method: Compressor name, ``fastv`` or ``none``.
        keep: Budget (see the module docstring).
        device: Torch device (``None``: cpu).
        dtype: Model dtype name.
        batch_size: Requests per model call.
        max_batch_size: Ignored (lmms-eval passes it).
        max_new_tokens: Budget when a request's generation kwargs give none.
        warmup: Run the first batch once, unrecorded, before the timed run.
        **options: Options of the method, passed to `mmcompress.apply`.
    """

    def __init__(self, pretrained: str = "ref-vlm", method: str = "none", keep: Any = 0.25, device: str | None = None,
                 dtype: str = "float32", batch_size: int | str = 1, max_batch_size: Any = None,
                 max_new_tokens: int = 128, warmup: bool = True, **options: Any) -> None:
        super().__init__()
        import mmcompress as mmc
        from mmcompress.evals.backends import load_backend

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("WORLD_SIZE: the mmcompress lmms-eval model runs in one process; shard with "
                             "`torchrun ... -m mmcompress bench` or run one lmms-eval process per device")
        if not isinstance(method, str) or not method:
            raise TypeError(f"method: expected a compressor name, 'fastv' or 'none', got {method!r}")
        if method not in ("none", "fastv") and method not in mmc.available():
            raise ValueError(f"method: unknown method {method!r}; available: none, fastv, {', '.join(mmc.available())}")
        try:
            bs = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}") from None
        if bs <= 0:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
        self.method = method
        self.keep = 1.0 if method == "none" else _parse_keep(keep)
        self.options = options
        self.batch_size_per_gpu = bs
        self.max_new_tokens = max_new_tokens
        if not isinstance(warmup, bool):
            raise TypeError(f"warmup: expected true or false, got {warmup!r}")
        self.warmup = warmup
        self.pretrained = str(pretrained)
        self.backend = load_backend(self.pretrained, "image", device=str(device or "cpu"), dtype=dtype)
        self.backend.configure(method, self.keep, options)  # "none": the unwrapped model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> Any:
        return self.backend.device

    # -- lmms-eval API ------------------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the mmcompress lmms-eval model answers generate_until tasks only "
                                  "(loglikelihood / multiple-choice-by-likelihood tasks are not supported yet)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the mmcompress lmms-eval model does not support multi-round generation")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answers of `requests`, in their order, batched ``batch_size`` at a time in document order."""
        from mmcompress.evals.tasks import Sample

        if not requests:
            return []
        tasks_seen: dict[str, int] = {}
        keyed = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            rank = tasks_seen.setdefault(task, len(tasks_seen))
            gen_key = json.dumps(gen_kwargs or {}, sort_keys=True, default=str)
            keyed.append(((rank, gen_key, split), doc_id, i))
        # one group per (task, generation kwargs, split), each in document order
        groups: dict[Any, list[int]] = {}
        for key, _, i in sorted(keyed, key=lambda t: (t[0][0], t[1], t[2])):
            groups.setdefault(key, []).append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = _bar(len(requests))
        for idxs in groups.values():
            gen_kwargs = dict(requests[idxs[0]].args[1] or {})
            for s in range(0, len(idxs), self.batch_size):
                chunk = idxs[s : s + self.batch_size]
                samples = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    doc = self.task_dict[task][split][doc_id]
                    visuals = doc_to_visual(doc)
                    visuals = [v for v in (visuals or []) if v is not None]
                    if len(visuals) != 1 or not hasattr(visuals[0], "convert"):
                        raise ValueError(f"doc {task}/{split}/{doc_id}: the mmcompress model takes exactly one image "
                                         f"per document, got {len(visuals)} visual(s)")
                    # the sample's own id where the task carries one (the mmc_* tasks: bench's id, so `random`
                    # draws the same tokens as in `mmcompress bench`), else the document index
                    sid = doc.get("id") if hasattr(doc, "get") else None
                    samples.append(Sample(id=str(doc_id if sid is None else sid), prompt=context, answer=None,
                                          image=visuals[0]))
                if self.warmup:  # once per model: the first batch, unrecorded
                    self._answer(samples, gen_kwargs)
                    self.warmup = False
                for i, res in zip(chunk, self._answer(samples, gen_kwargs), strict=True):
                    results[i] = res
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return results  # type: ignore[return-value]

    # -- generation ---------------------------------------------------------------------------------------------------
    def _answer(self, samples: list[Any], gen_kwargs: dict[str, Any]) -> list[GenerationResult]:
        """One batch through `VLMBackend.predict` with the request's decoding (the path `mmcompress bench` runs)."""
        from mmcompress.evals.generation import GenerationSettings

        gen = GenerationSettings.from_kwargs(gen_kwargs)
        rows = self.backend.predict(samples, gen.max_new_tokens or self.max_new_tokens, gen)
        return [GenerationResult(text=r["prediction"], token_counts=MMCompressCounts(
            media_tokens=int(r["tokens"]), encode_ms=r["encode_ms"], compress_ms=r["compress_ms"],
            prefill_ms=r["prefill_ms"], decode_ms=r["decode_ms"], peak_mem_mb=r["peak_mem_mb"],
            method=self.method, keep=self.keep)) for r in rows]


def _bar(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=f"{MODEL_ID} generate_until", unit="req", file=sys.stderr, dynamic_ncols=True)
