"""Tiny random VLMs saved as local Hugging Face directories that vLLM can serve (config, weights, tokenizer, processor).

vLLM's CPU attention backend needs a text head_dim >= 32, and the vision merger's output width must equal the text
hidden size. The tokenizer is word-level (whitespace split, special tokens split out), with a chat template that
renders image parts as the family's placeholder, so `vllm serve` answers OpenAI chat requests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>", "<image>", "<s>", "</s>"]
VOCAB = 256
_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=2048, head_dim=32, rms_norm_eps=1e-6,
             tie_word_embeddings=False)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] in ('image', 'image_url') %}{{ IMG }}{% elif c['type'] in ('video', 'video_url') %}{{ VID }}"
    "{% else %}{{ c['text'] }}{% endif %} {% endfor %}{% endif %} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def words() -> list[str]:
    """The plain words of the vocabulary (ids after the special tokens)."""
    return [f"w{i}" for i in range(VOCAB - len(SPECIALS))]


def _tokenizer(image: str, video: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   unk_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    fast.chat_template = CHAT_TEMPLATE.replace("{{ IMG }}", image).replace("{{ VID }}", video)
    return fast


def token_id(name: str) -> int:
    return SPECIALS.index(name)


def build_qwen2_vl(out: str | os.PathLike, seed: int = 0, family: str = "qwen2_vl", text_kw: dict | None = None,
                   vision_kw: dict | None = None, max_side: int = 224) -> Path:
    """Save a tiny random Qwen2-VL (or Qwen2.5-VL with family="qwen2_5_vl") with its processor under `out`.

    Images of 112 x 112 px give an 8 x 8 patch grid: 16 tokens after the 2 x 2 merger. `text_kw` / `vision_kw` override
    config fields (larger models for benchmarks); images are resized to at most `max_side`^2 pixels.
    """
    import transformers as T

    torch.manual_seed(seed)
    ids = dict(image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
               vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
               bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>"),
               pad_token_id=token_id("<pad>"))
    text = dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                **{k: v for k, v in ids.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    text.update(text_kw or {})
    if family == "qwen2_vl":
        vc = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        vc.update(vision_kw or {})
        cfg = T.Qwen2VLConfig(vision_config=vc, text_config=dict(text, model_type="qwen2_vl_text"), **ids)
        model = T.Qwen2VLForConditionalGeneration(cfg)
    elif family == "qwen2_5_vl":
        vc = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])
        vc.update(vision_kw or {})
        cfg = T.Qwen2_5_VLConfig(vision_config=vc, text_config=dict(text, model_type="qwen2_5_vl_text"), **ids)
        model = T.Qwen2_5_VLForConditionalGeneration(cfg)
    else:
        raise ValueError(f"family: expected 'qwen2_vl' or 'qwen2_5_vl', got {family!r}")
    out = Path(out)
    model.eval().save_pretrained(out)
    tok = _tokenizer("<|vision_start|> <|image_pad|> <|vision_end|>", "<|vision_start|> <|video_pad|> <|vision_end|>")
    size = {"shortest_edge": 56 * 56, "longest_edge": max_side * max_side}
    ip = T.Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    vp = T.Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    proc_cls = T.Qwen2_5_VLProcessor if family == "qwen2_5_vl" else T.Qwen2VLProcessor  # 2.5: second_per_grid_ts
    proc = proc_cls(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)
    proc.save_pretrained(out)
    tok.save_pretrained(out)
    _gen_config(out, ids["eos_token_id"])
    return out


def build_qwen3_vl(out: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random Qwen3-VL (16 px patches, DeepStack from both vision layers) with its processor.

    Images of 128 x 128 px give an 8 x 8 patch grid: 16 tokens after the 2 x 2 merger.
    """
    import transformers as T

    torch.manual_seed(seed)
    ids = dict(image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
               vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"))
    special = dict(bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>"),
                   pad_token_id=token_id("<pad>"))
    text = dict(_TEXT, model_type="qwen3_vl_text", **special,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
                                 "mrope_interleaved": True})
    vc = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, spatial_merge_size=2,
              temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=256, deepstack_visual_indexes=[0, 1])
    cfg = T.Qwen3VLConfig(vision_config=vc, text_config=text, **ids)
    model = T.Qwen3VLForConditionalGeneration(cfg)
    out = Path(out)
    model.eval().save_pretrained(out)
    tok = _tokenizer("<|vision_start|> <|image_pad|> <|vision_end|>", "<|vision_start|> <|video_pad|> <|vision_end|>")
    size = {"shortest_edge": 64 * 64, "longest_edge": 256 * 256}
    # mean/std 0.5 for images too, as Qwen3-VL's checkpoints: vLLM normalizes video pixels in the model with the
    # IMAGE processor's mean/std (`mm_input_norm`), so processors that differ make vLLM's videos differ from HF's
    half = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ip = T.Qwen2VLImageProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2, **half)
    vp = T.Qwen3VLVideoProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2)
    proc = T.Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)
    proc.save_pretrained(out)
    tok.save_pretrained(out)
    _gen_config(out, special["eos_token_id"])
    return out


def build_llava(out: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random LLaVA-1.5 (CLIP tower, 112 px, 14 px patches: 64 image tokens) with its processor."""
    import transformers as T

    torch.manual_seed(seed)
    img = token_id("<image>")
    vc = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=112,
              patch_size=14, projection_dim=64)
    text = dict(_TEXT, model_type="llama", bos_token_id=token_id("<s>"), eos_token_id=token_id("<|im_end|>"),
                pad_token_id=token_id("<pad>"))
    cfg = T.LlavaConfig(vision_config=dict(vc, model_type="clip_vision_model"), text_config=text,
                        image_token_index=img, vision_feature_layer=-2, vision_feature_select_strategy="default",
                        projector_hidden_act="gelu", image_seq_length=64)
    model = T.LlavaForConditionalGeneration(cfg)
    out = Path(out)
    model.eval().save_pretrained(out)
    _clip_layout(out / "model.safetensors")
    tok = _tokenizer("<image>", "<image>")
    ip = T.CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    proc = T.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                            chat_template=tok.chat_template, num_additional_image_tokens=1)
    proc.save_pretrained(out)
    tok.save_pretrained(out)
    _gen_config(out, text["eos_token_id"])
    return out


def build_llava_next(out: str | os.PathLike, seed: int = 0, family: str = "llava_next") -> Path:
    """Save a tiny random LLaVA-NeXT (or LLaVA-OneVision / LLaVA-NeXT-Video with family="llava_onevision" /
    "llava_next_video"): CLIP tower at 112 px with 14 px patches (64 tokens per tile), anyres tiles on the pinpoints
    112x224, 224x112, 224x224, image_newline (LLaVA-NeXT-Video: 224 px tiles, pinpoints doubled)."""
    import transformers as T

    torch.manual_seed(seed)
    img = token_id("<image>")
    px = 224 if family == "llava_next_video" else 112  # vLLM's LLaVA-NeXT-Video pooler needs image_size >= patch^2
    vc = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=px,
              patch_size=14, projection_dim=64, model_type="clip_vision_model")
    text = dict(_TEXT, model_type="qwen2" if family == "llava_onevision" else "llama", bos_token_id=token_id("<s>"),
                eos_token_id=token_id("<|im_end|>"), pad_token_id=token_id("<pad>"))
    pins = [[px, 2 * px], [2 * px, px], [2 * px, 2 * px]]
    common = dict(vision_config=vc, text_config=text, image_token_index=img, vision_feature_layer=-2,
                  image_grid_pinpoints=pins, projector_hidden_act="gelu")
    size, crop = {"shortest_edge": px}, {"height": px, "width": px}
    tok = _tokenizer("<image>", "<|video_pad|>")
    if family == "llava_next":
        cfg = T.LlavaNextConfig(vision_feature_select_strategy="default", **common)
        model = T.LlavaNextForConditionalGeneration(cfg)
        ip = T.LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=pins)
        proc = T.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                    vision_feature_select_strategy="default", chat_template=tok.chat_template,
                                    num_additional_image_tokens=1)
    elif family == "llava_onevision":
        vid = token_id("<|video_pad|>")
        cfg = T.LlavaOnevisionConfig(vision_feature_select_strategy="default", video_token_index=vid,
                                     vision_aspect_ratio="anyres_max_9", **common)
        model = T.LlavaOnevisionForConditionalGeneration(cfg)
        ip = T.LlavaOnevisionImageProcessor(size={"height": 112, "width": 112}, image_grid_pinpoints=pins)
        vp = T.LlavaOnevisionVideoProcessor(size={"height": 112, "width": 112})
        proc = T.LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, num_image_tokens=65,
                                         vision_feature_select_strategy="default", chat_template=tok.chat_template,
                                         video_token="<|video_pad|>", vision_aspect_ratio="anyres_max_9")
    elif family == "llava_next_video":
        vid = token_id("<|video_pad|>")
        cfg = T.LlavaNextVideoConfig(vision_feature_select_strategy="default", video_token_index=vid,
                                     spatial_pool_stride=2, **common)
        model = T.LlavaNextVideoForConditionalGeneration(cfg)
        ip = T.LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=pins)
        vp = T.LlavaNextVideoVideoProcessor(size=size, crop_size=crop)
        proc = T.LlavaNextVideoProcessor(video_processor=vp, image_processor=ip, tokenizer=tok, patch_size=14,
                                         vision_feature_select_strategy="default", chat_template=tok.chat_template,
                                         num_additional_image_tokens=1, video_token="<|video_pad|>")
    else:
        raise ValueError(f"family: expected 'llava_next', 'llava_onevision' or 'llava_next_video', got {family!r}")
    out = Path(out)
    model.eval().save_pretrained(out)
    _clip_layout(out / "model.safetensors")
    proc.save_pretrained(out)
    tok.save_pretrained(out)
    _gen_config(out, text["eos_token_id"])
    return out


def _clip_layout(path: Path) -> None:
    """Checkpoint keys as llava-hf's checkpoints name them (`vision_tower.vision_model.*`): transformers 5 saves the
    CLIP tower without `vision_model.`, which vLLM's weight loader does not map; transformers reads both."""
    from safetensors.torch import load_file, save_file

    sd = load_file(path)
    fixed = {("vision_tower.vision_model." + k[len("vision_tower."):]
              if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
             for k, v in sd.items()}
    save_file(fixed, path, metadata={"format": "pt"})


def _gen_config(out: Path, eos: int) -> None:
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "do_sample": False}))


def image(seed: int, size: tuple[int, int] = (112, 112), kind: str = "noise", cell: int = 28):
    """A random RGB PIL image; kind "blocks": a page of flat cells of `cell` px (one merge group of 14 px patches
    at 28, of Qwen3-VL's 16 px ones at 32): mostly white, some flat colours, some noise, so PixelPrune drops the
    flat runs at tau 0; a third of the flat cells are shaded by 6/255, which a tau above that also drops."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        return Image.fromarray(arr)
    if kind != "blocks":
        raise ValueError(f"kind: expected 'noise' or 'blocks', got {kind!r}")
    ch, cw = -(-size[1] // cell), -(-size[0] // cell)
    palette = torch.tensor([[255, 255, 255], [30, 60, 200], [220, 40, 40]], dtype=torch.float32)
    pick = torch.multinomial(torch.tensor([0.6, 0.15, 0.1, 0.15]), ch * cw, replacement=True, generator=g)
    cells = torch.empty(ch * cw, cell, cell, 3)
    for i, p in enumerate(pick.tolist()):
        shade = 6.0 * float(torch.rand(1, generator=g) < 1 / 3)
        cells[i] = torch.rand(cell, cell, 3, generator=g) * 255 if p == 3 else (palette[p] - shade).clamp(min=0)
    arr = cells.view(ch, cw, cell, cell, 3).permute(0, 2, 1, 3, 4).reshape(ch * cell, cw * cell, 3)
    return Image.fromarray(arr[: size[1], : size[0]].to(torch.uint8).numpy())


def video(seed: int, frames: int = 4, size: tuple[int, int] = (112, 112)):
    """A random RGB video as a uint8 array [frames, height, width, 3]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(frames, size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()


def video_metadata(frames: int, fps: float = 2.0) -> dict:
    """What vLLM's Qwen processors expect beside a video (no frame sampling: every frame is used)."""
    return {"fps": fps, "duration": frames / fps, "total_num_frames": frames, "frames_indices": list(range(frames)),
            "video_backend": "opencv", "do_sample_frames": False}


VIDEO = "<|vision_start|> <|video_pad|> <|vision_end|>"


def prompt(n_words: int = 6, seed: int = 0, placeholder: str = "<|vision_start|> <|image_pad|> <|vision_end|>") -> str:
    """A chat-formatted prompt with one image and `n_words` random words."""
    g = torch.Generator().manual_seed(seed)
    w = words()
    q = " ".join(w[int(i)] for i in torch.randint(0, len(w), (n_words,), generator=g))
    return f"<|im_start|>user {placeholder} {q} <|im_end|> <|im_start|>assistant"


def request_kw(method, keep) -> dict:
    """A request's own plugin setting (vLLM's `mm_processor_kwargs`)."""
    return {"mm_processor_kwargs": {"mmcompress_method": method, "mmcompress_keep": keep}}


def assert_same_runs(batch: list[dict], singles: list[dict], tol: float = 1e-4) -> None:
    """Each request of a batch equals its single run: prompt ids, token ids, first-token log-probs within `tol`."""
    for m, s in zip(batch, singles, strict=True):
        assert m["prompt_token_ids"] == s["prompt_token_ids"]
        assert m["token_ids"] == s["token_ids"]
        for k, v in s["first_logprobs"].items():
            assert abs(m["first_logprobs"][k] - v) <= tol, (k, m["first_logprobs"][k], v)


def assert_apply_agrees(model_dir, method: str | None, keep, calls: list[dict], results: list[dict]) -> None:
    """The saved model in transformers, wrapped by `mmc.apply(model, method, keep=keep)` (unwrapped when method is
    None), agrees with the engine's results on the same requests (`assert_transformers_agree`)."""
    import transformers as T

    import mmcompress as mmc

    model = T.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    proc = T.AutoProcessor.from_pretrained(model_dir)
    if method:
        mmc.apply(model, method, keep=keep)
    assert_transformers_agree(model, proc, calls, results)


def assert_transformers_agree(model, proc, calls: list[dict], results: list[dict], tol: float = 1e-4) -> None:
    """Each engine result equals the HF model's greedy generation on the same request: the same token ids, and
    first-token log-probs within `tol` (fp32 noise). `model` is already wrapped (or not) as the engine ran it."""
    for req, r in zip(calls, results, strict=True):
        media = {}
        if req.get("images"):
            media["images"] = [image(s, (w, h), *kind) for s, w, h, *kind in req["images"]]
        if req.get("videos"):
            from transformers.video_utils import VideoMetadata

            media["videos"] = [video(s, f, (w, h)) for s, f, w, h, *_ in req["videos"]]
            metas = [video_metadata(f, *fps) for _, f, _, _, *fps in req["videos"]]
            media["video_metadata"] = [VideoMetadata(**{k: v for k, v in m.items() if k != "do_sample_frames"})
                                       for m in metas]
            media["do_sample_frames"] = False
        inp = proc(text=[req["prompt"]], return_tensors="pt", **media)
        with torch.no_grad():
            out = model.generate(**inp, max_new_tokens=req.get("max_tokens", 5), do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        assert out.sequences[0, inp["input_ids"].shape[1]:].tolist() == r["token_ids"]
        lp = torch.log_softmax(out.logits[0][0].float(), -1)
        for k, v in r["first_logprobs"].items():
            assert abs(lp[int(k)].item() - v) < tol, (k, lp[int(k)].item(), v)


def stop(proc) -> None:
    """Terminate a server started in its own session; kill its process group if it does not exit within 60 s."""
    import signal
    import subprocess

    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
