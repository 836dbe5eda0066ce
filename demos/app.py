"""The Gradio app behind ``mmcompress demo``: image tab (ref-vlm), audio tab (whisper-tiny.en), results tab.

One model instance is shared by all users behind a lock; Gradio's queue serialises the heavy calls.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from .image import ImageBackend
from .questions import QuestionForms, forms_for, question_note, words
from .results import TABLE_HEADERS, plot_summary, read_summary, summary_table
from .safety import keep_fraction, load_image_safely

DEFAULT_METHODS = ("tome", "divprune", "pool")
DEFAULT_QUESTION = "What is in the image?"
N_SAMPLES = 3  # bundled benchmark samples per dataset
PREVIEW_SIDE = 224  # smaller pictures (easy-VQA: 64 px) are shown enlarged to at least this side, pixels kept sharp
ANSWER_HEADERS = ["method", "answer", "tokens in", "tokens out", "compress ms", "generate ms", "inside the LLM"]
IN_LLM_NOTE = ("**In-LLM methods** (`fastv`, `pdrop`, `dart`, `sparsevlm`) let every image token into the LLM and drop "
               "tokens inside it, at a layer: *tokens out* is what the last layers see, the caption how many image "
               "tokens each LLM layer saw, the map which tokens the last layers see (dimmed: dropped inside the "
               "LLM; PyramidDrop's earlier stages see more of them). `sparsevlm` has no map: it recycles pruned "
               "tokens into merged ones placed in freed positions, so which input token a position holds is not "
               "recorded. On this tab `keep` is each method's own budget, as in `mmc.apply` (docs/methods.md).")
# Gradio keeps an error toast up for 10 s: a successful run closes the old ones, so an error never sits beside a
# result it does not belong to.
CLOSE_TOASTS = "() => { document.querySelectorAll('[data-testid=\"toast-close\"]').forEach(b => b.click()); }"
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
    """Methods offered on the image tab: the compressors that work on an image's tokens (video-only `temporal` and
    audio-only `audio_merge` are left out: an image has no frames or time axis for them), then the in-LLM methods
    (they prune inside the LLM; a model whose adapter has no in-LLM stage says so in the answer column)."""
    import mmcompress as mmc
    from mmcompress.catalog import IN_LLM
    from mmcompress.registry import get

    return [m for m in mmc.available() if image_compressible(getattr(get(m), "modality", "any"))] + list(IN_LLM)


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
        (rows [method, answer, tokens in, tokens out, compress ms, generate ms, inside the LLM], [(overlay,
        caption)]); "inside the LLM" is an in-LLM method's image tokens per LLM layer (and why it has no map).

    Raises:
        ValueError: no image or two, an unreadable/oversized upload, no question, or a keep outside (0, 1].
    """
    from mmcompress.catalog import IN_LLM
    from mmcompress.registry import get

    image = pick_image(photos, upload, photo)
    if not question or not question.strip():
        raise ValueError("type a question")
    budget = "auto" if auto else keep_fraction(keep, "image tokens")  # the UI sends 1 (int) for 1.0
    ref = backend.answer(image, question, None, 1.0)
    rows = [["none", ref["answer"], ref["tokens_in"], ref["tokens_out"], 0.0, round(ref["generate_ms"]), ""]]
    gallery = []
    for m in methods:
        try:
            modality = "image" if m in IN_LLM else getattr(get(m), "modality", "any")
        except ValueError:
            modality = "any"  # an unknown name: the backend's own error says so below
        if not image_compressible(modality):
            rows.append([m, f"(cannot run: {m} compresses {modality} tokens, not an image's)", ref["tokens_in"],
                         None, None, None, ""])
            continue
        try:
            r = backend.answer(image, question, m, budget)
        except (ValueError, TypeError) as e:
            rows.append([m, f"(cannot run: {e})", ref["tokens_in"], None, None, None, ""])
            continue
        note = r.get("note", "")
        rows.append([m, r["answer"], r["tokens_in"], r["tokens_out"], round(r["compress_ms"], 1),
                     round(r["generate_ms"]), note])
        if r["overlay"] is not None:
            caption = f"{m}: {r['answer']} ({r['tokens_in']} -> {r['tokens_out']} tokens)"
            gallery.append((r["overlay"], f"{caption}; {note}" if note else caption))
    return rows, gallery


def enlarge(image: np.ndarray, side: int = PREVIEW_SIDE) -> np.ndarray:
    """`image` [H, W, 3] repeated by the smallest integer factor that brings its long side to at least `side`
    (easy-VQA's 64 px pictures previewed at 256 px, pixels kept sharp); larger pictures unchanged."""
    k = -(-side // max(image.shape[:2]))
    return image if k <= 1 else np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def same_question(a: str, b: str) -> bool:
    """Whether two questions are the same words (case, spacing and punctuation spacing ignored)."""
    return words(a) == words(b)


def expected_note(photos: dict[str, Any], questions: dict[str, tuple[str, str]], upload: str | None,
                  photo: str | None, question: str) -> str:
    """The line under the question: the picked sample's expected answer while its own question is asked, and says
    that there is none once the question is edited."""
    if upload:
        return "Your upload is the image (the bundled choice was cleared)."
    if not photo or photo not in photos:
        return ""
    if photo not in questions:
        return f"**{photo}**: a photo without a reference answer; ask anything."
    q, a = questions[photo]
    if same_question(question or "", q):
        return f"**{photo}**: the sample's own question is filled in; **expected answer: {a}**"
    return (f"**{photo}**: your own question, so no reference answer (the sample's question \"{q}\" expects "
            f"\"{a}\").")


def preview(photos: dict[str, Any], questions: dict[str, tuple[str, str]], upload: str | None,
            photo: str | None) -> tuple[np.ndarray | None, str | None, str]:
    """What the image tab shows when an image is picked or uploaded: (preview, enlarged when small; the sample's
    question or None to leave the question as typed; the expected-answer line)."""
    if upload:
        try:
            return enlarge(load_image_safely(upload)), None, expected_note(photos, questions, upload, None, "")
        except ValueError as e:
            return None, None, f"**Cannot use this upload:** {e}"
    if not photo or photo not in photos:
        return None, None, ""
    image = enlarge(np.asarray(photos[photo]())[..., :3])
    q = questions[photo][0] if photo in questions else None
    return image, q, expected_note(photos, questions, None, photo, q or "")


def default_question(forms: QuestionForms | None, unknown: Any = None) -> str:
    """The question the tab opens on: `DEFAULT_QUESTION`, unless the model reads only its own question forms (then
    its first form without a colour or shape) or cannot read it (then the first form it can, if it has forms)."""
    if forms is None or (forms.matches(DEFAULT_QUESTION) and not (unknown and unknown(DEFAULT_QUESTION))):
        return DEFAULT_QUESTION
    plain = [q for q in forms.examples if not any(w in forms.slots for w in words(q))]
    return next(iter(plain), forms.examples[0])


def results_initial(folder: str) -> tuple[Any, list[list[Any]], str]:
    """The Results tab as it opens: the `--bench-dir` folder's plot and table when it holds a summary, else a hint."""
    if (Path(folder) / "summary.csv").is_file():
        return results_view(folder)
    return None, [], f"No summary.csv in `{folder}` yet: run `mmcompress bench`, or type a folder and press Load."


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
    forms = forms_for(model_name)
    shown = model_name if model_name in ("ref-vlm", "ref-vlm-mini") else Path(model_name).name or model_name
    first_question = default_question(forms, backend.unknown_words)

    def refused(e: ValueError) -> Any:
        """A bad input: one line in the server log and a toast, no traceback (it is the user's input, not a bug)."""
        print(f"mmcompress demo: refused: {e}", file=sys.stderr, flush=True)
        return gr.Error(str(e), print_exception=False)

    def safe_run_image(*args: Any):
        try:
            return run_image(backend, photos, *args)
        except ValueError as e:
            raise refused(e) from None

    def on_pick(photo: str | None):
        image, question, note = preview(photos, questions, None, photo)
        return None, image, question if question is not None else gr.update(), note

    def on_upload(upload: str | None):
        image, _, note = preview(photos, questions, upload, None)
        return None, image, note

    def on_question(question: str, upload: str | None, photo: str | None):
        note = question_note(question or "", forms, backend.unknown_words(question or ""))
        return note, expected_note(photos, questions, upload, photo, question or "")

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
                    question = gr.Textbox(label="question", value=first_question, elem_id="image-question")
                    qnote = gr.Markdown(question_note(first_question, forms, backend.unknown_words(first_question)),
                                        elem_id="image-question-note")
                    if forms is not None:
                        form = gr.Dropdown(list(forms.examples), value=None, elem_id="image-question-forms",
                                           label=f"or one of {shown}'s own question forms (the only ones it was "
                                                 f"trained on; change a colour or shape freely)")
                        form.input(lambda q: q, [form], [question])
                    expected = gr.Markdown("", elem_id="image-expected")
                with gr.Column(scale=1):
                    shown_image = gr.Image(label="the image", interactive=False, type="numpy", height=PREVIEW_SIDE,
                                           elem_id="image-preview")
            methods = gr.CheckboxGroup(image_methods(), value=list(DEFAULT_METHODS), label="methods",
                                       elem_id="image-methods")
            gr.Markdown(IN_LLM_NOTE, elem_id="image-inllm-note")
            with gr.Row():
                keep = gr.Number(value=0.25, minimum=None, maximum=None, step=0.05, elem_id="image-keep",
                                 label="keep: fraction of the image tokens, in (0, 1]; 1 keeps them all")
                auto = gr.Checkbox(False, label='keep="auto": each method picks the budget of this image',
                                   elem_id="image-auto")
            go = gr.Button("Run", elem_id="image-run")
            table = gr.Dataframe(headers=ANSWER_HEADERS, label="answers", wrap=True, elem_id="image-answers")
            gallery = gr.Gallery(label="token maps (merged groups tinted by slot, kept alone outlined, dropped dimmed; "
                                       "tiled images: every tile)",
                                 columns=4, height="auto", object_fit="contain", elem_id="image-overlays")
            photo.input(on_pick, [photo], [upload, shown_image, question, expected])
            upload.upload(on_upload, [upload], [photo, shown_image, expected])
            question.change(on_question, [question, upload, photo], [qnote, expected])
            go.click(safe_run_image, [upload, photo, question, methods, keep, auto], [table, gallery],
                     concurrency_limit=1, api_name="run_image").success(None, None, None, js=CLOSE_TOASTS)
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
            fig0, rows0, msg0 = results_initial(bench_dir)  # shown at once: --bench-dir needs no Load
            folder = gr.Textbox(value=bench_dir, label="bench folder", elem_id="results-folder")
            load = gr.Button("Load", elem_id="results-load")
            plot = gr.Plot(value=fig0, elem_id="results-plot")
            rtable = gr.Dataframe(value=rows0 or None, headers=TABLE_HEADERS, elem_id="results-table")
            msg = gr.Markdown(msg0, elem_id="results-message")
            load.click(results_view, [folder], [plot, rtable, msg])
    return app
