"""Standard VQA benchmarks for `mmcompress bench`, read from the files users already have (``--data DIR``).

Each task reads (1) the lmms-lab Hugging Face parquet export that lmms-eval uses (``DIR`` = the dataset folder as
downloaded from the hub: ``DIR/data/<split>-*.parquet``, ``DIR/<split>/*.parquet`` or
``DIR/<config>/<split>-*.parquet``; images as ``{"bytes", "path"}`` structs, loaded lazily) and (2) the
benchmark's original layout where it has one. Default split and prompt are lmms-eval's defaults for the task
(its ``lmms_eval/tasks/<task>/*.yaml`` and ``utils.py``). Sample ids are the benchmark's own. A malformed row raises
`BadSampleError` naming file and row, or is skipped and counted in ``task.skipped`` with ``skip_bad=True``.

| task | default split | metric |
|---|---|---|
| vqav2 | validation | VQA accuracy (official normalisation, 10 annotators) |
| textvqa | validation | VQA accuracy |
| gqa | testdev_balanced | exact match |
| pope | test | accuracy, precision, recall, F1, yes-ratio (overall and per category) |
| mme | test | acc, acc+ per category; perception / cognition totals |
| scienceqa_img | test | option accuracy |
| mmbench | dev | circular accuracy (all circular variants right) and per-row accuracy |
"""

from __future__ import annotations

import base64
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mmcompress.evals import metrics as M
from mmcompress.evals.tasks import BadSampleError, Sample, Task, mean_stderr, register_task, seeded_subset

__all__ = ["find_parquet", "ShortAnswerTask"]

# lmms-eval's default post-prompt of its short-answer tasks (vqav2, textvqa, gqa, pope, mme yaml files:
# `lmms_eval_specific_kwargs.default.post_prompt`).
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
# lmms-eval's post-prompt of its multiple-choice tasks (scienceqa_img, mmbench yaml files).
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."


# ---- file access ---------------------------------------------------------------------------------------------------
def find_parquet(data: Path, split: str, configs: Sequence[str] = ()) -> list[Path]:
    """Parquet files of `split` in an lmms-lab hub folder (see the module docstring); [] when there are none."""
    pats = [f"data/{split}-*.parquet", f"data/{split}/*.parquet", f"{split}/*.parquet", f"{split}-*.parquet"]
    pats += [f"{c}/{split}-*.parquet" for c in configs] + [f"{c}/{split}/*.parquet" for c in configs]
    pats += [f"data/{c}/{split}-*.parquet" for c in configs]
    for pat in pats:
        files = sorted(data.glob(pat))
        if files:
            return files
    return []


_TABLES: dict[Path, Any] = {}


def _parquet_cell(path: Path, row: int, column: str) -> Any:
    """One cell, read through a memory-mapped table (the two most recent files are kept open)."""
    import pyarrow.parquet as pq

    if path not in _TABLES:
        while len(_TABLES) >= 2:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[path] = pq.read_table(path, columns=[column], memory_map=True)
    return _TABLES[path].column(column)[row].as_py()


def _parquet_rows(files: Sequence[Path], skip: Sequence[str] = ("image",)) -> Iterator[tuple[Path, int, dict]]:
    """(file, row index, row without the heavy columns) for every row of `files`."""
    import pyarrow.parquet as pq

    for f in files:
        schema = pq.read_schema(f)
        cols = [n for n in schema.names if n not in skip]
        for i, row in enumerate(pq.read_table(f, columns=cols).to_pylist()):
            yield f, i, row


def _image_of_cell(cell: Any) -> Any:
    """PIL image from a parquet image struct ``{"bytes", "path"}`` or raw bytes."""
    import io

    from PIL import Image

    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return Image.open(io.BytesIO(cell))
    if isinstance(cell, str):
        return Image.open(cell)
    raise ValueError(f"image: expected bytes or a path, got {type(cell).__name__}")


def _lazy_parquet_image(path: Path, row: int, column: str = "image") -> Callable[[], Any]:
    return lambda: _image_of_cell(_parquet_cell(path, row, column))


class _Rows:
    """Collects samples from rows, turning a bad row into `BadSampleError` or a counted skip."""

    def __init__(self, task: Task, skip_bad: bool) -> None:
        self.task, self.skip_bad, self.samples = task, skip_bad, []
        task.skipped = 0

    def add(self, where: str, row_index: int, build: Callable[[], Sample]) -> None:
        try:
            sample = build()
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            if not self.skip_bad:
                raise BadSampleError(f"{self.task.name}: {where}: row {row_index}: malformed ({type(e).__name__}: "
                                     f"{e}); pass --skip-bad to skip such rows") from None
            self.task.skipped += 1
            return
        self.samples.append(sample)


def _need(data: Path | None, task: str) -> Path:
    if data is None:
        raise ValueError(f"data: task {task!r} reads the benchmark's files; pass --data DIR (the lmms-lab hub folder "
                         "or the original layout)")
    data = Path(data)
    if not data.is_dir():
        raise ValueError(f"data: {data} is not a directory")
    return data


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
    return value


def _unique_ids(samples: list[Sample], task: str) -> list[Sample]:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise BadSampleError(f"{task}: duplicate sample id {s.id!r}")
        seen.add(s.id)
    return samples


# ---- short-answer tasks --------------------------------------------------------------------------------------------
class ShortAnswerTask(Task):
    """A short-answer task: prompt = question + `SHORT_ANSWER`; subclasses say how rows become samples."""

    max_new_tokens = 16
    configs: tuple[str, ...] = ()

    def samples(self, data=None, split=None, limit=None, seed=0, skip_bad=False) -> list[Sample]:
        data = _need(data, self.name)
        split = split or self.default_split
        rows = _Rows(self, skip_bad)
        files = find_parquet(data, split, self.configs)
        if files:
            self._from_parquet(files, rows)
        else:
            self._from_original(data, split, rows)
        if not rows.samples and not self.skipped:
            raise ValueError(f"data: no {self.name} samples for split {split!r} under {data} (looked for the lmms-lab "
                             f"parquet export and the original layout)")
        return seeded_subset(_unique_ids(rows.samples, self.name), limit, seed)

    def _from_parquet(self, files: list[Path], rows: _Rows) -> None:
        raise NotImplementedError

    def _from_original(self, data: Path, split: str, rows: _Rows) -> None:
        raise ValueError(f"data: no parquet files for split {split!r} under {data}")


def _vqa_answers(value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"answers: expected a non-empty list, got {value!r}")
    return [str(a["answer"] if isinstance(a, dict) else a) for a in value]


class _VQATask(ShortAnswerTask):
    """VQA-style rows (``question_id``, ``question``, 10 annotator answers), scored with VQA accuracy."""

    @staticmethod
    def _sample(row: dict, answers: Any, image: Any, meta: dict) -> Sample:
        return Sample(id=str(int(row["question_id"])), prompt=_str(row["question"], "question") + SHORT_ANSWER,
                      answer=_vqa_answers(answers), image=image, meta=meta)

    def score(self, prediction, sample):
        return {"score": M.vqa_accuracy(prediction, sample.answer)}


@register_task("vqav2")
class VQAv2(_VQATask):
    """VQAv2 (lmms-lab/VQAv2 parquet, or ``v2_OpenEnded_mscoco_<split>2014_questions.json`` +
    ``v2_mscoco_<split>2014_annotations.json`` + ``<split>2014/COCO_<split>2014_<id:012d>.jpg``)."""

    default_split = "validation"

    def _from_parquet(self, files, rows):
        for f, i, r in _parquet_rows(files):
            rows.add(str(f), i, lambda r=r, f=f, i=i: self._sample(
                r, r["answers"], _lazy_parquet_image(f, i),
                {"answer_type": r.get("answer_type"), "question_type": r.get("question_type")}))

    def _from_original(self, data, split, rows):
        short = {"validation": "val", "val": "val", "train": "train", "test": "test"}.get(split, split)
        qf = data / f"v2_OpenEnded_mscoco_{short}2014_questions.json"
        af = data / f"v2_mscoco_{short}2014_annotations.json"
        if not qf.is_file():
            raise ValueError(f"data: neither parquet files nor {qf.name} under {data}")
        questions = json.loads(qf.read_text())["questions"]
        anns = {a["question_id"]: a for a in json.loads(af.read_text())["annotations"]} if af.is_file() else {}
        for i, q in enumerate(questions):
            def build(q=q):
                a = anns[q["question_id"]]
                img = data / f"{short}2014" / f"COCO_{short}2014_{int(q['image_id']):012d}.jpg"
                return self._sample(q, a["answers"], img,
                                    {"answer_type": a.get("answer_type"), "question_type": a.get("question_type")})

            rows.add(qf.name, i, build)


@register_task("textvqa")
class TextVQA(_VQATask):
    """TextVQA (lmms-lab/textvqa parquet, or ``TextVQA_0.5.1_<split>.json`` + ``train_images/<image_id>.jpg``)."""

    default_split = "validation"

    def _from_parquet(self, files, rows):
        for f, i, r in _parquet_rows(files):
            rows.add(str(f), i, lambda r=r, f=f, i=i: self._sample(r, r["answers"], _lazy_parquet_image(f, i),
                                                                   {"image_id": r.get("image_id")}))

    def _from_original(self, data, split, rows):
        short = {"validation": "val"}.get(split, split)
        jf = data / f"TextVQA_0.5.1_{short}.json"
        if not jf.is_file():
            raise ValueError(f"data: neither parquet files nor {jf.name} under {data}")
        for i, q in enumerate(json.loads(jf.read_text())["data"]):
            rows.add(jf.name, i, lambda q=q: self._sample(
                q, q["answers"], data / "train_images" / f"{_str(q['image_id'], 'id')}.jpg",
                {"image_id": q["image_id"]}))


@register_task("gqa")
class GQA(ShortAnswerTask):
    """GQA (lmms-lab/GQA parquet: ``testdev_balanced_instructions`` questions + ``testdev_balanced_images``; or
    ``<split>_questions.json`` + ``images/<imageId>.jpg``)."""

    default_split = "testdev_balanced"

    def samples(self, data=None, split=None, limit=None, seed=0, skip_bad=False) -> list[Sample]:
        data = _need(data, self.name)
        split = split or self.default_split
        q_files = (find_parquet(data, "testdev", (f"{split}_instructions",))
                   or find_parquet(data, "train", (f"{split}_instructions",)))
        rows = _Rows(self, skip_bad)
        if q_files:
            img_files = (find_parquet(data, "testdev", (f"{split}_images",))
                         or find_parquet(data, "train", (f"{split}_images",)))
            where: dict[str, tuple[Path, int]] = {}
            for f, i, r in _parquet_rows(img_files):
                where[str(r["id"])] = (f, i)
            for f, i, r in _parquet_rows(q_files):
                def build(r=r):
                    loc = where[str(r["imageId"])]
                    return Sample(id=str(r["id"]), prompt=_str(r["question"], "question") + SHORT_ANSWER,
                                  answer=_str(r["answer"], "answer"), image=_lazy_parquet_image(*loc),
                                  meta={"imageId": r["imageId"]})

                rows.add(str(f), i, build)
        else:
            jf = data / f"{split}_questions.json"
            if not jf.is_file():
                raise ValueError(f"data: neither lmms-lab GQA parquet folders nor {jf.name} under {data}")
            for i, (qid, q) in enumerate(json.loads(jf.read_text()).items()):
                rows.add(jf.name, i, lambda qid=qid, q=q: Sample(
                    id=str(qid), prompt=_str(q["question"], "question") + SHORT_ANSWER,
                    answer=_str(q["answer"], "answer"), image=data / "images" / f"{_str(q['imageId'], 'id')}.jpg",
                    meta={"imageId": q["imageId"]}))
        return seeded_subset(_unique_ids(rows.samples, self.name), limit, seed)

    def score(self, prediction, sample):
        return {"score": M.exact_match(prediction, sample.answer)}


@register_task("pope")
class POPE(ShortAnswerTask):
    """POPE (lmms-lab/POPE parquet, or the original ``coco_pope_<category>.json`` line files + ``val2014/``)."""

    default_split = "test"
    max_new_tokens = 8

    def _from_parquet(self, files, rows):
        for f, i, r in _parquet_rows(files):
            rows.add(str(f), i, lambda r=r, f=f, i=i: Sample(
                id=str(r["question_id"]) if r.get("category") is None else f"{r['category']}/{r['question_id']}",
                prompt=_str(r["question"], "question") + SHORT_ANSWER, answer=self._yn(r["answer"]),
                image=_lazy_parquet_image(f, i), meta={"category": r.get("category")}))

    def _from_original(self, data, split, rows):
        files = sorted(data.glob("coco_pope_*.json")) or sorted(data.glob("*/coco_pope_*.json"))
        if not files:
            raise ValueError(f"data: neither parquet files nor coco_pope_*.json under {data}")
        for f in files:
            cat = f.stem.removeprefix("coco_pope_")
            for i, line in enumerate(f.read_text().splitlines()):
                if not line.strip():
                    continue

                def build(line=line, cat=cat):
                    r = json.loads(line)
                    return Sample(id=f"{cat}/{r['question_id']}", prompt=_str(r["text"], "text") + SHORT_ANSWER,
                                  answer=self._yn(r["label"]), image=data / "val2014" / _str(r["image"], "image"),
                                  meta={"category": cat})

                rows.add(f.name, i, build)

    @staticmethod
    def _yn(value: Any) -> str:
        v = _str(value, "answer").strip().lower()
        if v not in ("yes", "no"):
            raise ValueError(f"answer: expected yes/no, got {value!r}")
        return v

    def score(self, prediction, sample):
        return {"score": float(M.yes_no(prediction) == sample.answer), "parsed": M.yes_no(prediction)}

    def aggregate(self, records):
        out = M.pope_metrics([r["prediction"] for r in records], [r["answer"] for r in records])
        out["stderr"] = mean_stderr([float(r["score"]) for r in records])[1]
        by: dict[str, list] = defaultdict(list)
        for r in records:
            by[str(r["meta"].get("category"))].append(r)
        if len(by) > 1:
            for cat, rs in by.items():
                m = M.pope_metrics([r["prediction"] for r in rs], [r["answer"] for r in rs])
                out.update({f"{cat}_{k}": v for k, v in m.items()})
        out["n"] = len(records)
        return out


@register_task("mme")
class MME(ShortAnswerTask):
    """MME (lmms-lab/MME parquet; or the release folder: ``<category>/`` with ``<image>.txt`` files of
    ``question<TAB>answer`` lines beside the images, or ``images/`` + ``questions_answers_YN/``)."""

    default_split = "test"
    max_new_tokens = 8

    def _from_parquet(self, files, rows):
        for f, i, r in _parquet_rows(files):
            rows.add(str(f), i, lambda r=r, f=f, i=i: Sample(
                id=f"{_str(r['question_id'], 'question_id')}#{_str(r['question'], 'question')[-40:]}",
                prompt=r["question"] + SHORT_ANSWER, answer=POPE._yn(r["answer"]), image=_lazy_parquet_image(f, i),
                meta={"category": _str(r["category"], "category"), "image": r["question_id"]}))

    def _from_original(self, data, split, rows):
        found = False
        for cat_dir in sorted(p for p in data.iterdir() if p.is_dir()):
            for txt in sorted(cat_dir.rglob("*.txt")):
                found = True
                stem = txt.stem
                img_dir = cat_dir / "images" if txt.parent.name == "questions_answers_YN" else txt.parent
                imgs = [p for p in img_dir.glob(f"{stem}.*") if p.suffix.lower() in (".jpg", ".png", ".jpeg")]
                for i, line in enumerate(txt.read_text().splitlines()):
                    if not line.strip():
                        continue

                    def build(line=line, i=i, imgs=imgs, stem=stem, cat=cat_dir.name):
                        q, a = line.split("\t")
                        if not imgs:
                            raise ValueError(f"image: no image named {stem}.* for this question")
                        return Sample(id=f"{cat}/{stem}/{i}", prompt=_str(q, "question") + SHORT_ANSWER,
                                      answer=POPE._yn(a), image=imgs[0],
                                      meta={"category": cat, "image": f"{cat}/{stem}"})

                    rows.add(str(txt), i, build)
        if not found:
            raise ValueError(f"data: neither parquet files nor MME category folders under {data}")

    def score(self, prediction, sample):
        return {"score": float(M.yes_no(prediction) == sample.answer)}

    def aggregate(self, records):
        out = M.mme_scores((r["meta"]["category"], r["meta"]["image"], r["prediction"], r["answer"]) for r in records)
        acc, se = mean_stderr([float(r["score"]) for r in records])
        out.update({"accuracy": acc, "stderr": se, "n": len(records)})
        return out


# ---- multiple choice -----------------------------------------------------------------------------------------------
def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _is_blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()) or \
        (isinstance(v, str) and v.strip().lower() == "nan")


@register_task("scienceqa_img")
class ScienceQAImg(Task):
    """ScienceQA, questions with an image (lmms-lab/ScienceQA ``ScienceQA-IMG`` parquet; or the original
    ``problems.json`` + ``pid_splits.json`` + ``images/<split>/<pid>/image.png``). Prompt as lmms-eval:
    ``Context: <hint>\\n<question>\\nA. ..\\nB. ..`` + `OPTION_LETTER`."""

    default_split = "test"
    max_new_tokens = 8

    @staticmethod
    def prompt(question: str, choices: Sequence[str], hint: Any) -> str:
        if not choices:
            raise ValueError("choices: expected at least one option")
        ctx = "" if _is_blank(hint) else f"Context: {hint}\n"
        opts = "\n".join(f"{c}. {o}" for c, o in zip(_letters(len(choices)), choices, strict=True))
        return f"{ctx}{_str(question, 'question')}\n{opts}{OPTION_LETTER}"

    def samples(self, data=None, split=None, limit=None, seed=0, skip_bad=False) -> list[Sample]:
        data = _need(data, self.name)
        split = split or self.default_split
        rows = _Rows(self, skip_bad)
        files = find_parquet(data, split, ("ScienceQA-IMG",))
        if files:
            for f, i, r in _parquet_rows(files):
                rows.add(str(f), i, lambda r=r, f=f, i=i: self._sample(f"{split}/{i}", r, _lazy_parquet_image(f, i)))
        else:
            pf, sf = data / "problems.json", data / "pid_splits.json"
            if not pf.is_file() or not sf.is_file():
                raise ValueError(f"data: neither ScienceQA-IMG parquet files nor problems.json + pid_splits.json "
                                 f"under {data}")
            problems = json.loads(pf.read_text())
            for i, pid in enumerate(json.loads(sf.read_text())[split]):
                if not problems.get(pid, {}).get("image"):
                    continue  # ScienceQA-IMG: the questions that have an image
                rows.add(pf.name, i, lambda pid=pid: self._sample(
                    str(pid), problems[pid], data / "images" / split / str(pid) / problems[pid]["image"]))
        return seeded_subset(_unique_ids(rows.samples, self.name), limit, seed)

    def _sample(self, sid: str, r: dict, image: Any) -> Sample:
        choices = [str(c) for c in r["choices"]]
        ans = int(r["answer"])
        if not 0 <= ans < len(choices):
            raise ValueError(f"answer: index {ans} out of range for {len(choices)} choices")
        return Sample(id=sid, prompt=self.prompt(r["question"], choices, r.get("hint")),
                      answer=_letters(len(choices))[ans], image=image,
                      meta={"choices": choices, "subject": r.get("subject")})

    def score(self, prediction, sample):
        picked = M.extract_option(prediction, sample.meta["choices"])
        return {"score": float(picked == sample.answer), "picked": picked}


@register_task("mmbench")
class MMBench(Task):
    """MMBench (lmms-lab/MMBench ``en`` parquet, or the original ``MMBench_DEV_EN*.tsv`` with base64 images),
    scored with circular evaluation over the variants that share ``index % 1_000_000``."""

    default_split = "dev"
    max_new_tokens = 8
    primary = "accuracy"

    def samples(self, data=None, split=None, limit=None, seed=0, skip_bad=False) -> list[Sample]:
        data = _need(data, self.name)
        split = split or self.default_split
        rows = _Rows(self, skip_bad)
        files = find_parquet(data, split, ("en",))
        if files:
            for f, i, r in _parquet_rows(files):
                rows.add(str(f), i, lambda r=r, f=f, i=i: self._sample(r, _lazy_parquet_image(f, i)))
        else:
            tsvs = sorted(data.glob(f"MMBench_{split.upper()}_EN*.tsv"))
            if not tsvs:
                raise ValueError(f"data: neither MMBench parquet files nor MMBench_{split.upper()}_EN*.tsv in {data}")
            import csv

            with tsvs[0].open(newline="") as fh:
                for i, r in enumerate(csv.DictReader(fh, delimiter="\t")):
                    rows.add(tsvs[0].name, i, lambda r=r: self._sample(r, base64.b64decode(r["image"], validate=True)))
        samples = rows.samples
        if limit is not None and limit < len(samples):  # subset whole circular groups, so the metric stays defined
            groups: dict[int, list[Sample]] = defaultdict(list)
            for s in samples:
                groups[s.meta["index"] % 1_000_000].append(s)
            keys = seeded_subset(sorted(groups), min(limit, len(groups)), seed)
            samples = [s for k in keys for s in groups[k]][:limit]
        return _unique_ids(samples, self.name)

    def _sample(self, r: dict, image: Any) -> Sample:
        options = [str(r[c]) for c in "ABCDEFGH" if c in r and not _is_blank(r[c])]
        ans = _str(r["answer"], "answer").strip()
        if ans not in _letters(len(options)):
            raise ValueError(f"answer: {ans!r} is not one of the {len(options)} option letters")
        hint = "" if _is_blank(r.get("hint")) else f"{r['hint']}\n"
        opts = "\n".join(f"{c}. {o}" for c, o in zip(_letters(len(options)), options, strict=True))
        return Sample(id=str(int(r["index"])), prompt=f"{hint}{_str(r['question'], 'question')}\n{opts}{OPTION_LETTER}",
                      answer=ans, image=image,
                      meta={"index": int(r["index"]), "options": options, "category": r.get("category")})

    def score(self, prediction, sample):
        picked = M.extract_option(prediction, sample.meta["options"])
        return {"score": float(picked == sample.answer), "picked": picked}

    def aggregate(self, records):
        out = M.mmbench_circular((r["meta"]["index"], bool(r["score"])) for r in records)
        groups: dict[int, list[bool]] = defaultdict(list)
        for r in records:
            groups[r["meta"]["index"] % 1_000_000].append(bool(r["score"]))
        acc, se = mean_stderr([float(all(v)) for v in groups.values()])
        out.update({"accuracy": acc, "stderr": se, "n": len(records)})
        return out

