"""Fixtures of the `mmcompress bench` tests: a tiny random LLaVA saved as a local HF model directory (model +
LlavaProcessor with a word-level tokenizer), and a toy task whose images and questions are generated from ids.

The toy task is loaded by import path (``--task tests.bench_fixtures:ToyTask``), as users load tasks of their own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mmcompress.evals.tasks import Sample, Task, mean_stderr

WORDS = ["what", "colour", "is", "the", "shape", "red", "blue", "green", "circle", "square", "yes", "no"]
ANSWERS = ["red", "blue", "green", "circle", "square", "yes", "no"]


class ToyTask(Task):
    """`n` samples (default 23, not a multiple of common batch sizes): a seeded 32 x 32 image and a question."""

    name = "toy"
    modality = "image"
    max_new_tokens = 3

    def __init__(self, n: int = 23) -> None:
        self.n = n

    def samples(self, data=None, split=None, limit=None, seed=0, skip_bad=False) -> list[Sample]:
        out = []
        for i in range(self.n if limit is None else min(limit, self.n)):
            def image(i=i):
                from PIL import Image

                rng = np.random.default_rng(1000 + i)
                return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))

            out.append(Sample(id=f"q{i}", prompt=" ".join(WORDS[j % len(WORDS)] for j in range(i % 4 + 2)),
                              answer=ANSWERS[i % len(ANSWERS)], image=image, meta={"i": i}))
        return out

    def score(self, prediction, sample):
        return {"score": float(prediction.split()[:1] == [sample.answer])}

    def aggregate(self, records):
        acc, se = mean_stderr([r["score"] for r in records])
        return {"accuracy": acc, "stderr": se, "n": len(records), "answered": sum(bool(r["prediction"])
                                                                                 for r in records)}


class SlowToyTask(ToyTask):
    """ToyTask whose images take 0.2 s each to load, so that a run is surely still busy when a test interrupts it."""

    name = "toy_slow"

    def samples(self, data=None, split=None, limit=None, seed=0, skip_bad=False) -> list[Sample]:
        import time

        out = super().samples(data, split, limit, seed, skip_bad)
        for s in out:
            def image(load=s.image):
                time.sleep(0.2)
                return load()

            s.image = image
        return out


def save_tiny_llava(path: Path, seed: int = 0, layers: int = 2) -> Path:
    """Write a tiny random `LlavaForConditionalGeneration` (a Llama decoder of `layers` layers) + `LlavaProcessor` to
    `path` (loadable offline with ``AutoModelForImageTextToText``/``AutoProcessor``); returns `path`."""
    import torch
    import transformers

    tok = word_tokenizer()
    tok.padding_side = "left"
    improc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = transformers.LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=8,
                                       vision_feature_select_strategy="default", image_token="<image>",
                                       num_additional_image_tokens=1)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
    tc = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=4, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration._from_config(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def word_tokenizer():
    """A word-level tokenizer over `WORDS` with <pad> <s> </s> <unk> <image> (ids 0-4) for tiny LLaVA builds."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": 4}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>",
                                                extra_special_tokens={"image_token": "<image>"})
