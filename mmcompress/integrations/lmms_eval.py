"""Deprecated re-export shim, for one release: `mmcompress.integrations.lmms_eval` is `mmcompress.lmms_eval_plugin`.

`python -m mmcompress.integrations.lmms_eval --tasks-dir` still prints the task folder. The names (`manifests`,
`MMCompressLMM`, ...) resolve on first use, so importing this shim needs no lmms-eval.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__ = ["MMCompressLMM", "MMCompressCounts", "manifests", "tasks_dir"]  # noqa: F822 (resolved by __getattr__)

warnings.warn("mmcompress.integrations.lmms_eval is deprecated and will be removed in the next release: use "
              "mmcompress.lmms_eval_plugin", DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'mmcompress.integrations.lmms_eval' has no attribute {name!r}")
    return getattr(importlib.import_module("mmcompress.lmms_eval_plugin"), name)


if __name__ == "__main__":  # `python -m mmcompress.integrations.lmms_eval --tasks-dir`: the --include_path folder
    import runpy

    runpy.run_module("mmcompress.lmms_eval_plugin", run_name="__main__")  # prints it without importing lmms-eval
