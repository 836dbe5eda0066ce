"""The methods every family's engine test serves beyond the feature-only ones: attention-scored (scores, keys, CLS
from vLLM's own vision tower), text-guided (the request's question) and video methods, with one budget each; the
calls that run them on one engine, and the checks shared by the family tests.

A family test adds `calls(...)` to its engine's calls (one engine per family) and parametrizes its checks over
`names(...)`: prompt shorter by exactly the removed tokens, agreement with `mmc.apply` in transformers, and a batch
of requests with different methods equal to their single runs.
"""

from __future__ import annotations

import tiny
import torch

#: attention-scored and text-guided image methods, (name, keep)
IMAGE = [("visionzip", 0.5), ("vispruner", 0.5), ("scope", 0.5), ("holov", 0.5), ("prumerge", 6), ("prumerge+", 6),
         ("prunesid", 0.5), ("idpruner", 0.5), ("cdpruner", 0.5), ("text_recovery", 0.5), ("visiontrim", 0.5)]
#: video methods (and an attention-scored one on video)
VIDEO = [("dycoke", 0.5), ("holitom", 0.5), ("temporal", 0.5), ("visionzip", 0.25), ("text_recovery", 0.5)]


def calls(reqs: list[dict], methods: list[tuple[str, float | int]], tag: str) -> dict[str, list[dict]]:
    """One engine call per method over the requests `reqs` (each with that method's setting)."""
    return {f"{tag}:{m}": [dict(r, **tiny.request_kw(m, k)) for r in reqs] for m, k in methods}


def names(methods: list[tuple[str, float | int]], tag: str) -> list[tuple[str, str, float | int]]:
    """(call name, method, keep) for pytest.mark.parametrize."""
    return [(f"{tag}:{m}", m, k) for m, k in methods]


def mixed(reqs: list[tuple[dict, str, float | int]]) -> list[dict]:
    """One batch of requests with their own methods."""
    return [dict(r, **tiny.request_kw(m, k)) for r, m, k in reqs]


#: methods that hand the LLM the tower's CLS too, counted in keep (on LLaVA-1.5 with the "default" strategy)
CLS_IN_BUDGET = ("visionzip", "prunesid")
#: a smaller set for the families whose tower is already covered by another family's test
IMAGE_SOME = [("visionzip", 0.5), ("prumerge", 6), ("vispruner", 0.5), ("cdpruner", 0.5), ("text_recovery", 0.5)]
#: the same for LLaVA-NeXT / OneVision images (128 and 256 tokens): CDPruner's greedy DPP over that many tokens of a
#: random tiny model is ill-conditioned at keep 0.5 (in transformers alone, 1e-6 relative noise on the features
#: changes its picks on both test images), so it runs at 16 tokens there, where the picks are stable
ANYRES_SOME = [(m, 16 if m == "cdpruner" else k) for m, k in IMAGE_SOME]


def kept(n: int, keep: float | int, cls: bool = False) -> int:
    """Placeholders an item of n tokens keeps at a fixed budget: the compressors' rule; `cls`: the CLS is handed
    to the LLM ahead of the kept patches and counted in keep."""
    if cls:
        return min(keep, n) if isinstance(keep, int) else max(2, min(n, round(keep * (n + 1))))
    return min(keep, n) if isinstance(keep, int) else max(1, round(keep * n))


def assert_shorter(got: list[dict], plain: list[dict], runs: list[int], new_runs: list[int], pad: int) -> None:
    """Each item's placeholder run went from `runs` (plain vLLM) to `new_runs` tokens, and the prompt is shorter by
    exactly the difference; generation ran."""
    assert isinstance(got, list), got  # a refused call is {"error": ...}
    for r, p, n, m in zip(got, plain, runs, new_runs, strict=True):
        assert r["prompt_token_ids"].count(pad) == m
        assert len(r["prompt_token_ids"]) == len(p["prompt_token_ids"]) - (n - m), (len(r["prompt_token_ids"]), m)
        assert len(r["token_ids"]) == 5


#: PixelPrune requests: the method alone (tau 0) or with its options
PIXELPRUNE = {"mm_processor_kwargs": {"mmcompress_method": "pixelprune"}}
PIXELPRUNE_TAU = {"mm_processor_kwargs": {"mmcompress_method": "pixelprune", "mmcompress_options": {"tau": 0.05}}}


def pixel_kept(model_dir, req: dict, **options) -> list[int]:
    """Merge groups PixelPrune keeps of each image of `req`, as `mmc.apply` selects them in transformers (the HF
    processor's pixels, the family's processor mean/std)."""
    import transformers as T

    import mmcompress as mmc
    from mmcompress.hf.qwen_vl import Qwen2VLFamily, Qwen3VLFamily

    cfg = T.AutoConfig.from_pretrained(model_dir)
    mean, std = (Qwen3VLFamily if cfg.model_type == "qwen3_vl" else Qwen2VLFamily).pixel_norm
    proc = T.AutoProcessor.from_pretrained(model_dir)
    inp = proc(text=[req["prompt"]], images=[tiny.image(s, (w, h), *kind) for s, w, h, *kind in req["images"]],
               return_tensors="pt")
    kept = mmc.create("pixelprune", **options).select(inp["pixel_values"], inp["image_grid_thw"], mean=mean, std=std)
    return [len(k) for k in kept]


def assert_pixelprune(model_dir, reqs: list[dict], got: list[dict], plain: list[dict], groups: list[int],
                      pad: int, **options) -> None:
    """PixelPrune served: each prompt is shorter than its uncompressed run (`plain`) by exactly the groups the rule
    drops (`groups`: all of each image's), and greedy ids / first-token log-probs equal `mmc.apply(model,
    "pixelprune", **options)` in transformers (the ViT on the kept patches at their original positions)."""
    import transformers as T

    import mmcompress as mmc

    kept = [pixel_kept(model_dir, r, **options)[0] for r in reqs]
    assert all(1 <= k < n for k, n in zip(kept, groups, strict=True)), kept  # groups were dropped
    assert_shorter(got, plain, groups, kept, pad)
    model = T.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    mmc.apply(model, "pixelprune", **options)
    tiny.assert_transformers_agree(model, T.AutoProcessor.from_pretrained(model_dir), reqs, got)


def assert_pixelprune_call(runs: tuple, calls: dict, i: int, groups: int, **options) -> None:
    """`assert_pixelprune` on the i-th "pp" call of a family engine's `runs` (model_dir, outputs, ...), whose image
    has `groups` merged groups uncompressed."""
    model_dir, got = runs[0], runs[1]
    assert_pixelprune(model_dir, [calls["pp"][i]], got["pp"][i:i + 1], got["pp_none"][i:i + 1], [groups],
                      tiny.token_id("<|image_pad|>"), **options)
