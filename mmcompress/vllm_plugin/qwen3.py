"""vLLM model class for Qwen3-VL (dense) with mmcompress between the vision tower and the LLM: images and videos.

Imported by vLLM only (through `mmcompress.vllm_plugin.SUPPORTED`). As on Qwen2-VL (`models`), an image is one item with
grid (1, h, w) after the 2x2 merger and its budget is fixed in the processor; what differs:

* DeepStack: vLLM's vision tower returns each token's main features and its DeepStack features (injected into the
  first LLM layers at the same positions) side by side, [N, C * (1 + D)]. The compressor sees the main features only;
  the DeepStack features of the kept tokens are their representatives' (`rep`), as `mmc.apply` subsets them in
  transformers.
* Positions: vLLM's own M-RoPE positions of the UNCOMPRESSED prompt (computed on the prompt with each compressed
  image's run expanded back to its N tokens), of which a compressed image keeps M columns, each set to the image's
  base id; the kept tokens' (t, h, w) offsets ride with the embeddings and are added in `forward` (see
  `models`). Text after an image keeps its uncompressed ids, as with `mmc.apply`.
* Videos: Qwen3-VL writes a video of grid (t, h, w) as t frame groups, each `<{s:.1f} seconds>` text, vision_start,
  its h * w tokens, vision_end. The video is ONE compressor item (grid (t, h, w), N = t * h * w tokens, budget
  M = budget(N, keep)), as `mmc.apply` compresses it in transformers; each kept token stays in its own frame group,
  so how the M tokens fall over the groups depends on the compressor's choice and is known only after the encoder
  ran. As vLLM's EVS does, the processor therefore writes the whole video as one embedding run of fixed length
  (timestamp texts, vision markers and M placeholders, all counted in the run: the placeholders sit in the first
  group), and `embed_multimodal` fills the run in the true layout: per group its timestamp text embeddings, vision
  markers and the kept tokens of that group. Every row's offset from the run's first position (text rows too) is
  taken from vLLM's positions of the uncompressed video and rides with the embeddings, so each token keeps its
  uncompressed (t, h, w) ids as with `mmc.apply`.

Letters: N tokens of one image or video, M kept, C hidden size, D DeepStack levels, L prompt length, P rows of a
compressed video's run (its text tokens + M).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from mmcompress.hf.qwen_vl import Qwen3VLFamily
from mmcompress.vllm_plugin import resolve
from mmcompress.vllm_plugin.models import (
    POS_CHANNELS,
    _encode_pos,
    _grid_ids,
    _plan_key,
    _PlanProcessor,
    _plans,
    _question_ids,
    _QwenInfoMixin,
    _QwenMixin,
    _request,
    _strip,
    _text_key,
    compress_item,
)
from mmcompress.vllm_plugin.pixels import GROUPS_KEY, PixelPlan


class MMCQwen3VLProcessingInfo(_QwenInfoMixin, Qwen3VLProcessingInfo):
    pass


class MMCQwen3VLMultiModalProcessor(PixelPlan, _PlanProcessor, Qwen3VLMultiModalProcessor):
    mmc_modalities = ("image", "video")
    mmc_structural = Qwen3VLFamily.structural
    mmc_pixel_norm = Qwen3VLFamily.pixel_norm

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Any) -> Any:
        # Qwen3-VL calls the HF processor itself (videos frame by frame), not through `_call_hf_processor`
        setting = resolve(self.info.get_hf_config(), _request(hf_kwargs))
        return self._add_plans(super()._apply_hf_processor_main(mm_items, _strip(hf_kwargs)), setting, hf_kwargs)

    def _item_tokens(self, out: Any) -> dict[str, list[int]]:
        m2 = self.info.get_hf_config().vision_config.spatial_merge_size ** 2
        return {mod: (out[f"{mod}_grid_thw"].prod(-1) // m2).tolist() for mod in self.mmc_modalities
                if out.get(f"{mod}_grid_thw") is not None}

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: Any) -> list:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        return [self._video_run(u, out_mm_kwargs) if isinstance(u, PromptReplacement) and u.modality == "video"
                else u for u in updates]

    def _video_run(self, update: PromptReplacement, out_mm_kwargs: Any) -> PromptReplacement:
        """A compressed video's replacement: the timestamps and vision markers of all t groups and its M
        placeholders in the first group, every token of it an embedding row (filled by `embed_multimodal`)."""
        orig = update.replacement
        cfg = self.info.get_hf_config()
        m2 = cfg.vision_config.spatial_merge_size ** 2

        def replacement(item_idx: int) -> Any:
            r = orig(item_idx) if callable(orig) else orig
            item = out_mm_kwargs["video"][item_idx]
            field = item.get(_plan_key("video"))
            if field is None:
                return r
            t, h, w = (int(v) for v in item["video_grid_thw"].data.tolist())
            m = int(field.data.reshape(-1)[0])
            if m >= t * h * w // m2:
                return r
            return Qwen3VLMultiModalProcessor.get_video_repl(
                tokens_per_frame=[m] + [0] * (t - 1), timestamps=item["timestamps"].data,
                tokenizer=self.info.get_tokenizer(), vision_start_token_id=cfg.vision_start_token_id,
                vision_end_token_id=cfg.vision_end_token_id, video_token_id=cfg.video_token_id,
                select_token_id=False)  # from_seq: the whole run is embedding rows

        return PromptReplacement(modality="video", target=update.target, replacement=replacement)


@MULTIMODAL_REGISTRY.register_processor(MMCQwen3VLMultiModalProcessor, info=MMCQwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class MMCQwen3VLForConditionalGeneration(_QwenMixin, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with mmcompress on image and video tokens (DeepStack features subset alike; EVS off)."""

    def __init__(self, *, vllm_config: Any, prefix: str = ""):
        self._mmc_check(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def embed_multimodal(self, **kwargs: object) -> Any:
        plans = {m: _plans(kwargs.pop(_plan_key(m), None)) for m in ("image", "video")}
        texts = {m: kwargs.pop(_text_key(m), None) for m in ("image", "video")}
        groups = kwargs.pop(GROUPS_KEY, None)
        mods = self._parse_and_validate_multimodal_inputs(**kwargs)
        if not mods:
            return None
        merge = self.visual.spatial_merge_size
        c = self.visual_dim
        out: list[torch.Tensor] = []
        for modality, inp in mods.items():  # vLLM's order of modalities
            video = modality == "video"
            grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in inp[f"{modality}_grid_thw"].tolist()]
            plan = plans[modality] or [(g[0] * g[1] * g[2], -1, 0) for g in grids]
            feats, scores, kept = self._mmc_encode(modality, inp, plan, groups)  # [N, C (1 + D)] each
            questions = _question_ids(texts[modality], len(grids))
            for i, (x, g, (_, code, k), sc, q, kp) in enumerate(zip(feats, grids, plan, scores, questions, kept,
                                                                    strict=True)):
                if kp is not None:  # pixel stage: the tower ran on the kept groups only, x is [M, C (1 + D)]
                    rel = torch.from_numpy(_grid_ids(*g, 1.0)).T.to(x.device)[kp]  # [M, 3]
                    out.append(torch.cat([x, _encode_pos(rel, x.dtype)], 1))
                    continue
                # the main features decide
                y, rep = compress_item(x[:, :c], g, k, code, scores=sc, text=self._mmc_question(q))
                if rep is None:  # kept whole: vLLM's own embedding and positions
                    out.append(torch.cat([x, x.new_zeros(x.shape[0], POS_CHANNELS)], 1))
                    continue
                rep = rep.to(x.device)
                if video:
                    out.append(self._video_rows(y, x[rep, c:], rep, g, inp["timestamps"][i]))
                    continue
                rel = torch.from_numpy(_grid_ids(*g, 1.0)).T.to(x.device)[rep]  # [M, 3]
                out.append(torch.cat([y, x[rep, c:], _encode_pos(rel, y.dtype)], 1))  # [M, C (1 + D) + 6]
        return tuple(out)

    def _video_repl(self, tokens_per_group: list[int], timestamps: Any) -> list[int]:
        cfg = self.config
        return list(Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=tokens_per_group, timestamps=timestamps, tokenizer=self._tokenizer,
            vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
            video_token_id=cfg.video_token_id).full)

    def _video_rows(self, y: torch.Tensor, deep: torch.Tensor, rep: torch.Tensor, grid: tuple[int, int, int],
                    timestamps: Any) -> torch.Tensor:
        """A compressed video's run [P, C (1 + D) + 6] in the true layout: each group's timestamp text and vision
        markers (text embeddings, zero DeepStack) around its kept tokens (y [M, C], deep [M, C D], rep [M] ascending
        indices of the N tokens); each row's offset from the run's first position, from the uncompressed video."""
        t, h, w = grid
        full = torch.tensor(self._video_repl([h * w] * t, timestamps))  # [P + N - M] uncompressed run
        video = full == self.config.video_token_id
        keep = ~video
        keep[video.nonzero().flatten()[rep.cpu()]] = True  # text rows and the kept tokens, in run order
        pos = _run_positions(full.tolist(), grid, self.config)  # [3, P + N - M]
        rel = (pos - pos[:, :1])[:, keep].T.to(y.device)  # [P, 3]
        is_vid = video[keep].to(y.device)  # [P]
        rows = self.get_language_model().embed_input_ids(full[keep].to(y.device)).to(y.dtype)  # [P, C]
        rows[is_vid] = y
        ds = y.new_zeros(rows.shape[0], deep.shape[1])
        ds[is_vid] = deep
        return torch.cat([rows, ds, _encode_pos(rel, y.dtype)], 1)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """[3, L]: vLLM's positions of the uncompressed prompt (each compressed item's run expanded back: an image
        to its N placeholders, a video to h * w placeholders in every frame group); a compressed run of m rows keeps
        m columns, all at the run's first id, to which `forward` adds each row's offset."""
        merge = self.config.vision_config.spatial_merge_size
        tokens, feats, spans, shift, st = [], [], [], 0, 0
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            off, m = f.mm_position.offset, f.mm_position.length
            run = input_tokens[off:off + m]
            if f.modality == "image":
                n = int(np.prod(f.data["image_grid_thw"].data.tolist())) // merge**2
                full = [run[0]] * n if n != m else run
            else:  # a compressed video's run holds fewer than its N placeholders: refill every group to h * w
                t, h, w = (int(v) for v in f.data["video_grid_thw"].data.tolist())
                full = run
                if run.count(self.config.video_token_id) < t * h * w // merge**2:
                    full = _refill(run, h * w // merge**2, self.config)
                n = len(full)
            g = copy.copy(f)
            g.mm_position = dataclasses.replace(f.mm_position, offset=off + shift, length=n)
            feats.append(g)
            if n != m:  # compressed: its run expanded back to n tokens
                tokens += input_tokens[st:off] + full
                spans.append((off + shift, n, m))
                shift += n - m
                st = off + m
        tokens += input_tokens[st:]
        full, _ = Qwen3VLForConditionalGeneration.get_mrope_input_positions(self, tokens, feats)  # [3, L + shift]
        if not spans:
            return full, int(full.max()) + 1 - len(input_tokens)
        keep = torch.ones(full.shape[1], dtype=torch.bool)
        full = full.clone()
        for o, n, m in spans:
            keep[o + m:o + n] = False
            full[:, o:o + m] = full[:, o:o + 1]  # every row at the run's first id; `forward` adds its offset
        return full[:, keep].contiguous(), int(full.max()) + 1 - len(input_tokens)


def _refill(run: list[int], per_group: int, cfg: Any) -> list[int]:
    """A compressed video run (any placeholders per group) -> the uncompressed one (`per_group` in each group)."""
    out, inside = [], False
    for tok in run:
        if tok == cfg.video_token_id and inside:
            continue
        out.append(tok)
        if tok == cfg.vision_start_token_id:
            out += [cfg.video_token_id] * per_group
            inside = True
        elif tok == cfg.vision_end_token_id:
            inside = False
    return out


def _run_positions(tokens: list[int], grid: tuple[int, int, int], cfg: Any) -> torch.Tensor:
    """[3, len(tokens)] vLLM's M-RoPE ids of one uncompressed video run on its own (grid: merged (t, h, w))."""
    m = cfg.vision_config.spatial_merge_size
    data = {"video_grid_thw": SimpleNamespace(data=torch.tensor([grid[0], grid[1] * m, grid[2] * m]))}
    feat = SimpleNamespace(modality="video", data=data, mm_position=SimpleNamespace(offset=0, length=len(tokens)))
    pos, _ = Qwen3VLForConditionalGeneration._get_mrope_input_positions(tokens, [feat], cfg)
    return pos
