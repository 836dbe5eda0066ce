"""Short descriptions of the placeholder-pattern families on the generic adapter (`placeholder.py`).

Each says only what differs: where the features come from, the grid of each item, which tokens are structural, and
how token scores for attention-based methods are read off the encoder (q/k of the feature layer, captured by hooks,
so SDPA/FlashAttention models need no eager attention; pooled to the tokens that enter the LLM with the same block
geometry as the family's own downsampling). Every family here uses 1-D positions rebuilt from the mask.

Items are what the model's encoder returns one feature block for: an image for Gemma 3 and Mistral 3, a tile for
InternVL and SmolVLM/Idefics3 (the tile tags between tiles are text tokens and stay), a video for LLaVA-NeXT-Video
(images there use LLaVA-NeXT's anyres packing and pass through uncompressed), a clip for Qwen2-Audio.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmcompress.compressors.attention_scores import QKCapture, attention_row_scores
from mmcompress.compressors.base import EncoderNeeds
from mmcompress.hf.llava import vision_layers, vision_scores_capture
from mmcompress.hf.placeholder import META_ATTR, Family, ItemMeta, Modality, register_family

__all__ = ["PaliGemmaFamily", "Gemma3Family", "InternVLFamily", "SmolVLMFamily", "Mistral3Family",
           "LlavaNextVideoFamily", "Qwen2AudioFamily", "block_pool"]

TILE_ATTR = "_mmcompress_tile_tokens"  # SmolVLM encoder outputs: tokens per tile (set by `describe`)
IMAGE = Modality("image", "pixel_values", ("image_token_id", "image_token_index"))


def block_pool(s: torch.Tensor, grid_in: tuple[int, int], grid_out: tuple[int, int]) -> torch.Tensor:
    """[T, h*w] token scores on a (h, w) patch grid -> [T, h'*w'] by averaging the blocks that each output token
    stands for (pixel shuffle, average pooling and patch merging all group row-major blocks; floor like them).
    [T, h*w, S] scores (one column per scored block) -> [T, h'*w', S], each column pooled alike."""
    (h, w), (ho, wo) = grid_in, grid_out
    if (ho, wo) == (h, w):
        return s
    if s.dim() == 3:
        return block_pool(s.transpose(1, 2).reshape(-1, h * w), grid_in, grid_out).view(
            s.shape[0], s.shape[2], ho * wo).transpose(1, 2)
    x = s.reshape(s.shape[0], 1, h, w).float()
    return F.avg_pool2d(x, (h // ho, w // wo)).reshape(s.shape[0], ho * wo).to(s.dtype)


def _square(n: int, what: str) -> int:
    r = math.isqrt(n)
    if r * r != n:
        raise ValueError(f"model: {n} {what} per item is not a square grid")
    return r


def tower_scores(cap: QKCapture, n_out: int, needs: EncoderNeeds | None = None
                 ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """[T, n_out] scores of the tokens entering the LLM, from a square-grid tower capture with or without CLS.

    CLS row when the tower has a CLS token, else the mean attention each patch receives, heads reduced as `needs`
    declares; the CLS column is dropped and the patch grid block-pooled onto the square output grid. Returns the
    scores, the output side length and the [T, n_out, d] metric `needs` asks for (None when not asked for, or when
    the tower's grid is pooled on its way to the LLM: keys have no pooled counterpart).
    """
    n_total = cap.q.shape[1]
    side_out = _square(n_out, "output tokens")
    extra = n_total - math.isqrt(n_total) ** 2  # CLS / register tokens ahead of a square patch grid
    rows = 0 if extra >= 1 else torch.arange(n_total, device=cap.q.device)
    s, m = cap.signals(needs or EncoderNeeds(), rows)
    s = s[:, extra:]  # [T, P*P] (or [T, P*P, S]: one column per block of a multi-block `needs.layer`)
    side_in = _square(s.shape[1], "patches")
    m = m[:, extra:] if m is not None and side_in == side_out else None
    return block_pool(s, (side_in, side_in), (side_out, side_out)), side_out, m


def _square_items(adapter: Any, mod: Modality, out: Any, cap: Any) -> list[ItemMeta]:
    """One item per row of a [T, n, C] pooler output, square (s, s) grid, scores from the tower capture."""
    feats = adapter.family.features(mod, out)
    s = _square(feats[0].shape[0], "tokens")
    scores = metric = [None] * len(feats)
    if cap is not None and cap.q is not None:
        sc, _, m = tower_scores(cap, feats[0].shape[0], adapter.encoder_needs)
        scores = list(sc)
        metric = metric if m is None else list(m)
    return [ItemMeta(grid=(s, s), scores=sc, metric=m) for sc, m in zip(scores, metric, strict=True)]


# --- README example: the whole description of a family (tests/test_readme_family.py runs it) -------------------
@register_family
class PaliGemmaFamily(Family):
    """PaliGemma: one item per image, the (s, s) grid of SigLIP tokens after the linear projector."""

    model_types = ("paligemma",)  # the config.model_type values it serves
    modalities = (Modality("image", "pixel_values", ("image_token_id", "image_token_index")),)
    position_offset = 1  # its 1-D positions are 1-indexed ("mrope" families define rope_index() instead)

    def score_capture(self, adapter, mod, args):  # hooks q/k of the last vision layer while the tower runs
        return QKCapture(vision_layers(adapter.core.vision_tower)[-1])

    def describe(self, adapter, mod, args, out, cap):  # called with the encoder's arguments and output
        feats = out.pooler_output  # [images, s * s, C] features entering the LLM
        s = math.isqrt(feats.shape[1])
        scores = [None] * len(feats) if cap is None else cap.scores(rows=torch.arange(s * s))  # mean received
        return [ItemMeta(grid=(s, s), scores=sc) for sc in scores]
# --- end of README example ----------------------------------------------------------------------------------------


@register_family
class Gemma3Family(Family):
    """Gemma 3: one item per image, the (s, s) grid of `mm_tokens_per_image` pooled SigLIP tokens; bidirectional
    image attention follows through `token_type_ids`, which the adapter subsets with the sequence."""

    model_types = ("gemma3",)
    modalities = (IMAGE,)
    structural = ("boi_token_id", "eoi_token_id", "boi_token_index", "eoi_token_index")

    def score_capture(self, adapter: Any, mod: Modality, args: dict[str, Any]) -> QKCapture:
        return QKCapture(vision_layers(adapter.core.vision_tower)[-1])

    def describe(self, adapter: Any, mod: Modality, args: dict[str, Any], out: Any, cap: Any) -> list[ItemMeta]:
        return _square_items(adapter, mod, out, cap)


@register_family
class InternVLFamily(Family):
    """InternVL: one item per tile (its pixel-shuffled (s, s) grid); the <img>/</img> tokens are text and stay."""

    model_types = ("internvl",)
    modalities = (IMAGE,)
    structural = ("image_start_token_id", "image_end_token_id")

    def score_capture(self, adapter: Any, mod: Modality, args: dict[str, Any]) -> QKCapture:
        layer = args.get("vision_feature_layer")
        layer = adapter.model.config.vision_feature_layer if layer is None else layer
        return vision_scores_capture(adapter.core.vision_tower, layer, adapter.encoder_needs)

    def describe(self, adapter: Any, mod: Modality, args: dict[str, Any], out: Any, cap: Any) -> list[ItemMeta]:
        return _square_items(adapter, mod, out, cap)


@register_family
class SmolVLMFamily(Family):
    """SmolVLM / Idefics3: one item per real tile (all-zero padding tiles are dropped by the model), its
    pixel-shuffled (s, s) grid; the <fake_token_around_image>/<row_i_col_j> tags between tiles stay."""

    model_types = ("smolvlm", "idefics3")
    modalities = (IMAGE,)
    structural = ("fake_image_token_id", "global_image_token_id")

    def features(self, mod: Modality, out: Any) -> list[torch.Tensor]:
        """The model returns one [tiles * n, C] block per sample: split it into tiles of n = s * s tokens."""
        n = getattr(out, TILE_ATTR, None)
        blocks = super().features(mod, out)
        if n is None:
            return blocks
        return [t for blk in blocks for t in torch.split(blk, n)]

    def score_capture(self, adapter: Any, mod: Modality, args: dict[str, Any]) -> QKCapture:
        return QKCapture(vision_layers(adapter.core.vision_model)[-1])

    def describe(self, adapter: Any, mod: Modality, args: dict[str, Any], out: Any, cap: Any) -> list[ItemMeta]:
        cfg = adapter.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size // cfg.scale_factor
        object.__setattr__(out, TILE_ATTR, side * side)
        return _square_items(adapter, mod, out, cap)


@register_family
class Mistral3Family(Family):
    """Mistral 3 (Pixtral tower): one item per image of any size, grid = image size / (patch x spatial merge); the
    [IMG_BREAK] row ends and [IMG_END] are text tokens, so kept tokens stay in their rows. Scores: mean attention
    each patch receives within its own image (the tower packs all images in one sequence), from q/k before the 2-D
    rotary embedding (an approximation), 2x2-pooled like the patch merger."""

    model_types = ("mistral3",)
    modalities = (IMAGE,)

    def _grids(self, adapter: Any, args: dict[str, Any], merge: int) -> list[tuple[int, int]]:
        sizes = args["image_sizes"]
        p = adapter.core.vision_tower.patch_size
        return [(int(h) // (p * merge), int(w) // (p * merge)) for h, w in torch.as_tensor(sizes).tolist()]

    def score_capture(self, adapter: Any, mod: Modality, args: dict[str, Any]) -> QKCapture:
        layer = args.get("vision_feature_layer")
        layer = adapter.model.config.vision_feature_layer if layer is None else layer
        return vision_scores_capture(adapter.core.vision_tower, layer, adapter.encoder_needs)

    def describe(self, adapter: Any, mod: Modality, args: dict[str, Any], out: Any, cap: Any) -> list[ItemMeta]:
        merge = adapter.model.config.spatial_merge_size
        grids = self._grids(adapter, args, merge)
        scores: list[torch.Tensor | None] = [None] * len(grids)
        if cap is not None and cap.q is not None:
            scores, start = [], 0
            for h, w in grids:
                n = h * w * merge * merge
                q, k = cap.q[:, start: start + n], cap.k[:, start: start + n]  # [1, n, C]
                start += n
                s = attention_row_scores(q, k, torch.arange(n, device=q.device), num_heads=cap.num_heads,
                                         num_kv_heads=cap.num_kv_heads)  # [1, n]
                scores.append(block_pool(s, (h * merge, w * merge), (h, w))[0])
        return [ItemMeta(grid=g, scores=s) for g, s in zip(grids, scores, strict=True)]


@register_family
class LlavaNextVideoFamily(Family):
    """LLaVA-NeXT-Video: one item per video, grid (T, h', w') of the resampler-pooled frame tokens (no newline)."""

    model_types = ("llava_next_video",)
    modalities = (Modality("video", "pixel_values_videos", ("video_token_id", "video_token_index")),)

    def score_capture(self, adapter: Any, mod: Modality, args: dict[str, Any]) -> QKCapture:
        layer = args.get("vision_feature_layer")
        layer = adapter.model.config.vision_feature_layer if layer is None else layer
        return vision_scores_capture(adapter.core.vision_tower, layer, adapter.encoder_needs)

    def describe(self, adapter: Any, mod: Modality, args: dict[str, Any], out: Any, cap: Any) -> list[ItemMeta]:
        B, T = args["pixel_values_videos"].shape[:2]
        n = out.pooler_output.shape[1] // T  # tokens per frame
        s = _square(n, "tokens per frame")
        scores: list[torch.Tensor | None] = [None] * B
        if cap is not None and cap.q is not None:
            sc, _, _ = tower_scores(cap, n, adapter.encoder_needs)  # [B*T, n] (or [B*T, n, S])
            scores = list(sc.reshape(B, T * n, *sc.shape[2:]))
        return [ItemMeta(grid=(T, s, s), scores=x) for x in scores]


@register_family
class Qwen2AudioFamily(Family):
    """Qwen2-Audio: one item per clip, a 1-D sequence of its valid pooled encoder frames. Its forward has no
    `mm_encoder_outputs`: the adapter encodes the audio as forward would and passes `inputs_embeds` instead."""

    model_types = ("qwen2_audio",)
    modalities = (Modality("audio", "input_features", ("audio_token_id", "audio_token_index"),
                           encoder="audio_tower"),)
    merge = "embeds"
    consumed = ("input_features", "feature_attention_mask")

    def core(self, model: torch.nn.Module) -> torch.nn.Module:
        inner = getattr(model, "model", None)
        return inner if inner is not None and hasattr(inner, "audio_tower") else model

    def encode(self, adapter: Any, mod: Modality, kw: dict[str, Any]) -> Any:
        """Forward's own audio path: tower, projector, the valid frames of each clip."""
        core = adapter.core
        tower = core.audio_tower
        feats, fam = kw["input_features"], kw.get("feature_attention_mask")
        if fam is None:
            raise ValueError("feature_attention_mask: Qwen2-Audio compression needs the mel-frame mask")
        from transformers.masking_utils import create_bidirectional_mask

        in_len, out_len = tower._get_feat_extract_output_lengths(fam.sum(-1))  # [B] encoder / pooled frames
        B, _, n_mel = feats.shape
        n_seq = (n_mel - 2) // 2 + 1
        valid2d = (torch.arange(n_seq, device=in_len.device)[None] < in_len[:, None]).long()  # [B, n_seq]
        mask = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(B, n_seq, 1),
                                         attention_mask=valid2d)
        cap = QKCapture(tower.layers[-1]) if "scores" in adapter._needs else None
        if cap is not None:
            with cap:
                hidden = tower(feats, attention_mask=mask).last_hidden_state
        else:
            hidden = tower(feats, attention_mask=mask).last_hidden_state
        x = core.multi_modal_projector(hidden)  # [B, n_seq / 2, C]
        items, metas = [], []
        for b in range(B):
            m = int(out_len[b])
            items.append(x[b, :m])
            sc = None
            if cap is not None:
                s = attention_row_scores(cap.q[b: b + 1], cap.k[b: b + 1], torch.arange(n_seq),
                                         num_heads=cap.num_heads, key_mask=valid2d[b: b + 1].bool())  # [1, n_seq]
                sc = F.avg_pool1d(s[None], 2, 2)[0, 0, :m]  # the encoder's 2x average pooler
            metas.append(ItemMeta(grid=None, scores=sc))
        out = BaseModelOutputWithPooling(pooler_output=tuple(items))
        object.__setattr__(out, META_ATTR, metas)
        return out
