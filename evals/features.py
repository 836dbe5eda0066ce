"""Vision-tower features of a task's images, as ``LlavaForConditionalGeneration.get_image_features`` selects them
before the projector, cached on disk: one loop for every task (easy-VQA images, detail scenes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def tower_features(
    name: str,
    n_images: int,
    images: Callable[[int, int], list[Any]],
    vision_tower: object,
    image_processor: object,
    vision_feature_layer: int = -1,
    drop_cls: bool = True,
    batch_size: int = 50,
    cache: bool = True,
    dtype: str = "float32",
) -> Any:
    """``hidden_states[vision_feature_layer]`` (CLS dropped for strategy "default") of images 0..n_images-1.

    Cached under ``<mmcompress cache>/features/<name>_<DINOv2 weights hash>_<size>px_L<layer>_<cls>.pt``.

    Args:
        name: Cache name of the image set (e.g. ``"easyvqa_train"``); it must identify the images.
        n_images: Number of images.
        images: ``images(start, stop)`` -> the PIL images ``start..stop-1``.
        vision_tower: The HF ``Dinov2Model``.
        image_processor: Callable ``(list of PIL) -> {"pixel_values": [B, 3, S, S]}`` with a ``size`` attribute.
        vision_feature_layer: Index into ``hidden_states``.
        drop_cls: Drop the CLS token (strategy ``"default"``).
        batch_size: Images per forward.
        cache: Read/write the on-disk cache.
        dtype: ``"float32"`` or ``"float16"`` (half the disk and memory, for training sets; the cache key names it).

    Returns:
        ``torch.Tensor [n_images, N, C]`` of `dtype`, row ``i`` = image ``i``.
    """
    import io

    import torch

    from mmcompress.zoo._cache import atomic_write_bytes, cache_root, file_sha256
    from mmcompress.zoo.dinov2 import dinov2_onnx_path

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype: expected 'float32' or 'float16', got {dtype!r}")
    size = int(getattr(image_processor, "size", 0))
    tail = "" if dtype == "float32" else "_fp16"
    key = f"{name}_{file_sha256(dinov2_onnx_path())[:16]}_{size}px_L{vision_feature_layer}_{int(drop_cls)}{tail}.pt"
    path = cache_root() / "features" / key
    if cache and path.is_file():
        return torch.load(path)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover

        def tqdm(x, **_):  # type: ignore[no-redef]
            return x

    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, n_images, batch_size), desc=f"DINOv2 features ({name})"):
            pv = image_processor(images(start, min(start + batch_size, n_images)))["pixel_values"]  # [b, 3, S, S]
            hs = vision_tower(pv, output_hidden_states=True).hidden_states[vision_feature_layer]  # [b, 1+N, C]
            out.append(hs[:, 1:] if drop_cls else hs)  # == mmcompress.zoo.refvlm.vision_features for the defaults
    feats = torch.cat(out).to(getattr(torch, dtype)).contiguous()  # [n_images, N, C]
    if cache:
        buf = io.BytesIO()
        torch.save(feats, buf)
        atomic_write_bytes(path, buf.getvalue())
    return feats
