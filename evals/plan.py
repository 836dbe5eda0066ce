"""What `mmcompress bench` hands the backend for one setting, and the timing of that setting.

- `setting_plan`: the keep and options of a setting. In-LLM methods (``fastv``, ``pdrop``, ``dart``, ``sparsevlm``)
  get the schedule that makes their mean image tokens over the host's layers meet the budget
  (`mmcompress.evals.cost.inllm_schedule`, from the host's layer count and image token count), unless the user set
  the schedule's options (``--option fastv:fastv_k=3``), which then win.
- `run_timing` / `read_timings`: the interleaved measurement of `mmcompress.evals.timing`, one
  ``parts/<task>/<setting>.timing.json`` per task x setting (a resumed run keeps the finished ones).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmcompress.catalog import IN_LLM as _CATALOG_IN_LLM

__all__ = ["IN_LLM", "SCHEDULE_OPTIONS", "setting_plan", "run_timing", "read_timings", "timing_path"]

IN_LLM = tuple(_CATALOG_IN_LLM)  # fastv, pdrop, dart, sparsevlm: the methods that prune inside the LLM
# the options through which a user sets a method's schedule by hand (any of them turns the bench's schedule off)
SCHEDULE_OPTIONS = {"fastv": ("fastv_k", "fastv_r"), "dart": ("dart_k",), "pdrop": ("pdrop_layers", "pdrop_lambda"),
                    "sparsevlm": ("sparsevlm_layers", "sparsevlm_counts"), "trio": ("trio_layer", "trio_encoder_keep")}


def setting_plan(method: str, keep: Any, options: dict[str, Any], backend: Any,
                 sample: Any) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """(keep for `backend.configure`, options, the schedule as a dict or None) of one setting.

    Args:
        method: the method name. keep: the column's budget. options: the user's options of the method.
        backend: the task's backend (the schedule needs ``media_tokens`` and ``llm_layers``).
        sample: a sample of the task (its uncompressed image token count sizes the budget).
    """
    opts = dict(options)
    if method not in IN_LLM or isinstance(keep, bool) or not isinstance(keep, (int, float)):
        return keep, opts, None
    if any(k in opts for k in SCHEDULE_OPTIONS[method]) or not hasattr(backend, "media_tokens"):
        return keep, opts, None
    from mmcompress.evals.cost import inllm_schedule

    n, L = backend.media_tokens(sample), backend.llm_layers()
    if n < 1 or L < 2:
        return keep, opts, None
    sch = inllm_schedule(method, keep, n, L)
    info = {"image_tokens": n, "layers": L, "keep": sch.keep, **sch.options, "planned_tokens": round(sch.planned, 2),
            "within_budget": sch.reachable}
    return sch.keep, {**sch.options, **opts}, info


def timing_path(out: Path, task: str, name: str) -> Path:
    """Where the timing of one task x setting is kept."""
    return out / "parts" / task / f"{name}.timing.json"


def run_timing(cfg: Any, samples: list[Any], backend: Any, method: str, keep: Any, options: dict[str, Any],
               path: Path) -> dict[str, Any] | None:
    """Measure one setting (`mmcompress.evals.timing.time_setting`) and keep it in `path`; None where the backend
    cannot (audio, encoder tasks) or the measurement is off (``cfg.timing_repeats == 0``). A finished file is kept."""
    if path.is_file():
        return json.loads(path.read_text())
    if not getattr(cfg, "timing_repeats", 0) or not hasattr(backend, "inputs_for"):
        return None
    from mmcompress.evals.timing import TimingConfig, time_setting

    tc = TimingConfig(threads=cfg.timing_threads, repeats=cfg.timing_repeats, samples=cfg.timing_samples)
    backend.configure(method, keep, options)
    res = time_setting(backend, samples[: tc.samples], tc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)
    return res


def read_timings(out: Path, tasks: list[str], names: dict[str, tuple[str, str]]) -> dict[tuple[str, str, str], dict]:
    """Every kept timing: {(task, method, keep label): result} for the settings `names` ({file name: (method,
    keep label)})."""
    got: dict[tuple[str, str, str], dict] = {}
    for task in tasks:
        for name, (method, label) in names.items():
            p = timing_path(out, task, name)
            if p.is_file():
                got[(task, method, label)] = json.loads(p.read_text())
    return got
