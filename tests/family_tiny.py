"""Tiny random models of the placeholder-pattern families (built from configs, no downloads) and their prompts.

Each `Spec` builds one family's model and single-sample prompts: `ids` [L] with the placeholder runs (and the
family's structural tokens around them), plus the media tensors of that sample, concatenated along dim 0 to batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers as T

PAD, BOS, EOS = 0, 1, 2
IMG, VID, AUD, START, END, BREAK = 100, 101, 102, 103, 104, 105

_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=BOS,
             eos_token_id=EOS, head_dim=16)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=4)


@dataclass
class Spec:
    """One family: `build()` -> eval model; `sample(seed, pre, post)` -> (ids [L], media {name: tensor})."""

    name: str
    build: Callable[[], torch.nn.Module]
    sample: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    token: int  # the placeholder id
    per_token: Callable[[torch.Tensor], dict[str, torch.Tensor]] = field(default=lambda ids: {})
    batch_invariant: bool = True  # the UNWRAPPED model's padded batch rows equal its single runs on SDPA


def _question(g: torch.Generator, pre: int, post: int) -> tuple[list[int], list[int]]:
    a = [BOS] + [int(i) for i in torch.randint(3, 90, (pre,), generator=g)]
    return a, [int(i) for i in torch.randint(3, 90, (post,), generator=g)]


def _gemma3() -> torch.nn.Module:
    cfg = T.Gemma3Config(text_config=dict(_TEXT, model_type="gemma3_text", sliding_window=64,
                                          query_pre_attn_scalar=16),
                         vision_config=_VISION, mm_tokens_per_image=16, image_token_id=IMG, boi_token_index=START,
                         eoi_token_index=END)
    return T.Gemma3ForConditionalGeneration(cfg)


def _square_sample(n_tok: int, shape: tuple[int, ...]):
    def sample(seed: int = 0, pre: int = 2, post: int = 4):
        g = torch.Generator().manual_seed(seed)
        a, b = _question(g, pre, post)
        ids = torch.tensor(a + [START] + [IMG] * n_tok + [END] + b)
        return ids, {"pixel_values": torch.randn(*shape, generator=g)}
    return sample


def _internvl() -> torch.nn.Module:
    cfg = T.InternVLConfig(text_config=dict(_TEXT, model_type="qwen2"),
                           vision_config=dict(_VISION, image_size=[32, 32], patch_size=[4, 4]),
                           image_token_id=IMG, downsample_ratio=0.5)
    return T.InternVLForConditionalGeneration(cfg)


def _smolvlm() -> torch.nn.Module:
    cfg = T.SmolVLMConfig(text_config=dict(_TEXT, model_type="llama"), vision_config=_VISION, image_token_id=IMG,
                          scale_factor=2)
    return T.SmolVLMForConditionalGeneration(cfg)


def _idefics3() -> torch.nn.Module:
    cfg = T.Idefics3Config(text_config=dict(_TEXT, model_type="llama"), vision_config=_VISION, image_token_id=IMG,
                           scale_factor=2)
    return T.Idefics3ForConditionalGeneration(cfg)


def _mistral3() -> torch.nn.Module:
    cfg = T.Mistral3Config(text_config=dict(_TEXT, model_type="mistral"), vision_config=dict(_VISION, head_dim=16),
                           image_token_index=IMG, spatial_merge_size=2, vision_feature_layer=-1)
    return T.Mistral3ForConditionalGeneration(cfg)


def _mistral3_sample(seed: int = 0, pre: int = 2, post: int = 4):
    """A 32 x 24 image: 8 x 6 patches, 4 rows of 3 merged tokens, [IMG_BREAK] after each row but the last."""
    g = torch.Generator().manual_seed(seed)
    a, b = _question(g, pre, post)
    rows = ([IMG] * 3 + [BREAK]) * 3 + [IMG] * 3 + [END]
    return torch.tensor(a + rows + b), {"pixel_values": torch.randn(1, 3, 32, 24, generator=g),
                                        "image_sizes": torch.tensor([[32, 24]])}


def _llava_next_video() -> torch.nn.Module:
    cfg = T.LlavaNextVideoConfig(text_config=dict(_TEXT, model_type="llama"),
                                 vision_config=dict(_VISION, model_type="clip_vision_model", projection_dim=32),
                                 image_token_index=IMG, video_token_index=VID, spatial_pool_stride=2,
                                 image_grid_pinpoints=[[32, 32]], vision_feature_layer=-1)
    return T.LlavaNextVideoForConditionalGeneration(cfg)


def _video_sample(seed: int = 0, pre: int = 2, post: int = 4):
    g = torch.Generator().manual_seed(seed)
    a, b = _question(g, pre, post)
    return torch.tensor(a + [VID] * 32 + b), {"pixel_values_videos": torch.randn(1, 2, 3, 32, 32, generator=g)}


def _qwen2_audio() -> torch.nn.Module:
    cfg = T.Qwen2AudioConfig(text_config=dict(_TEXT, model_type="qwen2"),
                             audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2,
                                               encoder_ffn_dim=64, num_mel_bins=16, max_source_positions=50),
                             audio_token_index=AUD)
    return T.Qwen2AudioForConditionalGeneration(cfg)


def _audio_sample(seed: int = 0, pre: int = 2, post: int = 4):
    """100 mel frames -> 50 encoder frames -> 25 pooled audio tokens."""
    g = torch.Generator().manual_seed(seed)
    a, b = _question(g, pre, post)
    return torch.tensor(a + [START] + [AUD] * 25 + [END] + b), {
        "input_features": torch.randn(1, 16, 100, generator=g),
        "feature_attention_mask": torch.ones(1, 100, dtype=torch.long)}


_MROPE_TEXT = dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
_QWEN_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                    temporal_patch_size=2, out_hidden_size=32)


def _qwen3_vl() -> torch.nn.Module:
    cfg = T.Qwen3VLConfig(text_config=dict(_MROPE_TEXT, model_type="qwen3_vl_text"),
                          vision_config=dict(_QWEN_VISION, num_position_embeddings=64, deepstack_visual_indexes=[0]),
                          image_token_id=IMG, video_token_id=VID, vision_start_token_id=START,
                          vision_end_token_id=END)
    return T.Qwen3VLForConditionalGeneration(cfg)


def _glm4v() -> torch.nn.Module:
    text = dict(_TEXT, model_type="glm4v_text", rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "mrope_section": [1, 1, 2],
                                                                 "partial_rotary_factor": 0.5})
    cfg = T.Glm4vConfig(text_config=text, vision_config=dict(_QWEN_VISION, image_size=32), image_token_id=IMG,
                        video_token_id=VID, image_start_token_id=START, image_end_token_id=END)
    return T.Glm4vForConditionalGeneration(cfg)


def _qwen2_vl() -> torch.nn.Module:
    vc = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3)
    cfg = T.Qwen2VLConfig(vision_config=vc, text_config=_MROPE_TEXT, image_token_id=IMG, video_token_id=VID,
                          vision_start_token_id=START, vision_end_token_id=END)
    return T.Qwen2VLForConditionalGeneration(cfg)


def _qwen2_5_vl() -> torch.nn.Module:
    vc = dict(_QWEN_VISION, window_size=16, fullatt_block_indexes=[1])
    cfg = T.Qwen2_5_VLConfig(vision_config=vc, text_config=_MROPE_TEXT, image_token_id=IMG, video_token_id=VID,
                             vision_start_token_id=START, vision_end_token_id=END)
    return T.Qwen2_5_VLForConditionalGeneration(cfg)


def _qwen3_vl_moe() -> torch.nn.Module:
    text = dict(_MROPE_TEXT, model_type="qwen3_vl_moe_text", num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=32, decoder_sparse_step=1)
    cfg = T.Qwen3VLMoeConfig(text_config=text,
                             vision_config=dict(_QWEN_VISION, num_position_embeddings=64,
                                                deepstack_visual_indexes=[0]),
                             image_token_id=IMG, video_token_id=VID, vision_start_token_id=START,
                             vision_end_token_id=END)
    return T.Qwen3VLMoeForConditionalGeneration(cfg)


def _glm4v_moe() -> torch.nn.Module:
    text = dict(_TEXT, model_type="glm4v_moe_text", n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                 "partial_rotary_factor": 0.5})
    cfg = T.Glm4vMoeConfig(text_config=text, vision_config=dict(_QWEN_VISION, image_size=32), image_token_id=IMG,
                           video_token_id=VID, image_start_token_id=START, image_end_token_id=END)
    return T.Glm4vMoeForConditionalGeneration(cfg)


def _mrope_sample(seed: int = 0, pre: int = 2, post: int = 4):
    """One image of 4 x 6 patches (2 x 3 merged tokens): flattened patches [24, 3*2*4*4] and its grid."""
    g = torch.Generator().manual_seed(seed)
    a, b = _question(g, pre, post)
    return torch.tensor(a + [START] + [IMG] * 6 + [END] + b), {
        "pixel_values": torch.randn(24, 96, generator=g), "image_grid_thw": torch.tensor([[1, 4, 6]])}


def _paligemma() -> torch.nn.Module:
    cfg = T.PaliGemmaConfig(text_config=dict(_TEXT, model_type="gemma"),
                            vision_config=dict(_VISION, projection_dim=32), image_token_index=IMG, projection_dim=32)
    return T.PaliGemmaForConditionalGeneration(cfg)


def _paligemma_sample(seed: int = 0, pre: int = 2, post: int = 4):
    """PaliGemma puts the 64 image tokens first, then BOS and the prompt."""
    g = torch.Generator().manual_seed(seed)
    a, b = _question(g, pre, post)
    return torch.tensor([IMG] * 64 + a + b), {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}


SPECS = {
    # transformers 5.24's PaliGemma on SDPA: padding one row of a batch changes the other rows' logits (~5e-2,
    # unwrapped); on eager attention rows are independent, so its batch tests run on eager
    "paligemma": Spec("paligemma", _paligemma, _paligemma_sample, IMG, batch_invariant=False),
    "qwen2_vl": Spec("qwen2_vl", _qwen2_vl, _mrope_sample, IMG,
                     per_token=lambda ids: {"mm_token_type_ids": (ids == IMG).int()}),
    "qwen2_5_vl": Spec("qwen2_5_vl", _qwen2_5_vl, _mrope_sample, IMG,
                       per_token=lambda ids: {"mm_token_type_ids": (ids == IMG).int()}),
    "qwen3_vl_moe": Spec("qwen3_vl_moe", _qwen3_vl_moe, _mrope_sample, IMG,
                         per_token=lambda ids: {"mm_token_type_ids": (ids == IMG).int()}),
    "glm4v_moe": Spec("glm4v_moe", _glm4v_moe, _mrope_sample, IMG,
                      per_token=lambda ids: {"mm_token_type_ids": (ids == IMG).int()}),
    "qwen3_vl": Spec("qwen3_vl", _qwen3_vl, _mrope_sample, IMG,
                     per_token=lambda ids: {"mm_token_type_ids": (ids == IMG).int()}),
    "glm4v": Spec("glm4v", _glm4v, _mrope_sample, IMG,
                  per_token=lambda ids: {"mm_token_type_ids": (ids == IMG).int()}),
    "gemma3": Spec("gemma3", _gemma3, _square_sample(16, (1, 3, 32, 32)), IMG,
                   per_token=lambda ids: {"token_type_ids": (ids == IMG).long()}),
    "internvl": Spec("internvl", _internvl, _square_sample(32, (2, 3, 32, 32)), IMG),  # two tiles
    "smolvlm": Spec("smolvlm", _smolvlm, _square_sample(16, (1, 1, 3, 32, 32)), IMG),
    "idefics3": Spec("idefics3", _idefics3, _square_sample(16, (1, 1, 3, 32, 32)), IMG),
    "mistral3": Spec("mistral3", _mistral3, _mistral3_sample, IMG),
    "llava_next_video": Spec("llava_next_video", _llava_next_video, _video_sample, VID),
    "qwen2_audio": Spec("qwen2_audio", _qwen2_audio, _audio_sample, AUD),
}


def build(name: str, seed: int = 0, attn: str | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = SPECS[name].build().eval()
    if attn is not None:
        model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None  # generate() always runs max_new_tokens: batch == single runs
    return model


def batch(spec: Spec, samples: list, side: str = "left") -> dict[str, torch.Tensor]:
    """Pad samples from `spec.sample` into forward/generate kwargs."""
    L = max(s[0].numel() for s in samples)
    ids = torch.full((len(samples), L), PAD)
    am = torch.zeros(len(samples), L, dtype=torch.long)
    for b, (x, _) in enumerate(samples):
        sl = slice(L - x.numel(), L) if side == "left" else slice(0, x.numel())
        ids[b, sl] = x
        am[b, sl] = 1
    media = {k: torch.cat([s[1][k] for s in samples]) for k in samples[0][1]}
    return dict(input_ids=ids, attention_mask=am, **media, **spec.per_token(ids))


def two_items(spec: Spec, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One prompt holding two media items (images, videos or clips): two samples' prompts joined."""
    (a, ma), (b, mb) = spec.sample(seed), spec.sample(seed + 1, pre=1)
    dim = 1 if spec.name in ("smolvlm", "idefics3") else 0  # SmolVLM stacks a sample's images on dim 1
    media = {k: torch.cat([ma[k], mb[k]], dim if ma[k].dim() == 5 else 0) for k in ma}
    return torch.cat([a, b[1:] if int(b[0]) == BOS else b]), media


def qwen3_video_sample(seed: int = 0, pre: int = 2, post: int = 4):
    """A 4-frame video of 4 x 4 patches (temporal patch 2: a 2 x 2 x 2 grid of merged tokens); Qwen3-VL gives each
    temporal step its own placeholder run (the processor puts a timestamp between them)."""
    g = torch.Generator().manual_seed(seed)
    a, b = _question(g, pre, post)
    frames = ([START] + [VID] * 4 + [END]) * 2
    return torch.tensor(a + frames + b), {
        "pixel_values_videos": torch.randn(32, 96, generator=g), "video_grid_thw": torch.tensor([[2, 4, 4]])}


def tiny_whisper(seed: int = 0, attn: str = "sdpa") -> torch.nn.Module:
    """A tiny random Whisper (8 mel bins, 40 encoder frames), eval mode."""
    cfg = T.WhisperConfig(vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_source_positions=40, max_target_positions=32, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, suppress_tokens=[],
                          begin_suppress_tokens=[])
    torch.manual_seed(seed)
    return T.WhisperForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()
