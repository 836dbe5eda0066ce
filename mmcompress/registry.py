"""Compressor registry: built-ins (lazy, from the catalogue), decorated classes and third-party entry points."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from importlib.metadata import entry_points
from typing import Any

from mmcompress.catalog import BUILTINS, IN_LLM

ENTRY_POINT_GROUP = "mmcompress.compressors"
_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator registering a compressor under `name`.

    Example:
        >>> @register("my_method")
        ... class MyMethod(Compressor): ...
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register(name): expected a non-empty str, got {name!r}")

    def deco(cls: type) -> type:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"register(name): {name!r} is already registered to {existing.__qualname__}")
        if name in BUILTINS and cls.__module__ != f"mmcompress.compressors.{BUILTINS[name][0]}":
            raise ValueError(f"register(name): {name!r} is a built-in compressor name; choose another")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _builtin_available(name: str) -> bool:
    module = BUILTINS[name][0]
    return importlib.util.find_spec(f"mmcompress.compressors.{module}") is not None


def _third_party() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Names of every registered compressor: built-ins, decorated classes and entry points, sorted."""
    names = {n for n in BUILTINS if _builtin_available(n)} | set(_REGISTRY) | set(_third_party())
    return sorted(names)


def get(name: str) -> type:
    """The compressor class registered under `name` (imports its module on first use)."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str compressor name, got {type(name).__name__}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in BUILTINS and _builtin_available(name):
        importlib.import_module(f"mmcompress.compressors.{BUILTINS[name][0]}")
        if name in _REGISTRY:
            return _REGISTRY[name]
    eps = _third_party()
    if name in eps:
        obj = eps[name].load()
        _REGISTRY.setdefault(name, obj)
        return _REGISTRY[name]
    if name in IN_LLM:
        raise ValueError(f"name: {name} runs inside the LLM: use mmc.apply(model, {name!r}, ...) (mmc.create builds "
                         "the compressors that run before the LLM)")
    close = difflib.get_close_matches(name, [*available(), *IN_LLM], n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"name: unknown compressor {name!r}{hint} (available: {', '.join(available())}; inside the "
                     f"LLM, through mmc.apply: {', '.join(IN_LLM)})")


def create(name: str, keep: int | float | str = 0.5, **options: Any):
    """Build the compressor `name` with budget `keep` and method options.

    Args:
        name: a name from `available()`.
        keep: tokens out per sample (int), a fraction of the non-prefix tokens in (0, 1], or "auto".
        **options: method options (see each compressor's docstring).
    """
    return get(name)(keep=keep, **options)
