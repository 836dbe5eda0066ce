"""Image tab backend: one VLM (ref-vlm or any local HF VLM that `mmcompress.apply` supports) shared by all requests.

The token map is the ``assign`` of the very compressor calls the model made (recorded on the adapter's compressor
for the duration of one ``generate``), so attention and text-guided methods get their real scores and question
embeddings, and the map shows exactly what the LLM received. It is drawn over the pixels the vision tower saw, every
tile of a tiled family (`demos.maps`). In-LLM methods (fastv, pdrop, dart, sparsevlm) drop tokens inside the LLM: their
map shows what the last LLM layers see, their caption how many image tokens each layer saw.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import numpy as np

from .maps import image_grid, inllm_assign, items_map, layer_counts, tile_views, token_map, unnormalise
from .questions import unknown_words
from .safety import keep_fraction

__all__ = ["CompressorRecorder", "ImageBackend", "image_grid", "model_view", "record_compressions", "token_map"]
IN_LLM_NO_MAP = {"sparsevlm": "no map: SparseVLM recycles pruned tokens into merged ones placed in freed positions, "
                              "so which input token each position holds is not recorded"}


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
    return unnormalise(pixel_values[0], image_processor)


def _items(rec: CompressorRecorder | None, st: dict[str, Any]) -> list[tuple[np.ndarray, Any]]:
    """([N] assign, grid) of every item the compressor got in the prefill, in order: from the recorded calls (exact
    grids; a call holds a group of items of one shape, e.g. the tiles of InternVL), else from
    ``mmcompress.stats(model)["assign"]`` (placeholder families) with square grids guessed."""
    if rec is not None and rec.calls:
        return [(a[prefix:].cpu().numpy(), grid) for grid, prefix, out in rec.calls for a in out.assign]
    items = []
    for mod, _, a in st.get("assign", []):
        if mod == "image" and a is not None:
            assign = a.cpu().numpy() if hasattr(a, "cpu") else np.asarray(a)  # [N]
            g = int(round(assign.size ** 0.5))
            items.append((assign, (g, g) if g * g == assign.size else None))
    return items


def _tile_grid(model: Any) -> tuple[int, int] | None:
    """(h, w) tokens of one square tile of the vision tower (LLaVA-NeXT anyres items start with a base tile)."""
    vc = getattr(getattr(model, "config", None), "vision_config", None)
    size, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and patch > 0:
        return size // patch, size // patch
    return None


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
        self._tokenizer: Any = None  # a copy of the model's tokenizer for question checks, outside `lock`
        self._tok_lock = threading.Lock()
        self.warm_ups = 0  # how many times a loaded model was warmed up (once per load)

    def _load(self) -> Any:
        if self._vlm is None:
            from mmcompress.evals.backends import VLMBackend

            vlm = VLMBackend.load(self.model_name)
            self._warm_up(vlm)
            self._tokenizer = copy.deepcopy(getattr(vlm.processor, "tokenizer", None))
            self._vlm = vlm
        return self._vlm

    @property
    def loaded(self) -> bool:
        """Whether the model is loaded (the question check needs its tokenizer)."""
        return self._vlm is not None

    def unknown_words(self, question: str) -> list[str]:
        """Words of `question` the loaded model's tokenizer cannot read (maps to its unknown token); [] before the
        model is loaded or for tokenizers that read every string. Does not wait for a running answer."""
        if self._tokenizer is None:
            return []
        with self._tok_lock:
            return unknown_words(self._tokenizer, question)

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
            method: compressor or in-LLM method name, or None.
            keep: fraction of image tokens kept, (0, 1], or "auto" (the method's own per-image budget).

        Returns:
            dict with answer, tokens_in, tokens_out (for in-LLM methods: what the last LLM layers see), compress_ms,
            generate_ms, overlay (uint8 picture of every tile's map, or None when there is no map) and note (for
            in-LLM methods: image tokens per LLM layer, and why there is no map where there is none).
        """
        import torch
        from PIL import Image

        import mmcompress as mmc
        from mmcompress.catalog import IN_LLM

        if keep != "auto":
            keep = keep_fraction(keep, "image tokens")  # an int 1 from the UI means all tokens, not one
        with self.lock, torch.inference_mode():
            vlm = self._load()
            model = vlm.model
            inputs = vlm._inputs([Image.fromarray(np.asarray(image)).convert("RGB")], [question])
            img_cols = (inputs["input_ids"][0] == vlm.image_token_id).nonzero().squeeze(1).cpu().numpy() \
                if vlm.image_token_id is not None else np.zeros(0, np.int64)  # [n] image columns of the LLM input
            rec, st, pruned = None, {}, None
            if method is not None:
                mmc.apply(model, method, keep=keep)
                rec = record_compressions(model)
            try:
                t0 = time.perf_counter()
                ids = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
                generate_ms = (time.perf_counter() - t0) * 1e3
                if method is not None:
                    st = mmc.stats(model)
                    pruned = _inllm_pruned(model) if method in IN_LLM else None
            finally:
                if method is not None:
                    mmc.remove(model)
            text = vlm._decode(ids[:, inputs["input_ids"].shape[1]:])[0]
            items = _items(rec, st)
            note = ""
            if method in IN_LLM:
                items, note = _inllm_items(method, items, img_cols, pruned, st)
            overlay = None
            if items:
                ip = getattr(vlm.processor, "image_processor", None)
                views = tile_views(inputs.get("pixel_values"), ip)
                overlay = items_map(items, views, np.asarray(image), _tile_grid(model))
        tokens_in = int(sum(st.get("tokens_in", []))) or img_cols.size
        tokens_out = int(sum(st.get("tokens_out", []))) if st else tokens_in
        if method in IN_LLM and st.get("inllm_removed"):
            tokens_out = tokens_in - int(st["inllm_removed"][0])
        return {"answer": text, "tokens_in": tokens_in, "tokens_out": tokens_out,
                "compress_ms": float(st.get("compress_ms", 0.0)), "generate_ms": generate_ms, "overlay": overlay,
                "note": note}


def _inllm_pruned(model: Any) -> np.ndarray | None:
    """Columns of the LLM input whose image tokens the in-LLM stage dropped in the last prefill (sample 0)."""
    from mmcompress import hf

    adapter = getattr(hf, "_adapter", lambda m: None)(model)
    stage = getattr(adapter, "inllm", None)
    last = getattr(stage, "last_pruned", None)
    return last[0].cpu().numpy() if last else None


def _inllm_items(method: str, items: list[tuple[np.ndarray, Any]], img_cols: np.ndarray, pruned: np.ndarray | None,
                 st: dict[str, Any]) -> tuple[list[tuple[np.ndarray, Any]], str]:
    """The items of an in-LLM run with each token's fate inside the LLM (kept by the last layers, or dropped), and
    the caption note: image tokens per LLM layer, and why there is no map where there is none."""
    per_layer = st.get("inllm_layer_tokens") or []
    note = layer_counts(per_layer[0]) if per_layer else ""
    why = IN_LLM_NO_MAP.get(method)
    if why is None and pruned is None:
        why = "no map: the in-LLM stage recorded no dropped positions"
    if why is None and img_cols.size != sum(a.size for a, _ in items):
        why = ("no map: the LLM's image run holds tokens the encoder's items do not (e.g. LLaVA-NeXT's row "
               "newlines)")
    if why is not None:
        return [], f"{note}; {why}" if note else why
    full = inllm_assign(img_cols, pruned)  # [n] over the image tokens of the LLM input, in order
    out, start = [], 0
    for a, grid in items:
        out.append((full[start:start + a.size], grid))
        start += a.size
    return out, f"{note}; map: the tokens the last layers see" if note else "map: the tokens the last layers see"
