"""Demo image tab, as a new user meets it: the keep field, Qwen2-VL token maps, image-only methods, picking a sample
(preview, its question and expected answer), upload vs sample, a missing --model, the warm-up."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

import mmcompress as mmc  # noqa: E402
from demos.app import (  # noqa: E402
    benchmark_questions,
    bundled_photos,
    enlarge,
    image_methods,
    pick_image,
    preview,
    run_image,
)
from demos.image import ImageBackend, image_grid  # noqa: E402
from tests.bench_fixtures import save_tiny_llava  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
Q = "what colour is the shape"


def save_tiny_qwen2vl(path: Path, seed: int = 0) -> Path:
    """A tiny random `Qwen2VLForConditionalGeneration` + `Qwen2VLProcessor` (with a one-turn chat template) saved as
    a local HF folder, loadable offline with ``AutoModelForImageTextToText``/``AutoProcessor``."""
    import torch
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<|image_pad|>": 4, "<|video_pad|>": 5,
             "<|vision_start|>": 6, "<|vision_end|>": 7}
    for w in "what colour is the shape red green blue circle square triangle".split():
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                    unk_token="<unk>", extra_special_tokens={"image_token": "<|image_pad|>",
                                                                             "video_token": "<|video_pad|>"})
    size = dict(min_pixels=16 * 16, max_pixels=32 * 32, patch_size=4, merge_size=2, temporal_patch_size=2)
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                "{% endfor %}")
    proc = T.Qwen2VLProcessor(image_processor=T.Qwen2VLImageProcessor(**size), tokenizer=tok,
                              video_processor=T.Qwen2VLVideoProcessor(**size), chat_template=template)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    cfg = T.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=4, video_token_id=5,
                          vision_start_token_id=6, vision_end_token_id=7)
    torch.manual_seed(seed)
    model = T.Qwen2VLForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> ImageBackend:
    return ImageBackend(str(save_tiny_llava(tmp_path_factory.mktemp("llava"))), max_new_tokens=3)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "shape.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_keep_one_from_the_ui_keeps_every_token(llava, image):
    """Gradio sends keep 1.0 as the int 1, which `mmc.apply` reads as ONE token; the tab means all of them."""
    for keep in (1, 1.0, "1"):
        rows, gallery = run_image(llava, {}, image, None, Q, ["tome", "pool"], keep)
        assert [r[2:4] for r in rows] == [[16, 16]] * 3, keep
        assert rows[1][1] == rows[2][1] == rows[0][1]  # identity compression: the uncompressed answer
    assert llava.answer(np.zeros((32, 32, 3), np.uint8), Q, "tome", 1)["tokens_out"] == 16  # the backend alike


@pytest.mark.parametrize("bad", [0, 0.0, 2, 2.0, -0.25, float("nan"), "lots", None])
def test_keep_out_of_range_gets_a_message(llava, image, bad):
    with pytest.raises(ValueError, match=r"keep: .*\(0, 1\]"):
        run_image(llava, {}, image, None, Q, ["tome"], bad)


def test_qwen2_vl_folder_draws_token_maps(tmp_path):
    """Qwen2-VL records an image's grid as (1, h, w); the map is drawn on its (h, w) merged-token grid."""
    backend = ImageBackend(str(save_tiny_qwen2vl(tmp_path / "qwen2vl")), max_new_tokens=3)
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    ref = backend.answer(img, Q, None, 1.0)
    assert ref["tokens_in"] == ref["tokens_out"] == 12 and ref["overlay"] is None
    for m in ("tome", "visionzip", "divprune"):
        r = backend.answer(img, Q, m, 0.25)
        assert (r["tokens_in"], r["tokens_out"]) == (12, 3), m
        assert r["overlay"] is not None and r["overlay"].shape == (168, 224, 3), m  # 3 x 4 grid, 56 px a token


def test_image_grid_reads_llava_and_qwen_grids():
    assert image_grid((4, 6), 24) == (4, 6)
    assert image_grid((1, 4, 6), 24) == (4, 6)  # Qwen2-VL and other M-RoPE families: one frame
    assert image_grid((2, 4, 6), 48) is None  # a video: no single image map
    assert image_grid((24,), 24) is None and image_grid(None, 24) is None and image_grid((4, 6), 25) is None


def test_video_and_audio_only_compressors_are_not_offered_and_refused_with_the_reason(llava, image):
    offered = image_methods()
    assert "temporal" not in offered and "audio_merge" not in offered
    assert {"tome", "pool", "visionzip", "divprune", "random"} <= set(offered)
    rows, gallery = run_image(llava, {}, image, None, Q, ["temporal", "audio_merge", "tome"], 0.5)
    assert rows[1][1] == "(cannot run: temporal compresses video tokens, not an image's)"
    assert rows[2][1] == "(cannot run: audio_merge compresses audio tokens, not an image's)"
    assert rows[3][3] == 8 and len(gallery) == 1  # the other methods still run


def test_upload_and_picked_sample_are_never_chosen_silently(image):
    photos = {"grey": lambda: np.full((8, 8, 3), 128, np.uint8)}
    with pytest.raises(ValueError, match="two images given"):
        pick_image(photos, image, "grey")
    assert pick_image(photos, None, "grey").shape == (8, 8, 3)
    assert pick_image(photos, image, None).shape == (40, 50, 3)
    with pytest.raises(ValueError, match="upload an image or pick"):
        pick_image(photos, None, None)


def test_picking_a_benchmark_sample_shows_it_with_its_question_and_expected_answer(image):
    photos, questions = bundled_photos(), benchmark_questions()
    scene = "detail test scene 0"
    assert scene in photos and scene in questions
    img, question, note = preview(photos, questions, None, scene)
    assert img.shape[-1] == 3 and np.array_equal(img, enlarge(photos[scene]()[..., :3]))  # 112 px shown at 224
    q, a = questions[scene]
    assert question == q and q.endswith("?") and f"expected answer: {a}" in note
    from mmcompress.evals import detail

    assert (q, a) in {(qq, aa) for _, qq, aa in detail.questions(detail.make_scene(detail.SPLIT_SEEDS["test"]))}
    img, question, note = preview(photos, questions, image, None)  # an upload: shown, the question left as typed
    assert img.shape == (200, 250, 3) and question is None and "upload" in note  # 40 x 50 shown 5x
    assert preview(photos, questions, None, None) == (None, None, "")


def test_backend_warms_up_once_before_the_first_timed_answer(tmp_path):
    backend = ImageBackend(str(save_tiny_llava(tmp_path / "m")), max_new_tokens=2)
    assert backend.warm_ups == 0
    backend.load()
    assert backend.warm_ups == 1
    with pytest.raises(ValueError, match="not wrapped"):
        mmc.stats(backend._vlm.model)  # the warm-up's compression is removed again
    backend.answer(np.zeros((32, 32, 3), np.uint8), Q, "tome", 0.5)
    assert backend.warm_ups == 1


def _demo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "mmcompress", "demo", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=REPO)


def test_missing_model_fails_at_start_in_one_line(tmp_path):
    t0 = time.monotonic()
    r = _demo("--model", str(tmp_path / "no_such_model"), "--port", "1")
    assert r.returncode == 2 and time.monotonic() - t0 < 120  # before gradio or a model is imported
    assert r.stderr.strip().splitlines() == [f"mmcompress demo: --model: '{tmp_path / 'no_such_model'}' is neither "
                                             "a built-in VLM (ref-vlm, ref-vlm-mini) nor an existing model directory"]
    (tmp_path / "empty").mkdir()
    r = _demo("--model", str(tmp_path / "empty"), "--port", "1")
    assert r.returncode == 2 and "has no config.json" in r.stderr and "Traceback" not in r.stderr


def test_builtin_models_pass_the_start_check():
    from mmcompress.demos.cli_demo import check_model

    for name in ("ref-vlm", "ref-vlm-mini"):
        check_model(name)  # no error: both load from the zoo


def test_demo_help_describes_the_app():
    r = _demo("--help")
    assert r.returncode == 0 and "browser app" in r.stdout and "(default: 127.0.0.1)" in r.stdout
