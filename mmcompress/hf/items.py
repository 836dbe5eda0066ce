"""Item bookkeeping of the generic placeholder adapter: one encoder output -> items, items -> compressed features.

An item is one image, video or audio clip of one sample: its features, its placeholder columns in `input_ids`, and
what the compressor gets for it (tokens, grid, prefix, scores, metric, question embeddings). Items of equal shape
are compressed as one batch. The adapter (`mmcompress.hf.placeholder.PlaceholderAdapter`) calls these during the
prefill and then rewrites the sequence around the result.

Letters: L sequence length, N tokens of one item, M kept, C hidden size, G items compressed together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mmcompress.hf.family import META_ATTR, ItemMeta, Modality, expanded_meta, int_list
from mmcompress.hf.plumbing import media_segments, question_embeddings, question_mask

if TYPE_CHECKING:  # annotations only: the adapter imports this module
    from mmcompress.hf.placeholder import PlaceholderAdapter

__all__ = ["question_texts", "compress_items", "item_list"]


def question_texts(adapter: PlaceholderAdapter, ids: torch.Tensor,
                   am: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Per sample [L_b, C] input embeddings of the question (text-guided compressors)."""
    cfg = adapter.model.config
    media = list(adapter.tokens.values())
    excl = [i for a in adapter.family.structural for i in int_list(getattr(cfg, a, None))]
    text_cfg = getattr(cfg, "text_config", None)  # the top-level copies of these ids are deprecated there
    for c in (text_cfg or cfg, getattr(adapter.model, "generation_config", None)):
        for n in ("pad_token_id", "bos_token_id", "eos_token_id"):
            excl += int_list(getattr(c, n, None)) if c is not None else []
    qm = question_mask(ids, am, media, excl + int_list(adapter.opts["text_exclude_ids"]))
    return question_embeddings(adapter.model.get_input_embeddings(), ids, qm)


def compress_items(adapter: PlaceholderAdapter, items: list[dict[str, Any]]) -> None:
    """Compress items in groups of equal (N, grid, prefix, text length, metric width); sets it["x_out"]
    ([M', C] features) and it["kept"] ([M] representatives; None when nothing was removed).

    Items compressed in another space (`project`: their run keeps its first M' columns) get their outputs in the
    order the method declares (`CompressOutput.order`, e.g. VisionZip's dominant-then-contextual); items whose
    outputs sit at their representatives' columns keep source order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for it in items:
        if adapter.encoder_needs.stage == "pixels":  # decided before the encoder (`pixels`): kept tokens as they are
            pre, n, dev = it.get("pre"), it["x"].shape[0], it["x"].device
            it["kept"], it["x_out"], it["assign"] = None, None, torch.arange(n, device=dev)
            if pre is not None and pre.numel() < n:
                it["kept"], it["x_out"] = pre, it["x"][pre]
                it["assign"] = torch.full((n,), -1, dtype=torch.long, device=dev)
                it["assign"][pre] = torch.arange(pre.numel(), device=dev)
            continue
        t, mt = it["text"], it["metric"]
        key = (tuple(it["x"].shape), it["grid"], it["prefix"], it["project"], None if t is None else t.shape[0],
               None if mt is None else mt.shape[-1])
        groups.setdefault(key, []).append(it)
    for (_, grid, prefix, project, _, _), group in groups.items():
        x = torch.stack([it["x"] for it in group])  # [G, N, C']
        sc = None if group[0]["scores"] is None else torch.stack([it["scores"] for it in group]).to(x.device)
        tx = None if group[0]["text"] is None else torch.stack([it["text"] for it in group]).to(x.dtype)
        mt = None if group[0]["metric"] is None else torch.stack([it["metric"] for it in group]).to(x.device)
        res = adapter.compressor(x, grid=grid, prefix=prefix, scores=sc, text=tx, metric=mt)
        if project and res.order is not None:
            res.x = res.ordered()  # the 1-D run reads the tokens in the method's order
        counts = res.counts.tolist()
        feats = adapter.family.project(adapter, res.x) if project else res.x  # [G, M, C]
        for j, it in enumerate(group):
            m = counts[j]
            it["assign"] = res.assign[j]  # [N] output slot of every compressed token (-1: dropped)
            if m >= x.shape[1]:  # nothing removed: the model's own features, bit for bit
                it["x_out"], it["kept"] = None, None
                continue
            it["x_out"], it["kept"] = feats[j, :m], res.rep[j, :m]
            if it["tail"] is not None:
                it["x_out"] = torch.cat([it["x_out"], it["tail"].to(feats)])


def item_list(adapter: PlaceholderAdapter, mod: Modality, out: Any, ids: torch.Tensor,
              texts: list) -> list[dict[str, Any]]:
    """The items of one modality: features, placeholder columns, what the compressor gets."""
    fam = adapter.family
    feats = fam.features(mod, out)
    segs = media_segments(ids, adapter.tokens[mod.name], [f.shape[0] for f in feats])  # (sample, [n_i] columns)
    meta = getattr(out, META_ATTR, None)
    if meta is None:
        if "scores" in adapter._needs:
            raise ValueError(f"scores: compressor {adapter.compressor.name!r} needs attention scores, taken "
                             f"while the encoder runs; the {mod.name} features were encoded before "
                             f"mmcompress.apply (pass {mod.input} instead of mm_encoder_outputs)")
        meta = [ItemMeta() for _ in feats]
    if len(meta) != len(feats):
        meta = expanded_meta(meta, segs, ids.shape[0])
    if len(meta) != len(feats):
        raise ValueError(f"model: {len(feats)} {mod.name} items but {len(meta)} item descriptions")
    items = []
    for f, mt, (b, cols) in zip(feats, meta, segs, strict=True):
        if "scores" in adapter._needs and mt.scores is None:
            raise ValueError(f"scores: the {type(fam).__name__} description gives no attention scores for "
                             f"{mod.name}; use a compressor that does not need `scores`")
        S = len(adapter.encoder_needs.layers)
        if "scores" in adapter._needs and S > 1 and (mt.scores.dim() != 2 or mt.scores.shape[1] != S):
            raise ValueError(f"scores: compressor {adapter.compressor.name!r} reads attention at {S} encoder blocks "
                             f"{adapter.encoder_needs.layer}; the {type(fam).__name__} description reads one "
                             f"block only (served: LLaVA, InternVL, LLaVA-NeXT-Video towers)")
        sel = None if mt.fixed is None else (~mt.fixed.to(f.device)).nonzero().squeeze(1)  # [N_c]
        x = mt.x if mt.x is not None else f if sel is None else f[sel]
        sc = mt.scores if sel is None or mt.x is not None else mt.scores[sel]
        me = mt.metric if sel is None or mt.x is not None or mt.metric is None else mt.metric[sel]
        items.append({"mod": mod, "sample": b, "cols": cols, "orig": f, "sel": sel, "grid": mt.grid, "x": x,
                      "prefix": mt.prefix, "project": mt.x is not None, "tail": mt.tail, "text": texts[b],
                      "scores": sc, "metric": me, "pre": mt.kept,
                      "skip": getattr(out, META_ATTR, None) is None and fam.requires_meta})
    return items
