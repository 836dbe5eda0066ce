"""The Gradio app behind ``mmcompress demo``: image tab (ref-vlm), audio tab (whisper-tiny.en), results tab.

One model instance is shared by all users behind a lock; Gradio's queue serialises the heavy calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .image import ImageBackend
from .results import plot_summary, read_summary
from .safety import load_image_safely

DEFAULT_METHODS = ("tome", "divprune", "pool")


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
    try:  # benchmark samples: easy-VQA test images and detail test scenes (small objects: compression shows)
        from mmcompress.evals import detail, easyvqa
        from PIL import Image

        def easyvqa_image(i: int) -> np.ndarray:
            return np.asarray(Image.open(easyvqa.image_path("test", i)).convert("RGB"))

        def detail_scene(i: int) -> np.ndarray:
            return np.asarray(detail.render(detail.make_scene(detail.SPLIT_SEEDS["test"] + i)).convert("RGB"))

        for i in range(3):
            if easyvqa.image_path("test", i).is_file():
                photos[f"easy-VQA test image {i}"] = lambda i=i: easyvqa_image(i)
            photos[f"detail test scene {i}"] = lambda i=i: detail_scene(i)
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


def image_methods() -> list[str]:
    """Compressors offered on the image tab (audio-only ones left out)."""
    import mmcompress as mmc
    from mmcompress.registry import get

    return [m for m in mmc.available() if getattr(get(m), "modality", "") != "audio"]


def run_image(backend: ImageBackend, photos: dict[str, Any], upload: str | None, photo: str | None, question: str,
              methods: list[str], keep: float,
              auto: bool = False) -> tuple[list[list[Any]], list[tuple[np.ndarray, str]]]:
    """The image tab's handler: one table row per run (uncompressed first) and one token map per method.

    A method the model cannot run (e.g. one needing attention scores its encoder does not give) gets its error in
    the answer column; the other methods still run. With `auto`, every method runs with keep="auto" (its own
    per-image budget, shown as "tokens out") and `keep` is ignored.

    Returns:
        (rows [method, answer, tokens in, tokens out, compress ms, generate ms], [(overlay, caption)]).

    Raises:
        ValueError: no image, an unreadable/oversized upload, no question, or a bad keep.
    """
    if upload:
        image = load_image_safely(upload)
    elif photo:
        if photo not in photos:
            raise ValueError(f"unknown photo {photo!r}")
        image = np.asarray(photos[photo]())[..., :3]
    else:
        raise ValueError("upload an image or pick a photo")
    if not question or not question.strip():
        raise ValueError("type a question")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep}")
    budget = "auto" if auto else keep
    ref = backend.answer(image, question, None, 1.0)
    rows = [["none", ref["answer"], ref["tokens_in"], ref["tokens_out"], 0.0, round(ref["generate_ms"], 1)]]
    gallery = []
    for m in methods:
        try:
            r = backend.answer(image, question, m, budget)
        except (ValueError, TypeError) as e:
            rows.append([m, f"(cannot run: {e})", ref["tokens_in"], None, None, None])
            continue
        rows.append([m, r["answer"], r["tokens_in"], r["tokens_out"], round(r["compress_ms"], 2),
                     round(r["generate_ms"], 1)])
        if r["overlay"] is not None:
            gallery.append((r["overlay"], f"{m}: {r['answer']} ({r['tokens_in']} -> {r['tokens_out']} tokens)"))
    return rows, gallery


def build_app(model_name: str = "ref-vlm", bench_dir: str = "runs/bench", audio_backend: Any = None) -> Any:
    """The Gradio Blocks app (the models load on the first request).

    Args:
        model_name: ``ref-vlm`` or a local HF VLM directory for the image tab.
        bench_dir: default folder of the results tab.
        audio_backend: ``demos.audio.AudioBackend`` of the audio tab (default whisper-tiny.en).

    Returns:
        ``gradio.Blocks``.
    """
    import gradio as gr

    backend = ImageBackend(model_name)
    photos = bundled_photos()

    def safe_run_image(*args: Any):
        try:
            return run_image(backend, photos, *args)
        except ValueError as e:
            raise gr.Error(str(e)) from e

    with gr.Blocks(title="mmcompress demo") as app:
        with gr.Tab("Image"):
            with gr.Row():
                upload = gr.File(label="image", type="filepath", elem_id="image-upload")
                photo = gr.Dropdown(sorted(photos), label="or a bundled photo", value=None)
            question = gr.Textbox(label="question", value="What is in the image?")
            methods = gr.CheckboxGroup(image_methods(), value=list(DEFAULT_METHODS), label="methods",
                                       elem_id="image-methods")
            with gr.Row():
                keep = gr.Slider(0.05, 1.0, value=0.25, label="keep (fraction)")
                auto = gr.Checkbox(False, label='keep="auto": each method picks the budget of this image',
                                   elem_id="image-auto")
            go = gr.Button("Run", elem_id="image-run")
            table = gr.Dataframe(headers=["method", "answer", "tokens in", "tokens out", "compress ms",
                                          "generate ms"], label="answers", elem_id="image-answers")
            gallery = gr.Gallery(label="token maps (merged groups tinted by slot, kept alone outlined, dropped dimmed)",
                                 columns=4, fit_columns=False, height=300, object_fit="contain",
                                 elem_id="image-overlays")
            go.click(safe_run_image, [upload, photo, question, methods, keep, auto], [table, gallery],
                     concurrency_limit=1, api_name="run_image")
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
