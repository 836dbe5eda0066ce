"""Tiny random LLaVA-family models and prompts for the integration tests (built offline from configs, sdpa).

Token ids: 0 pad, 1 bos, 2 eos, 5 <image>, 6 <video>; 10..63 ordinary words.
"""

from __future__ import annotations

import torch
import transformers

PAD, BOS, EOS, IMG, VID = 0, 1, 2, 5, 6
SIDE, PATCH = 32, 8  # 4 x 4 = 16 patches per tile


def _text_cfg(layers: int = 4) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                    pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def _clip_cfg() -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=SIDE, patch_size=PATCH, projection_dim=32)


def build(kind: str, seed: int = 0, attn: str | None = None) -> torch.nn.Module:
    """A tiny random `llava`, `llava_next` or `llava_onevision` model in eval mode."""
    torch.manual_seed(seed)
    kw = {} if attn is None else {"attn_implementation": attn}
    if kind == "llava":
        cfg = transformers.LlavaConfig(vision_config=_clip_cfg(), text_config=_text_cfg(), image_token_id=IMG,
                                       vision_feature_layer=-2, vision_feature_select_strategy="default")
        return transformers.LlavaForConditionalGeneration._from_config(cfg, **kw).eval()
    pins = [[SIDE, 2 * SIDE], [2 * SIDE, SIDE], [2 * SIDE, 2 * SIDE]]
    if kind == "llava_next":
        cfg = transformers.LlavaNextConfig(vision_config=_clip_cfg(), text_config=_text_cfg(), image_token_id=IMG,
                                           image_grid_pinpoints=pins, vision_feature_layer=-1,
                                           vision_feature_select_strategy="default")
        return transformers.LlavaNextForConditionalGeneration._from_config(cfg, **kw).eval()
    if kind == "llava_onevision":
        vc = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=SIDE, patch_size=PATCH)
        cfg = transformers.LlavaOnevisionConfig(vision_config=vc, text_config=_text_cfg(), image_token_id=IMG,
                                                video_token_id=VID, image_grid_pinpoints=pins,
                                                vision_feature_layer=-1, vision_feature_select_strategy="full")
        return transformers.LlavaOnevisionForConditionalGeneration._from_config(cfg, **kw).eval()
    raise ValueError(kind)


def image_tokens(model: torch.nn.Module, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[int]:
    """Feature count of each image, as the (unwrapped) model computes it."""
    core = model.model
    with torch.no_grad():
        if image_sizes is None:
            out = core.get_image_features(pixel_values=pixel_values, return_dict=True)
        else:
            out = core.get_image_features(pixel_values, image_sizes, return_dict=True)
    return [int(f.shape[0]) for f in out.pooler_output]


def prompt(n_img_tokens: list[int], pre: list[int], post: list[int], video_tokens: int = 0) -> list[int]:
    """bos, pre words, each image's placeholder run (separated by word 10), [video run], post words."""
    ids = [BOS, *pre]
    for j, n in enumerate(n_img_tokens):
        if j:
            ids.append(10)
        ids += [IMG] * n
    ids += [VID] * video_tokens
    return ids + list(post)


def pad(seqs: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] input_ids and attention_mask, padded with PAD on `side`."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        ids[b, sl] = torch.tensor(s)
        mask[b, sl] = 1
    return ids, mask


def images(n: int, seed: int = 0, side: int = SIDE) -> torch.Tensor:
    """[n, 3, side, side] random pixels."""
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def module_model_fixtures(kind: str = "llava") -> tuple:
    """``(model, _unwrap)`` pytest fixtures for a test module: one tiny `kind` model per module, and an autouse
    fixture that removes any compression after each test. Use as ``model, _unwrap = module_model_fixtures()``."""
    import pytest

    import mmcompress as mmc

    @pytest.fixture(scope="module")
    def model() -> torch.nn.Module:
        return build(kind)

    @pytest.fixture(autouse=True)
    def _unwrap(model):
        yield
        mmc.remove(model)

    return model, _unwrap


def assert_generate_equals_solo_runs(model, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                                     pixel_values: torch.Tensor, seqs: list[list[int]], solo_pixels: list[torch.Tensor],
                                     steps: int = 4, stat: str | None = None) -> dict:
    """Greedy `generate` of a batch, then of each sample alone: the same new tokens, scores within fp32 noise; with
    `stat`, each solo run's ``mmc.stats(model)[stat]`` is the batch's row. Returns the batch run's stats."""
    import mmcompress as mmc

    gen = {"max_new_tokens": steps, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attention_mask, pixel_values=pixel_values, **gen)
        batch_stats = mmc.stats(model)
        for b, (s, p) in enumerate(zip(seqs, solo_pixels, strict=True)):
            solo = model.generate(input_ids=torch.tensor([s]), pixel_values=p, **gen)
            if stat is not None:
                assert mmc.stats(model)[stat] == [batch_stats[stat][b]]
            assert torch.equal(out.sequences[b, -steps:], solo.sequences[0, -steps:])
            for sb, ss in zip(out.scores, solo.scores, strict=True):
                torch.testing.assert_close(sb[b], ss[0], atol=1e-5, rtol=1e-4)
    return batch_stats
