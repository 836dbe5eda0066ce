"""Demo pieces: token-map overlay, bench summary reading/plotting, input safety, CLI parser."""

import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch

import mmcompress as mmc
from demos.cli_demo import add_demo_parser
from demos.overlay import overlay_token_map, slot_colours, token_classes
from demos.results import plot_summary, read_summary
from demos.safety import check_audio, load_image_safely


def test_token_classes():
    assign = np.array([0, 0, 1, -1, 2, 2, 2, -1])
    assert token_classes(assign).tolist() == [2, 2, 1, 0, 2, 2, 2, 0]


def test_overlay_every_token_painted_by_its_slot():
    g, p = 4, 3
    img = np.full((g * p, g * p, 3), 128, np.uint8)
    assign = np.array([0, 0, 1, 2, 3, 3, -1, 4, 5, 6, 7, 8, 9, 10, 11, -1])
    out = overlay_token_map(img, assign, (g, g), alpha=0.5)
    cols = slot_colours(int(assign.max()) + 1)
    cls = token_classes(assign)
    for t in range(g * g):
        i, j = divmod(t, g)
        tile = out[i * p:(i + 1) * p, j * p:(j + 1) * p].astype(int)
        if cls[t] == 0:
            assert (tile == 32).all()
        elif cls[t] == 2:
            expect = (0.5 * 128 + 0.5 * cols[assign[t]]).astype(int)
            assert np.abs(tile - expect).max() <= 1
        else:
            assert (tile[0] == 255).all() and (tile[1, 1] == 128).all()


def test_overlay_matches_real_compressor_assign():
    torch.manual_seed(0)
    feats = torch.randn(1, 64, 16)  # [B, N, C]
    out = mmc.create("tome", keep=16)(feats, grid=(8, 8))
    a = out.assign[0].numpy()
    img = np.zeros((32, 32, 3), np.uint8) + 100
    ov = overlay_token_map(img, a, (8, 8))
    merged = token_classes(a) == 2
    assert merged.any()
    # two tokens of the same merged slot get the same colour; tokens of different slots differ
    tiles = ov.reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4).reshape(64, 4, 4, 3)[:, 1, 1]
    for s in np.unique(a[merged]):
        idx = np.flatnonzero(a == s)
        assert (tiles[idx] == tiles[idx[0]]).all()


def test_overlay_bad_input():
    with pytest.raises(ValueError, match="assign"):
        overlay_token_map(np.zeros((8, 8, 3), np.uint8), np.zeros(5, int), (2, 2))
    with pytest.raises(ValueError, match="image"):
        overlay_token_map(np.zeros((8, 8), np.uint8), np.zeros(4, int), (2, 2))
    with pytest.raises(ValueError, match="grid"):
        overlay_token_map(np.zeros((9, 8, 3), np.uint8), np.zeros(4, int), (2, 2))


def _write_summary(folder, rows):
    cols = "task,method,keep,n,accuracy,stderr,tokens,prefill_ms,compress_ms"
    (folder / "summary.csv").write_text(cols + "\n" + "\n".join(rows) + "\n")


def test_results_read_and_plot(tmp_path):
    _write_summary(tmp_path, ["easyvqa,none,1,100,0.9,0.03,64,10.0,0.0", "easyvqa,tome,0.5,100,0.85,0.035,32,6.0,0.4",
                              "easyvqa,tome,0.25,100,0.7,0.04,16,4.0,0.3"])
    rows = read_summary(tmp_path)
    assert len(rows) == 3 and rows[1]["accuracy"] == 0.85 and rows[2]["tokens"] == 16.0
    fig = plot_summary(rows)
    ax0, ax1 = fig.axes[:2]
    assert len(fig.legends) == 1 and not ax0.get_legend() and not ax1.get_legend()  # one legend for the figure
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["tome", "none (uncompressed)"]
    assert ax0.get_xlabel() == "tokens entering the LLM" and ax1.get_xlabel() == "LLM prefill ms per sample"


def _pareto_rows(methods=("random", "tome", "pool", "divprune")):
    rows = [{"task": "easyvqa", "method": "none", "keep": "1", "n": 50, "accuracy": 0.9, "stderr": 0.03,
             "tokens": 64.0, "prefill_ms": 10.0, "compress_ms": 0.0}]
    for m in methods:
        for k, tok in (("0.5", 32.0), ("0.25", 16.0)):
            rows.append({"task": "easyvqa", "method": m, "keep": k, "n": 50, "accuracy": 0.8, "stderr": 0.03,
                         "tokens": tok, "prefill_ms": tok / 6, "compress_ms": 0.2})
    return rows


def test_pareto_png_and_results_tab_draw_the_same_figure_with_visible_overlaps(tmp_path):
    """Equal points of different methods stay visible (dodged sideways, outlined markers of their own shape), one
    legend, and pareto.png and the Results tab use the same axis names."""
    from mmcompress.evals.report import pareto_figure

    rows = _pareto_rows()
    demo, png = plot_summary(rows), pareto_figure(rows)
    for fig in (demo, png):
        ax = fig.axes[0]
        assert len(fig.legends) == 1 and all(a.get_legend() is None for a in fig.axes)
        bars = [c for c in ax.containers if c.get_label() in ("random", "tome", "pool", "divprune")]
        lines = [c.lines[0] for c in bars]  # the data line of each errorbar, points sorted by tokens
        xs = {c.get_label(): tuple(c.lines[0].get_xdata()) for c in bars}
        assert len(xs) == 4
        assert len({x[0] for x in xs.values()}) == 4  # all four at 16 tokens, at four distinct x positions
        assert max(abs(x[0] - 16) for x in xs.values()) < 0.05 * 48  # close to their true token count
        assert len({ln.get_marker() for ln in lines}) == 4
        assert all(ln.get_markeredgecolor() == "white" for ln in lines)
    assert [(a.get_xlabel(), a.get_ylabel()) for a in demo.axes] == [(a.get_xlabel(), a.get_ylabel())
                                                                     for a in png.axes]


def test_results_table_shows_stderr_and_rounded_times(tmp_path):
    from demos.app import results_view

    _write_summary(tmp_path, ["easyvqa,none,1,100,0.9,0.0301,64,10.123456,0.0",
                              "easyvqa,tome,0.5,100,0.85,0.035,32,6.0,0.41234"])
    fig, table, msg = results_view(str(tmp_path))
    assert table[0] == ["easyvqa", "none", "1", "0.900 ± 0.030", "64.0", "10.1", "0.00"]
    assert table[1][3:] == ["0.850 ± 0.035", "32.0", "6.0", "0.41"] and "2 rows" in msg


def test_results_errors(tmp_path):
    with pytest.raises(ValueError, match="summary.csv"):
        read_summary(tmp_path)
    (tmp_path / "summary.csv").write_text("task,method\nx,y\n")
    with pytest.raises(ValueError, match="lacks columns"):
        read_summary(tmp_path)


def test_image_safety(tmp_path):
    from PIL import Image

    ok = tmp_path / "a.png"
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(ok)
    assert load_image_safely(ok).shape == (10, 20, 3)
    with pytest.raises(ValueError, match="over the cap"):
        load_image_safely(ok, max_pixels=100)
    bad = tmp_path / "a.txt"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        load_image_safely(bad)


def test_audio_cap():
    check_audio(np.zeros(16000), 16000, max_seconds=2)
    with pytest.raises(ValueError, match="over the cap"):
        check_audio(np.zeros(16000 * 3), 16000, max_seconds=2)
    with pytest.raises(ValueError, match="empty"):
        check_audio(np.zeros(0), 16000)


def test_demo_parser_defaults_to_localhost():
    p = argparse.ArgumentParser()
    add_demo_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["demo"])
    assert a.host == "127.0.0.1" and a.model == "ref-vlm" and a.bench_dir == "runs/bench"


def test_demos_import_is_light():
    code = "import sys, demos, demos.cli_demo; assert 'torch' not in sys.modules and 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_app_without_model():
    pytest.importorskip("gradio")
    from demos.app import audio_available, build_app, results_view

    app = build_app()
    assert app is not None
    ok, why = audio_available()
    assert ok or "not available yet" in why
    fig, table, msg = results_view("/nonexistent/folder")
    assert fig is None and "summary.csv" in msg


def test_compressor_recorder_forwards_and_records():
    from demos.image import CompressorRecorder

    comp = mmc.create("tome", keep=4)
    rec = CompressorRecorder(comp)
    x = torch.randn(1, 16, 8)  # [B, N, C]
    out = rec(x, grid=(4, 4), prefix=0)
    assert rec.name == "tome" and rec.needs == comp.needs
    assert len(rec.calls) == 1 and rec.calls[0][:2] == ((4, 4), 0) and rec.calls[0][2] is out
    assert torch.equal(out.x, comp(x, grid=(4, 4)).x)


def test_model_view_unnormalises():
    from types import SimpleNamespace

    from demos.image import model_view, token_map

    img = np.random.default_rng(0).integers(0, 256, (14, 14, 3), dtype=np.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    pv = (torch.from_numpy(img).float() / 255 - torch.tensor(mean)) / torch.tensor(std)  # [S, S, 3]
    view = model_view(pv.permute(2, 0, 1)[None], SimpleNamespace(image_mean=mean, image_std=std), img)
    assert np.abs(view.astype(int) - img).max() <= 1
    assert model_view(torch.zeros(2, 3, 14, 14), None, img) is img  # several tiles: the original image
    ov = token_map(view, np.arange(4), (2, 2))
    assert ov.shape == (224, 224, 3)


class _FailingBackend:
    def answer(self, image, question, method, keep):
        if method == "bad":
            raise ValueError("scores: not available")
        return {"answer": "red", "tokens_in": 64, "tokens_out": 64 if method is None else 16, "compress_ms": 1.0,
                "generate_ms": 5.0, "overlay": None if method is None else np.zeros((8, 8, 3), np.uint8)}


def test_run_image_rows_errors_and_bad_input(tmp_path):
    from PIL import Image

    from demos.app import run_image

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    rows, gallery = run_image(_FailingBackend(), {}, str(path), None, "q?", ["tome", "bad"], 0.25)
    assert [r[0] for r in rows] == ["none", "tome", "bad"] and rows[2][1].startswith("(cannot run: scores")
    assert len(gallery) == 1 and gallery[0][1] == "tome: red (64 -> 16 tokens)"
    photos = {"black": lambda: np.zeros((4, 4, 4), np.uint8)}  # RGBA loader: alpha dropped
    assert run_image(_FailingBackend(), photos, None, "black", "q?", [], 0.5)[0][0][1] == "red"
    for args, msg in [((None, None, "q?"), "upload an image"), ((str(path), None, " "), "question"),
                      ((None, "nope", "q?"), "unknown photo")]:
        with pytest.raises(ValueError, match=msg):
            run_image(_FailingBackend(), photos, *args, ["tome"], 0.25)
    with pytest.raises(ValueError, match="keep"):
        run_image(_FailingBackend(), photos, str(path), None, "q?", ["tome"], 1.5)


def test_image_backend_tiny_llava_maps_every_method(tmp_path):
    pytest.importorskip("transformers")
    from demos.image import ImageBackend
    from tests.bench_fixtures import save_tiny_llava

    backend = ImageBackend(str(save_tiny_llava(tmp_path / "m")), max_new_tokens=3)
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    ref = backend.answer(img, "what colour is the shape", None, 0.25)
    assert ref["tokens_in"] == ref["tokens_out"] == 16 and ref["overlay"] is None
    for m in ("tome", "visionzip", "text_recovery"):  # similarity, attention scores, question embeddings
        r = backend.answer(img, "what colour is the shape", m, 0.25)
        assert (r["tokens_in"], r["tokens_out"]) == (16, 4) and r["overlay"].shape == (224, 224, 3), m
        with pytest.raises(ValueError, match="not wrapped"):
            mmc.stats(backend._vlm.model)  # the shared model is left unwrapped
    assert backend.answer(img, "what colour is the shape", None, 0.25)["answer"] == ref["answer"]


def test_image_backend_falls_back_to_stats_assign(tmp_path, monkeypatch):
    """Without the recorder (e.g. the adapter's attribute renamed), the map comes from mmc.stats(model)["assign"]."""
    pytest.importorskip("transformers")
    import demos.image as image_mod
    from tests.bench_fixtures import save_tiny_llava

    backend = image_mod.ImageBackend(str(save_tiny_llava(tmp_path / "m")), max_new_tokens=2)
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with_rec = backend.answer(img, "what colour is the shape", "tome", 0.25)["overlay"]
    monkeypatch.setattr(image_mod, "record_compressions", lambda model: None)
    r = backend.answer(img, "what colour is the shape", "tome", 0.25)
    if r["overlay"] is None:
        pytest.skip("this mmcompress's stats carry no assign")
    assert np.array_equal(r["overlay"], with_rec)


def test_benchmark_samples_are_offered_and_auto_reaches_the_backend():
    from demos.app import bundled_photos, run_image

    photos = bundled_photos()
    scenes = [n for n in photos if n.startswith("detail test scene")]
    assert scenes and photos[scenes[0]]().shape[-1] == 3
    seen = []

    class _Backend:
        def answer(self, image, question, method, keep):
            seen.append((method, keep))
            return {"answer": "x", "tokens_in": 64, "tokens_out": 64 if method is None else 20, "compress_ms": 0.1,
                    "generate_ms": 1.0, "overlay": None}

    rows, _ = run_image(_Backend(), photos, None, scenes[0], "q?", ["tome"], 0.25, True)
    assert seen == [(None, 1.0), ("tome", "auto")] and rows[1][3] == 20
