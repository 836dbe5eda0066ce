"""Benchmark loaders on fixtures written here in each benchmark's exact layout: the lmms-lab parquet exports
(through pyarrow, images as {"bytes", "path"} structs) and the original JSON/TSV/folder layouts; malformed rows."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from mmcompress.evals.tasks import BadSampleError, get_task

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def png(seed: int = 0, side: int = 8) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (side, side), (seed * 40 % 256, 100, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def img_cell(seed: int) -> dict:
    return {"bytes": png(seed), "path": f"{seed}.png"}


def records(task, preds, samples) -> list[dict]:
    """Per-sample records as the runner writes them."""
    return [{"prediction": p, "answer": x.answer, "meta": x.meta, **task.score(p, x)}
            for p, x in zip(preds, samples, strict=True)]


def ten(*answers: str) -> list[dict]:
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


# ---- VQAv2 ---------------------------------------------------------------------------------------------------------
def test_vqav2_parquet_and_scoring(tmp_path):
    rows = [{"question_type": "how many", "multiple_choice_answer": "2", "answers": ten(*(["2"] * 3 + ["3"] * 7)),
             "image_id": 42, "answer_type": "number", "question_id": 420001, "question": "How many cats?",
             "image": img_cell(1)},
            {"question_type": "what", "multiple_choice_answer": "red", "answers": ten(*(["red"] * 10)),
             "image_id": 43, "answer_type": "other", "question_id": 430002, "question": "What colour?",
             "image": img_cell(2)}]
    write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", rows)
    task = get_task("vqav2")
    s = task.samples(tmp_path, None, None)
    assert [x.id for x in s] == ["420001", "430002"]
    assert s[0].prompt == "How many cats?\nAnswer the question using a single word or phrase."
    assert s[0].load_image().size == (8, 8)
    assert task.score("Two.", s[0])["score"] == pytest.approx(0.9)
    recs = [{"score": task.score("two", s[0])["score"]}, {"score": task.score("blue", s[1])["score"]}]
    agg = task.aggregate(recs)
    assert agg["accuracy"] == pytest.approx(0.45) and agg["n"] == 2


def test_vqav2_original_json_and_bad_row(tmp_path):
    qs = {"questions": [{"image_id": 7, "question": "Is it?", "question_id": 70},
                        {"image_id": 8, "question": "", "question_id": 80}]}  # empty question: malformed
    anns = {"annotations": [{"question_id": 70, "answers": ten(*(["yes"] * 10)), "answer_type": "yes/no",
                             "question_type": "is it"},
                            {"question_id": 80, "answers": ten(*(["no"] * 10))}]}
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(qs))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(anns))
    task = get_task("vqav2")
    with pytest.raises(BadSampleError, match=r"v2_OpenEnded_mscoco_val2014_questions\.json: row 1"):
        task.samples(tmp_path, None, None)
    s = task.samples(tmp_path, None, None, skip_bad=True)
    assert task.skipped == 1 and [x.id for x in s] == ["70"]
    assert s[0].image == tmp_path / "val2014" / "COCO_val2014_000000000007.jpg"


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--data"):
        get_task("vqav2").samples(None, None, None)
    with pytest.raises(ValueError, match="data"):
        get_task("textvqa").samples(tmp_path, None, None)


# ---- TextVQA -------------------------------------------------------------------------------------------------------
def test_textvqa_parquet_and_json(tmp_path):
    rows = [{"image_id": "abc", "question_id": 5, "question": "What brand?", "answers": ["nike"] * 10,
             "image": img_cell(3), "ocr_tokens": ["nike"]}]
    write_parquet(tmp_path / "pq" / "data" / "validation-00000-of-00001.parquet", rows)
    task = get_task("textvqa")
    s = task.samples(tmp_path / "pq", None, None)
    assert s[0].id == "5" and task.score("Nike", s[0])["score"] == 1.0
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"question": "What brand?", "image_id": "abc", "question_id": 5, "answers": ["nike"] * 10}]}))
    s2 = task.samples(tmp_path / "js", None, None)
    assert s2[0].image == tmp_path / "js" / "train_images" / "abc.jpg" and s2[0].prompt == s[0].prompt


# ---- GQA -----------------------------------------------------------------------------------------------------------
def test_gqa_parquet_configs_and_json(tmp_path):
    write_parquet(tmp_path / "pq" / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet",
                  [{"id": "201", "imageId": "n1", "question": "Which side?", "answer": "left", "fullAnswer": "x"},
                   {"id": "202", "imageId": "n2", "question": "What is it?", "answer": "cup", "fullAnswer": "x"}])
    write_parquet(tmp_path / "pq" / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
                  [{"id": "n2", "image": img_cell(5)}, {"id": "n1", "image": img_cell(4)}])
    task = get_task("gqa")
    s = task.samples(tmp_path / "pq", None, None)
    assert [x.id for x in s] == ["201", "202"]
    from PIL import Image

    assert s[0].load_image().getpixel((0, 0)) == Image.open(io.BytesIO(png(4))).convert("RGB").getpixel((0, 0))
    assert task.score("Left.", s[0])["score"] == 1.0
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "testdev_balanced_questions.json").write_text(json.dumps(
        {"201": {"imageId": "n1", "question": "Which side?", "answer": "left"}}))
    assert get_task("gqa").samples(tmp_path / "js", None, None)[0].image == tmp_path / "js" / "images" / "n1.jpg"


# ---- POPE ----------------------------------------------------------------------------------------------------------
def test_pope_parquet_metrics_and_original(tmp_path):
    rows = [{"id": str(i), "question_id": str(i + 1), "question": "Is there a dog in the image?",
             "answer": a, "image_source": "x", "image": img_cell(i), "category": c}
            for i, (a, c) in enumerate([("yes", "random"), ("no", "random"), ("yes", "popular"), ("no", "popular")])]
    write_parquet(tmp_path / "pq" / "data" / "test-00000-of-00001.parquet", rows)
    task = get_task("pope")
    s = task.samples(tmp_path / "pq", None, None)
    preds = ["Yes.", "Yes", "No, there is not.", "no"]
    recs = records(task, preds, s)
    agg = task.aggregate(recs)
    # tp 1 (first), fp 1 (second), fn 1 (third), tn 1 -> acc 0.5, precision 0.5, recall 0.5, yes-ratio 0.5
    assert agg["accuracy"] == 0.5 and agg["precision"] == 0.5 and agg["recall"] == 0.5 and agg["yes_ratio"] == 0.5
    assert agg["random_accuracy"] == 0.5 and agg["popular_accuracy"] == 0.5
    (tmp_path / "orig").mkdir()
    (tmp_path / "orig" / "coco_pope_adversarial.json").write_text(
        json.dumps({"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat?",
                    "label": "no"}) + "\n" + json.dumps({"question_id": 2, "image": "x.jpg", "text": "Is there?",
                                                         "label": "maybe"}) + "\n")
    with pytest.raises(BadSampleError, match=r"coco_pope_adversarial\.json: row 1"):
        task.samples(tmp_path / "orig", None, None)
    s2 = task.samples(tmp_path / "orig", None, None, skip_bad=True)
    assert [x.id for x in s2] == ["adversarial/1"] and task.skipped == 1


# ---- MME -----------------------------------------------------------------------------------------------------------
def test_mme_parquet_and_release_folder(tmp_path):
    rows = [{"question_id": "existence/1.png", "image": img_cell(1), "question": "Is there a cat? Please answer "
             "yes or no.", "answer": "Yes", "category": "existence"},
            {"question_id": "existence/1.png", "image": img_cell(1), "question": "Is there a dog? Please answer "
             "yes or no.", "answer": "No", "category": "existence"}]
    write_parquet(tmp_path / "pq" / "data" / "test-00000-of-00001.parquet", rows)
    task = get_task("mme")
    s = task.samples(tmp_path / "pq", None, None)
    assert len(s) == 2 and s[0].id != s[1].id
    recs = records(task, ["Yes", "Yes"], s)
    agg = task.aggregate(recs)
    assert agg["existence_acc"] == 0.5 and agg["existence_acc_plus"] == 0.0 and agg["perception"] == 50.0
    cat = tmp_path / "rel" / "count"
    cat.mkdir(parents=True)
    (cat / "000.png").write_bytes(png(2))
    (cat / "000.txt").write_text("Are there two cats?\tYes\nAre there three cats?\tNo\n")
    s2 = get_task("mme").samples(tmp_path / "rel", None, None)
    assert [x.answer for x in s2] == ["yes", "no"] and s2[0].meta == {"category": "count", "image": "count/000"}


# ---- ScienceQA-IMG -------------------------------------------------------------------------------------------------
def test_scienceqa_parquet_prompt_and_original(tmp_path):
    rows = [{"image": img_cell(1), "question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1,
             "hint": "Look closely.", "task": "closed choice", "subject": "natural science"},
            {"image": img_cell(2), "question": "Pick", "choices": ["a"], "answer": 3, "hint": "",
             "subject": "x"}]  # answer out of range: malformed
    write_parquet(tmp_path / "pq" / "ScienceQA-IMG" / "test-00000-of-00001.parquet", rows)
    task = get_task("scienceqa_img")
    with pytest.raises(BadSampleError, match="row 1"):
        task.samples(tmp_path / "pq", None, None)
    s = task.samples(tmp_path / "pq", None, None, skip_bad=True)
    assert s[0].prompt == ("Context: Look closely.\nWhich is a mammal?\nA. frog\nB. whale\n"
                           "Answer with the option's letter from the given choices directly.")
    assert s[0].answer == "B" and task.score("B", s[0])["score"] == 1.0 and task.score("whale", s[0])["score"] == 1.0
    d = tmp_path / "orig"
    d.mkdir()
    (d / "problems.json").write_text(json.dumps({
        "1": {"question": "Q1?", "choices": ["x", "y"], "answer": 0, "hint": "", "image": "image.png", "split": "test"},
        "2": {"question": "Q2?", "choices": ["x", "y"], "answer": 1, "hint": "", "image": None, "split": "test"}}))
    (d / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"]}))
    s2 = task.samples(d, None, None)
    assert [x.id for x in s2] == ["1"] and s2[0].image == d / "images" / "test" / "1" / "image.png"
    assert s2[0].prompt.startswith("Q1?\nA. x\nB. y")


# ---- MMBench -------------------------------------------------------------------------------------------------------
def mmb_row(index: int, answer: str, **kw) -> dict:
    return {"index": index, "question": "Which animal?", "hint": None, "A": "cat", "B": "dog", "C": "bird",
            "D": None, "answer": answer, "category": "x", "image": img_cell(index % 7), **kw}


def test_mmbench_circular_parquet_and_tsv(tmp_path):
    rows = [mmb_row(1, "A"), mmb_row(1_000_001, "B"), mmb_row(2, "C"), mmb_row(1_000_002, "A")]
    write_parquet(tmp_path / "pq" / "en" / "dev-00000-of-00001.parquet", rows)
    task = get_task("mmbench")
    s = task.samples(tmp_path / "pq", None, None)
    assert s[0].prompt == ("Which animal?\nA. cat\nB. dog\nC. bird\n"
                           "Answer with the option's letter from the given choices directly.")
    preds = ["A", "B", "C", "B"]  # question 1 right in both variants, question 2 wrong in one
    recs = records(task, preds, s)
    agg = task.aggregate(recs)
    assert agg["accuracy"] == 0.5 and agg["vanilla_accuracy"] == 0.75 and agg["questions"] == 2
    # a limit keeps whole circular groups
    sub = task.samples(tmp_path / "pq", None, 2, seed=0)
    assert len({x.meta["index"] % 1_000_000 for x in sub}) == 1
    import csv

    d = tmp_path / "tsv"
    d.mkdir()
    with (d / "MMBench_DEV_EN.tsv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                                          "image"], delimiter="\t")
        w.writeheader()
        w.writerow({"index": 3, "question": "Q?", "hint": "nan", "A": "x", "B": "y", "C": "", "D": "",
                    "answer": "B", "category": "c", "image": base64.b64encode(png(1)).decode()})
        w.writerow({"index": 4, "question": "Q?", "hint": "", "A": "x", "B": "y", "C": "", "D": "",
                    "answer": "D", "category": "c", "image": base64.b64encode(png(1)).decode()})  # D: no such option
    with pytest.raises(BadSampleError, match=r"MMBench_DEV_EN\.tsv: row 1"):
        task.samples(d, None, None)
    s2 = task.samples(d, None, None, skip_bad=True)
    assert [x.id for x in s2] == ["3"] and s2[0].load_image().size == (8, 8) and task.skipped == 1
