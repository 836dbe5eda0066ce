"""The question a text-guided compressor reads (`text=`), for vLLM requests: the same token span and the same LLM
input embedding as `mmc.apply` uses in transformers (`mmcompress.hf.placeholder.PlaceholderAdapter._texts`).

The span is found in vLLM's processor, which knows the request's prompt ids: the tokens after the item's last media
placeholder, without the family's structural tokens (Qwen's vision start/end) and the config's and generation
config's pad/bos/eos ids (`mmcompress.hf.plumbing.question_mask`, with its fallbacks). The ids ride with the request
as one more `mm_processor_kwargs` entry (`QUESTION_KEY`, a string of ids), so vLLM's multimodal cache, keyed by the
item and these kwargs, never hands one request's question to another, and then as a per-item field
(`mmcompress_<modality>_text`, [items, L] ids) to the model, which embeds them with its LLM's input embedding.

Letters: L question tokens, C LLM hidden size.
"""

from __future__ import annotations

from typing import Any

import torch

from mmcompress.hf.placeholder import int_list
from mmcompress.hf.plumbing import question_mask

__all__ = ["QUESTION_KEY", "DUMMY_KEY", "question_ids", "encode_ids", "decode_ids", "media_token_ids",
           "excluded_token_ids"]

QUESTION_KEY = "mmcompress_question"  # str: the question's token ids, space-separated (set by the processor)
DUMMY_KEY = "mmcompress_profiling"  # True on vLLM's dummy (profiling) inputs, whose prompt holds no question
_MEDIA_ATTRS = (("image_token_id", "image_token_index"), ("video_token_id", "video_token_index"))


def _first_id(cfg: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        for c in (cfg, getattr(cfg, "text_config", None)):
            v = getattr(c, name, None) if c is not None else None
            if isinstance(v, int):
                return v
    return None


def media_token_ids(hf_config: Any) -> list[int]:
    """The image and video placeholder ids of a model (as the HF adapter reads them from the config)."""
    return [i for names in _MEDIA_ATTRS if (i := _first_id(hf_config, names)) is not None]


def excluded_token_ids(hf_config: Any, generation_config: dict | None, structural: tuple[str, ...]) -> list[int]:
    """Ids never part of the question: the family's structural tokens, and pad/bos/eos of the text config (else the
    config) and of the generation config."""
    excl = [i for a in structural for i in int_list(getattr(hf_config, a, None))]
    text_cfg = getattr(hf_config, "text_config", None) or hf_config
    for n in ("pad_token_id", "bos_token_id", "eos_token_id"):
        excl += int_list(getattr(text_cfg, n, None))
        excl += int_list((generation_config or {}).get(n))
    return excl


def question_ids(prompt: list[int], media: list[int], exclude: list[int]) -> list[int]:
    """The question tokens of one prompt (`question_mask`'s rule, fallbacks included); may be empty."""
    if not prompt:
        return []
    ids = torch.tensor([list(prompt)], dtype=torch.long)  # [1, L]
    return ids[0][question_mask(ids, None, media, exclude)[0]].tolist()


def encode_ids(ids: list[int]) -> str:
    return " ".join(str(int(i)) for i in ids)


def decode_ids(s: str | None) -> list[int]:
    if not s:
        return []
    return [int(t) for t in str(s).split()]
