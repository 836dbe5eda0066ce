"""The Gradio app behind ``mmcompress demo``: image tab (ref-vlm), audio tab (whisper-tiny.en), results tab.

One model instance is shared by all users behind a lock; Gradio's queue serialises the heavy calls.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .overlay import overlay_token_map
from .results import plot_summary, read_summary
from .safety import load_image_safely

DEFAULT_METHODS = ("tome", "divprune", "pool")


class ImageBackend:
    """Lazily loaded VLM shared by all requests.

    Args:
        model_name: zoo name (default ``ref-vlm``).
    """

    def __init__(self, model_name: str = "ref-vlm") -> None:
        self.model_name = model_name
        self.lock = threading.Lock()
        self._model: Any = None
        self._processor: Any = None

    def _load(self) -> None:
        if self._model is None:
            from mmcompress import zoo

            self._model, self._processor = zoo.load(self.model_name)
            self._model.eval()

    def answer(self, image: np.ndarray, question: str, method: str | None, keep: float) -> dict[str, Any]:
        """Answer a question with the model, compressed by ``method`` (None = uncompressed).

        Args:
            image: uint8 [H, W, 3].
            question: the question text.
            method: compressor name or None.
            keep: fraction of tokens kept (0, 1].

        Returns:
            dict with answer, tokens_in, tokens_out, compress_ms, prefill_ms, overlay (uint8 image or None).
        """
        import torch

        import mmcompress as mmc
        from mmcompress.zoo.refvlm import IMAGE_SIZE, vision_features

        with self.lock, torch.inference_mode():
            self._load()
            model, proc = self._model, self._processor
            inputs = proc(images=[image], text=[question], return_tensors="pt")
            feats = vision_features(model.model.vision_tower, inputs["pixel_values"])  # [1, N, C]
            n = feats.shape[1]
            g = int(round(n ** 0.5))
            overlay, tokens_out, compress_ms = None, n, 0.0
            if method is not None:
                comp = mmc.create(method, keep=keep)
                t0 = time.perf_counter()
                try:
                    out = comp(feats, grid=(g, g))
                    compress_ms = (time.perf_counter() - t0) * 1e3
                    tokens_out = int(out.x.shape[1])
                    side = IMAGE_SIZE
                    small = np.asarray(_resize(image, side))
                    overlay = overlay_token_map(small, out.assign[0].numpy(), (g, g))
                except (ValueError, TypeError):
                    overlay = None  # the method needs the text/attention the adapter supplies
                mmc.apply(model, method, keep=keep)
            try:
                t0 = time.perf_counter()
                ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
                prefill_ms = (time.perf_counter() - t0) * 1e3
                text = proc.batch_decode(ids[:, inputs["input_ids"].shape[1]:])[0].strip()
            finally:
                if method is not None:
                    mmc.remove(model)
        return {"answer": text, "tokens_in": n, "tokens_out": tokens_out, "compress_ms": compress_ms,
                "generate_ms": prefill_ms, "overlay": overlay}


def _resize(image: np.ndarray, side: int) -> Any:
    from PIL import Image

    return Image.fromarray(image).convert("RGB").resize((side, side), Image.BICUBIC)


def bundled_photos() -> dict[str, Any]:
    """Offline photos by name -> loader returning uint8 [H, W, 3]; absent sources are left out."""
    photos: dict[str, Any] = {}
    try:
        from skimage import data

        for name in ("astronaut", "coffee", "chelsea", "rocket"):
            photos[name] = getattr(data, name)
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_image

        for name in ("china.jpg", "flower.jpg"):
            photos[name] = lambda name=name: load_sample_image(name)
    except ImportError:
        pass
    try:
        import matplotlib.cbook as cbook
        from PIL import Image

        def grace_hopper() -> np.ndarray:
            with cbook.get_sample_data("grace_hopper.jpg") as f:
                return np.asarray(Image.open(f).convert("RGB"))

        photos["grace_hopper"] = grace_hopper
    except ImportError:
        pass
    return photos


def results_view(folder: str) -> tuple[Any, list[list[Any]], str]:
    """Figure, table rows and status message for a bench folder (errors become the message)."""
    try:
        rows = read_summary(folder)
    except ValueError as e:
        return None, [], str(e)
    table = [[r["task"], r["method"], r["keep"], r["accuracy"], r["tokens"], r["prefill_ms"]] for r in rows]
    return plot_summary(rows), table, f"{len(rows)} rows from {Path(folder) / 'summary.csv'}"


def audio_available() -> tuple[bool, str]:
    """Whether Whisper compression can run here, with the reason when it cannot."""
    try:
        import mmcompress as mmc

        if "audio_merge" not in mmc.available():
            return False, "audio compression not available yet"
        import mmcompress.integrations.whisper  # noqa: F401
    except ImportError as e:
        return False, f"audio compression not available yet ({e})"
    return True, ""


def build_app(model_name: str = "ref-vlm", bench_dir: str = "runs/bench", audio_backend: Any = None) -> Any:
    """The Gradio Blocks app (the models load on the first request).

    Args:
        model_name: zoo model for the image tab.
        bench_dir: default folder of the results tab.
        audio_backend: ``demos.audio.AudioBackend`` of the audio tab (default whisper-tiny.en).

    Returns:
        ``gradio.Blocks``.
    """
    import gradio as gr

    backend = ImageBackend(model_name)
    photos = bundled_photos()

    def run_image(upload: str | None, photo: str | None, question: str, methods: list[str], keep: float):
        if upload:
            image = load_image_safely(upload)
        elif photo:
            image = np.asarray(photos[photo]())[..., :3]
        else:
            raise gr.Error("upload an image or pick a photo")
        if not question:
            raise gr.Error("type a question")
        ref = backend.answer(image, question, None, keep)
        rows, gallery = [["none", ref["answer"], ref["tokens_in"], ref["tokens_out"], 0.0, ref["generate_ms"]]], []
        for m in methods:
            r = backend.answer(image, question, m, keep)
            rows.append([m, r["answer"], r["tokens_in"], r["tokens_out"], r["compress_ms"], r["generate_ms"]])
            if r["overlay"] is not None:
                gallery.append((r["overlay"], f"{m}: {r['answer']}"))
        return rows, gallery

    def safe_run_image(*args: Any):
        try:
            return run_image(*args)
        except ValueError as e:
            raise gr.Error(str(e)) from e

    import mmcompress as mmc

    with gr.Blocks(title="mmcompress demo") as app:
        with gr.Tab("Image"):
            with gr.Row():
                upload = gr.File(label="image", type="filepath")
                photo = gr.Dropdown(sorted(photos), label="or a bundled photo", value=None)
            question = gr.Textbox(label="question", value="What is in the image?")
            methods = gr.CheckboxGroup(mmc.available(), value=list(DEFAULT_METHODS), label="methods")
            keep = gr.Slider(0.05, 1.0, value=0.25, label="keep (fraction)")
            go = gr.Button("Run")
            table = gr.Dataframe(headers=["method", "answer", "tokens in", "tokens out", "compress ms",
                                          "generate ms"], label="answers")
            gallery = gr.Gallery(label="token maps")
            go.click(safe_run_image, [upload, photo, question, methods, keep], [table, gallery],
                     concurrency_limit=1)
        with gr.Tab("Audio"):
            ok, why = audio_available()
            if ok:
                from .audio import build_audio_tab

                build_audio_tab(gr, audio_backend)
            else:
                gr.Markdown(why)
        with gr.Tab("Results"):
            folder = gr.Textbox(value=bench_dir, label="bench folder")
            load = gr.Button("Load")
            plot = gr.Plot()
            rtable = gr.Dataframe(headers=["task", "method", "keep", "accuracy", "tokens", "prefill ms"])
            msg = gr.Markdown()
            load.click(results_view, [folder], [plot, rtable, msg])
    return app
