"""Questions a model can read: its own question forms (ref-vlm-mini knows only its training tasks' forms) and the
words its tokenizer does not know, so the image tab can flag a question the answer would mean nothing for.

Imports neither torch nor gradio.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

SLOT = "X"  # stands for a colour, shape or count word in a question form


def words(text: str) -> list[str]:
    """Lower-cased words of `text`, punctuation split off (how ref-vlm-mini's tokenizer splits)."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


@dataclass(frozen=True)
class QuestionForms:
    """The question forms a model was trained on.

    Attributes:
        slots: words a form's slot takes (colours, shapes and their plurals).
        keys: each form with its slot words replaced by `SLOT`, as a tuple of words.
        examples: one concrete question per form, in a stable order (offered in the question box).
    """

    slots: frozenset[str]
    keys: frozenset[tuple[str, ...]]
    examples: tuple[str, ...]

    def key(self, question: str) -> tuple[str, ...]:
        """The form of `question`: its words with slot words replaced by `SLOT` (a trailing "?" added if missing)."""
        w = [SLOT if t in self.slots else t for t in words(question)]
        return tuple(w if w[-1:] == ["?"] else [*w, "?"])

    def matches(self, question: str) -> bool:
        """Whether `question` is one of the forms (any colour or shape in the slots)."""
        return bool(question.strip()) and self.key(question) in self.keys


@lru_cache(maxsize=1)
def refvlm_mini_forms() -> QuestionForms:
    """ref-vlm-mini's forms: every easy-VQA question form and `detail`'s question templates (the easy-VQA test split
    holds all 24 forms of the train split)."""
    from mmcompress.evals import detail, easyvqa

    slots = {a for a in easyvqa.answers() if a not in ("yes", "no")}
    slots |= set(detail.COLORS) | set(detail.SHAPES) | {f"{s}s" for s in detail.SHAPES}
    forms = QuestionForms(frozenset(slots), frozenset(), ())
    keys: dict[tuple[str, ...], str] = {}
    for s in easyvqa.load_split("test"):
        keys.setdefault(forms.key(s.question), s.question)
    colours, shapes = list(detail.COLORS), list(detail.SHAPES)
    c, s, c2, s2 = colours[0], shapes[0], colours[1], shapes[1]
    for q in (f"what color is the {s}?", f"what shape is the {c} object?", f"is there a {c} {s}?",
              f"how many {s}s are there?", f"where is the {c} {s} relative to the {c2} {s2}?"):
        keys.setdefault(forms.key(q), q)
    examples = tuple(sorted(keys.values(), key=lambda q: (not q.startswith("what"), len(q), q)))
    return QuestionForms(frozenset(slots), frozenset(keys), examples)


def forms_for(model_name: str) -> QuestionForms | None:
    """The question forms of a built-in model that reads only its training tasks' questions (ref-vlm-mini), or None
    for a model that takes free-form questions."""
    return refvlm_mini_forms() if model_name == "ref-vlm-mini" else None


def unknown_words(tokenizer: object, question: str) -> list[str]:
    """Words of `question` that `tokenizer` maps to its unknown token (in order, once each); [] for tokenizers
    without one (byte-level BPE reads every string)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    out: list[str] = []
    for w in words(question):
        if w in out:
            continue
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if unk in ids:
            out.append(w)
    return out


def question_note(question: str, forms: QuestionForms | None, unknown: list[str]) -> str:
    """Markdown under the question box: empty when the model can read the question, else what it cannot read."""
    notes = []
    if unknown:
        notes.append(f"**The model cannot read:** {', '.join(unknown)} (outside its vocabulary: its tokenizer maps "
                     f"{'it' if len(unknown) == 1 else 'them'} to the unknown token).")
    if forms is not None and question.strip() and not forms.matches(question):
        notes.append("**Not one of the model's question forms:** it was trained only on easy-VQA and detail "
                     "questions, so its answer to this one means nothing. Pick one of its forms below.")
    return " ".join(notes)
