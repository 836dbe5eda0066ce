"""The bench's token count per sample: entering the LLM for encoder-side compressors, averaged over the LLM's layers
for in-LLM methods (the budget their papers compare at)."""

from __future__ import annotations

import torch
from mmcompress.evals.backends import llm_media_tokens


def test_counts_from_stats_placeholders_and_layers() -> None:
    ids = torch.tensor([[5, 9, 9, 9, 1], [9, 9, 1, 1, 1]])  # [B, L], image token 9
    assert llm_media_tokens({}, ids, 9, 2) == [3.0, 2.0]  # unwrapped: the placeholders
    assert llm_media_tokens({"tokens_out": [16, 8]}, ids, 9, 2) == [16.0, 8.0]
    st = {"tokens_out": [64, 64], "inllm_layer_tokens": [[64, 64, 32, 32], [64, 64, 16, 16]]}
    assert llm_media_tokens(st, ids, 9, 2) == [48.0, 40.0]  # FastV at layer 2 of 4: the mean over layers
    assert llm_media_tokens({"tokens_out": [10, 20, 30, 40]}, ids, 9, 2) == [50.0, 50.0]  # 2 items per sample
    assert llm_media_tokens({}, ids, None, 2) == [0.0, 0.0]
