"""Demo image tab, second contact: questions the model cannot read are flagged (ref-vlm-mini opens on one of its own
question forms and offers them; words outside a tokenizer's vocabulary are named), the expected-answer line follows
the question as it is edited, small pictures preview enlarged, and the Results tab shows `--bench-dir` at once."""

from __future__ import annotations

import numpy as np
import pytest

from demos.app import (
    DEFAULT_QUESTION,
    benchmark_questions,
    build_app,
    bundled_photos,
    default_question,
    enlarge,
    expected_note,
    preview,
)
from demos.questions import forms_for, question_note, refvlm_mini_forms, unknown_words

gr = pytest.importorskip("gradio")


def component(app, elem_id: str):
    found = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    assert len(found) == 1, elem_id
    return found[0]


def test_refvlm_mini_forms_cover_its_tasks_and_not_the_generic_question():
    from mmcompress.evals import detail, easyvqa

    forms = refvlm_mini_forms()
    assert not forms.matches(DEFAULT_QUESTION) and not forms.matches("describe the image")
    for s in easyvqa.load_split("test")[:300]:
        assert forms.matches(s.question), s.question
    for seed in range(5):
        for _, q, _ in detail.questions(detail.make_scene(detail.SPLIT_SEEDS["test"] + seed)):
            assert forms.matches(q), q
    assert all(forms.matches(q) for q in forms.examples) and len(forms.examples) == len(forms.keys)
    assert forms_for("ref-vlm-mini") is forms and forms_for("ref-vlm") is None


def test_refvlm_mini_opens_on_its_own_form_and_offers_them():
    """The page opened on "What is in the image?", which ref-vlm-mini answered "yes"/"rectangle" without a word."""

    class Unloaded:
        model_name = "ref-vlm-mini"

        def unknown_words(self, q):
            return []

    app = build_app("ref-vlm-mini", image_backend=Unloaded())
    q = component(app, "image-question").value
    forms = refvlm_mini_forms()
    assert q != DEFAULT_QUESTION and forms.matches(q) and q == default_question(forms)
    offered = component(app, "image-question-forms")
    assert [c[0] if isinstance(c, tuple) else c for c in offered.choices] == list(forms.examples)
    assert component(app, "image-question-note").value == ""  # its own form: nothing to flag
    note = question_note(DEFAULT_QUESTION, forms, [])
    assert "Not one of the model's question forms" in note
    assert question_note("what color is the circle?", forms, []) == ""
    plain = build_app("ref-vlm", image_backend=Unloaded())  # a free-form model keeps the generic question
    assert component(plain, "image-question").value == DEFAULT_QUESTION
    assert not [b for b in plain.blocks.values() if getattr(b, "elem_id", None) == "image-question-forms"]


def test_words_outside_the_vocabulary_are_named(tmp_path):
    pytest.importorskip("transformers")
    from demos.image import ImageBackend
    from tests.bench_fixtures import save_tiny_llava

    backend = ImageBackend(str(save_tiny_llava(tmp_path / "m")), max_new_tokens=2)
    assert backend.unknown_words(DEFAULT_QUESTION) == []  # not loaded yet: nothing to check against
    backend.load()
    unknown = backend.unknown_words(DEFAULT_QUESTION)  # the tiny vocabulary: what colour is the shape ...
    assert {"in", "image"} <= set(unknown) and "what" not in unknown and "the" not in unknown
    assert backend.unknown_words("what colour is the shape") == []
    app = build_app(str(tmp_path / "m"), image_backend=backend)
    note = component(app, "image-question-note").value
    assert "The model cannot read:" in note and "in" in note and "image" in note

    class ByteLevel:  # a tokenizer without an unknown token reads every string
        unk_token_id = None

    assert unknown_words(ByteLevel(), "anything at all") == []


def test_expected_answer_line_follows_the_edited_question():
    photos, questions = bundled_photos(), benchmark_questions()
    scene = "detail test scene 0"
    q, a = questions[scene]
    _, filled, note = preview(photos, questions, None, scene)
    assert filled == q and f"expected answer: {a}" in note
    assert f"expected answer: {a}" in expected_note(photos, questions, None, scene, q.upper().replace("?", " ?"))
    edited = expected_note(photos, questions, None, scene, "what color is the square?")
    assert "expected answer" not in edited and "your own question" in edited and q in edited
    assert expected_note(photos, questions, "/some/upload.png", None, "x").startswith("Your upload")
    assert expected_note(photos, questions, None, None, "x") == ""


def test_small_pictures_preview_enlarged():
    """Easy-VQA's 64 px pictures showed at about 50 px."""
    img = np.arange(64 * 48 * 3, dtype=np.uint8).reshape(64, 48, 3)
    big = enlarge(img)
    assert big.shape == (256, 192, 3) and np.array_equal(big[::4, ::4], img)
    assert enlarge(np.zeros((300, 20, 3), np.uint8)).shape == (300, 20, 3)
    photos, questions = bundled_photos(), benchmark_questions()
    name = "easy-VQA test image 0"
    if name not in photos:
        pytest.skip("easy-VQA images not installed")
    shown, _, _ = preview(photos, questions, None, name)
    assert min(shown.shape[:2]) >= 224


def test_results_tab_shows_the_bench_dir_without_load(tmp_path):
    (tmp_path / "summary.csv").write_text("task,method,keep,n,accuracy,stderr,tokens,prefill_ms,compress_ms\n"
                                          "easyvqa,none,1,100,0.9,0.03,64,10.0,0.0\n"
                                          "easyvqa,tome,0.25,100,0.7,0.04,16,4.0,0.3\n")
    app = build_app(bench_dir=str(tmp_path))
    table = component(app, "results-table").value
    assert len(table["data"]) == 2 and table["data"][1][1] == "tome"
    assert "2 rows from" in component(app, "results-message").value
    assert component(app, "results-plot").value is not None
    empty = build_app(bench_dir=str(tmp_path / "none"))
    assert "No summary.csv" in component(empty, "results-message").value
