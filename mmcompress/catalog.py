"""Static facts about the built-in compressors, readable without importing torch (used by `mmcompress list`).

A compressor's class carries the same facts (`family`, `modality`, `needs`); tests check they agree.
"""

from __future__ import annotations

# name: (module under mmcompress.compressors, family, modality, needs, one-line summary)
BUILTINS: dict[str, tuple[str, str, str, tuple[str, ...], str]] = {
    "random": ("baselines", "baseline", "any", (), "random selection (seeded)"),
    "uniform": ("baselines", "baseline", "any", (), "evenly strided selection"),
    "pool": ("pool", "transformation", "1D/2D/3D", (), "grid-aware average/bilinear pooling to a target grid"),
    "tome": ("tome", "similarity", "any", (), "ToMe bipartite soft matching, size-weighted merge"),
    "divprune": ("divprune", "similarity", "any", (), "greedy max-min diversity selection"),
    "visionzip": ("visionzip", "attention", "image/video", ("scores",), "dominant by scores + merged context"),
    "prumerge": ("prumerge", "attention, adaptive", "image", ("scores",), "IQR outliers of scores + kNN merge"),
    "prumerge+": ("prumerge", "attention, adaptive", "image", ("scores",), "prumerge + spatially uniform samples"),
    "text_recovery": ("text_recovery", "query", "image/video", ("scores", "text"), "keep, recover by text, merge"),
    "temporal": ("temporal", "similarity", "video", ("grid",), "merge similar tokens across frames, then spatial"),
    "dycoke": ("dycoke", "similarity", "video", ("grid",), "DyCoke TTM: paired frames, fixed per-frame quota, drop"),
    "audio_merge": ("audio_merge", "similarity", "audio", (), "neighbour-only merging along time"),
    "cdpruner": ("cdpruner", "diversity", "image", ("text",), "conditional DPP: similarity x text relevance"),
    "vispruner": ("vispruner", "attention, diversity", "image", ("scores",), "top CLS attention + de-duplicated rest"),
    "holov": ("holov", "attention, coverage", "image", ("scores",), "budget spread over crops, top scores within"),
    "scope": ("scope", "attention, coverage", "image", ("scores",), "greedy coverage gain x saliency"),
    "holitom": ("holitom", "similarity", "video", ("grid", "scores"), "temporal windows, static DPC merge, top rest"),
    "prunesid": ("prunesid", "attention, diversity", "image", ("scores",), "NMS on scores within PCA groups"),
    "idpruner": ("idpruner", "importance, diversity", "image", (), "MMR: importance vs max similarity to the kept"),
    "visiontrim": ("visiontrim", "attention, query", "image", ("scores", "text"),
                   "top DVTS attention + text-guided merging of the rest"),
    "flashvid": ("flashvid", "attention, similarity", "video", ("grid", "scores"),
                 "segments, attention+diversity per frame, tree merging across frames, DPC-kNN"),
    "trio_encoder": ("trio_encoder", "attention, similarity", "image", ("scores", "grid"),
                     "TRIO before the LLM: window + global [CLS] top, rest merged into the most similar kept"),
    "pixelprune": ("pixelprune", "before the encoder", "image", (),
                   "drop patch groups a 2-D predictor reproduces, before the ViT (Qwen-VL)"),
    "adaptive": ("adaptive", "budget", "any", (), "single-pass per-sample budget for a target error epsilon"),
}

# In-LLM methods: rules on the shared in-LLM pruning stage (mmcompress/inllm/stage.py), run only through
# `mmc.apply` (not `mmc.create`). name: (module under mmcompress.inllm, family, modality, needs, summary)
IN_LLM: dict[str, tuple[str, str, str, tuple[str, ...], str]] = {
    "fastv": ("fastv", "in-LLM", "image", ("apply",), "drop at LLM layer K by last-token attention"),
    "pdrop": ("pdrop", "in-LLM", "image", ("apply",), "PyramidDrop: staged drops by last-instruction attention"),
    "dart": ("dart", "in-LLM", "image", ("apply",), "keep tokens least duplicated with pivots, at LLM layer 2"),
    "sparsevlm": ("sparsevlm", "in-LLM", "image", ("apply",),
                  "text raters' attention per layer, pruned tokens recycled"),
    "trio": ("trio", "in-LLM", "image", ("apply",), "gradient saliency of a re-run layer's input + NMS (cosine 0.8)"),
}
