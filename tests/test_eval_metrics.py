"""Benchmark metrics on hand-checked cases derived from each benchmark's rules."""

from __future__ import annotations

import pytest
from mmcompress.evals import metrics as M


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Two", "2"),  # number word -> digit
        ("the dog", "dog"),  # article dropped
        ("A red, white and blue flag.", "red white and blue flag"),  # ", " -> removed; final period dropped
        ("black-white", "black white"),  # "-" inside a word -> space
        ("1,000", "1000"),  # comma inside a number removed
        ("2.5", "2.5"),  # period inside a number kept
        ("dont know", "don't know"),  # contraction restored
        ("Yes!\n", "yes"),
        ("  It's   an  apple ", "it's apple"),
    ],
)
def test_vqa_normalisation(raw, norm):
    assert M.normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_leave_one_out():
    # 10 annotators; with k matching answers each leave-one-out subset of 9 holds k-1 (if the left-out one matched)
    # or k matches: acc = mean over the 10 subsets of min(matches / 3, 1).
    ans = ["2"] * 3 + ["3"] * 7
    # k = 3: 3 subsets see 2 matches (2/3), 7 see 3 (1) -> (3 * 2/3 + 7) / 10 = 0.9
    assert M.vqa_accuracy("two", ans) == pytest.approx(0.9)
    # k = 1: 1 subset sees 0, 9 see 1 -> 9 * (1/3) / 10 = 0.3
    assert M.vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3)
    # k = 2: 2 subsets see 1 (1/3), 8 see 2 (2/3) -> (2/3 + 16/3) / 10 = 0.6
    assert M.vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    # k = 4: 4 subsets see 3 (1), 6 see 4 (1) -> 1
    assert M.vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == 1.0
    assert M.vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert M.vqa_accuracy("The Dog.", ["dog"] * 10) == 1.0
    with pytest.raises(ValueError, match="answers"):
        M.vqa_accuracy("x", [])


def test_exact_match_gqa():
    assert M.exact_match("Left.", "left") == 1.0
    assert M.exact_match(" yes ", "yes") == 1.0
    assert M.exact_match("the left", "left") == 0.0  # GQA does not drop articles


def test_yes_no_and_pope_metrics():
    assert M.yes_no("Yes, there is a dog.") == "yes"
    assert M.yes_no("No.") == "no"
    assert M.yes_no("There is not a dog in the image.") == "no"
    assert M.yes_no("A dog") == "other"
    preds = ["yes", "yes", "no", "no", "Yes.", "maybe"]
    gts = ["yes", "no", "no", "yes", "yes", "yes"]
    # yes-preds: 3 (tp 2, fp 1); not-yes: no/no/maybe -> tn 1, fn 2 ("maybe" on a yes is a miss)
    m = M.pope_metrics(preds, gts)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match="yes/no"):
        M.pope_metrics(["yes"], ["maybe"])


def test_mme_scores():
    rows = [
        ("existence", "a.jpg", "Yes", "Yes"), ("existence", "a.jpg", "No", "No"),  # image a: both right
        ("existence", "b.jpg", "Yes", "Yes"), ("existence", "b.jpg", "Yes", "No"),  # image b: one right
        ("code_reasoning", "c.png", "no", "Yes"), ("code_reasoning", "c.png", "no", "No"),
    ]
    s = M.mme_scores(rows)
    # existence: acc 3/4, acc+ 1/2 -> score 125; code_reasoning: acc 1/2, acc+ 0 -> 50
    assert s["existence_acc"] == 0.75 and s["existence_acc_plus"] == 0.5 and s["existence_score"] == 125.0
    assert s["code_reasoning_score"] == 50.0
    assert s["perception"] == 125.0 and s["cognition"] == 50.0 and s["total"] == 175.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"), ("B.", "B"), ("(C) a cat", "C"), ("The answer is D.", "D"), ("Answer: A", "A"),
        ("I think it is C because", "C"), ("a red apple", "B"), ("E", None), ("", None),
        ("A or B", None),  # two letters: undecided
    ],
)
def test_extract_option(text, expected):
    assert M.extract_option(text, ["a dog", "a red apple", "a cat", "a bird"]) == expected


def test_mmbench_circular():
    # question 7 has 3 circular variants (7, 1000007, 2000007), question 8 has 2; one variant of 7 is wrong
    rows = [(7, True), (1_000_007, False), (2_000_007, True), (8, True), (1_000_008, True)]
    m = M.mmbench_circular(rows)
    assert m["questions"] == 2 and m["circular_accuracy"] == 0.5 and m["vanilla_accuracy"] == 0.8


def test_wer_hand_checked_and_against_jiwer():
    # one substitution (sat -> sit), one deletion (the), one insertion (down): 3 errors / 6 words
    assert M.word_errors("The cat sat on the mat.", "the cat sit on mat down") == (3, 6)
    assert M.wer(["hello world"], ["Hello, world!"]) == 0.0
    assert M.wer(["a b c d"], [""]) == 1.0
    with pytest.raises(ValueError, match="hypotheses"):
        M.wer(["a"], [])
    jiwer = pytest.importorskip("jiwer")
    refs = ["the quick brown fox", "jumps over the lazy dog", "it was a bright cold day in april"]
    hyps = ["the quick brown box", "jumps over lazy dog dog", "it was bright cold day in april and"]
    ours = M.wer(refs, hyps)
    theirs = jiwer.wer([" ".join(M.normalize_transcript(r)) for r in refs],
                       [" ".join(M.normalize_transcript(h)) for h in hyps])
    assert ours == pytest.approx(theirs)
