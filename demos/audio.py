"""Audio tab: Whisper transcripts per compressor, WER against the reference transcript, and the token timeline.

The compressed tokens are the encoder frames Whisper's decoder cross-attends to (whisper-tiny.en: 1,500 per 30 s
window, 20 ms each; `mmcompress.apply(whisper, method, keep=...)` then `generate()`). The timeline paints every
encoder frame with the output slot it went to (``assign``), so a run of one colour is a merged span.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .overlay import slot_colours, token_classes
from .safety import keep_fraction, load_audio_safely

SAMPLING_RATE = 16000
MAX_WINDOW_S = 30.0  # Whisper transcribes one 30 s window; longer uploads are refused, not silently cut
DEFAULT_AUDIO_METHODS = ("audio_merge", "pool")
DROPPED = np.array([45, 45, 45], np.uint8)
KEPT_ALONE = np.array([235, 235, 235], np.uint8)


def audio_methods() -> list[str]:
    """Compressors the Whisper adapter can run: no ``scores=``/``text=`` needed, not video-only, not a stage before
    an image encoder (pixelprune)."""
    import mmcompress as mmc
    from mmcompress.registry import get

    names = []
    for name in mmc.available():
        cls = get(name)
        if set(getattr(cls, "needs", ())) & {"scores", "text", "grid"} or getattr(cls, "modality", "") == "video":
            continue
        if getattr(getattr(cls, "encoder_needs", None), "stage", None) == "pixels":
            continue
        names.append(name)
    return names


def bundled_clips(root: str | Path | None = None) -> dict[str, Any]:
    """LibriVox clips of ``pocketsphinx-testdata`` by id (``SpeechClip``: audio, sampling_rate, text); {} if absent."""
    from mmcompress.zoo.data import load_librivox

    try:
        return {c.id: c for c in load_librivox(root)}
    except FileNotFoundError:
        return {}


def word_error_rate(reference: str, hypothesis: str) -> float | None:
    """WER of one transcript (``mmcompress.zoo.metrics``, Whisper-style normalisation); None without a reference."""
    from mmcompress.zoo.metrics import normalize_text, wer

    if not reference or not normalize_text(reference):
        return None
    return wer([reference], [hypothesis])


def timeline_image(assign: np.ndarray, clip_frames: int | None = None, width: int = 900, height: int = 28,
                   mark: int = 4) -> np.ndarray:
    """Token timeline: one column block per encoder frame, painted by the output slot it went to.

    Merged frames take their slot's colour (adjacent slots get distinct hues, so span boundaries show), frames kept
    alone are light grey, dropped frames dark grey. The bottom ``mark`` rows tell the clip (white) from Whisper's
    silence padding up to its 30 s window (black).

    Args:
        assign: int [N]; output slot of each encoder frame, -1 = dropped.
        clip_frames: frames covering the clip (default N: no padding).
        width: target width in pixels (each frame gets ``max(1, width // N)`` columns).
        height: image height, ``mark`` rows included.
        mark: height of the clip/padding strip.

    Returns:
        uint8 [height, N * px, 3].
    """
    assign = np.asarray(assign)
    if assign.ndim != 1 or assign.size == 0:
        raise ValueError(f"assign must be a non-empty 1-D [N] array, got shape {assign.shape}")
    n = assign.size
    clip = n if clip_frames is None else int(clip_frames)
    if not 1 <= clip <= n:
        raise ValueError(f"clip_frames must be in [1, {n}], got {clip_frames}")
    if not 0 <= mark < height:
        raise ValueError(f"mark must be in [0, height={height}), got {mark}")
    px = max(1, width // n)
    cls = token_classes(assign)  # [N] 0 dropped, 1 alone, 2 merged
    colours = slot_colours(int(assign.max()) + 1 if (assign >= 0).any() else 0)
    row = np.empty((n, 3), np.uint8)  # [N, 3] colour of each frame
    row[cls == 0] = DROPPED
    row[cls == 1] = KEPT_ALONE
    row[cls == 2] = colours[assign[cls == 2]]
    img = np.empty((height, n * px, 3), np.uint8)
    img[:] = np.repeat(row, px, axis=0)[None]
    img[height - mark:] = 0
    img[height - mark:, :clip * px] = 255
    return img


def span_summary(assign: np.ndarray, frame_s: float, clip_frames: int | None = None) -> str:
    """One line: tokens spent on the clip and on the padding, how many spans merged, the longest one in seconds."""
    assign = np.asarray(assign)
    n = assign.size
    clip = n if clip_frames is None else int(clip_frames)

    def tokens(a: np.ndarray) -> int:
        return int(np.unique(a[a >= 0]).size)

    parts = [f"clip {clip * frame_s:.2f} s: {clip} frames -> {tokens(assign[:clip])} tokens"]
    if clip < n:
        parts.append(f"padding: {n - clip} frames -> {tokens(assign[clip:])} tokens")
    live = assign[assign >= 0]
    counts = np.bincount(live) if live.size else np.zeros(0, int)  # [M] members of each slot
    merged = np.flatnonzero(counts > 1)
    if merged.size:
        top = merged[np.argmax(counts[merged])]
        idx = np.flatnonzero(assign == top)
        parts.append(f"{merged.size} merged groups, largest {idx[0] * frame_s:.2f}-{(idx[-1] + 1) * frame_s:.2f} s "
                     f"({counts[top]} frames)")
    dropped = int((assign < 0).sum())
    if dropped:
        parts.append(f"{dropped} frames dropped")
    return "; ".join(parts)


def _wrap_caption(draw: Any, caption: str, font: Any, width: int) -> list[str]:
    """`caption` in lines no wider than `width` pixels, broken after "; " or ", " where possible, else between
    words (a single word wider than the line gets a line of its own)."""
    words: list[str] = []
    for part in re.split(r"(?<=[;,]) ", caption):
        fits = draw.textlength(part, font=font) <= width
        words.append(part) if fits else words.extend(part.split(" "))
    lines: list[str] = []
    for w in words:
        if lines and draw.textlength(f"{lines[-1]} {w}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {w}"
        else:
            lines.append(w)
    return lines


def compose_timelines(items: list[tuple[np.ndarray, str]], window_s: float, width: int = 1200, row: int = 22,
                      font_size: int = 13) -> np.ndarray:
    """Stack timelines into one picture: each caption above its strip (stretched to ``width``), a seconds axis below.

    Text never touches a strip or another label: line heights come from the font's own extent, captions wider than
    the strip wrap after "; ", and an axis label that would run into the previous one is left out.

    Args:
        items: (timeline uint8 [h, w, 3], caption) per method, as `run_audio` returns them.
        window_s: seconds the timelines cover (Whisper's window: 30).
        width: strip width in pixels.
        row: strip height in pixels.
        font_size: caption and axis font size in pixels.

    Returns:
        uint8 [H, width + 24, 3] on white.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not items:
        raise ValueError("items: expected at least one (timeline, caption)")
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    pad, space = 12, 4  # margins; white rows between a text line and anything below it
    try:
        font = ImageFont.load_default(size=font_size)  # scalable with FreeType
    except (TypeError, OSError, ImportError):
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    top, bottom = probe.textbbox((0, 0), "Ag(|)0123456789", font=font)[1::2]
    line = bottom + space  # drawn at y, a line's ink lies in [y + top, y + bottom)
    blocks = [(img, _wrap_caption(probe, caption, font, width)) for img, caption in items]
    tick = 4
    height = sum(len(lines) * line + row + space for _, lines in blocks) + tick + bottom + space
    canvas = Image.new("RGB", (width + 2 * pad, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for img, lines in blocks:
        for text in lines:
            draw.text((pad, y), text, fill=(20, 20, 20), font=font)
            y += line
        strip = Image.fromarray(np.ascontiguousarray(img)).resize((width, row), Image.NEAREST)
        canvas.paste(strip, (pad, y))
        y += row + space
    step = 5.0 if window_s >= 10 else 1.0 if window_s >= 2 else 0.1
    right = -1.0  # right end of the last label drawn
    for k in range(int(window_s / step + 1e-9) + 1):
        x = pad + round(k * step / window_s * (width - 1))
        draw.line([(x, y), (x, y + tick)], fill=(20, 20, 20))
        label = f"{k * step:g} s"
        w = draw.textlength(label, font=font)
        left = min(x + 2, pad + width - w)  # the last label ends at the strip's end
        if left < right + 8:
            continue  # it would run into the previous label
        draw.text((left, y + tick), label, fill=(20, 20, 20), font=font)
        right = left + w
    return np.asarray(canvas)


class AudioBackend:
    """Whisper shared by all requests behind a lock, loaded on first use.

    Args:
        model_name: zoo name (default ``whisper-tiny.en``).
        model: an already built ``WhisperForConditionalGeneration`` (then ``processor`` too); skips the zoo.
        processor: callable ``(audio, sampling_rate=, return_tensors="pt")`` -> ``.input_features`` with
            ``batch_decode(ids, skip_special_tokens=True)`` (a ``WhisperProcessor``).
        max_new_tokens: longest transcript in tokens.
    """

    def __init__(self, model_name: str = "whisper-tiny.en", model: Any = None, processor: Any = None,
                 max_new_tokens: int = 128) -> None:
        if (model is None) != (processor is None):
            raise ValueError("model and processor: give both or neither")
        self.model_name = model_name
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()
        self._model, self._processor = model, processor
        self._encoded: Any = None  # [1, N, C] uncompressed encoder frames of the last run
        self._hooked = False
        self.warm_ups = 0  # how many times the loaded model was warmed up (once)

    def _load(self) -> None:
        if self._model is None:
            from mmcompress import zoo

            self._model, self._processor = zoo.load(self.model_name)
        if not self._hooked:
            self._model.eval()
            # registered before any mmcompress.apply, so it runs before the adapter's hook and sees the frames
            # the compressor gets; the adapter replaces the output's tensor, it does not modify this one
            self._model.get_encoder().register_forward_hook(self._keep_frames)
            self._hooked = True
            self._warm_up()

    def _warm_up(self) -> None:
        """One uncompressed and one compressed transcription of a second of silence, not shown: a process's first
        calls pay one-time costs that would otherwise land on the first table row."""
        import torch

        import mmcompress as mmc

        feats = self._processor(np.zeros(SAMPLING_RATE, np.float32), sampling_rate=SAMPLING_RATE,
                                return_tensors="pt").input_features
        with torch.inference_mode():
            self._model.generate(input_features=feats, max_length=2, do_sample=False)
            try:
                mmc.apply(self._model, "audio_merge", keep=0.5)
                self._model.generate(input_features=feats, max_length=2, do_sample=False)
            except (ValueError, TypeError):
                pass
            finally:
                mmc.remove(self._model)
        self.warm_ups += 1

    def _keep_frames(self, module: Any, args: Any, output: Any) -> None:
        self._encoded = output[0] if isinstance(output, tuple) else output.last_hidden_state

    @property
    def window_s(self) -> float:
        """Seconds of one Whisper window (the timelines' span); 30 before the model is loaded."""
        fe = getattr(self._processor, "feature_extractor", self._processor)
        n, rate = getattr(fe, "n_samples", None), getattr(fe, "sampling_rate", SAMPLING_RATE)
        return n / rate if n else MAX_WINDOW_S

    def frame_seconds(self, n_frames: int) -> float:
        """Seconds per encoder frame: the feature extractor's window length / N (whisper-tiny.en: 30 s / 1500)."""
        return self.window_s / n_frames

    def transcribe(self, audio: np.ndarray, method: str | None, keep: float | int) -> dict[str, Any]:
        """Transcribe a clip, compressed by ``method`` (None = uncompressed).

        Args:
            audio: float32 [T] mono at 16 kHz.
            method: compressor name or None.
            keep: budget of encoder frames (fraction or count).

        Returns:
            dict with text, tokens_in, tokens_out, compress_ms, generate_ms, assign (int [N], slot of every encoder
            frame), frame_s (seconds per frame) and clip_frames (frames covering the clip, before the padding).
        """
        import torch

        import mmcompress as mmc

        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"audio must be a non-empty 1-D [T] array, got shape {audio.shape}")
        with self.lock, torch.inference_mode():
            self._load()
            model, proc = self._model, self._processor
            feats = proc(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features  # [1, mels, 2N]
            compress_ms = 0.0
            if method is not None:
                mmc.apply(model, method, keep=keep)
            try:
                t0 = time.perf_counter()
                # Whisper's generate reads max_length as the tokens after its decoder prompt (it adds the prompt's
                # length); max_new_tokens there prints transformers' max_new_tokens/max_length warning every call
                ids = model.generate(input_features=feats, max_length=self.max_new_tokens, do_sample=False)
                generate_ms = (time.perf_counter() - t0) * 1e3
                if method is not None:
                    st = mmc.stats(model)
                    compress_ms = float(st.get("compress_ms", 0.0))
            finally:
                if method is not None:
                    mmc.remove(model)
            enc = self._encoded  # [1, N, C]
            n = int(enc.shape[1])
            if method is None:
                assign = np.arange(n)
            else:  # same compressor, same frames: the assignment the adapter used (compressors are deterministic)
                assign = mmc.create(method, keep=keep)(enc, grid=(n,)).assign[0].numpy()  # [N]
            text = proc.batch_decode(ids, skip_special_tokens=True)[0].strip()
        live = assign[assign >= 0]
        frame_s = self.frame_seconds(n)
        clip_frames = min(n, max(1, int(np.ceil(audio.size / SAMPLING_RATE / frame_s))))
        return {"text": text, "tokens_in": n, "tokens_out": int(np.unique(live).size), "compress_ms": compress_ms,
                "generate_ms": generate_ms, "assign": assign, "frame_s": frame_s, "clip_frames": clip_frames}


def run_audio(backend: AudioBackend, clips: dict[str, Any], clip_id: str | None, upload: str | None,
              reference: str, methods: list[str], keep: float) -> tuple[list[list[Any]], list[tuple[np.ndarray, str]]]:
    """The audio tab's handler: table rows (uncompressed first) and one timeline per run.

    Args:
        backend: the shared Whisper.
        clips: bundled clips by id.
        clip_id: a bundled clip (used when nothing is uploaded).
        upload: path of an uploaded audio file (checked by `load_audio_safely`).
        reference: reference transcript for WER ('' = unknown; a bundled clip's own transcript when empty).
        methods: compressor names.
        keep: fraction of encoder frames kept.

    Returns:
        (rows [method, transcript, WER, tokens in, tokens out, compress ms, generate ms], [(timeline, caption)]).

    Raises:
        ValueError: no audio or two, unreadable/too long audio, or a keep outside (0, 1].
    """
    if upload and clip_id:
        raise ValueError(f"two clips given: an upload and the bundled {clip_id!r}; clear one of them")
    if upload:
        audio = load_audio_safely(upload, max_seconds=MAX_WINDOW_S, sample_rate=SAMPLING_RATE)
    elif clip_id:
        if clip_id not in clips:
            raise ValueError(f"unknown clip {clip_id!r}")
        clip = clips[clip_id]
        audio = load_audio_clip(clip)
        reference = reference or clip.text
    else:
        raise ValueError("upload a WAV file or pick a bundled clip")
    keep = keep_fraction(keep, "encoder frames")  # the UI sends 1 (int) for 1.0, which would keep ONE frame
    rows, gallery = [], []
    for method in [None, *methods]:
        r = backend.transcribe(audio, method, keep)
        w = word_error_rate(reference, r["text"])
        name = method or "none"
        rows.append([name, r["text"], None if w is None else round(w, 3), r["tokens_in"], r["tokens_out"],
                     round(r["compress_ms"], 1), round(r["generate_ms"])])
        if method is not None:
            caption = f"{name}: {span_summary(r['assign'], r['frame_s'], r['clip_frames'])}"
            gallery.append((timeline_image(r["assign"], r["clip_frames"]), caption))
    return rows, gallery


def load_audio_clip(clip: Any) -> np.ndarray:
    """A bundled clip's samples at 16 kHz, float32 [T]."""
    from .safety import resample

    return resample(clip.audio, clip.sampling_rate, SAMPLING_RATE)


def build_audio_tab(gr: Any, backend: AudioBackend | None = None, clips: dict[str, Any] | None = None) -> None:
    """Lay out the audio tab inside the current ``gr.Blocks`` / ``gr.Tab`` context.

    Args:
        gr: the ``gradio`` module.
        backend: shared Whisper (default: whisper-tiny.en, loaded on the first request).
        clips: bundled clips (default: the LibriVox clips, when installed).
    """
    backend = backend or AudioBackend()
    clips = bundled_clips() if clips is None else clips
    names = sorted(clips)
    gr.Markdown("Whisper tiny.en transcribes the clip from its compressed encoder frames (1,500 per 30 s). "
                f"WAV uploads up to {MAX_WINDOW_S:.0f} s.")
    with gr.Row():
        clip = gr.Dropdown(names, value=names[0] if names else None, label="bundled LibriVox clip")
        upload = gr.File(label="or upload a WAV (replaces the bundled clip)", type="filepath")
    reference = gr.Textbox(label="reference transcript (for WER; a bundled clip's own when empty)", value="")
    methods = gr.CheckboxGroup(audio_methods(), value=list(DEFAULT_AUDIO_METHODS), label="methods",
                              elem_id="audio-methods")
    keep = gr.Number(value=0.5, step=0.05, label="keep: fraction of the encoder frames, in (0, 1]; 1 keeps them all",
                     elem_id="audio-keep")
    go = gr.Button("Transcribe", elem_id="audio-run")
    table = gr.Dataframe(headers=["method", "transcript", "WER", "tokens in", "tokens out", "compress ms",
                                  "generate ms"], label="transcripts", wrap=True, elem_id="audio-transcripts",
                         column_widths=["11%", "46%", "7%", "8%", "9%", "9%", "10%"])
    gr.Markdown("Token timelines over Whisper's 30 s window: one colour = one merged group, light grey = kept alone, "
                "dark grey = dropped; thin strip below each: white = the clip, black = Whisper's silence padding.")
    picture = gr.Image(show_label=False, type="numpy", elem_id="audio-timelines")

    def handler(clip_id: str | None, up: str | None, ref: str, ms: list[str], k: float):
        try:
            rows, items = run_audio(backend, clips, clip_id, up, ref, ms, k)
            return rows, compose_timelines(items, backend.window_s) if items else None
        except ValueError as e:  # a bad input: one line in the server log, a toast, no traceback
            print(f"mmcompress demo: refused: {e}", file=sys.stderr, flush=True)
            raise gr.Error(str(e), print_exception=False) from None

    upload.upload(lambda up: None, [upload], [clip])  # an upload replaces the bundled clip, visibly
    clip.input(lambda c: None, [clip], [upload])
    go.click(handler, [clip, upload, reference, methods, keep], [table, picture], concurrency_limit=1)
