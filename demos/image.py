"""Image tab backend: one VLM (ref-vlm or any local HF VLM that `mmcompress.apply` supports) shared by all requests.

The token map is the ``assign`` of the very compressor call the model made (recorded on the adapter's compressor
for the duration of one ``generate``), so attention and text-guided methods get their real scores and question
embeddings, and the map shows exactly what the LLM received. It is drawn over the pixels the vision tower saw.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from .overlay import overlay_token_map
from .safety import keep_fraction

VIEW_SIDE = 224  # the overlay is upscaled (nearest) to about this side, so small grids stay readable


class CompressorRecorder:
    """Stands in for an adapter's compressor: forwards every call and keeps (grid, prefix, output)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: list[tuple[Any, int, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, x: Any, **kw: Any) -> Any:
        out = self._inner(x, **kw)
        self.calls.append((kw.get("grid"), int(kw.get("prefix") or 0), out))
        return out


def record_compressions(model: Any) -> CompressorRecorder | None:
    """Wrap the compressor of a model wrapped by `mmcompress.apply` with a recorder (None if it cannot be found)."""
    from mmcompress import hf

    adapter = getattr(hf, "_adapter", lambda m: None)(model)
    if adapter is None or not hasattr(adapter, "compressor"):
        return None
    rec = CompressorRecorder(adapter.compressor)
    adapter.compressor = rec
    return rec


def model_view(pixel_values: Any, image_processor: Any, image: np.ndarray) -> np.ndarray:
    """The picture the vision tower saw, as uint8 [S, S, 3]: ``pixel_values`` [1, 3, S, S] un-normalised with the
    processor's mean/std (min-max when it has none); other layouts (tiles, video) fall back to ``image``."""
    if pixel_values is None or pixel_values.ndim != 4 or pixel_values.shape[0] != 1 or pixel_values.shape[1] != 3:
        return np.asarray(image)
    x = pixel_values[0].float().permute(1, 2, 0).cpu().numpy()  # [S, S, 3]
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is not None and std is not None:
        x = x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    else:
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
    return (x.clip(0, 1) * 255).round().astype(np.uint8)


def token_map(view: np.ndarray, assign: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Overlay of ``assign`` [gh * gw] on ``view`` [H, W, 3], resized to a multiple of the grid near `VIEW_SIDE`."""
    from PIL import Image

    gh, gw = grid
    p = max(1, round(VIEW_SIDE / max(gh, gw)))
    img = np.asarray(Image.fromarray(view).resize((gw * p, gh * p), Image.BICUBIC))  # [gh * p, gw * p, 3]
    return overlay_token_map(img, assign, (gh, gw))


def image_grid(grid: Any, n: int) -> tuple[int, int] | None:
    """The (h, w) patch grid of one image's `n` tokens from the grid its compressor got: ``(h, w)`` (LLaVA), or
    ``(1, h, w)`` (Qwen2-VL and other M-RoPE families record images as one frame); None when the tokens are not one
    2-D grid (several frames, tiles, audio)."""
    if grid is None:
        return None
    g = tuple(int(v) for v in grid)
    while len(g) > 2 and g[0] == 1:
        g = g[1:]
    return g if len(g) == 2 and g[0] * g[1] == n else None


def _first_assign(rec: CompressorRecorder | None, st: dict[str, Any]) -> tuple[np.ndarray | None, Any]:
    """([N] assign of the first image item, its (gh, gw) grid or None): from the recorded compressor call (exact
    grid), else from ``mmcompress.stats(model)["assign"]`` (placeholder families) with a square grid."""
    if rec is not None and rec.calls:
        grid, prefix, out = rec.calls[0]  # the first (prefill) call: [1, prefix + N] assign
        assign = out.assign[0, prefix:].cpu().numpy()
        return assign, image_grid(grid, assign.size)
    for mod, _, a in st.get("assign", []):
        if mod == "image" and a is not None:
            assign = a.cpu().numpy() if hasattr(a, "cpu") else np.asarray(a)  # [N]
            g = int(round(assign.size ** 0.5))
            return assign, (g, g) if g * g == assign.size else None
    return None, None


class ImageBackend:
    """Lazily loaded VLM shared by all requests behind a lock.

    Args:
        model_name: ``ref-vlm`` or a local HF VLM directory (``AutoModelForImageTextToText``).
        max_new_tokens: longest answer.
    """

    def __init__(self, model_name: str = "ref-vlm", max_new_tokens: int = 8) -> None:
        self.model_name = model_name
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()
        self._vlm: Any = None
        self.warm_ups = 0  # how many times a loaded model was warmed up (once per load)

    def _load(self) -> Any:
        if self._vlm is None:
            from mmcompress.evals.backends import VLMBackend

            vlm = VLMBackend.load(self.model_name)
            self._warm_up(vlm)
            self._vlm = vlm
        return self._vlm

    def load(self) -> None:
        """Load (and warm up) the model now rather than on the first request."""
        with self.lock:
            self._load()

    def _warm_up(self, vlm: Any) -> None:
        """One uncompressed and one compressed answer on a grey image, not shown: the first calls of a process pay
        one-time costs (allocations, the first run of each kernel, hooks) that would land on the first table row."""
        import torch
        from PIL import Image

        import mmcompress as mmc

        inputs = vlm._inputs([Image.new("RGB", (64, 64), (128, 128, 128))], ["what is in the image?"])
        with torch.inference_mode():
            vlm.model.generate(**inputs, max_new_tokens=2, do_sample=False)
            try:
                mmc.apply(vlm.model, "tome", keep=0.5)
                vlm.model.generate(**inputs, max_new_tokens=2, do_sample=False)
            except (ValueError, TypeError):
                pass  # a model tome cannot wrap: the uncompressed warm-up is still done
            finally:
                mmc.remove(vlm.model)
        self.warm_ups += 1

    def answer(self, image: np.ndarray, question: str, method: str | None, keep: float | str) -> dict[str, Any]:
        """Answer a question, compressed by ``method`` (None = uncompressed).

        Args:
            image: uint8 [H, W, 3].
            question: the question text.
            method: compressor name or None.
            keep: fraction of image tokens kept, (0, 1], or "auto" (the method's own per-image budget).

        Returns:
            dict with answer, tokens_in, tokens_out, compress_ms, generate_ms, overlay (uint8 [S, S, 3] or None when
            the model's tokens are not one 2-D grid).
        """
        import torch
        from PIL import Image

        import mmcompress as mmc

        if keep != "auto":
            keep = keep_fraction(keep, "image tokens")  # an int 1 from the UI means all tokens, not one
        with self.lock, torch.inference_mode():
            vlm = self._load()
            model = vlm.model
            inputs = vlm._inputs([Image.fromarray(np.asarray(image)).convert("RGB")], [question])
            n_img = int(inputs["input_ids"].eq(vlm.image_token_id).sum()) if vlm.image_token_id is not None else 0
            rec, st = None, {}
            if method is not None:
                mmc.apply(model, method, keep=keep)
                rec = record_compressions(model)
            try:
                t0 = time.perf_counter()
                ids = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
                generate_ms = (time.perf_counter() - t0) * 1e3
                if method is not None:
                    st = mmc.stats(model)
            finally:
                if method is not None:
                    mmc.remove(model)
            text = vlm._decode(ids[:, inputs["input_ids"].shape[1]:])[0]
            overlay = None
            assign, grid = _first_assign(rec, st)
            if assign is not None and grid is not None:
                ip = getattr(vlm.processor, "image_processor", None)
                overlay = token_map(model_view(inputs.get("pixel_values"), ip, image), assign, grid)
        tokens_in = int(sum(st.get("tokens_in", []))) or n_img
        tokens_out = int(sum(st.get("tokens_out", []))) if st else tokens_in
        return {"answer": text, "tokens_in": tokens_in, "tokens_out": tokens_out,
                "compress_ms": float(st.get("compress_ms", 0.0)), "generate_ms": generate_ms, "overlay": overlay}
