"""mmcompress: training-free compression of image, video and audio tokens for vision-language models.

    >>> import mmcompress as mmc
    >>> comp = mmc.create("tome", keep=64)
    >>> out = comp(x)            # x [B, N, C] -> out.x [B, 64, C], out.assign [B, N], out.size [B, 64]

The package imports torch only when a compressor or integration is first used, so `mmcompress list` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from mmcompress._version import __version__
from mmcompress.registry import available, create, register

__all__ = [
    "__version__",
    "available",
    "create",
    "register",
    "get",
    "Compressor",
    "CompressOutput",
    "apply",
    "remove",
    "disabled",
    "stats",
    "zoo",
]

_LAZY = {
    "get": ("mmcompress.registry", "get"),
    "Compressor": ("mmcompress.compressors.base", "Compressor"),
    "Inputs": ("mmcompress.compressors.base", "Inputs"),
    "Plan": ("mmcompress.compressors.base", "Plan"),
    "CompressOutput": ("mmcompress.types", "CompressOutput"),
    "apply": ("mmcompress.hf", "apply"),
    "remove": ("mmcompress.hf", "remove"),
    "disabled": ("mmcompress.hf", "disabled"),
    "stats": ("mmcompress.hf", "stats"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in ("zoo", "compressors", "hf", "inllm", "kernels", "evals"):
        return importlib.import_module(f"mmcompress.{name}")
    raise AttributeError(f"module 'mmcompress' has no attribute {name!r}")
