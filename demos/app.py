"""The Gradio app behind ``mmcompress demo``: image tab (ref-vlm), audio tab (whisper-tiny.en), results tab.

One model instance is shared by all users behind a lock; Gradio's queue serialises the heavy calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .image import ImageBackend
from .results import TABLE_HEADERS, plot_summary, read_summary, summary_table
from .safety import keep_fraction, load_image_safely

DEFAULT_METHODS = ("tome", "divprune", "pool")
DEFAULT_QUESTION = "What is in the image?"
N_SAMPLES = 3  # bundled benchmark samples per dataset
# Gradio caps an auto-height gallery at 55% of the window and scrolls inside it, which hid every token map after
# the first row; the maps' gallery grows with the number of methods instead (pass to `launch(css=...)`).
APP_CSS = ("#image-overlays .fixed-height { max-height: none !important; }\n"
           "#image-overlays .grid-wrap { overflow-y: visible !important; }")


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

        for i in range(N_SAMPLES):
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


def benchmark_questions() -> dict[str, tuple[str, str]]:
    """Question and expected answer of each bundled benchmark sample, by its name in `bundled_photos` (the first
    question of each easy-VQA test image and of each detail test scene)."""
    out: dict[str, tuple[str, str]] = {}
    try:
        from mmcompress.evals import detail, easyvqa
    except ImportError:
        return out
    try:
        first: dict[int, Any] = {}
        for q in easyvqa.load_split("test"):
            if q.image_id < N_SAMPLES:
                first.setdefault(q.image_id, q)
            if len(first) == N_SAMPLES:
                break
        out.update({f"easy-VQA test image {i}": (q.question, q.answer) for i, q in sorted(first.items())})
    except (ImportError, OSError):
        pass
    for i in range(N_SAMPLES):
        qs = detail.questions(detail.make_scene(detail.SPLIT_SEEDS["test"] + i))
        if qs:
            out[f"detail test scene {i}"] = (qs[0][1], qs[0][2])
    return out


def results_view(folder: str) -> tuple[Any, list[list[Any]], str]:
    """Figure, table rows (accuracy ± standard error, rounded times) and status message for a bench folder (errors
    become the message)."""
    try:
        rows = read_summary(folder)
    except ValueError as e:
        return None, [], str(e)
    return plot_summary(rows), summary_table(rows), f"{len(rows)} rows from {Path(folder) / 'summary.csv'}"


def audio_available() -> tuple[bool, str]:
    """Whether Whisper compression can run here, with the reason when it cannot."""
    try:
        import mmcompress as mmc

        if "audio_merge" not in mmc.available():
            return False, "audio compression not available yet"
        import mmcompress.hf.whisper  # noqa: F401
    except ImportError as e:
        return False, f"audio compression not available yet ({e})"
    return True, ""


def image_compressible(modality: str) -> bool:
    """Whether a compressor of this `modality` (the registry's: "any", "image", "image/video", "1D/2D/3D", "video",
    "audio") works on one image's 2-D token grid."""
    return modality == "any" or "image" in modality or "2D" in modality


def image_methods() -> list[str]:
    """Compressors offered on the image tab: video-only (`temporal`) and audio-only (`audio_merge`) ones are left
    out, since an image has no frames or time axis for them to work along."""
    import mmcompress as mmc
    from mmcompress.registry import get

    return [m for m in mmc.available() if image_compressible(getattr(get(m), "modality", "any"))]


def pick_image(photos: dict[str, Any], upload: str | None, photo: str | None) -> np.ndarray:
    """The image a run uses: the upload or the picked bundled photo/sample, never a silent choice between both.

    Raises:
        ValueError: neither or both given, an unknown photo, or an unreadable/oversized upload.
    """
    if upload and photo:
        raise ValueError(f"two images given: an upload and the bundled {photo!r}; clear one of them")
    if upload:
        return load_image_safely(upload)
    if photo:
        if photo not in photos:
            raise ValueError(f"unknown photo {photo!r}")
        return np.asarray(photos[photo]())[..., :3]
    raise ValueError("upload an image or pick a photo")


def run_image(backend: ImageBackend, photos: dict[str, Any], upload: str | None, photo: str | None, question: str,
              methods: list[str], keep: float,
              auto: bool = False) -> tuple[list[list[Any]], list[tuple[np.ndarray, str]]]:
    """The image tab's handler: one table row per run (uncompressed first) and one token map per method.

    A method the model cannot run (e.g. one needing attention scores its encoder does not give, or a video- or
    audio-only compressor) gets the reason in the answer column; the other methods still run. With `auto`, every
    method runs with keep="auto" (its own per-image budget, shown as "tokens out") and `keep` is ignored.

    Returns:
        (rows [method, answer, tokens in, tokens out, compress ms, generate ms], [(overlay, caption)]).

    Raises:
        ValueError: no image or two, an unreadable/oversized upload, no question, or a keep outside (0, 1].
    """
    from mmcompress.registry import get

    image = pick_image(photos, upload, photo)
    if not question or not question.strip():
        raise ValueError("type a question")
    budget = "auto" if auto else keep_fraction(keep, "image tokens")  # the UI sends 1 (int) for 1.0
    ref = backend.answer(image, question, None, 1.0)
    rows = [["none", ref["answer"], ref["tokens_in"], ref["tokens_out"], 0.0, round(ref["generate_ms"])]]
    gallery = []
    for m in methods:
        try:
            modality = getattr(get(m), "modality", "any")
        except ValueError:
            modality = "any"  # an unknown name: the backend's own error says so below
        if not image_compressible(modality):
            rows.append([m, f"(cannot run: {m} compresses {modality} tokens, not an image's)", ref["tokens_in"],
                         None, None, None])
            continue
        try:
            r = backend.answer(image, question, m, budget)
        except (ValueError, TypeError) as e:
            rows.append([m, f"(cannot run: {e})", ref["tokens_in"], None, None, None])
            continue
        rows.append([m, r["answer"], r["tokens_in"], r["tokens_out"], round(r["compress_ms"], 1),
                     round(r["generate_ms"])])
        if r["overlay"] is not None:
            gallery.append((r["overlay"], f"{m}: {r['answer']} ({r['tokens_in']} -> {r['tokens_out']} tokens)"))
    return rows, gallery


def preview(photos: dict[str, Any], questions: dict[str, tuple[str, str]], upload: str | None,
            photo: str | None) -> tuple[np.ndarray | None, str | None, str]:
    """What the image tab shows when an image is picked or uploaded: (preview, the sample's question or None to
    leave the question as typed, the expected-answer line)."""
    if upload:
        try:
            return load_image_safely(upload), None, "Your upload is the image (the bundled choice was cleared)."
        except ValueError as e:
            return None, None, f"**Cannot use this upload:** {e}"
    if not photo or photo not in photos:
        return None, None, ""
    image = np.asarray(photos[photo]())[..., :3]
    if photo in questions:
        q, a = questions[photo]
        return image, q, f"**{photo}**: the sample's own question is filled in; **expected answer: {a}**"
    return image, None, f"**{photo}**: a photo without a reference answer; ask anything."


def build_app(model_name: str = "ref-vlm", bench_dir: str = "runs/bench", audio_backend: Any = None,
              image_backend: ImageBackend | None = None) -> Any:
    """The Gradio Blocks app (the image model loads on the first request unless `image_backend` is loaded).

    Args:
        model_name: ``ref-vlm`` or a local HF VLM directory for the image tab (named in the title).
        bench_dir: default folder of the results tab.
        audio_backend: ``demos.audio.AudioBackend`` of the audio tab (default whisper-tiny.en).
        image_backend: the image tab's backend (default: ``ImageBackend(model_name)``, loaded lazily).

    Returns:
        ``gradio.Blocks``.
    """
    import gradio as gr
    from mmcompress.evals.report import X_LABELS, Y_LABEL

    backend = image_backend or ImageBackend(model_name)
    photos = bundled_photos()
    questions = benchmark_questions()
    shown = model_name if model_name in ("ref-vlm", "ref-vlm-mini") else Path(model_name).name or model_name

    def safe_run_image(*args: Any):
        try:
            return run_image(backend, photos, *args)
        except ValueError as e:
            raise gr.Error(str(e)) from e

    def on_pick(photo: str | None):
        image, question, note = preview(photos, questions, None, photo)
        return None, image, question if question is not None else gr.update(), note

    def on_upload(upload: str | None):
        image, _, note = preview(photos, questions, upload, None)
        return None, image, note

    with gr.Blocks(title=f"mmcompress demo: {shown}") as app:
        gr.Markdown(f"# mmcompress demo: {shown}\n"
                    f"Training-free compression of the image (and audio) tokens between the encoder and the LLM of "
                    f"**{model_name}**: pick methods and a budget, compare the answers, token counts, times and "
                    f"which tokens each method merged or dropped.", elem_id="title")
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column(scale=2):
                    photo = gr.Dropdown(sorted(photos), label="a bundled photo or benchmark sample", value=None,
                                        elem_id="image-photo")
                    upload = gr.File(label="or upload an image (replaces the bundled choice)", type="filepath",
                                     elem_id="image-upload")
                    question = gr.Textbox(label="question", value=DEFAULT_QUESTION, elem_id="image-question")
                    expected = gr.Markdown("", elem_id="image-expected")
                with gr.Column(scale=1):
                    shown_image = gr.Image(label="the image", interactive=False, type="numpy", height=224,
                                           elem_id="image-preview")
            methods = gr.CheckboxGroup(image_methods(), value=list(DEFAULT_METHODS), label="methods",
                                       elem_id="image-methods")
            with gr.Row():
                keep = gr.Number(value=0.25, minimum=None, maximum=None, step=0.05, elem_id="image-keep",
                                 label="keep: fraction of the image tokens, in (0, 1]; 1 keeps them all")
                auto = gr.Checkbox(False, label='keep="auto": each method picks the budget of this image',
                                   elem_id="image-auto")
            go = gr.Button("Run", elem_id="image-run")
            table = gr.Dataframe(headers=["method", "answer", "tokens in", "tokens out", "compress ms",
                                          "generate ms"], label="answers", elem_id="image-answers")
            gallery = gr.Gallery(label="token maps (merged groups tinted by slot, kept alone outlined, dropped dimmed)",
                                 columns=4, height="auto", object_fit="contain", elem_id="image-overlays")
            photo.input(on_pick, [photo], [upload, shown_image, question, expected])
            upload.upload(on_upload, [upload], [photo, shown_image, expected])
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
            gr.Markdown(f"A `mmcompress bench` folder: the same plot as its `pareto.png` ({Y_LABEL} vs "
                        f"{X_LABELS['tokens']} and vs {X_LABELS['prefill_ms']}) and its summary table.")
            folder = gr.Textbox(value=bench_dir, label="bench folder")
            load = gr.Button("Load")
            plot = gr.Plot()
            rtable = gr.Dataframe(headers=TABLE_HEADERS, elem_id="results-table")
            msg = gr.Markdown()
            load.click(results_view, [folder], [plot, rtable, msg])
    return app
