"""ref-vlm-mini's pieces without its trained weights: the tokenizer, the processor's template, the training sequences,
and the export of the trained parts into a plain LlavaForConditionalGeneration (same logits as training computed)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.script_module import load_script

transformers = pytest.importorskip("transformers")

from mmcompress.zoo import refvlm_mini as mini  # noqa: E402

WORDS = ["what", "color", "is", "the", "circle", "red", "?", "how", "many", "crosss", "are", "there", "2", "yes"]


@pytest.fixture(scope="module")
def proc():
    return mini.RefVLMMiniProcessor(mini.build_tokenizer(WORDS), 112)  # v1's 112 px: 64 image tokens


def tiny_vision():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=1, num_attention_heads=6, intermediate_size=64,
                       patch_size=14, image_size=112)
    return Dinov2Model(cfg).eval()


def test_tokenizer_words_and_specials(proc):
    tok = proc.tokenizer
    assert tok.convert_ids_to_tokens(list(range(len(mini.SPECIALS)))) == list(mini.SPECIALS)
    for w in WORDS:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert ids != [tok.unk_token_id] and len(ids) == 1, w
        assert tok.decode(ids) == w
    assert tok("What COLOR is the circle?", add_special_tokens=False)["input_ids"] == tok.convert_tokens_to_ids(
        ["what", "color", "is", "the", "circle", "?"])
    assert tok("purple", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]  # not in this vocabulary


@pytest.mark.real
def test_task_vocabulary_covers_every_answer():
    """Every easy-VQA and detail answer is one known word that decodes back to itself."""
    from mmcompress.evals import detail, easyvqa

    tok = mini.load_tokenizer() if mini.tokenizer_asset_path().is_file() else mini.build_tokenizer()
    answers = set(easyvqa.answers()) | set(detail.COLORS) | set(detail.SHAPES) | {"yes", "no", "1", "2", "3", "4",
                                                                                 "left", "right", "above", "below"}
    for a in sorted(answers):
        ids = tok(a, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id and tok.decode(ids) == a, a
    for _, _, _, q, _ in detail.split_questions("test", 20):
        assert tok.unk_token_id not in tok(q, add_special_tokens=False)["input_ids"], q


def test_prompt_is_the_chat_template(proc):
    """The processor's prompt of a bare question = the chat template of one user turn, the image after the
    question."""
    q = "what color is the circle?"
    via_template = proc.tokenizer.apply_chat_template([{"role": "user", "content": f"{q} {mini.IMAGE_TOKEN}"}],
                                                      add_generation_prompt=True, tokenize=False)
    assert proc.encode_text(proc.prompt(q)) == proc.encode_text(via_template)
    ids = proc.encode_text(proc.prompt(q))
    assert ids.count(proc.image_token_id) == 64 and ids[0] == proc.tokenizer.convert_tokens_to_ids(mini.USER)
    assert ids[-65:-1] == [proc.image_token_id] * 64  # the image right before <|assistant|>
    out = proc(images=[torch.zeros(112, 112, 3, dtype=torch.uint8).numpy()] * 2, text=[q, "how many crosss?"])
    assert out["pixel_values"].shape == (2, 3, 112, 112)
    assert (out["input_ids"] == proc.image_token_id).sum(1).tolist() == [64, 64]
    assert out["attention_mask"][:, 0].tolist() == [1, 0]  # left padding (the shorter question)


def test_training_sequence_is_the_multiturn_template(proc):
    """A training conversation tokenizes as the chat template renders it, and only answers (+ </s>) are labels."""
    train = load_script("scripts/train_ref_mini.py")
    rows = [(("d", 0), "colour", "what color is the circle?", "red"), (("d", 0), "count", "how many crosss are there?",
                                                                      "2")]
    (conv,) = train.conversations(proc, rows, turns=4)
    ids, labels = train.encode_turns(proc, conv)
    msgs = []
    for i, (_, _, q, a) in enumerate(conv):
        msgs.append({"role": "user", "content": proc.tokenizer.decode(q) + (f" {mini.IMAGE_TOKEN}" if i == 0 else "")})
        msgs.append({"role": "assistant", "content": proc.tokenizer.decode(a, skip_special_tokens=True)})
    text = proc.tokenizer.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    assert proc.encode_text(text) == ids
    shuffled, _ = train.sequence(proc, conv, random.Random(3))
    assert sorted(shuffled) == sorted(ids) and shuffled.count(proc.image_token_id) == 64
    answer_ids = [t for t, lab in zip(ids, labels, strict=False) if lab != -100]
    eos = proc.tokenizer.eos_token_id
    assert sorted(answer_ids) == sorted(proc.tokenizer.convert_tokens_to_ids(["red", "2"]) + [eos, eos])
    assert all(lab in (-100, t) for t, lab in zip(ids, labels, strict=False))


def test_export_is_the_trained_computation(proc):
    """Weights exported from training (standardisation folded into the projector) give the assembled Llava the
    logits training computed on the same image features."""
    train = load_script("scripts/train_ref_mini.py")
    vision = tiny_vision()
    cfg = mini.config(len(proc.tokenizer), vision.config)
    torch.manual_seed(1)
    mean, std = torch.randn(384) * 0.3, torch.rand(384) + 0.5
    trainable = train.Trainable(cfg, mean, std).eval()
    with torch.no_grad():
        for p in trainable.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model, _ = mini.build_mini(trainable.export(), tokenizer=proc.tokenizer, vision=vision)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    img = (torch.rand(112, 112, 3) * 255).to(torch.uint8).numpy()
    inputs = proc(images=[img], text=["what color is the circle?"])
    with torch.no_grad():
        feats = vision(inputs["pixel_values"], output_hidden_states=True).hidden_states[-1][:, 1:]  # [1, 64, 384]
        want = trainable(inputs["input_ids"], inputs["attention_mask"], feats)
        got = model(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["random", "uniform", "pool", "tome", "divprune"])
def test_compressed_training_inputs_are_what_apply_hands_the_llm(method):
    """v2 trains on compressed token sets: for each method of its mix, the logits training computes (compressed
    tokens at the stage mmc.apply uses, one shortened run of placeholders after the question) equal those of the
    exported LlavaForConditionalGeneration under mmc.apply(model, method, keep=k)."""
    import mmcompress as mmc

    train = load_script("scripts/train_ref_mini.py")
    proc2 = mini.RefVLMMiniProcessor(mini.build_tokenizer(WORDS), mini.ARCH_V2.image_size)
    vision = tiny_vision()
    cfg = mini.config(len(proc2.tokenizer), vision.config, shape=mini.ARCH_V2)
    assert cfg.text_config.num_hidden_layers == 8 and proc2.num_image_tokens == 144
    torch.manual_seed(2)
    trainable = train.Trainable(cfg, torch.randn(384) * 0.3, torch.rand(384) + 0.5).eval()
    with torch.no_grad():
        for p in trainable.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model, _ = mini.build_mini(trainable.export(), tokenizer=proc2.tokenizer, vision=vision, shape=mini.ARCH_V2)
    imgs = [(torch.rand(168, 168, 3) * 255).to(torch.uint8).numpy() for _ in range(2)]
    qs = ["what color is the circle?", "how many crosss are there?"]
    keep = 36
    with torch.no_grad():
        pv = proc2(images=imgs, text=qs)["pixel_values"]
        raw = vision(pv, output_hidden_states=True).hidden_states[-1]  # [2, 1 + 144, 384], CLS first
        img = train.compress_group(trainable, method, raw, keep, (12, 12))  # [2, M, C]
        mmc.apply(model, method, keep=keep)
        for b in range(2):  # one sample at a time: the processor pads on the left, training on the right
            inputs = proc2(images=[imgs[b]], text=[qs[b]])
            got = model(**inputs).logits[0]  # [L', V]
            conv = [(0, "t", proc2.tokenizer(qs[b], add_special_tokens=False)["input_ids"], [])]
            ids, _ = train.encode_turns(proc2, conv, img.shape[1])
            ids_t = torch.tensor([ids])
            want = trainable.forward_tokens(ids_t, torch.ones_like(ids_t), img[b: b + 1])[0]
            assert got.shape == want.shape, (got.shape, want.shape)
            torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
        mmc.remove(model)


def test_step_plan_is_a_pure_function_of_the_step():
    """--resume repeats the budgets and methods: the plan depends on (seed, step) only; budgets span the range."""
    train = load_script("scripts/train_ref_mini.py")
    plans = [train.step_plan(0, s, 144, 0.25, 0.04, train.MIX, 8) for s in range(400)]
    assert plans == [train.step_plan(0, s, 144, 0.25, 0.04, train.MIX, 8) for s in range(400)]
    keeps = [k for k, _ in plans]
    full = sum(k == 144 and m == ["full"] * 8 for k, m in plans)
    assert 60 <= full <= 140  # ~25% full steps
    assert min(keeps) <= 8 and any(30 <= k <= 40 for k in keeps)
    assert {m for _, ms in plans for m in ms} == set(train.MIX) | {"full"}


def test_a_continued_run_s_log_counts_on_from_the_run_it_continues(tmp_path):
    """--prior-log: the exported log is the earlier run's rows, then the continuation's with step, epoch,
    presentations and seconds counted on from the earlier run's last row (evaluations and losses untouched)."""
    train = load_script("scripts/train_ref_mini.py")
    head = "step\tepoch\tpresentations\tloss\tlr\tseconds\tevaluation\timage_tokens"
    (tmp_path / "a.tsv").write_text(f"{head}\n10\t0.008\t640\t0.4\t1e-4\t17\t\t93.6\n"
                                    '1700\t1.331\t108800\t0.2\t2.5e-05\t3981\t{"detail_val_acc": 0.8}\t70.0\n')
    (tmp_path / "b.tsv").write_text(f"{head}\n10\t0.008\t640\t0.19\t5.5e-05\t19\t\t62.8\n"
                                    '300\t0.235\t19200\t0.18\t2e-4\t600\t{"detail_val_acc": 0.81}\t70.1\n')
    text, off = train.merge_logs(tmp_path / "a.tsv", tmp_path / "b.tsv")
    assert off == {"step": 1700, "presentations": 108800, "seconds": 3981}
    lines = text.splitlines()
    assert lines[0] == head and len(lines) == 5
    assert lines[3].split("\t") == ["1710", "1.339", "109440", "0.19", "5.5e-05", "4000", "", "62.8"]
    assert lines[4].split("\t")[:3] == ["2000", "1.566", "128000"]
    assert lines[4].split("\t")[6] == '{"detail_val_acc": 0.81}'


@pytest.mark.parametrize("method", ["cdpruner", "text_recovery"])
def test_bench_hands_text_guided_methods_the_question(monkeypatch, method):
    """ref-vlm-mini's template puts the question BEFORE the image, so the tokens after the image are template
    markers only; the bench leaves the tokenizer's special ids out of the question span, so a text-guided method
    reads the question's words (without it, `<|assistant|>` alone)."""
    from mmcompress.evals.backends import VLMBackend
    from mmcompress.evals.tasks import Sample

    import mmcompress.hf.items as items

    proc = mini.RefVLMMiniProcessor(mini.build_tokenizer(WORDS), 112)
    model, _ = mini.build_mini(None, tokenizer=proc.tokenizer, vision=tiny_vision(), shape=mini.ARCH_V1)
    seen = []
    real = items.question_mask

    def spy(ids, am, media, exclude=()):
        qm = real(ids, am, media, exclude)
        seen.extend(proc.tokenizer.convert_ids_to_tokens(ids[b][qm[b]].tolist()) for b in range(ids.shape[0]))
        return qm

    monkeypatch.setattr(items, "question_mask", spy)
    backend = VLMBackend(model, proc)
    backend.configure(method, 0.5)
    from PIL import Image

    img = Image.fromarray((torch.rand(112, 112, 3) * 255).to(torch.uint8).numpy())
    backend.predict([Sample(id=0, prompt="what color is the circle?", answer="red", image=lambda: img)], 2)
    assert seen and seen[0] == ["what", "color", "is", "the", "circle", "?"], seen
