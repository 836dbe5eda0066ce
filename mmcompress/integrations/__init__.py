"""Deprecated re-export shim, kept for one release: `mmcompress.integrations` is now `mmcompress.hf`.

Use `mmc.apply` / `mmc.remove` / `mmc.disabled` / `mmc.stats` (or `mmcompress.hf`). The other former modules:
`mmcompress.integrations.fastv` -> `mmcompress.inllm.fastv`, `mmcompress.integrations.vllm_plugin` ->
`mmcompress.vllm_plugin`, `mmcompress.integrations.lmms_eval` -> `mmcompress.lmms_eval_plugin`. Each name read here
emits a `DeprecationWarning` naming its new path; nothing inside mmcompress imports this package.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__ = ["apply", "remove", "disabled", "stats", "Adapter", "register_adapter", "supported_model_types"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'mmcompress.integrations' has no attribute {name!r}")
    warnings.warn(f"mmcompress.integrations.{name} is deprecated and will be removed in the next release: use "
                  f"mmcompress.hf.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module("mmcompress.hf"), name)
