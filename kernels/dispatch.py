"""Kernel dispatch: one flag, ``MMCOMPRESS_KERNELS=auto|triton|torch`` (DESIGN §5).

``auto`` (default): Triton on CUDA tensors when triton imports, the PyTorch path elsewhere and under autograd.
``triton``: always the Triton kernel (on CPU tensors this needs ``TRITON_INTERPRET=1`` set before triton is imported).
``torch``: always the PyTorch path (the reference; for float32 CPU merges of many rows, `merge.merge_bags`).
"""

from __future__ import annotations

import os

import torch

_MODES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    """The current value of MMCOMPRESS_KERNELS (read on every call so tests and users can flip it)."""
    mode = os.environ.get("MMCOMPRESS_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"MMCOMPRESS_KERNELS: expected one of {_MODES}, got {mode!r}")
    return mode


def triton_available() -> bool:
    """True when triton imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def needs_grad(*ts: torch.Tensor | None) -> bool:
    """True when autograd records ops on any of `ts` (the Triton kernels have no backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def use_triton(t: torch.Tensor, *grad_inputs: torch.Tensor | None) -> bool:
    """Whether an op on tensor `t` should take the Triton path under the current flag.

    `grad_inputs`: the op's differentiable inputs. When autograd records any of them, `auto` takes the PyTorch path
    (the kernels have no backward) and `triton` raises instead of returning outputs without gradients.
    """
    mode = kernel_mode()
    if mode == "torch":
        return False
    grad = needs_grad(*grad_inputs)
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("MMCOMPRESS_KERNELS=triton needs triton (pip install mmcompress[kernels])")
        if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("MMCOMPRESS_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1")
        if grad:
            raise RuntimeError("MMCOMPRESS_KERNELS=triton: the Triton kernels have no backward, but an input requires "
                               "grad; use MMCOMPRESS_KERNELS=auto (PyTorch path under autograd) or torch.no_grad()")
        return True
    return t.device.type == "cuda" and triton_available() and not grad
