"""Deprecated re-export shim, kept for one release: `mmcompress.integrations.vllm_plugin` is `mmcompress.vllm_plugin`.

Import-light like its target (no vLLM, no torch): vLLM may still call `register` through an entry point installed
by an older release.
"""

from __future__ import annotations

import warnings

from mmcompress.vllm_plugin import SUPPORTED, Setting, budget, method_code, method_name, register, resolve

__all__ = ["register", "Setting", "resolve", "budget", "SUPPORTED", "method_code", "method_name"]

warnings.warn("mmcompress.integrations.vllm_plugin is deprecated and will be removed in the next release: use "
              "mmcompress.vllm_plugin (register)", DeprecationWarning, stacklevel=2)
