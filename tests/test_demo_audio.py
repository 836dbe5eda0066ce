"""Demo audio tab: timeline painting, span summary, WER, audio upload safety, and the Whisper backend on a tiny random
WhisperForConditionalGeneration (40 encoder frames); the real whisper-tiny.en run is marked `real`."""

from __future__ import annotations

import wave

import numpy as np
import pytest
import torch
from family_tiny import tiny_whisper

import mmcompress as mmc
from demos.audio import (
    DROPPED,
    KEPT_ALONE,
    AudioBackend,
    audio_methods,
    bundled_clips,
    compose_timelines,
    run_audio,
    span_summary,
    timeline_image,
    word_error_rate,
)
from demos.overlay import slot_colours
from demos.safety import load_audio_safely, resample

transformers = pytest.importorskip("transformers")


def write_wav(path, samples: np.ndarray, rate: int = 16000, channels: int = 1) -> None:
    """PCM 16-bit WAV; samples [T] or [T, channels] in [-1, 1]."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def tone(seconds: float, rate: int = 16000, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)  # [T]


class TinyProcessor:
    """Feature extractor for 1 s windows -> 80 mel frames (8 bins) -> 40 encoder frames; decodes ids as 'wN'."""

    def __init__(self) -> None:
        self.feature_extractor = transformers.WhisperFeatureExtractor(feature_size=8, sampling_rate=16000,
                                                                      hop_length=200, chunk_length=1, n_fft=400)

    def __call__(self, audio, sampling_rate, return_tensors):
        return self.feature_extractor(audio, sampling_rate=sampling_rate, return_tensors=return_tensors)

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(f"w{int(t)}" for t in row if int(t) > 2) for row in ids]


@pytest.fixture(scope="module")
def backend():
    return AudioBackend(model=tiny_whisper(), processor=TinyProcessor(), max_new_tokens=5)


def test_timeline_every_frame_painted_by_its_slot():
    assign = np.array([0, 0, 0, 1, 2, 2, -1, 3, 4, 4])  # [N]: spans 0-2, 4-5, 8-9 merged; 3, 7 alone; 6 dropped
    img = timeline_image(assign, clip_frames=7, width=50, height=6, mark=2)
    assert img.shape == (6, 50, 3) and img.dtype == np.uint8
    cols = slot_colours(5)
    for t, s in enumerate(assign):
        block = img[:4, t * 5:(t + 1) * 5]  # [4, 5, 3] columns of frame t above the clip strip
        want = DROPPED if s < 0 else KEPT_ALONE if (assign == s).sum() == 1 else cols[s]
        assert (block == want).all(), t
        assert (img[4:, t * 5:(t + 1) * 5] == (255 if t < 7 else 0)).all(), t  # clip white, padding black
    # adjacent merged spans get distinct colours, so span boundaries show
    assert not (img[0, 2 * 5] == img[0, 4 * 5]).all()


def test_timeline_sizes_and_bad_input():
    assign = np.repeat(np.arange(10), 4)  # [40] ten spans of 4 frames
    assert timeline_image(assign, width=80).shape == (28, 80, 3)
    assert timeline_image(assign, width=10).shape[1] == 40  # at least one column per frame
    assert (timeline_image(assign, mark=0) != 0).any(axis=-1).all()  # no strip: no black
    with pytest.raises(ValueError, match="clip_frames"):
        timeline_image(assign, clip_frames=41)
    with pytest.raises(ValueError, match="mark"):
        timeline_image(assign, height=4, mark=4)
    with pytest.raises(ValueError, match="assign"):
        timeline_image(np.zeros((2, 3), int))


def test_span_summary():
    assign = np.array([0, 0, 0, 1, 2, 2, -1, 3, 3, 3, 3])
    s = span_summary(assign, 0.02, clip_frames=6)
    assert s.startswith("clip 0.12 s: 6 frames -> 3 tokens; padding: 5 frames -> 1 tokens")
    assert "3 merged groups, largest 0.14-0.22 s (4 frames)" in s and "1 frames dropped" in s
    assert span_summary(np.arange(4), 0.02) == "clip 0.08 s: 4 frames -> 4 tokens"
    assert span_summary(np.array([-1, -1]), 0.02) == "clip 0.04 s: 2 frames -> 0 tokens; 2 frames dropped"


def strip_rows(pic: np.ndarray, pad: int = 12) -> list[tuple[int, int]]:
    """(first, last + 1) rows of each timeline strip: rows (almost) fully inked across the strip's width (text rows are
    mostly white; the white part of a strip's clip mark may be left out)."""
    ink = ~(pic[:, pad:pic.shape[1] - pad] == 255).all(-1)  # [H, width]
    rows = np.flatnonzero(ink.mean(1) > 0.9)
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


def test_compose_timelines():
    a = timeline_image(np.repeat(np.arange(5), 8), clip_frames=30)  # [28, 40 * 22, 3]
    b = timeline_image(np.arange(40))
    pic = compose_timelines([(a, "audio_merge: x"), (b, "none")], window_s=30.0, width=400, row=20)
    assert pic.shape[1] == 424 and pic.dtype == np.uint8
    (s0, e0), (s1, e1) = strip_rows(pic)
    assert 15 <= e0 - s0 <= 20 and 15 <= e1 - s1 <= 20 and s1 > e0
    strip = pic[s0:s0 + 20, 12:412]  # [20, 400, 3] the first strip, stretched with nearest neighbours
    assert (strip[0, 0] == a[0, 0]).all() and (strip[0, -1] == a[0, -1]).all()
    assert (strip[-1, 0] == 255).all() and (strip[-1, -1] == 0).all()  # clip strip: white, then padding black
    assert (pic[:s0, 12:100] < 100).any()  # the caption is drawn above it
    with pytest.raises(ValueError, match="items"):
        compose_timelines([], 30.0)
    with pytest.raises(ValueError, match="window_s"):
        compose_timelines([(a, "x")], 0.0)


def test_timeline_text_never_touches_strips_or_other_labels():
    """Captions sat 2 px above a 13 px font's 18 px line, so descenders ran into the strip below; long captions ran
    off the picture; axis labels of a narrow picture ran into each other."""
    rng = np.random.default_rng(0)
    items = []
    for m in ("audio_merge", "tome", "pool"):
        a = np.sort(rng.integers(0, 750, 1500))
        items.append((timeline_image(a, 400), f"{m}: {span_summary(a, 0.02, 400)}"))  # "(8 frames)": descenders
    for width in (1200, 500):
        pic = compose_timelines(items, 30.0, width=width)
        strips = strip_rows(pic)
        assert len(strips) == 3
        ink = ~(pic == 255).all(-1)  # [H, W]
        for s, _ in strips:
            assert not ink[s - 2:s].any(), (width, s)  # white rows between a caption and its strip
        above = ink[:strips[0][0]]
        assert not above[:, pic.shape[1] - 12:].any()  # the caption wraps inside the picture
    assert len(strip_rows(compose_timelines(items[:1], 30.0, width=500))) == 1
    pic = compose_timelines(items[:1], 30.0, width=120)  # 7 labels would need more than 120 px
    inked = (pic[-14:] != 255).any(-1).any(0)  # [W] columns with label ink (the labels: the last rows)
    runs, gap, start = [], 0, None
    for x, ink in enumerate(inked):
        if ink:
            if start is None or gap >= 6:
                runs.append([x, x])
            runs[-1][1] = x
            start, gap = x, 0
        else:
            gap += 1
    assert len(runs) >= 2 and all(b - a <= 30 for a, b in runs), runs  # separate labels, none run together

def test_word_error_rate():
    assert word_error_rate("he was not an ill disposed young man", "He was not an ill-disposed young man.") == 0.0
    assert word_error_rate("a b c d", "a x c") == pytest.approx(0.5)
    assert word_error_rate("", "anything") is None


def test_load_audio_safely(tmp_path):
    ok = tmp_path / "a.wav"
    write_wav(ok, tone(0.5))
    x = load_audio_safely(ok)
    assert x.dtype == np.float32 and x.shape == (8000,) and np.abs(x).max() == pytest.approx(0.3, abs=1e-3)
    low = tmp_path / "low.wav"  # 8 kHz stereo -> 16 kHz mono
    write_wav(low, np.stack([tone(0.5, 8000), tone(0.5, 8000)], -1), rate=8000, channels=2)
    assert load_audio_safely(low).shape == (8000,)
    long = tmp_path / "long.wav"
    write_wav(long, tone(3.0))
    with pytest.raises(ValueError, match="over the cap of 2 s"):
        load_audio_safely(long, max_seconds=2)
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all")
    with pytest.raises(ValueError, match="not audio"):
        load_audio_safely(text)
    from PIL import Image

    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    with pytest.raises(ValueError, match="not audio"):
        load_audio_safely(png)
    empty = tmp_path / "empty.wav"
    write_wav(empty, np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="empty"):
        load_audio_safely(empty)


def test_load_audio_float_wav_through_soundfile(tmp_path):
    sf = pytest.importorskip("soundfile")
    path = tmp_path / "f.wav"
    sf.write(str(path), tone(0.25, 22050), 22050, subtype="FLOAT")  # not PCM: the wave module refuses it
    assert load_audio_safely(path).shape == (4000,)


def test_resample_keeps_a_tone():
    x = tone(1.0, 8000, hz=200.0)
    y = resample(x, 8000, 16000)
    assert y.shape == (16000,)
    want = tone(1.0, 16000, hz=200.0)
    assert np.corrcoef(y[10:-10], want[10:-10])[0, 1] > 0.995  # half-sample-centred grid: a 31 us shift
    assert np.abs(y).max() == pytest.approx(0.3, abs=0.01)
    down = resample(tone(1.0, 48000, hz=200.0), 48000, 16000)  # anti-aliased down-sampling keeps the tone
    assert down.shape == (16000,) and np.corrcoef(down[10:-10], want[10:-10])[0, 1] > 0.995
    assert np.array_equal(resample(x, 8000, 8000), x)


def test_audio_methods_are_the_ones_whisper_can_run():
    names = audio_methods()
    assert {"audio_merge", "pool", "tome", "random", "uniform"} <= set(names)
    assert not {"visionzip", "text_recovery", "prumerge", "temporal"} & set(names)


@pytest.mark.parametrize("method", audio_methods())
def test_backend_every_method_halves_the_frames(backend, method):
    r = backend.transcribe(tone(0.5), method, 0.5)
    assert r["tokens_in"] == 40 and r["tokens_out"] == 20
    assert r["assign"].shape == (40,) and r["assign"].max() < 20
    assert isinstance(r["text"], str) and r["generate_ms"] > 0
    assert r["frame_s"] == pytest.approx(0.025) and r["clip_frames"] == 20  # 0.5 s of a 1 s window
    with pytest.raises(ValueError, match="not wrapped"):
        mmc.stats(backend._model)  # removed after the run: the shared model is left unwrapped


def test_backend_matches_direct_apply_and_spans(backend):
    from mmcompress.compressors.audio_merge import spans

    audio = tone(0.8, hz=300.0) + 0.05 * np.random.default_rng(0).standard_normal(12800).astype(np.float32)
    none = backend.transcribe(audio, None, 1.0)
    assert none["tokens_out"] == 40 and np.array_equal(none["assign"], np.arange(40))
    r = backend.transcribe(audio, "audio_merge", 10)
    model, proc = backend._model, backend._processor
    feats = proc(audio, sampling_rate=16000, return_tensors="pt").input_features  # [1, 8, 80]
    mmc.apply(model, "audio_merge", keep=10)
    with torch.no_grad():
        ids = model.generate(input_features=feats, max_new_tokens=5, do_sample=False)
        assert mmc.stats(model)["tokens_out"] == [10]
        enc = model.get_encoder()(feats).last_hidden_state  # [1, 40, 32] (encoder hooks compress it)
    mmc.remove(model)
    assert r["text"] == proc.batch_decode(ids)[0].strip()
    with torch.no_grad():
        out = mmc.create("audio_merge", keep=10)(model.get_encoder()(feats).last_hidden_state, grid=(40,))
    assert enc.shape == (1, 10, 32)
    assert np.array_equal(r["assign"], out.assign[0].numpy())
    sp = spans(out)[0].numpy()  # [10, 2] first/last frame of each span: the timeline's runs of one slot
    for s, (a, b) in enumerate(sp):
        assert (r["assign"][a:b + 1] == s).all()


def test_backend_rejects_bad_audio(backend):
    with pytest.raises(ValueError, match="1-D"):
        backend.transcribe(np.zeros((2, 100), np.float32), "pool", 0.5)
    with pytest.raises(ValueError, match="both or neither"):
        AudioBackend(model=tiny_whisper())


def librivox_folder(tmp_path):
    """Two clips in the pocketsphinx-testdata layout (WAVs + `transcription`)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_wav(tmp_path / "c1.wav", tone(0.5))
    write_wav(tmp_path / "c2.wav", tone(0.3, 8000), rate=8000)
    (tmp_path / "transcription").write_text("<s> he was not an ill disposed young man </s> (c1)\n"
                                            "<s> he might even have been made amiable himself </s> (c2)\n")
    return tmp_path


def test_bundled_clips(tmp_path):
    clips = bundled_clips(librivox_folder(tmp_path))
    assert sorted(clips) == ["c1", "c2"] and clips["c2"].sampling_rate == 8000
    assert bundled_clips(tmp_path / "missing") == {}


def test_run_audio_rows_and_timelines(backend, tmp_path):
    clips = bundled_clips(librivox_folder(tmp_path / "lv"))
    rows, gallery = run_audio(backend, clips, "c2", None, "", ["audio_merge", "pool"], 0.25)
    assert [r[0] for r in rows] == ["none", "audio_merge", "pool"]
    assert all(isinstance(r[2], float) for r in rows)  # the clip's transcript is the WER reference
    assert [r[3:5] for r in rows] == [[40, 40], [40, 10], [40, 10]]
    assert len(gallery) == 2 and gallery[0][1].startswith("audio_merge: ")
    img = gallery[0][0]  # [28, 40 * 22, 3]: the 0.3 s clip covers 12 of the 40 frames
    assert img.shape == (28, 880, 3) and (img[-1, :12 * 22] == 255).all() and (img[-1, 12 * 22:] == 0).all()
    assert "clip 0.30 s: 12 frames" in gallery[0][1]
    # an upload and a clip at once are refused (the UI clears one when the other is chosen); an upload without a
    # reference has no WER
    up = tmp_path / "up.wav"
    write_wav(up, tone(0.5))
    with pytest.raises(ValueError, match="two clips given"):
        run_audio(backend, clips, "c1", str(up), "", ["pool"], 0.5)
    rows, _ = run_audio(backend, clips, None, str(up), "", ["pool"], 0.5)
    assert rows[0][2] is None and rows[1][4] == 20
    rows, _ = run_audio(backend, clips, None, str(up), "hello world", [], 0.5)
    assert len(rows) == 1 and rows[0][2] is not None


def test_run_audio_errors(backend, tmp_path):
    bad = tmp_path / "x.txt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not audio"):
        run_audio(backend, {}, None, str(bad), "", ["pool"], 0.5)
    with pytest.raises(ValueError, match="upload a WAV"):
        run_audio(backend, {}, None, None, "", ["pool"], 0.5)
    with pytest.raises(ValueError, match="unknown clip"):
        run_audio(backend, {}, "nope", None, "", ["pool"], 0.5)
    long = tmp_path / "long.wav"
    write_wav(long, tone(31.0, 8000), rate=8000)
    with pytest.raises(ValueError, match="over the cap of 30 s"):
        run_audio(backend, {}, None, str(long), "", ["pool"], 0.5)
    up = tmp_path / "ok.wav"
    write_wav(up, tone(0.2))
    with pytest.raises(ValueError, match="keep"):
        run_audio(backend, {}, None, str(up), "", ["pool"], 0.0)


def test_keep_one_from_the_ui_keeps_every_frame(backend, tmp_path):
    """Gradio sends keep 1.0 as the int 1, which `mmc.apply` reads as ONE frame: the tab keeps all of them."""
    up = tmp_path / "one.wav"
    write_wav(up, tone(0.3))
    for keep in (1, 1.0, "1"):
        rows, _ = run_audio(backend, {}, None, str(up), "", ["audio_merge", "pool"], keep)
        assert [r[3:5] for r in rows] == [[40, 40]] * 3, keep
    for bad in (0, 2, 2.0, -0.5, float("nan"), "lots", None):
        with pytest.raises(ValueError, match=r"keep: .*\(0, 1\]"):
            run_audio(backend, {}, None, str(up), "", ["pool"], bad)


def test_backend_warms_up_once_before_the_first_timed_call():
    b = AudioBackend(model=tiny_whisper(), processor=TinyProcessor(), max_new_tokens=3)
    assert b.warm_ups == 0
    b.transcribe(tone(0.3), None, 1.0)
    b.transcribe(tone(0.3), "pool", 0.5)
    assert b.warm_ups == 1  # the first request loaded and warmed up the model before its timed call; once only


def test_build_app_with_audio_tab(backend):
    pytest.importorskip("gradio")
    from demos.app import build_app

    assert build_app(audio_backend=backend) is not None


@pytest.mark.real
def test_real_whisper_bundled_clip_audio_merge_half():
    clips = bundled_clips()
    if not clips:
        pytest.skip("pocketsphinx-testdata is not installed (apt-get install pocketsphinx-testdata)")
    cid = "sense_and_sensibility_01_austen_64kb-0930"  # "he might even have been made amiable himself"
    rows, gallery = run_audio(AudioBackend(), clips, cid, None, "", ["audio_merge"], 0.25)
    (_, base_text, base_wer, n_in, n_out, *_), (_, text, w, m_in, m_out, *_) = rows
    assert (n_in, n_out, m_in, m_out) == (1500, 1500, 1500, 375)
    assert base_wer == 0.0 and w <= 0.15, (base_text, text)  # measured 0.0 and 0.0
    img, caption = gallery[0]
    assert img.shape == (28, 1500, 3) and "clip 3.30 s: 165 frames" in caption and "merged groups" in caption


def test_transcribe_prints_no_generation_length_warning(backend):
    """Every request printed transformers' "Both `max_new_tokens` and `max_length`" warning (Whisper's generate
    fills max_length itself); the backend asks for the answer length in the form Whisper takes without one."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger("transformers")
    backend.transcribe(tone(0.3), None, 1.0)  # loads and warms up
    log.addHandler(handler)
    try:
        for method in (None, "audio_merge"):
            r = backend.transcribe(tone(0.5), method, 0.5)
            assert len(r["text"].split()) <= backend.max_new_tokens
    finally:
        log.removeHandler(handler)
    said = [r.getMessage() for r in records]
    assert not [m for m in said if "max_new_tokens" in m or "max_length" in m], said
