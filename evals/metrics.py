"""Benchmark metrics as each benchmark defines them (pure Python; no torch).

- `vqa_accuracy`: VQAv2 / TextVQA. Answers are normalised as the official VQA evaluation does (newlines/tabs to
  spaces; punctuation removed or turned into a space depending on context; a period not inside a number dropped;
  lowercase; number words zero..ten to digits; articles a/an/the dropped; apostrophe-less contractions restored),
  and the accuracy is the mean over the 10 leave-one-out subsets of 9 annotators of min(#matches / 3, 1).
- `exact_match`: GQA (lowercase, trailing period and surrounding space stripped).
- `yes_no` + `pope_metrics`: POPE accuracy / precision / recall / F1 / yes-ratio ("yes" is the positive class).
- `mme_scores`: MME acc and acc+ per category (acc+: both questions of an image right), category score =
  100 * (acc + acc+), perception and cognition totals = sums over their categories.
- `extract_option`: the option letter in a free-text answer (ScienceQA-IMG, MMBench); `mmbench_circular`: a question
  counts only if every circular variant of it (same ``index % 1_000_000``) is right.
- `wer`: word error rate (word-level Levenshtein / reference words) after `normalize_transcript` (the zoo's).
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Sequence

__all__ = [
    "normalize_vqa_answer",
    "vqa_accuracy",
    "exact_match",
    "yes_no",
    "pope_metrics",
    "mme_scores",
    "MME_PERCEPTION",
    "MME_COGNITION",
    "extract_option",
    "mmbench_circular",
    "normalize_transcript",
    "word_errors",
    "wer",
]

# ---- VQA answer normalisation (the rules of the official VQA evaluation) -------------------------------------------
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# apostrophe-less spelling -> the contraction (answers are compared with apostrophes restored)
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd":
    "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve":
    "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve":
    "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period not followed by a digit (kept inside "2.5")
_COMMA_NUM = re.compile(r"(\d)(,)(\d)")  # "1,000"


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # attached to a word boundary or inside a number: removed; elsewhere: a space ("black-white" -> "black white")
        if (p + " " in text or " " + p in text) or _COMMA_NUM.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer as the official VQA evaluation does (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the annotators' answers (10 for VQAv2 / TextVQA).

    For each annotator, the others' answers that equal the prediction are counted; min(count / 3, 1) averaged over
    the annotators. With 10 answers of which k match: k = 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.
    """
    if not answers:
        raise ValueError("answers: expected at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def exact_match(prediction: str, answer: str) -> float:
    """GQA exact match: lowercase, surrounding whitespace and a trailing period stripped, then equality."""
    def norm(t: str) -> str:
        return t.strip().lower().rstrip(".").strip()

    return float(norm(prediction) == norm(answer))


# ---- yes / no benchmarks -------------------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z']+")


def yes_no(text: str) -> str:
    """"yes", "no" or "other" for a free-text answer: POPE's rule (the first sentence holding "no"/"not" is no,
    otherwise yes if it holds "yes"); text with neither is "other"."""
    first = re.split(r"[.\n]", text.strip().lower(), maxsplit=1)[0]
    words = set(_WORD.findall(first))
    if words & {"no", "not"}:
        return "no"
    if "yes" in words:
        return "yes"
    return "other"


def pope_metrics(predictions: Iterable[str], answers: Iterable[str]) -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 (positive = "yes") and yes-ratio (share of predictions that are yes).
    A prediction that is neither yes nor no counts as a wrong "no" for precision/recall (it never says yes)."""
    tp = fp = tn = fn = yes = n = 0
    for p, a in zip(predictions, answers, strict=True):
        p, a = yes_no(p), a.strip().lower()
        if a not in ("yes", "no"):
            raise ValueError(f"answers: POPE answers are yes/no, got {a!r}")
        n += 1
        yes += p == "yes"
        if p == "yes":
            tp += a == "yes"
            fp += a == "no"
        else:
            fn += a == "yes"
            tn += a == "no" and p == "no"
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else float("nan"), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": yes / n if n else float("nan")}


# ---- MME -----------------------------------------------------------------------------------------------------------
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(rows: Iterable[tuple[str, str, str, str]]) -> dict[str, float]:
    """MME scores from ``(category, image, prediction, answer)`` rows (two questions per image).

    Returns ``{<category>_acc, <category>_acc_plus, <category>_score, perception, cognition, total}``; acc and acc+
    in [0, 1], scores as MME reports them (100 * (acc + acc+) per category, summed per group).
    """
    by_cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for cat, image, pred, ans in rows:
        by_cat[cat][image].append(yes_no(pred) == ans.strip().lower())
    out: dict[str, float] = {}
    for cat, images in by_cat.items():
        flat = [c for v in images.values() for c in v]
        acc = sum(flat) / len(flat)
        acc_plus = sum(all(v) for v in images.values()) / len(images)
        out[f"{cat}_acc"], out[f"{cat}_acc_plus"], out[f"{cat}_score"] = acc, acc_plus, 100 * (acc + acc_plus)
    out["perception"] = sum(out.get(f"{c}_score", 0.0) for c in MME_PERCEPTION)
    out["cognition"] = sum(out.get(f"{c}_score", 0.0) for c in MME_COGNITION)
    out["total"] = out["perception"] + out["cognition"]
    return out


# ---- multiple choice -----------------------------------------------------------------------------------------------
def extract_option(text: str, options: Sequence[str], letters: str = string.ascii_uppercase) -> str | None:
    """The option letter a free-text answer picks, or None.

    Tried in order: a bare letter ("B", "B.", "(B)") or one followed by a delimiter ("B) cat", "B. cat");
    "answer is B" / "answer: B"; a single standalone letter among the valid ones anywhere in the text; the text of
    exactly one option contained in the answer.

    Args:
        text: The model's answer.
        options: Option texts in letter order (A, B, ...).
        letters: Letter alphabet.
    """
    valid = letters[: len(options)]
    t = text.strip()
    m = re.match(r"^\(?([A-Z])\)?[.:]?$", t) or re.match(r"^\(?([A-Z])[.:)]\s", t)
    if m and m.group(1) in valid:
        return m.group(1)
    m = re.search(r"answer\s*(?:is|:)?\s*:?\s*\(?([A-Z])\)?(?![a-zA-Z])", t, flags=re.IGNORECASE)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    found = {c for c in re.findall(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", t) if c in valid}
    if len(found) == 1:
        return found.pop()
    low = t.lower()
    hits = [valid[i] for i, o in enumerate(options) if o and str(o).strip().lower() in low]
    if len(hits) == 1:
        return hits[0]
    return None


def mmbench_circular(rows: Iterable[tuple[int, bool]]) -> dict[str, float]:
    """MMBench circular evaluation from ``(index, correct)`` rows: variants of a question share
    ``index % 1_000_000``; a question is right only if all its variants are. Returns accuracy over questions
    (``circular_accuracy``), the plain per-row accuracy (``vanilla_accuracy``) and the number of questions."""
    groups: dict[int, list[bool]] = defaultdict(list)
    flat = []
    for index, ok in rows:
        groups[int(index) % 1_000_000].append(bool(ok))
        flat.append(bool(ok))
    if not groups:
        return {"circular_accuracy": float("nan"), "vanilla_accuracy": float("nan"), "questions": 0}
    return {"circular_accuracy": sum(all(v) for v in groups.values()) / len(groups),
            "vanilla_accuracy": sum(flat) / len(flat), "questions": len(groups)}


# ---- ASR -----------------------------------------------------------------------------------------------------------
# One WER implementation in the package: the zoo's (Whisper-style English normaliser: lowercase, no punctuation,
# bracketed annotations dropped, Mr/Dr/St and single digits spelled out as LibriVox transcripts spell them).
from mmcompress.zoo.metrics import edit_distance, wer  # noqa: E402
from mmcompress.zoo.metrics import normalize_text as normalize_transcript  # noqa: E402


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words) after `normalize_transcript`."""
    ref, hyp = normalize_transcript(reference), normalize_transcript(hypothesis)
    return edit_distance(ref, hyp), len(ref)
