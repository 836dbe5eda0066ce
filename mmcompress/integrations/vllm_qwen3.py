"""vLLM model class for Qwen3-VL (dense) with mmcompress between the vision tower and the LLM: images.

Imported by vLLM only (through `vllm_plugin.SUPPORTED`). As on Qwen2-VL (`vllm_models`), an image is one item with
grid (1, h, w) after the 2x2 merger and its budget is fixed in the processor; what differs:

* DeepStack: vLLM's vision tower returns each token's main features and its DeepStack features (injected into the
  first LLM layers at the same positions) side by side, [N, C * (1 + D)]. The compressor sees the main features only;
  the DeepStack features of the kept tokens are their representatives' (`rep`), as `mmc.apply` subsets them in
  transformers.
* Positions: vLLM's own M-RoPE positions of the UNCOMPRESSED prompt (computed on the prompt with each compressed
  image's run expanded back to its N tokens), of which a compressed image keeps M columns, each set to the image's
  base id; the kept tokens' (t, h, w) offsets ride with the embeddings and are added in `forward` (see
  `vllm_models`). Text after an image keeps its uncompressed ids, as with `mmc.apply`.
* Videos (per-frame timestamps between frames) are served as plain vLLM; an active setting on a request with a
  video is refused.

Letters: N tokens of one image, M kept, C hidden size, D DeepStack levels, L prompt length.
"""

from __future__ import annotations

import copy
import dataclasses
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

from mmcompress.integrations.vllm_models import (
    POS_CHANNELS,
    _encode_pos,
    _grid_ids,
    _plan_key,
    _PlanProcessor,
    _plans,
    _QwenInfoMixin,
    _QwenMixin,
    _strip,
    compress_item,
)
from mmcompress.integrations.vllm_plugin import resolve


class MMCQwen3VLProcessingInfo(_QwenInfoMixin, Qwen3VLProcessingInfo):
    pass


class MMCQwen3VLMultiModalProcessor(_PlanProcessor, Qwen3VLMultiModalProcessor):
    mmc_modalities = ("image",)

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Any) -> Any:
        # Qwen3-VL calls the HF processor itself (videos frame by frame), not through `_call_hf_processor`
        setting = resolve(self.info.get_hf_config(), dict(hf_kwargs))
        out = super()._apply_hf_processor_main(mm_items, _strip(hf_kwargs))
        if setting.active and out.get("video_grid_thw") is not None:
            raise ValueError(f"mmcompress {setting.method!r} keep={setting.keep!r}: the mmcompress vLLM plugin "
                             "compresses Qwen3-VL images only, not videos; drop the setting for this request")
        return self._add_plans(out, setting)

    def _item_tokens(self, out: Any) -> dict[str, list[int]]:
        grid = out.get("image_grid_thw")
        if grid is None:
            return {}
        return {"image": (grid.prod(-1) // self.info.get_hf_config().vision_config.spatial_merge_size ** 2).tolist()}


@MULTIMODAL_REGISTRY.register_processor(MMCQwen3VLMultiModalProcessor, info=MMCQwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class MMCQwen3VLForConditionalGeneration(_QwenMixin, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with mmcompress on image tokens (DeepStack features subset alike; EVS off)."""

    def __init__(self, *, vllm_config: Any, prefix: str = ""):
        self._mmc_check(vllm_config)
        rate = getattr(vllm_config.model_config.multimodal_config, "video_pruning_rate", None)
        if rate:
            raise ValueError(f"video_pruning_rate: {rate} turns on vLLM's EVS video pruning, which does not combine "
                             "with the mmcompress plugin's positions; drop --video-pruning-rate or set "
                             "MMCOMPRESS_VLLM=0")
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def embed_multimodal(self, **kwargs: object) -> Any:
        plans = _plans(kwargs.pop(_plan_key("image"), None))
        mods = self._parse_and_validate_multimodal_inputs(**kwargs)
        if not mods:
            return None
        merge = self.visual.spatial_merge_size
        c = self.visual_dim
        out: list[torch.Tensor] = []
        for modality, inp in mods.items():  # vLLM's order of modalities
            if modality != "image":
                for x in self._process_video_input(inp):  # plain vLLM; zero offsets: positions stay vLLM's
                    out.append(torch.cat([x, x.new_zeros(x.shape[0], POS_CHANNELS)], 1))
                continue
            feats = self._process_image_input(inp)  # each [N, C * (1 + D)]
            grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in inp["image_grid_thw"].tolist()]
            plan = plans or [(g[0] * g[1] * g[2], -1) for g in grids]
            for x, g, (m, code) in zip(feats, grids, plan, strict=True):
                y, rep = compress_item(x[:, :c], g, m, code)  # the main features decide
                if rep is None:  # kept whole: vLLM's own embedding and positions
                    out.append(torch.cat([x, x.new_zeros(x.shape[0], POS_CHANNELS)], 1))
                    continue
                rep = rep.to(x.device)
                rel = torch.from_numpy(_grid_ids(*g, 1.0)).T.to(x.device)[rep]  # [M, 3]
                out.append(torch.cat([y, x[rep, c:], _encode_pos(rel, y.dtype)], 1))  # [M, C (1 + D) + 6]
        return tuple(out)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """[3, L]: vLLM's positions of the uncompressed prompt; a compressed image keeps M columns at its base id."""
        merge = self.config.vision_config.spatial_merge_size
        tokens, feats, spans, shift, st = [], [], [], 0, 0
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            off, m = f.mm_position.offset, f.mm_position.length
            n = m
            if f.modality == "image":
                n = int(np.prod(f.data["image_grid_thw"].data.tolist())) // merge**2
            g = copy.copy(f)
            g.mm_position = dataclasses.replace(f.mm_position, offset=off + shift, length=n)
            feats.append(g)
            if n != m:  # compressed: its run expanded back to n tokens
                tokens += input_tokens[st:off] + [input_tokens[off]] * n
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
            full[:, o:o + m] = full[:, o:o + 1]  # every kept token at the base id; `forward` adds its (t, h, w)
        return full[:, keep].contiguous(), int(full.max()) + 1 - len(input_tokens)
