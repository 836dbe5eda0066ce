"""The runner behind `mmcompress bench`: tasks x methods x budgets, one JSONL line per sample, resumable, sharded.

    >>> from mmcompress.evals.runner import BenchConfig, run
    >>> run(BenchConfig(model="ref-vlm", tasks=["easyvqa"], methods=["tome"], keeps=[0.5, 0.25], limit=100,
    ...                 out=Path("runs/demo")))

Layout of ``out``:
    config.json                         what was asked (a resumed run must ask the same)
    parts/<task>/<method>@<keep>.rank<r>.jsonl
                                        one line per finished sample, appended and flushed as each batch ends
    parts/<task>/<method>@<keep>.timing.json
                                        the interleaved timing of the setting (`mmcompress.evals.timing`, rank 0)
    samples.jsonl                       every sample line of every setting, in a fixed order (written at the end)
    summary.csv, summary.md, pareto.png one row per task x method x keep (see `mmcompress.evals.report`)

Determinism: samples are cut into fixed batches (``batch_size`` consecutive samples of the task's fixed order), and a
batch is always run whole, so a resumed or sharded run feeds the model exactly the batches an uninterrupted one does.
Sharding (``torchrun --nproc-per-node N -m mmcompress bench ...``): rank r runs the batches b with b % N == r; rank 0
waits for the others (a gloo barrier) and writes the merged outputs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmcompress.evals.plan import read_timings, run_timing, setting_plan, timing_path
from mmcompress.evals.tasks import Sample, Task, get_task

__all__ = ["BenchConfig", "run", "parse_keeps", "setting_name", "read_records"]

BASELINES = ("none", "random", "resize")  # in every table: uncompressed, and random and resize at the same budgets
IMAGE_ONLY = ("resize",)  # references that only image tasks have (the image downsampled to the budget)


@dataclass
class BenchConfig:
    """What `mmcompress bench` runs (the CLI flags, one field each).

    Attributes:
        model: Built-in model name or local HF directory / hub id.
        tasks: Task names (`mmcompress.evals.tasks.available_tasks()`).
        methods: Compressor names, ``fastv``, or ``none``; ``none`` and ``random`` are always added.
        keeps: Budgets: fractions in (0, 1], token counts (int > 1) or ``"auto"``.
        limit: Samples per task (seeded subset); None = all.
        seed: Subset seed.
        batch_size: Samples per model call.
        out: Output folder.
        data: Dataset folder for tasks that read files (``--data``).
        split: Split (None = each task's default).
        device: Torch device.
        dtype: Model dtype.
        max_new_tokens: Generation budget (None = each task's own).
        gen_kwargs: Decoding of image tasks (``--gen-kwargs``; `mmcompress.evals.generation`): lmms-eval's keys
            (``temperature``, ``top_p``, ``top_k``, ``num_beams``, ``do_sample``, ``until``); empty = greedy.
        resume: Continue a run in ``out`` (skip finished samples).
        skip_bad: Skip malformed dataset rows (counted) instead of failing.
        options: Extra options per method (``{"tome": {"metric_dim": 64}}``), passed to `mmcompress.apply`.
        progress: Show tqdm bars.
        timing_threads: torch threads while the time columns are measured (`mmcompress.evals.timing`).
        timing_repeats: interleaved (none, setting) prefill pairs per task x setting; 0: no interleaved timing
            (times are then each sample's share of its batch).
        timing_samples: the timing batch: each task's first `timing_samples` samples.
        encoder_memo: run each batch's vision tower once per run and replay it for later settings
            (`mmcompress.evals.encoder_memo`; the answers are the same; the time columns never use it).
    """

    model: str = "ref-vlm"
    tasks: list[str] = field(default_factory=lambda: ["easyvqa"])
    methods: list[str] = field(default_factory=lambda: ["none", "random"])
    keeps: list[Any] = field(default_factory=lambda: [0.5, 0.25])
    limit: int | None = None
    seed: int = 0
    batch_size: int = 16
    out: Path = Path("runs/bench")
    data: Path | None = None
    split: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    max_new_tokens: int | None = None
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    skip_bad: bool = False
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: bool = True
    timing_threads: int = 1
    timing_repeats: int = 7
    timing_samples: int = 8
    encoder_memo: bool = True

    def identity(self) -> dict[str, Any]:
        """The fields that decide which samples and batches a run has (a resumed run must not change them)."""
        from mmcompress.evals.backends import model_fingerprint

        return {"model": self.model, "weights": model_fingerprint(self.model), "limit": self.limit,
                "seed": self.seed, "batch_size": self.batch_size,
                "data": str(self.data) if self.data else None, "split": self.split, "dtype": self.dtype,
                "max_new_tokens": self.max_new_tokens, **self._gen_identity()}

    def generation(self) -> Any:
        """`gen_kwargs` read as `mmcompress.evals.generation.GenerationSettings` (checked; greedy when empty)."""
        from mmcompress.evals.generation import GenerationSettings

        gen = GenerationSettings.from_kwargs(self.gen_kwargs)
        if gen.max_new_tokens is not None:
            raise ValueError("gen_kwargs: max_new_tokens is set by --max-new-tokens (max_new_tokens=), not here")
        return gen

    def _gen_identity(self) -> dict[str, Any]:
        """Decoding joins the identity only when it is not greedy (runs made before it existed still resume)."""
        gen = self.generation().to_dict()
        return {"generation": gen} if gen else {}


def parse_keeps(text: str) -> list[Any]:
    """``"1,0.5,64,auto"`` -> ``[1.0, 0.5, 64, "auto"]``: a number with a dot or <= 1 is a fraction, a larger
    integer a token count.

    Raises:
        ValueError: An entry that is none of these (the message names it).
    """
    keeps: list[Any] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item == "auto":
            keeps.append("auto")
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"keep: expected fractions in (0, 1], token counts or 'auto', got {item!r}") from None
        if "." in item or value <= 1:
            if not 0 < value <= 1:
                raise ValueError(f"keep: a fraction must be in (0, 1], got {item!r}")
            keeps.append(value)
        elif value.is_integer():
            keeps.append(int(value))
        else:
            raise ValueError(f"keep: expected fractions in (0, 1], token counts or 'auto', got {item!r}")
    if not keeps:
        raise ValueError(f"keep: no budget given in {text!r}")
    return keeps


def setting_name(method: str, keep: Any) -> str:
    """File-safe name of one setting, e.g. ``tome@0.25``, ``prumerge+@64``, ``none@1``."""
    from mmcompress.evals.report import keep_label

    return f"{method}@{keep_label(method, keep)}"


def _settings(cfg: BenchConfig) -> list[tuple[str, Any]]:
    methods = list(dict.fromkeys([*BASELINES, *cfg.methods]))
    out: list[tuple[str, Any]] = [("none", 1.0)]
    for m in methods:
        if m == "none":
            continue
        for k in cfg.keeps:
            if isinstance(k, float) and k >= 1.0:
                continue  # keep 100% is the uncompressed row (identity compression is bit-identical to it)
            if m == "resize" and k == "auto":
                continue  # the resize reference has a fixed budget only
            out.append((m, k))
    return out


def _dist() -> tuple[int, int, Any]:
    """(rank, world size, torch.distributed or None) from the torchrun environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dist


def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


def read_records(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The complete lines of a JSONL part file. A torn last line (a process killed mid-write) is ignored, and with
    ``repair=True`` cut off the file so that appending continues cleanly."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if repair and end < len(raw):
        with path.open("r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in raw[:end].decode().splitlines() if line.strip()]


def _holds_samples(out: Path) -> bool:
    """Whether any part file under `out` holds a finished sample (one complete line)."""
    for part in out.glob("parts/*/*.jsonl"):
        with part.open("rb") as f:
            while chunk := f.read(1 << 20):
                if b"\n" in chunk:
                    return True
    return False


def _check_out(cfg: BenchConfig) -> dict[str, Any]:
    """Check `cfg.out` without writing anything; returns the run's identity. A folder whose config.json has no
    finished sample beside it (a run that failed before its first sample) counts as empty."""
    if cfg.out.exists() and not cfg.out.is_dir():
        raise ValueError(f"out: {cfg.out} is a file; --out takes a folder (new, or a run's folder with --resume)")
    for parent in cfg.out.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"out: {parent} is a file, so {cfg.out} cannot be created; --out takes a folder")
    path = cfg.out / "config.json"
    ident = cfg.identity()
    if not cfg.out.is_dir() or not _holds_samples(cfg.out):
        return ident
    if not path.is_file():
        raise ValueError(f"out: {cfg.out} holds samples but no config.json, so they cannot be matched to settings; "
                         "use another --out")
    old = json.loads(path.read_text()).get("identity")
    if not cfg.resume:
        raise ValueError(f"out: {cfg.out} already holds a run; pass --resume to continue it, or another --out")
    if old != ident:
        diff = {k: (old.get(k) if old else None, v) for k, v in ident.items() if not old or old.get(k) != v}
        raise ValueError(f"resume: the run in {cfg.out} was made with different settings {diff} (old, new); "
                         "resuming would mix samples")
    return ident


def _write_config(cfg: BenchConfig, ident: dict[str, Any]) -> None:
    """Write ``out/config.json`` (rank 0), once the model has loaded and the first sample is about to run, so that a
    run that fails before leaves no trace; a resumed run that already holds samples keeps its config."""
    path = cfg.out / "config.json"
    if path.is_file() and _holds_samples(cfg.out):
        return
    cfg.out.mkdir(parents=True, exist_ok=True)
    body = {"identity": ident, "config": _json_safe(asdict(cfg)), "argv": sys.argv}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    tmp.replace(path)


def _gen(cfg: BenchConfig, task: Task) -> dict[str, Any]:
    """``predict``'s decoding argument for `task`: nothing for greedy (every backend's default), else ``{"gen":
    settings}`` (`VLMBackend.predict`).

    Raises:
        ValueError: non-greedy `gen_kwargs` on a task whose backend decodes greedily only (audio, encoder).
    """
    gen = cfg.generation()
    if not gen.to_dict():
        return {}
    if task.modality != "image":
        raise ValueError(f"gen_kwargs: decoding settings apply to image tasks; {task.name!r} is a {task.modality} "
                         "task (greedy only)")
    return {"gen": gen}


def _first_runnable(cfg: BenchConfig, task: Task, samples: list[Sample], backend: Any,
                    settings: list[tuple[str, Any]], skipped: dict[str, str]) -> None:
    """Try the compressed settings on one sample until one runs; those that cannot run are recorded in `skipped`.
    The reference rows that compress nothing (``none``, and ``resize``, which shrinks the image) are not tried.

    Raises:
        ValueError: No compressed setting can run on this task (e.g. every ``--keep`` asks more tokens than the
            model has), so the run would compare nothing.
    """
    reasons: dict[str, str] = {}
    for method, keep in settings:
        if method in ("none", "resize"):
            continue
        try:
            backend.configure(method, *setting_plan(method, keep, cfg.options.get(method, {}), backend, samples[0])[:2])
            backend.predict(samples[:1], cfg.max_new_tokens or task.max_new_tokens, **_gen(cfg, task))
            break
        except (ValueError, TypeError) as e:
            reasons[f"{task.name} {setting_name(method, keep)}"] = str(e)
    else:
        if reasons:
            first, why = next(iter(reasons.items()))
            raise ValueError(f"nothing to compare on {task.name}: none of the {len(reasons)} compressed settings can "
                             f"run ({first.split(' ', 1)[1]}: {why})")
    for name, why in reasons.items():
        skipped[name] = why
        print(f"mmcompress bench: skipping {name}: {why}", file=sys.stderr)


def _bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True, file=sys.stderr)


def _setting_records(folder: Path, name: str) -> list[dict[str, Any]]:
    """Every finished record of setting `name` in `folder`, over the part files of all ranks (a resumed run may use
    another number of processes)."""
    return [r for part in sorted(folder.glob(f"{name}.rank*.jsonl")) for r in read_records(part)]


def _run_setting(cfg: BenchConfig, task: Task, samples: list[Sample], backend: Any, method: str, keep: Any,
                 part: Path, rank: int, world: int, run_keep: Any = None, run_options: dict | None = None) -> None:
    """Run the unfinished batches of one setting; `run_keep`/`run_options` are what the backend is configured with
    (the in-LLM schedule of the budget `keep`, `mmcompress.evals.plan`)."""
    read_records(part, repair=True)  # cut a torn last line off this rank's file before appending to it
    done = {r["id"] for r in _setting_records(part.parent, setting_name(method, keep))}
    B = cfg.batch_size
    batches = [(b, samples[s : s + B]) for b, s in enumerate(range(0, len(samples), B)) if b % world == rank]
    todo = [(b, chunk) for b, chunk in batches if not all(s.id in done for s in chunk)]
    mine = sum(len(c) for _, c in batches)
    bar = _bar(mine, f"{task.name} {setting_name(method, keep)}" + (f" [rank {rank}]" if world > 1 else ""),
               cfg.progress)
    if bar is not None:
        bar.update(mine - sum(len(c) for _, c in todo))
    if not todo:
        if bar is not None:
            bar.close()
        return
    backend.configure(method, keep if run_options is None else run_keep,
                      cfg.options.get(method, {}) if run_options is None else run_options)
    max_new = cfg.max_new_tokens or task.max_new_tokens
    gen = _gen(cfg, task)
    backend.predict(todo[0][1][:1], max_new, **gen)  # warm-up, not recorded: a setting's first call pays one-time costs
    scores: list[float] = []
    t_start = time.perf_counter()
    part.parent.mkdir(parents=True, exist_ok=True)
    with part.open("a") as f:
        for b, chunk in todo:
            rows = backend.predict(chunk, max_new, **gen)
            if len(rows) != len(chunk):
                raise RuntimeError(f"backend returned {len(rows)} rows for {len(chunk)} samples")
            lines = []
            for s, row in zip(chunk, rows, strict=True):
                if s.id in done:
                    continue  # finished before the crash; the batch was re-run whole only to keep its composition
                sc = task.score(row["prediction"], s)
                scores.append(float(sc["score"]))
                rec = {"task": task.name, "method": method, "keep": keep, "id": s.id, "batch": b,
                       "prediction": row["prediction"], "answer": s.answer, **sc, "meta": s.meta,
                       **{k: v for k, v in row.items() if k != "prediction"}}
                lines.append(json.dumps(_json_safe(rec)) + "\n")
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            if bar is not None:
                bar.update(len(chunk))
                rate = len(scores) / max(time.perf_counter() - t_start, 1e-9)
                bar.set_postfix(acc=f"{sum(scores) / len(scores):.3f}", sps=f"{rate:.1f}")
    if bar is not None:
        bar.close()


def _merge(cfg: BenchConfig, order: dict[str, list[str]], settings: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """All finished records, deduplicated by (task, setting, id), in task -> setting -> sample order."""
    merged: list[dict[str, Any]] = []
    for task_name, ids in order.items():
        pos = {sid: i for i, sid in enumerate(ids)}
        for method, keep in settings:
            name = setting_name(method, keep)
            recs: dict[str, dict[str, Any]] = {}
            for r in _setting_records(cfg.out / "parts" / task_name, name):
                recs.setdefault(r["id"], r)
            merged.extend(sorted((r for r in recs.values() if r["id"] in pos), key=lambda r: pos[r["id"]]))
    return merged


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Run every task x setting of `cfg`; returns ``{"summary": rows, "skipped": {...}, "out": path}`` on rank 0
    (other ranks return after their shards are written)."""
    from mmcompress.evals import report
    from mmcompress.evals.backends import load_backend

    if cfg.batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive int, got {cfg.batch_size}")
    if cfg.limit is not None and (isinstance(cfg.limit, bool) or not isinstance(cfg.limit, int) or cfg.limit < 1):
        raise ValueError(f"limit: expected a positive number of samples per task (or none: all), got {cfg.limit!r}")
    rank, world, dist = _dist()
    tasks = [get_task(t) for t in cfg.tasks]
    for task in tasks:
        _gen(cfg, task)  # decoding checked before anything loads
    ident = _check_out(cfg) if rank == 0 else {}  # the other ranks wait for rank 0 to check the output folder
    if rank == 0:
        from mmcompress.evals.backends import BUILTIN_MODELS

        from mmcompress.zoo import check_model

        check_model(cfg.model, list(BUILTIN_MODELS))  # seconds, where loading a bad hub id retries for minutes
    if dist is not None:
        dist.barrier()
    settings = _settings(cfg)
    backends: dict[str, Any] = {}
    order: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    bad_rows: dict[str, int] = {}
    schedules: dict[str, dict[str, Any]] = {}  # the in-LLM schedule of each "task method@keep"
    for task in tasks:
        samples = task.samples(cfg.data, cfg.split, cfg.limit, cfg.seed, skip_bad=cfg.skip_bad)
        if not samples:
            raise ValueError(f"task {task.name!r}: no samples (data={cfg.data}, split={cfg.split})")
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise ValueError(f"task {task.name!r}: sample ids are not unique")
        order[task.name] = ids
        bad_rows[task.name] = int(getattr(task, "skipped", 0))
        if task.modality not in backends:
            backends[task.modality] = load_backend(cfg.model, task.modality, device=cfg.device, dtype=cfg.dtype)
            backends[task.modality].configure("none", 1.0, {})
            if cfg.encoder_memo and hasattr(backends[task.modality], "use_encoder_memo"):
                backends[task.modality].use_encoder_memo()
            backends[task.modality].predict(samples[: cfg.batch_size], cfg.max_new_tokens or task.max_new_tokens,
                                            **_gen(cfg, task))
            # ^ warm-up, not recorded: first calls pay one-time costs (allocator, kernels) that no setting should
        backend = backends[task.modality]
        _first_runnable(cfg, task, samples, backend, settings, skipped)
        if rank == 0:
            _write_config(cfg, ident)  # the model has loaded and the first sample is about to run
        for method, keep in settings:
            name = setting_name(method, keep)
            if f"{task.name} {name}" in skipped or (method in IMAGE_ONLY and task.modality != "image"):
                continue
            part = cfg.out / "parts" / task.name / f"{name}.rank{rank}.jsonl"
            try:
                run_keep, run_opts, sched = setting_plan(method, keep, cfg.options.get(method, {}), backend,
                                                         samples[0])
                if sched is not None:
                    schedules[f"{task.name} {name}"] = sched
                _run_setting(cfg, task, samples, backend, method, keep, part, rank, world, run_keep, run_opts)
                if rank == 0:
                    run_timing(cfg, samples, backend, method, run_keep, run_opts,
                               timing_path(cfg.out, task.name, name))
            except (ValueError, TypeError) as e:  # a method that cannot run this model/budget: said, not hidden
                if method == "none":
                    raise
                skipped[f"{task.name} {name}"] = str(e)
                print(f"mmcompress bench: skipping {task.name} {name}: {e}", file=sys.stderr)
    if dist is not None:
        dist.barrier()
    if rank != 0:
        return {"out": cfg.out}
    records = _merge(cfg, order, settings)
    tmp = cfg.out / "samples.jsonl.tmp"
    with tmp.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    tmp.replace(cfg.out / "samples.jsonl")
    names = {setting_name(m, k): (m, report.keep_label(m, k)) for m, k in settings}
    timings = read_timings(cfg.out, list(order), names)
    notes = []
    if timings:
        from mmcompress.evals.timing import TimingConfig, describe_machine

        notes.append(TimingConfig(cfg.timing_threads, cfg.timing_repeats, cfg.timing_samples).describe())
        notes += [m for m in [describe_machine(list(timings.values()))] if m]
    notes += [f"{k}: schedule {json.dumps(v, sort_keys=True)}" for k, v in schedules.items()]
    rows = report.write_reports(cfg.out, records, tasks, settings, skipped=skipped, bad_rows=bad_rows,
                                timings=timings, notes=notes,
                                model=cfg.model, expected={t: len(ids) for t, ids in order.items()})
    return {"summary": rows, "skipped": skipped, "out": cfg.out}
