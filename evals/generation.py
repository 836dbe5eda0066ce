"""Generation settings: how a VLM decodes its answers, one path for `mmcompress bench` and the lmms-eval model.

    mmcompress bench ... --gen-kwargs temperature=0.7,top_p=0.9       # sampling
    mmcompress bench ... --gen-kwargs num_beams=3                     # beam search
    python -m lmms_eval --model mmcompress ... --gen_kwargs temperature=0.7,top_p=0.9

Both read the keys (``--gen-kwargs`` through `parse_gen_kwargs`) into a `GenerationSettings`
(`GenerationSettings.from_kwargs`) and hand it to
`mmcompress.evals.backends.VLMBackend.predict`, which runs ``model.generate`` with `GenerationSettings.generate_kwargs`
and cuts each answer at the first stop string (`GenerationSettings.cut`). The default is greedy decoding, what
`mmcompress bench` always ran. Sampled answers are seeded per batch from its sample ids (`batch_seed`), so a resumed or
sharded run, or lmms-eval on the same batches, draws the same answers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["GenerationSettings", "batch_seed", "parse_gen_kwargs"]

KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams", "until")


@dataclass(frozen=True)
class GenerationSettings:
    """How ``generate`` decodes (lmms-eval's ``generation_kwargs`` keys).

    Attributes:
        max_new_tokens: answer budget in tokens; None = the task's own.
        do_sample: sample instead of greedy / beam search (also implied by ``temperature`` > 0).
        temperature: sampling temperature (> 0); None = 1.0 when sampling.
        top_p: nucleus sampling mass in (0, 1]; None = off.
        top_k: sample among the k most likely tokens; None = off.
        num_beams: beams (1 = no beam search).
        until: stop strings; the answer is cut at the first occurrence of any of them.
    """

    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_beams: int = 1
    until: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and (isinstance(self.max_new_tokens, bool)
                                                or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens: expected a positive int, got {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample: expected true or false, got {self.do_sample!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature: expected a number > 0 (0 means greedy), got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k: expected a positive int, got {self.top_k!r}")
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams: expected an int >= 1, got {self.num_beams!r}")
        if not isinstance(self.until, tuple) or not all(isinstance(s, str) for s in self.until):
            raise ValueError(f"until: expected stop strings, got {self.until!r}")
        if not self.do_sample and (self.temperature is not None or self.top_p is not None or self.top_k is not None):
            raise ValueError("do_sample: temperature, top_p and top_k apply to sampling; set temperature > 0 or "
                             "do_sample=true")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any] | None) -> GenerationSettings:
        """Settings from lmms-eval-style keys (a task's ``generation_kwargs``, ``--gen_kwargs``, ``--gen-kwargs``).

        ``temperature: 0`` (lmms-eval's way of saying greedy) and ``do_sample: false`` mean greedy; ``temperature`` > 0
        turns sampling on; ``top_p``/``top_k`` are dropped when greedy (lmms-eval tasks list ``top_p`` beside
        ``temperature: 0``); ``until`` may be one string or a list.

        Raises:
            ValueError: an unknown key or a bad value (the message names the key).
        """
        kw = dict(kwargs or {})
        unknown = sorted(set(kw) - set(KEYS))
        if unknown:
            raise ValueError(f"{unknown[0]}: not a generation setting; known: {', '.join(KEYS)}")
        temperature = _number("temperature", kw.get("temperature"), float)
        do_sample = _flag("do_sample", kw.get("do_sample", False)) or (temperature or 0) > 0
        until = kw.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        num_beams = _number("num_beams", kw.get("num_beams"), int)
        return cls(
            max_new_tokens=_number("max_new_tokens", kw.get("max_new_tokens"), int),
            do_sample=do_sample,
            temperature=temperature if do_sample and temperature else None,
            top_p=_number("top_p", kw.get("top_p"), float) if do_sample else None,
            top_k=_number("top_k", kw.get("top_k"), int) if do_sample else None,
            num_beams=1 if num_beams is None else num_beams,
            until=until,
        )

    @property
    def greedy(self) -> bool:
        """Greedy decoding (no sampling, one beam)."""
        return not self.do_sample and self.num_beams == 1

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate`` (besides ``max_new_tokens``): always ``do_sample`` and
        ``num_beams``, so a model's own generation config never switches decoding on its own."""
        out: dict[str, Any] = {"do_sample": self.do_sample, "num_beams": self.num_beams}
        if self.do_sample:
            out["temperature"] = self.temperature if self.temperature is not None else 1.0
            if self.top_p is not None:
                out["top_p"] = self.top_p
            if self.top_k is not None:
                out["top_k"] = self.top_k
        return out

    def cut(self, text: str) -> str:
        """`text` cut at the first occurrence of any stop string of ``until``."""
        for stop in self.until:
            if stop:
                text = text.split(stop, 1)[0]
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields that differ from greedy's defaults (what ``config.json`` records)."""
        default = asdict(GenerationSettings())
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v != default[k]}


def parse_gen_kwargs(text: str) -> dict[str, Any]:
    """``"temperature=0.7,top_p=0.9,until=."`` (``--gen-kwargs``, the format of lmms-eval's ``--gen_kwargs``) -> the
    keys for `GenerationSettings.from_kwargs`; values are read as JSON where they parse (numbers, true/false), else
    kept as strings.

    Raises:
        ValueError: an item without ``=`` (the message names it).
    """
    import json

    kw: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"gen_kwargs: expected key=value items separated by commas, got {item!r}")
        try:
            kw[key.strip()] = json.loads(value.strip())
        except json.JSONDecodeError:
            kw[key.strip()] = value
    return kw


def batch_seed(ids: Sequence[str | int], settings: GenerationSettings) -> int:
    """63-bit seed of a sampled batch from its sample ids and the settings: the same batch draws the same answers in
    any run (resumed, sharded, or through lmms-eval)."""
    data = "\x00".join(str(i) for i in ids) + "\x01" + repr(sorted(settings.to_dict().items()))
    return int.from_bytes(hashlib.sha256(data.encode()).digest()[:8], "little") >> 1


def _number(key: str, value: Any, kind: type) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"{key}: expected a number, got {value!r}")
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if kind is int and out != float(value):
        raise ValueError(f"{key}: expected an int, got {value!r}")
    return out


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{key}: expected true or false, got {value!r}")
