"""Deprecated re-export shim, kept for one release: `mmcompress.integrations.fastv` is now `mmcompress.inllm.fastv`."""

from __future__ import annotations

import warnings

from mmcompress.inllm.fastv import FastV, FastVRule, fastv_keep_count

__all__ = ["FastV", "FastVRule", "fastv_keep_count"]

warnings.warn("mmcompress.integrations.fastv is deprecated and will be removed in the next release: use "
              "mmcompress.inllm.fastv (FastV)", DeprecationWarning, stacklevel=2)
