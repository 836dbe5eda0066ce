"""Stable time columns of `mmcompress bench`: the encoder, the compressor and the LLM prefill timed apart, on a fixed
thread count, with the uncompressed prefill interleaved with the setting's own.

Protocol (`time_setting`), per task x setting, on one fixed batch (the task's first ``samples`` samples):

1. ``torch.set_num_threads(threads)`` for the whole measurement (restored after), so that the ratio does not depend on
   how many cores the rest of the run was given.
2. One full prefill of the setting (``model(**inputs, logits_to_keep=1)``: encoder, compressor, LLM; what
   ``generate()`` runs before its first token), untimed except for the encoder; the encoder's output is kept.
3. ``repeats`` pairs of prefills, alternating the order within a pair (none, setting / setting, none): the setting
   on its kept encoder output (``mm_encoder_outputs``, so the compressor and the LLM run again but the encoder does
   not), and the uncompressed model (`mmcompress.disabled`) on the uncompressed encoder output. The LLM's share is
   timed by hooks on the language model alone; the compressor's by the wrapper (`mmcompress.stats`).
4. What is timed: on CPU the CPU time the process spent (`time.process_time`), on one thread; on a quiet machine
   that is the wall time, and unlike the wall time it does not grow while other processes hold the cores (on a
   machine shared with a training job, wall-clock ratios of the same command moved by 40 %). On CUDA the wall
   time, synchronized.
5. Per-sample ms = the fastest repeat / batch size (on a shared machine other work only ever adds time, so the
   minimum is the estimate that load disturbs least); ``prefill_ratio`` = fastest setting / fastest none.
   ``ratio_spread`` checks it within the run: the same ratio from the even and from the odd pairs, half their
   difference relative to the ratio (each half has both orders, none first and setting first).
6. Where that check exceeds ``max_spread`` (default 2.5 %), two pairs more at a time, up to ``3 x repeats`` pairs:
   a setting disturbed by load is measured longer instead of kept as it fell (``pairs`` says how many ran).
7. The machine is recorded beside the numbers: the CPU's name, its logical CPUs and the 1-minute load average
   before the setting's measurement (``cpu``, ``cpus``, ``load1``), so two runs can be read side by side.

Replaying on a kept encoder output is checked once per setting: its last-position logits must equal the full
prefill's; where they do not (or the model takes no ``mm_encoder_outputs``), every repeat runs the full prefill and
only the language model's share is taken (same numbers, more time).

Letters: B timing batch, V vocabulary.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["TimingConfig", "time_setting", "language_model", "capture_encoder", "fastest_ratio", "split_half_spread",
           "machine", "describe_machine", "run_pairs"]


class TimingConfig:
    """How time columns are measured (written to ``config.json`` and stated in ``summary.md``).

    Args:
        threads: torch threads during the measurement (>= 1).
        repeats: interleaved (none, setting) pairs (>= 1).
        samples: the timing batch: the task's first `samples` samples (>= 1).
    """

    def __init__(self, threads: int = 1, repeats: int = 7, samples: int = 8, max_spread: float = 0.025) -> None:
        for name, v in (("timing_threads", threads), ("timing_repeats", repeats), ("timing_samples", samples)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if isinstance(max_spread, bool) or not isinstance(max_spread, (int, float)) or not max_spread > 0:
            raise ValueError(f"max_spread: expected a number > 0, got {max_spread!r}")
        self.threads, self.repeats, self.samples, self.max_spread = threads, repeats, samples, float(max_spread)

    @property
    def max_repeats(self) -> int:
        """The most pairs a setting whose split-half check stays above ``max_spread`` gets."""
        return 3 * self.repeats

    def describe(self) -> str:
        """One sentence for ``summary.md``."""
        return (f"times: {self.threads} torch thread(s), the task's first {self.samples} samples as one batch, "
                f"{self.repeats} interleaved (none, setting) prefill pairs (two more at a time while the even and odd "
                f"pairs' ratios differ by more than ±{100 * self.max_spread:g} %, up to {self.max_repeats}); the "
                "fastest repeat per sample; prefill ratio = fastest setting / fastest none")


@functools.cache
def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo, else what `platform` says); read once per process."""
    import platform

    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """``{"cpu": the CPU's model name, "cpus": logical CPUs, "load1": the 1-minute load average (None where the OS has
    none)}``."""
    import os

    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = round(os.getloadavg()[0], 2)
    return {"cpu": _cpu_name(), "cpus": os.cpu_count(), "load1": load}


def describe_machine(timings: list[dict[str, Any]]) -> str | None:
    """One sentence for ``summary.md`` on where the times were taken: the CPU, the load before the settings, how many
    settings were measured longer (None where no timing says)."""
    got = [t for t in timings if t.get("cpu")]
    if not got:
        return None
    cpus = sorted({f"{t['cpu']} ({t.get('cpus')} logical CPUs)" for t in got})
    loads = [t["load1"] for t in got if t.get("load1") is not None]
    longer = sum(t.get("pairs", t.get("repeats", 0)) > t.get("repeats", 0) for t in got)
    text = f"timed on {', '.join(cpus)}"
    if loads:
        text += f"; 1-minute load average {min(loads):.2f}-{max(loads):.2f} before the settings' measurements"
    return text + f"; {longer} of {len(got)} settings measured with extra pairs"


def language_model(model: Any) -> Any:
    """The decoder stack of a VLM (``model.model.language_model`` on LLaVA-style models, else ``get_decoder()``)."""
    core = getattr(model, "model", None)
    lm = getattr(core, "language_model", None) if core is not None else None
    if lm is None and hasattr(model, "get_decoder"):
        lm = model.get_decoder()
    if lm is None:
        raise ValueError(f"model: {type(model).__name__} has no language model to time")
    return lm


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Stopwatch:
    """Sums the time spent inside `module`'s forward calls (pre/post hooks), read from `clock`."""

    def __init__(self, module: Any, sync: Any, clock: Any = time.perf_counter) -> None:
        self.module, self.sync, self.clock, self.total, self._t0 = module, sync, clock, 0.0, 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> _Stopwatch:
        if self.module is not None:
            self._handles = [self.module.register_forward_pre_hook(self._pre),
                             self.module.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    def _pre(self, *_: Any) -> None:
        self.sync()
        self._t0 = self.clock()

    def _post(self, *_: Any) -> None:
        self.sync()
        self.total += self.clock() - self._t0


@contextlib.contextmanager
def capture_encoder(model: Any) -> Iterator[list[Any]]:
    """Within the context, every call of the model's ``get_image_features`` (whatever wraps it: `mmcompress.apply`'s
    adapter attaches the per-item metadata its compressor needs) appends its output to the yielded list."""
    core = getattr(model, "model", None)
    got: list[Any] = []
    if core is None or not hasattr(core, "get_image_features"):
        yield got
        return
    had = "get_image_features" in core.__dict__
    prev = core.__dict__.get("get_image_features")
    inner = core.get_image_features

    def grab(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        got.append(out)
        return out

    grab.__signature__ = inspect.signature(inner)  # type: ignore[attr-defined]  # the adapter binds by signature
    core.__dict__["get_image_features"] = grab
    try:
        yield got
    finally:
        if had:
            core.__dict__["get_image_features"] = prev
        else:
            del core.__dict__["get_image_features"]


def _takes_encoder_outputs(model: Any) -> bool:
    return "mm_encoder_outputs" in inspect.signature(model.forward).parameters


def fastest_ratio(setting: list[float], none: list[float]) -> float:
    """min(setting) / min(none): the ratio of the least disturbed repeats."""
    return min(setting) / min(none) if setting and none and min(none) > 0 else float("nan")


def split_half_spread(setting: list[float], none: list[float]) -> float:
    """|ratio of the even pairs - ratio of the odd pairs| / 2 / the ratio of all (NaN below 2 pairs)."""
    if len(setting) < 2:
        return float("nan")
    whole = fastest_ratio(setting, none)
    even, odd = fastest_ratio(setting[0::2], none[0::2]), fastest_ratio(setting[1::2], none[1::2])
    return abs(even - odd) / 2 / whole if whole else float("nan")


def run_pairs(pair: Any, runs: dict[str, list[float]], cfg: TimingConfig) -> int:
    """Run ``pair(r)`` for r = 0 .. repeats - 1, then two more at a time while the split-half check of
    ``runs["set"]`` vs ``runs["none"]`` (which `pair` appends to) exceeds ``cfg.max_spread``, up to
    ``cfg.max_repeats``. Returns the pairs run."""
    for r in range(cfg.repeats):
        pair(r)
    r = cfg.repeats
    while r + 2 <= cfg.max_repeats and split_half_spread(runs["set"], runs["none"]) > cfg.max_spread:
        pair(r)  # two at a time: both orders, one more pair in each half
        pair(r + 1)
        r += 2
    return r


def time_setting(backend: Any, samples: list[Any], cfg: TimingConfig) -> dict[str, Any]:
    """Time one setting (the one `backend` is configured with) against the uncompressed model (see the module doc).

    Args:
        backend: a `mmcompress.evals.backends.VLMBackend`, configured.
        samples: the timing batch.
        cfg: threads / repeats.

    Returns:
        ``{"encode_ms", "compress_ms", "prefill_ms", "none_prefill_ms", "none_encode_ms", "prefill_ratio",
        "ratio_spread", "replay", "threads", "repeats", "pairs", "samples", "cpu", "cpus", "load1",
        "prefill_ms_runs", "none_prefill_ms_runs"}`` (ms per sample; ``pairs``: the pairs that ran, ``repeats`` or
        more).
    """
    import torch

    import mmcompress as mmc
    from mmcompress.compressors.baselines import sample_keys

    model = backend.model
    lm = language_model(model)
    B = len(samples)
    keys = [s.id for s in samples]
    wrapped = backend.method not in ("none", "resize")
    base_inputs = backend.inputs_for(samples, resize=False)
    set_inputs = backend.inputs_for(samples, resize=True)

    cuda = torch.device(backend.device).type == "cuda"
    clock = time.perf_counter if cuda else time.process_time  # CPU: the CPU time this process spent (see above)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(backend.device)

    def forward(inputs: dict[str, Any], compressed: bool, enc: Any = None) -> tuple[float, float, float, Any]:
        """One prefill: (encoder s, LLM s, compressor s, last-position logits [B, V])."""
        kw = dict(inputs)
        if enc is not None:
            kw = {k: v for k, v in kw.items() if k not in ("pixel_values", "image_sizes")}
            kw["mm_encoder_outputs"] = {"image": enc}
        ctx = contextlib.nullcontext() if compressed else mmc.disabled(model)
        with ctx, sample_keys(keys), torch.inference_mode(), _Stopwatch(lm, sync, clock) as llm, \
                _Stopwatch(backend.vision if enc is None else None, sync, clock) as vis:
            out = model(**kw, logits_to_keep=1)
        comp = float(mmc.stats(model).get("compress_ms", 0.0)) / 1e3 if compressed and wrapped else 0.0
        return vis.total, llm.total, comp, out.logits[:, -1].float()

    load = machine()  # before this setting's own work
    with _threads(cfg.threads):
        with capture_encoder(model) as got:
            enc_s, _, _, ref = forward(set_inputs, True)  # warm-up of the setting, and its encoder output
        key = ("none", tuple(keys))
        if key not in backend.timing_cache:
            with capture_encoder(model) as got_none:
                none_enc_s, _, _, _ = forward(base_inputs, False)
            backend.timing_cache[key] = (got_none[0] if len(got_none) == 1 else None, none_enc_s)
        none_enc, none_enc_s = backend.timing_cache[key]
        enc = got[0] if len(got) == 1 else None
        replay = enc is not None and none_enc is not None and _takes_encoder_outputs(model)
        if replay:
            again = forward(set_inputs, True, enc)[3]
            replay = bool(torch.allclose(again, ref, rtol=1e-4, atol=1e-4))
        set_enc, base_enc = (enc, none_enc) if replay else (None, None)
        forward(base_inputs, False, base_enc)  # warm-up of the uncompressed replay
        runs: dict[str, list[float]] = {"set": [], "none": [], "comp": []}

        def pair(r: int) -> None:
            for which in ("none", "set") if r % 2 == 0 else ("set", "none"):
                if which == "set":
                    _, llm_s, comp_s, _ = forward(set_inputs, True, set_enc)
                    runs["set"].append(llm_s)
                    runs["comp"].append(comp_s)
                else:
                    runs["none"].append(forward(base_inputs, False, base_enc)[1])

        run_pairs(pair, runs, cfg)
    per = 1e3 / B
    return {"encode_ms": enc_s * per, "none_encode_ms": none_enc_s * per,
            "compress_ms": min(runs["comp"]) * per, "prefill_ms": min(runs["set"]) * per,
            "none_prefill_ms": min(runs["none"]) * per, "prefill_ratio": fastest_ratio(runs["set"], runs["none"]),
            "ratio_spread": split_half_spread(runs["set"], runs["none"]), "replay": replay,
            "threads": cfg.threads, "repeats": cfg.repeats, "pairs": len(runs["set"]), "samples": B, **load,
            "prefill_ms_runs": [round(x * per, 4) for x in runs["set"]],
            "none_prefill_ms_runs": [round(x * per, 4) for x in runs["none"]]}
