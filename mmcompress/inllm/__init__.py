"""In-LLM methods: image tokens pruned inside the decoder, on one shared stage, one rule per module.

`stage` owns the mechanics once for every method (scoring without eager attention, pruning by pre-hooks on the
decoder layers, masks, position ids and KV cache, `generate()`, exact `detach`); `fastv`, `pdrop`, `dart` and
`sparsevlm` each state one rule, and `options` turns `mmc.apply`'s `keep` and `<name>_*` options into a rule
(FastV's `fastv_k`/`fastv_r` are adapter options). They run through
`mmc.apply(model, "fastv" | "pdrop" | "dart" | "sparsevlm", ...)` (not `mmc.create`); `mmcompress list` names them
from `mmcompress.catalog.IN_LLM`.

This package imports only `mmcompress.compressors` (attention scoring), never the Hugging Face adapter
(`mmcompress.hf`).
"""

from mmcompress.inllm.stage import InLLM, InLLMMethod, PruneContext, drop_lowest, find_decoder  # noqa: I001 (first)
from mmcompress.inllm.dart import DARTRule
from mmcompress.inllm.fastv import FastV, FastVRule
from mmcompress.inllm.pdrop import PDropRule
from mmcompress.inllm.sparsevlm import SparseVLMRule

__all__ = ["InLLM", "InLLMMethod", "PruneContext", "drop_lowest", "find_decoder", "FastV", "FastVRule", "PDropRule",
           "DARTRule", "SparseVLMRule"]
