"""Qwen2-VL / Qwen2.5-VL adapter: compress the vision tokens entering the LLM (after the 2x2 patch merger).

How a forward is rewritten (prefill, i.e. a call with pixels and an empty cache):

1. The vision tower runs unchanged (`get_image_features` / `get_video_features`); each image or video is one
   compressor sample with grid (t, h / merge, w / merge).
2. Every output token sits at the column of its representative placeholder token; the other placeholder columns are
   removed from `input_ids`, `attention_mask`, `mm_token_type_ids`, `labels` and the position ids.
3. Positions: the M-RoPE (t, h, w) ids of the UNCOMPRESSED sequence are computed (or taken from the caller, as
   `generate()` passes them) and then subset. Kept tokens keep their original ids, a merged token gets its
   representative's id (= `out.pos` offset like the original grid), and text after the image keeps its original
   ids (original max + 1 onwards), as most token-compression papers do (FastV, VisionZip, SparseVLM on Qwen): the
   LLM sees the same geometry, only with holes. `rope_deltas` is set so that decoding continues at the same positions
   as the uncompressed model would.
4. Samples whose sequences now differ in length are re-padded on the side they were padded on (left when no sample
   is right-padded, the `generate()` convention); pad columns are masked out, so each sample gets the logits it
   would get alone.
5. The returned logits cover the compressed sequence: [B, L', V] with L' = the longest compressed sample.

Compressor inputs: `grid`; `text` = input embeddings of the question (the tokens after the last vision token) for
text-guided methods; `scores` for attention-based methods = mean attention each token receives in the last vision
block (recomputed from its q/k with RoPE, see `vision_scores`; the tower has no CLS token).

Decoding (a call whose cache came from a compressed prefill) translates the caller's full-length attention mask into
the compressed layout and shifts the text-position row, so `generate()` works unchanged with its KV cache.

Letters: B batch, L sequence length (L' compressed), N vision tokens of one image, M kept, C hidden size.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from mmcompress.compressors.attention_scores import attention_row_scores
from mmcompress.integrations.base import Adapter, register_adapter
from mmcompress.integrations.fastv import FastV
from mmcompress.integrations.plumbing import padding_side_of, question_embeddings, question_mask

SCORES_ATTR = "_mmcompress_scores"  # attribute of a vision output holding per-item token scores

# (name, pixel kwarg, grid kwarg, placeholder-token config attribute, mm_token_type value)
_MODALITIES = (
    ("image", "pixel_values", "image_grid_thw", "image_token_id", 1),
    ("video", "pixel_values_videos", "video_grid_thw", "video_token_id", 2),
)


@dataclass
class _Layout:
    """Where the columns of a compressed sequence come from.

    Attributes:
        idx: [B, L'] original column of every compressed column, -1 on padding added by the adapter.
        length: L, the original sequence length.
        removed: [B] columns removed per sample.
        padded: whether the adapter added padding (the compressed batch then needs an attention mask).
    """

    idx: torch.Tensor
    length: int
    removed: torch.Tensor
    padded: bool

    @property
    def identity(self) -> bool:
        return not self.padded and self.idx.shape[1] == self.length and not bool(self.removed.any())

    def take(self, t: torch.Tensor, fill: int | float) -> torch.Tensor:
        """Columns of t [..., B, L] in the compressed layout: [..., B, L'] (`fill` on added padding)."""
        g = self.idx.clamp(min=0).expand(*t.shape[:-2], *self.idx.shape)
        out = t.gather(-1, g)
        return out.masked_fill(self.idx < 0, fill)

    def mask(self, am: torch.Tensor | None, total: int) -> torch.Tensor:
        """Full attention mask [B, total] in original columns (prompt + new tokens) -> [B, total - L + L']."""
        B = self.idx.shape[0]
        if am is None:
            am = torch.ones(B, total, dtype=torch.long, device=self.idx.device)
        head = self.take(am[:, : self.length], 0)
        return torch.cat([head, am[:, self.length:]], dim=1)


def _find_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    if cache is None and isinstance(out, tuple):
        cache = next((o for o in out if hasattr(o, "get_seq_length")), None)
    return cache


def _cache_len(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


@register_adapter
class Qwen2VLAdapter(Adapter):
    """Compress Qwen2-VL / Qwen2.5-VL vision tokens between the vision merger and the LLM.

    Works on `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` (and their bare `*Model`):
    forward, `generate()` with a KV cache, padded and ragged batches, images and videos.

    Options:
        modalities: which of ("image", "video") to compress (default both).
        fastv_k: None (off) or the FastV layer K: LLM layers >= K see the vision tokens pruned by last-token
            attention (`mmcompress.integrations.fastv`), on top of (or, with keep=1.0, instead of) the compressor.
        fastv_r: FastV's R, the fraction of vision tokens pruned at layer K (default 0.5).
    """

    model_types = ("qwen2_vl", "qwen2_5_vl")
    options = {"modalities": ("image", "video"), "fastv_k": None, "fastv_r": 0.5}

    def __init__(self, model: torch.nn.Module, compressor, **options: Any):
        super().__init__(model, compressor, **options)
        mods = self.opts["modalities"]
        if isinstance(mods, str):
            mods = (mods,)
        if not set(mods) <= {"image", "video"}:
            raise ValueError(f"modalities: expected a subset of ('image', 'video'), got {mods!r}")
        self.opts["modalities"] = tuple(mods)
        inner = model.model if hasattr(getattr(model, "model", None), "visual") else model
        if not hasattr(inner, "visual") or not hasattr(inner, "get_rope_index"):
            raise TypeError(f"model: {type(model).__name__} has no Qwen2-VL vision tower (`.visual`)")
        self.inner = inner
        self.fastv: FastV | None = None
        if self.opts["fastv_k"] is not None:
            self.fastv = FastV(inner.language_model.layers, k=self.opts["fastv_k"], r=self.opts["fastv_r"])
        self._orig: Any = None
        self._had_forward = False
        self._layouts: dict[int, tuple[weakref.ref, _Layout]] = {}
        self._needs = tuple(getattr(compressor, "needs", ()))
        self._inner_saved: list[tuple[str, bool, Any]] = []

    # ---- patching --------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Install an instance-level `forward` wrapper (the class and other instances are untouched)."""
        self._had_forward = "forward" in self.model.__dict__
        self._orig = self.model.forward  # bound method (or a previous instance attribute)
        self._sig = inspect.signature(self._orig)

        @functools.wraps(self._orig)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._forward(*args, **kwargs)

        self.model.forward = forward
        if self.fastv is not None:
            self.fastv.attach()
        if "scores" in self._needs:  # attention-based compressors: score tokens while the vision tower runs
            for name in ("get_image_features", "get_video_features"):
                fn = getattr(self.inner, name)
                self._inner_saved.append((name, name in self.inner.__dict__, self.inner.__dict__.get(name)))
                object.__setattr__(self.inner, name, self._scoring(fn))

    def detach(self) -> None:
        """Remove the wrappers: the instance's methods are the ones it had before `attach`."""
        if self._had_forward:
            self.model.forward = self._orig
        else:
            self.model.__dict__.pop("forward", None)
        for name, had, fn in reversed(self._inner_saved):
            if had:
                object.__setattr__(self.inner, name, fn)
            else:
                self.inner.__dict__.pop(name, None)
        self._inner_saved.clear()
        self._layouts.clear()
        if self.fastv is not None:
            self.fastv.detach()

    def _scoring(self, fn: Any) -> Any:
        """Wrap get_image/video_features so its output carries per-item token scores (`SCORES_ATTR`)."""
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            attn = self.inner.visual.blocks[-1].attn
            cap: dict[str, Any] = {}

            def hook(_m: Any, a: tuple, kw: dict) -> None:
                names = ("hidden_states", "cu_seqlens", "position_embeddings")
                cap.update({n: a[j] if len(a) > j else kw.get(n) for j, n in enumerate(names)})

            handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                out = fn(*args, **kwargs)
            finally:
                handle.remove()
            grid = list(sig.bind(*args, **kwargs).arguments.values())[1]  # image_grid_thw / video_grid_thw
            if cap and not isinstance(out, tuple):
                object.__setattr__(out, SCORES_ATTR, vision_scores(self.inner.visual, attn, cap, grid))
            return out

        return wrapper

    # ---- dispatch --------------------------------------------------------------------------------------
    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        kw = dict(self._sig.bind(*args, **kwargs).arguments)
        for name, p in self._sig.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                kw.update(kw.pop(name, {}))
        if kw.get("past_key_values") is not None and kw.get("cache") is None:
            kw["cache"] = kw.pop("past_key_values")
        return kw

    def _layout_for(self, cache: Any) -> _Layout | None:
        entry = self._layouts.get(id(cache))
        if entry is None or entry[0]() is not cache:
            return None
        return entry[1]

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        kw = self._bind(args, kwargs)
        cache = kw.get("cache")
        past = _cache_len(cache)
        if past > 0:
            layout = self._layout_for(cache)
            if layout is not None:  # decoding after a compressed prefill: translate into the compressed layout
                return self._orig(**self._decode_kwargs(kw, layout, past))
            return self._orig(**kw)
        if cache is not None:
            self._layouts.pop(id(cache), None)
        if self.enabled and self._media(kw):
            return self._prefill(kw)
        return self._orig(**kw)

    def _media(self, kw: dict[str, Any]) -> list[tuple]:
        """The modalities of this call to compress: (name, pixel kwarg, grid kwarg, token attr, type value)."""
        enc = kw.get("mm_encoder_outputs") or {}
        return [(name, pix, grid, tok, tv) for name, pix, grid, tok, tv in _MODALITIES
                if name in self.opts["modalities"] and (kw.get(pix) is not None or enc.get(name) is not None)]

    # ---- prefill ---------------------------------------------------------------------------------------
    def _features(self, kw: dict[str, Any], name: str, pix: str,
                  grid_key: str) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Per-item features [N_i, C] after the merger (vision tower or the caller's encoder outputs), and per-item
        scores [N_i] when the compressor needs them."""
        enc = kw.get("mm_encoder_outputs") or {}
        if enc.get(name) is not None:
            res = enc[name]
        else:
            fn = self.inner.get_image_features if name == "image" else self.inner.get_video_features
            res = fn(kw[pix], kw.get(grid_key), return_dict=True)
        pooled = res.pooler_output
        if isinstance(pooled, torch.Tensor):
            grid = kw.get(grid_key)
            m = self.inner.visual.spatial_merge_size
            pooled = torch.split(pooled, (grid.prod(-1) // m**2).tolist())
        scores = None
        if "scores" in self._needs:
            scores = getattr(res, SCORES_ATTR, None)
            if scores is None:
                raise ValueError(f"scores: compressor {self.compressor.name!r} needs attention scores, computed while "
                                 f"the vision tower runs; the {name} features were encoded before mmcompress.apply "
                                 "(pass pixels instead of precomputed mm_encoder_outputs)")
        return list(pooled), scores

    def _compress_items(self, feats: list[torch.Tensor], grids: list[tuple[int, int, int]],
                        texts: list[torch.Tensor | None],
                        scores: list[torch.Tensor] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Compress each item [N_i, C] (same-grid items batched unless text-guided). Returns (x [M_i, C], rep [M_i])."""
        needs_text = "text" in self._needs
        groups: dict[Any, list[int]] = {}
        for i, g in enumerate(grids):
            groups.setdefault((g, i if needs_text else -1), []).append(i)
        result: list[Any] = [None] * len(feats)
        for (g, _), items in groups.items():
            x = torch.stack([feats[i] for i in items])  # [b, N, C]
            text = texts[items[0]] if needs_text else None  # [1, L, C] (one item per group)
            sc = None if scores is None else torch.stack([scores[i] for i in items]).to(x.device)  # [b, N]
            out = self.compressor(x, grid=g, text=text, scores=sc)
            for j, i in enumerate(items):
                valid = slice(None) if out.mask is None else out.mask[j]
                result[i] = (out.x[j][valid], out.rep[j][valid])
        return result

    def _texts(self, input_ids: torch.Tensor, am: torch.Tensor | None, owners: list[int]) -> list[torch.Tensor]:
        """[1, L_b, C] embeddings of the question tokens of each item's sample (text-guided compressors)."""
        cfg = self.model.config
        media = [getattr(cfg, a, None) for a in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                 "vision_end_token_id")]
        qmask = question_mask(input_ids, am, [m for m in media if m is not None], exclude_ids=[_pad_id(cfg)])
        emb = question_embeddings(self.inner.get_input_embeddings(), input_ids, qmask)
        return [emb[b].unsqueeze(0) for b in owners]

    def _prefill(self, kw: dict[str, Any]) -> Any:
        cfg = self.model.config
        input_ids = kw.get("input_ids")
        if input_ids is None:
            raise ValueError("input_ids: the qwen2_vl adapter needs `input_ids` (with the vision placeholder tokens) "
                             "to compress; got only `inputs_embeds`")
        B, L = input_ids.shape
        dev = input_ids.device
        am = kw.get("attention_mask")
        if am is not None and (am.dim() != 2 or tuple(am.shape) != (B, L)):
            raise ValueError(f"attention_mask: expected a 2D mask of shape {(B, L)}, got {tuple(am.shape)}")
        mm = kw.get("mm_token_type_ids")
        if mm is None:  # derive it from the placeholder tokens (transformers requires it with grids)
            mm = torch.zeros_like(input_ids, dtype=torch.int)
            for *_, tok, tv in _MODALITIES:
                mm = mm.masked_fill(input_ids == getattr(cfg, tok), tv)
        media = self._media(kw)

        # Vision features of every item, checked against the placeholders before anything else.
        found = []
        for name, pix, grid_key, _tok, tv in media:
            feats, scores = self._features(kw, name, pix, grid_key)
            cols = (mm == tv).nonzero()  # [sum N_i, 2] (sample, column) in row-major = feature order
            counts = [f.shape[0] for f in feats]
            if cols.shape[0] != sum(counts):
                raise ValueError(f"input_ids: {cols.shape[0]} {name} placeholder tokens but the {name} features hold "
                                 f"{sum(counts)} tokens")
            found.append((name, grid_key, feats, scores, cols, counts))

        # Original (uncompressed) 3D positions, as the model itself would compute them.
        pos = kw.get("position_ids")
        if pos is None:
            rope_kw = {"image_grid_thw": kw.get("image_grid_thw"), "video_grid_thw": kw.get("video_grid_thw"),
                       "attention_mask": am}
            if "second_per_grid_ts" in inspect.signature(self.inner.get_rope_index).parameters:
                rope_kw["second_per_grid_ts"] = kw.get("second_per_grid_ts")
            pos, _ = self.inner.get_rope_index(input_ids, mm_token_type_ids=mm, **rope_kw)  # [3, B, L]
        elif pos.dim() == 2:
            pos = pos.unsqueeze(0).expand(3, B, L)

        # Compress each item; keep[b, l] says whether column l survives.
        keep = torch.ones(B, L, dtype=torch.bool, device=dev)
        merge = self.inner.visual.spatial_merge_size
        enc_out: dict[str, Any] = dict(kw.get("mm_encoder_outputs") or {})
        tokens_in = torch.zeros(B, dtype=torch.long)
        tokens_out = torch.zeros(B, dtype=torch.long)
        ms = 0.0
        for name, grid_key, feats, scores, cols, counts in found:
            starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
            grid_thw = kw.get(grid_key)
            if grid_thw is not None:
                if grid_thw.shape[0] != len(feats):
                    raise ValueError(f"{grid_key}: expected one (t, h, w) row per {name} ({len(feats)}), got "
                                     f"{tuple(grid_thw.shape)}")
                grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()]
            else:  # generate() consumes the grids when it pre-encodes the pixels: read them off the 3D positions
                grids = [_grid_from_positions(pos[-3:, int(cols[s, 0]), cols[s:e, 1]])
                         for s, e in zip(starts[:-1], starts[1:], strict=True)]
            if any(math.prod(g) != n for g, n in zip(grids, counts, strict=True)):
                raise ValueError(f"{grid_key}: grids {grids} do not match the {name} token counts {counts}")
            owners = [int(cols[s, 0]) for s in starts[:-1]]
            texts = self._texts(input_ids, am, owners) if "text" in self._needs else [None] * len(feats)
            t0 = time.perf_counter()
            outs = self._compress_items(feats, grids, texts, scores)
            ms += (time.perf_counter() - t0) * 1e3
            kept = []
            for i, (x_i, rep_i) in enumerate(outs):
                c = cols[starts[i]: starts[i + 1]]  # [N_i, 2]
                b = owners[i]
                if not bool((c[:, 0] == b).all()):
                    raise ValueError(f"input_ids: the placeholder tokens of {name} {i} span several samples")
                keep[b, c[:, 1]] = False
                keep[b, c[rep_i.to(dev), 1]] = True
                tokens_in[b] += counts[i]
                tokens_out[b] += x_i.shape[0]
                kept.append(x_i)
            enc_out[name] = _pooled(kept)

        # New layout: kept columns of each sample, re-padded on the original padding side.
        n_keep = keep.sum(1)  # [B]
        Lp = int(n_keep.max())
        right = padding_side_of(am) == "right"
        idx = torch.full((B, Lp), -1, dtype=torch.long, device=dev)
        for b in range(B):
            kc = keep[b].nonzero().squeeze(1)
            if right:
                idx[b, : kc.numel()] = kc
            else:
                idx[b, Lp - kc.numel():] = kc
        lay = _Layout(idx=idx, length=L, removed=(L - n_keep).cpu(), padded=bool((n_keep != Lp).any()))

        new = dict(kw)
        for k in ("pixel_values", "pixel_values_videos"):
            new.pop(k, None)
        new["mm_encoder_outputs"] = enc_out
        if not lay.identity:
            pad_id = _pad_id(cfg)
            new["input_ids"] = lay.take(input_ids, pad_id)
            new["mm_token_type_ids"] = lay.take(mm, 0)
            if am is not None or lay.padded:
                new["attention_mask"] = lay.mask(am, L)
            if kw.get("labels") is not None:
                new["labels"] = lay.take(kw["labels"], -100)
            p = lay.take(pos, 0)
            if p.shape[0] == 4:  # row 0 is the plain sequence index (mask building / packing): renumber it
                am_new = new.get("attention_mask")
                if am_new is None:
                    p[0] = torch.arange(Lp, device=dev).expand(B, Lp)
                else:
                    p[0] = (am_new.long().cumsum(-1) - 1).masked_fill(am_new == 0, 0)
            new["position_ids"] = p
        else:
            new["mm_token_type_ids"] = mm
            new["position_ids"] = pos
        fv = self.fastv
        if fv is not None and fv.r > 0:
            if new.get("labels") is not None:
                raise ValueError("labels: FastV prunes the LLM sequence; a loss over it is not supported")
            ids = new["input_ids"]
            vision = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)  # [B, L']
            with fv.armed(vision, new.get("attention_mask")):
                out = self._orig(**new)
        else:
            out = self._orig(**new)

        # Decoding continues at the original positions: delta = (orig max + 1 - orig valid count) + removed.
        pos3 = pos[-3:]
        valid = torch.ones(B, L, dtype=torch.bool, device=dev) if am is None else am.bool()
        mx = pos3.masked_fill(~valid.unsqueeze(0), -1).amax(dim=(0, 2))  # [B]
        self.inner.rope_deltas = (mx + 1 - valid.sum(1) + lay.removed.to(dev)).unsqueeze(1)
        cache = _find_cache(out)
        if cache is not None and not lay.identity:
            self._layouts = {k: v for k, v in self._layouts.items() if v[0]() is not None}
            self._layouts[id(cache)] = (weakref.ref(cache), lay)
        extra = {"fastv_removed": list(fv.last_removed)} if fv is not None and fv.r > 0 else {}
        self.record(tokens_in, tokens_out, ms, seq_len_in=L, seq_len_out=Lp, **extra)
        return out

    # ---- decode ----------------------------------------------------------------------------------------
    def _decode_kwargs(self, kw: dict[str, Any], lay: _Layout, past: int) -> dict[str, Any]:
        """Translate a decoding call (full-length mask and positions) into the compressed layout."""
        new = dict(kw)
        ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        q = ref.shape[1]
        total = past - lay.idx.shape[1] + lay.length + q  # length of the uncompressed sequence so far
        am = kw.get("attention_mask")
        if am is not None and am.dim() == 2 and am.shape[1] == total:
            new["attention_mask"] = lay.mask(am, total)
        elif am is None and lay.padded:
            new["attention_mask"] = lay.mask(None, total)
        pos = kw.get("position_ids")
        if pos is not None and pos.dim() == 3 and pos.shape[0] == 4 and bool(lay.removed.any()):
            pos = pos.clone()
            pos[0] -= lay.removed.to(pos.device).unsqueeze(1)
            new["position_ids"] = pos
        return new


@torch.no_grad()
def vision_scores(visual: torch.nn.Module, attn: torch.nn.Module, cap: dict[str, Any],
                  grid: torch.Tensor) -> list[torch.Tensor]:
    """Per-item [N_i] importance of the tokens entering the LLM: mean attention each patch receives in the last
    vision block (over heads and all queries of its attention segment), averaged over the patches of each merged
    token. Recomputed from the block's q/k with their rotary embedding, so SDPA/FlashAttention models need no eager
    attention. Qwen2.5-VL's window permutation is undone.

    Args:
        visual: the vision tower.
        attn: its last block's attention module.
        cap: the attention call's `hidden_states` [S, C], `cu_seqlens` [segments + 1], `position_embeddings` (cos, sin).
        grid: [items, 3] (t, h, w) patch grids.
    """
    x = cap["hidden_states"]
    S = x.shape[0]
    q, k, _ = attn.qkv(x).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # each [S, H, D]
    host = sys.modules[type(attn).__module__]
    if cap.get("position_embeddings") is not None:
        cos, sin = cap["position_embeddings"]
        q, k = host.apply_rotary_pos_emb_vision(q, k, cos, sin)
    cu = cap["cu_seqlens"].tolist()
    parts = []
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        qs, ks = q[s:e].transpose(0, 1).unsqueeze(0), k[s:e].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        parts.append(attention_row_scores(qs, ks, torch.arange(e - s, device=x.device), scale=attn.scaling)[0])
    m = visual.spatial_merge_size
    u = torch.cat(parts).view(-1, m * m).mean(1)  # [S / m^2] per merged token, in the blocks' order
    if hasattr(visual, "window_size"):  # Qwen2.5-VL: blocks run in a window-permuted order of merged tokens
        vmod = sys.modules[type(visual).__module__]
        window_index, _ = vmod.get_vision_window_index(grid, spatial_merge_size=m, window_size=visual.window_size,
                                                       patch_size=visual.patch_size)
        u = u[torch.argsort(window_index.to(u.device))]
    return list(torch.split(u, (grid.prod(-1) // m**2).tolist()))


def _grid_from_positions(p: torch.Tensor) -> tuple[int, ...]:
    """(t, h, w) grid of one item from its M-RoPE ids p [3, N] (row-major t, h, w; t may be scaled by fps)."""
    t = int(p[0].unique().numel())
    h = int(p[1].max() - p[1].min()) + 1
    w = int(p[2].max() - p[2].min()) + 1
    if t * h * w != p.shape[1]:
        return (p.shape[1],)  # not a full grid (custom positions): compress it as a 1D sequence
    return (t, h, w)


def _pooled(items: list[torch.Tensor]) -> Any:
    """Encoder output holding per-item features, in the form `Qwen2VLModel.forward(mm_encoder_outputs=)` reads."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=tuple(items))


def _pad_id(cfg: Any) -> int:
    """A token id for padding columns (masked out anyway): the pad token, else 0."""
    for c in (getattr(cfg, "text_config", None), cfg):
        pid = getattr(c, "pad_token_id", None) if c is not None else None
        if isinstance(pid, int):
            return pid
    return 0
