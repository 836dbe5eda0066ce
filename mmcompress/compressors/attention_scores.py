"""Attention-row scores for attention-based compressors, without eager attention (SDPA/FlashAttention models).

Methods such as `visionzip` and `prumerge` rank tokens by a row of an attention map: the CLS row, or the mean of the
rows of a set of text queries. Models that run SDPA or FlashAttention never materialise that map, and asking them for
it (`output_attentions=True`) switches the whole model to the slow eager path. Here the needed rows are recomputed
from the layer's queries and keys:

    scores[b, j] = mean over heads h and query rows r of softmax_j(q[b, h, r] . k[b, h, j] * scale)

in O(R·N) extra memory per row chunk (R query rows, chunked so a chunk never exceeds `chunk` rows; the N x N map is
never formed); on CUDA (or with MMCOMPRESS_KERNELS=triton) a fused Triton kernel (kernels/attention_rows.py) keeps
the rows in registers. `QKCapture` grabs q and k of one Hugging Face attention layer with forward hooks on its q/k
Linear modules, so callers need not set output_attentions=True.

Letters: B batch, H heads, N tokens (keys), R query rows, D head dim, C = H * D channels.

Caveat: the hooks see the Linear outputs, i.e. q and k BEFORE any rotary embedding. That is exact for ViTs with
learned/absolute positions (CLIP, SigLIP, DINOv2, Whisper encoder); for RoPE layers (Qwen2-VL vision) apply the
rotation to the captured tensors before calling `attention_row_scores`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mmcompress.compressors.base import EncoderNeeds
from mmcompress.kernels.attention_rows import attention_rows

__all__ = ["attention_row_scores", "received_row_scores", "encoder_signals", "QKCapture", "QKCaptures",
           "find_qk_linears"]


def _heads(t: torch.Tensor, name: str, num_heads: int | None) -> torch.Tensor:
    """[B, H, N, D] or [B, N, C] (with num_heads) -> [B, H, N, D]."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating point tensor, got dtype {t.dtype}")
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        if num_heads is None:
            raise ValueError(f"{name}: a [B, N, C] tensor needs num_heads= to split C into heads")
        B, N, C = t.shape
        if C % num_heads:
            raise ValueError(f"{name}: C = {C} is not divisible by num_heads = {num_heads}")
        return t.view(B, N, num_heads, C // num_heads).transpose(1, 2)
    raise ValueError(f"{name}: expected shape [B, H, N, D] or [B, N, C], got {tuple(t.shape)}")


def _rows(rows: int | Sequence[int] | torch.Tensor, B: int, Nq: int, device: torch.device) -> torch.Tensor:
    """-> [B, R] int64 query-row indices."""
    if isinstance(rows, bool):
        raise TypeError("rows: expected an int, a sequence of ints or an int64 tensor, got a bool")
    if isinstance(rows, int):
        r = torch.tensor([rows], device=device)
    elif isinstance(rows, torch.Tensor):
        if rows.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"rows: expected an integer tensor, got dtype {rows.dtype}")
        r = rows.to(device=device, dtype=torch.long)
    elif isinstance(rows, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in rows):
        r = torch.tensor(list(rows), dtype=torch.long, device=device)
    else:
        raise TypeError(f"rows: expected an int, a sequence of ints or an int64 tensor, got {type(rows).__name__}")
    if r.dim() == 1:
        r = r.unsqueeze(0).expand(B, -1)
    if r.dim() != 2 or r.shape[0] != B or r.shape[1] == 0:
        raise ValueError(f"rows: expected [R] or [B, R] with B = {B} and R >= 1, got shape {tuple(r.shape)}")
    r = torch.where(r < 0, r + Nq, r)
    if bool(((r < 0) | (r >= Nq)).any()):
        raise ValueError(f"rows: indices must lie in [-{Nq}, {Nq}) (the query length), got {rows!r}")
    return r


@torch.no_grad()
def attention_row_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: int | Sequence[int] | torch.Tensor = 0,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    chunk: int = 64,
) -> torch.Tensor:
    """Softmax attention rows of selected queries, averaged over heads and over the selected rows.

    Args:
        q: [B, H, Nq, D] queries, or [B, Nq, H*D] with `num_heads`.
        k: [B, Hk, N, D] keys, or [B, N, Hk*D] with `num_kv_heads` (default `num_heads`); Hk must divide H
            (grouped-query attention: each key head serves H / Hk query heads).
        rows: query rows to score from: an int (e.g. 0 for CLS), a sequence of ints, or an int tensor [R] or [B, R]
            (e.g. the text-token positions); negative indices count from the end.
        num_heads: heads of q when q is [B, Nq, C].
        num_kv_heads: heads of k when k is [B, N, C]; default `num_heads`.
        scale: logit scale; default 1 / sqrt(D).
        key_mask: optional [B, N] bool, True for keys that may be attended (False: padding, gets score 0).
        chunk: query rows per chunk (peak extra memory B * H * chunk * N floats).

    Returns:
        [B, N] float32 scores: each selected row sums to 1 over the keys, so the result sums to 1 per sample.
    """
    q4 = _heads(q, "q", num_heads)
    k4 = _heads(k, "k", num_kv_heads if num_kv_heads is not None else num_heads)
    B, H, Nq, D = q4.shape
    Bk, Hk, N, Dk = k4.shape
    if Bk != B or Dk != D:
        raise ValueError(f"k: shape {tuple(k4.shape)} (as [B, H, N, D]) does not match q {tuple(q4.shape)}")
    if k4.device != q4.device:
        raise ValueError(f"k: is on {k4.device} but q is on {q4.device}")
    if H % Hk:
        raise ValueError(f"k: {Hk} key heads do not divide {H} query heads")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool or key_mask.shape != (B, N):
            raise ValueError(f"key_mask: expected a bool tensor [B, N] = [{B}, {N}]")
        if not bool(key_mask.any(1).all()):
            raise ValueError("key_mask: every sample needs at least one attendable key")
    s = (1.0 / math.sqrt(D)) if scale is None else float(scale)
    r = _rows(rows, B, Nq, q4.device)  # [B, R]
    R = r.shape[1]
    return attention_rows(q4, k4, r, s, key_mask, chunk).sum(1) / (H * R)  # [B, H, N] -> [B, N]; kernels/


@torch.no_grad()
def received_row_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    cls: bool,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    chunk: int = 64,
) -> torch.Tensor:
    """VisionTrim's DVTS score from q and k (the release's `0.5 * normalize(cls_attn) + 0.5 *
    normalize(avg_received_attn)` of the head-averaged eager map, without forming the map).

    Args:
        q: [B, H, N, D] queries, or [B, N, H*D] with `num_heads`.
        k: [B, Hk, N, D] keys, or [B, N, Hk*D] with `num_kv_heads` (default `num_heads`).
        cls: True when token 0 is a CLS: row = its attention row and the patches are tokens 1..N-1 (columns and
            queries); False: no CLS, row = the mean attention each token receives (all rows), patches = all tokens.
        num_heads: heads of q when q is [B, N, C].
        num_kv_heads: heads of k when k is [B, N, C]; default `num_heads`.
        chunk: query rows per chunk (peak extra memory B * H * chunk * N floats).

    Returns:
        [B, N] float32: over the patches, 0.5 * row / ||row|| + 0.5 * r / ||r||, r_j = sum over patch queries i != j
        of the head-averaged attention A[i, j]; the CLS column (cls=True) holds 0.
    """
    q4 = _heads(q, "q", num_heads)
    k4 = _heads(k, "k", num_kv_heads if num_kv_heads is not None else num_heads)
    B, H, N, D = q4.shape
    Hk = k4.shape[1]
    if k4.shape[0] != B or k4.shape[2] != N or k4.shape[3] != D or H % Hk:
        raise ValueError(f"k: shape {tuple(k4.shape)} (as [B, H, N, D]) does not match q {tuple(q4.shape)}")
    s = 1.0 / math.sqrt(D)
    p0 = 1 if cls else 0  # first patch token
    if p0 >= N:
        raise ValueError(f"q: {N} tokens leave no patch after the CLS")
    row = attention_row_scores(q4, k4, 0 if cls else torch.arange(N, device=q4.device))[:, p0:]  # [B, Np]
    kf = k4.float()
    recv = torch.zeros(B, N - p0, dtype=torch.float32, device=q4.device)  # [B, Np]
    for i in range(p0, N, chunk):
        r = min(chunk, N - i)
        qi = q4[:, :, i : i + r].float().reshape(B, Hk, (H // Hk) * r, D)  # query heads under their key head
        a = (torch.matmul(qi, kf.transpose(-1, -2)) * s).softmax(-1).view(B, H, r, N).mean(1)  # [B, r, N]
        a = a[:, :, p0:]  # [B, r, Np] patch columns
        recv += a.sum(1)
        own = torch.arange(r, device=q4.device)
        recv[:, i - p0 : i - p0 + r] -= a[:, own, own + i - p0]  # self-attention excluded
    out = 0.5 * torch.nn.functional.normalize(row, dim=-1) + 0.5 * torch.nn.functional.normalize(recv, dim=-1)
    return torch.nn.functional.pad(out, (p0, 0))


@torch.no_grad()
def encoder_signals(
    q: torch.Tensor,
    k: torch.Tensor,
    needs: EncoderNeeds,
    rows: int | Sequence[int] | torch.Tensor = 0,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scores and metric a compressor declared in its `EncoderNeeds`, from one block's captured q and k.

    Args:
        q: [B, N, C] query Linear outputs (C = H * D).
        k: [B, N, Ck] key Linear outputs (Ck = Hk * D).
        needs: the compressor's declaration (`heads`, `metric` are read here; `layer` chose the block).
        rows: query rows whose attention is averaged (0: CLS; all rows: mean attention received).
        num_heads: query heads H.
        num_kv_heads: key heads Hk (default H).

    Returns:
        scores [B, N] float32 (heads="mean": per-head softmax rows averaged over heads and rows; heads="single": one
        softmax over all C channels with scale C^-0.5, as PruMerge computes it; needs Ck = C; scores="row+received":
        `received_row_scores`, with a CLS when `rows` is 0), and metric [B, N, d] in k's dtype or None
        (metric="keys_mean": [B, N, D] keys averaged over heads; "keys": [B, N, Ck]).
    """
    Hk = num_kv_heads or num_heads
    if needs.scores == "row+received":
        if not (isinstance(rows, torch.Tensor) or rows == 0):
            raise ValueError(f"rows: scores='row+received' takes 0 (CLS row) or all rows (no CLS), got {rows!r}")
        scores = received_row_scores(q, k, not isinstance(rows, torch.Tensor), num_heads=num_heads,
                                     num_kv_heads=Hk)
    elif needs.heads == "single":
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"needs: heads='single' needs q and k of one width, got {q.shape[-1]} and {k.shape[-1]}")
        scores = attention_row_scores(q, k, rows, num_heads=1, scale=q.shape[-1] ** -0.5)
    else:
        scores = attention_row_scores(q, k, rows, num_heads=num_heads, num_kv_heads=Hk)
    metric = None
    if needs.metric == "keys_mean":
        B, N, Ck = k.shape
        metric = k.view(B, N, Hk, Ck // Hk).mean(2)  # [B, N, D]
    elif needs.metric == "keys":
        metric = k
    return scores, metric


def find_qk_linears(attn: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The query and key Linear modules of one attention layer (q_proj/k_proj, query/key, q/k, ...).

    Args:
        attn: an attention module, or a block containing exactly one attention module.

    Raises:
        ValueError: when no (or more than one) q/k pair is found; pass the attention module itself.
    """
    pairs = (("q_proj", "k_proj"), ("query", "key"), ("q", "k"), ("to_q", "to_k"), ("wq", "wk"))
    found = []
    for prefix, mod in attn.named_modules():
        for qn, kn in pairs:
            qm, km = getattr(mod, qn, None), getattr(mod, kn, None)
            if isinstance(qm, nn.Linear) and isinstance(km, nn.Linear):
                found.append((prefix, qm, km))
                break
    if len(found) != 1:
        where = [p or "<root>" for p, _, _ in found]
        raise ValueError(
            f"attn: expected one attention module with q/k Linear layers (q_proj/k_proj or query/key), found "
            f"{len(found)} {where}; pass that module itself (fused qkv projections are not supported)"
        )
    return found[0][1], found[0][2]


class QKCapture:
    """Capture q and k of one attention layer during a normal forward (any attention implementation).

    Example:
        >>> layer = model.encoder.layer[-1].attention
        >>> with QKCapture(layer, num_heads=6) as cap:
        ...     model(pixel_values)
        >>> scores = cap.scores(rows=0)          # [B, N] CLS attention row, heads averaged

    Args:
        attn: the attention module (or a block holding exactly one) whose q/k Linear modules are hooked.
        num_heads: query heads; default read from the module (`num_attention_heads`, `num_heads`, `config`).
        num_kv_heads: key heads (grouped-query attention); default read likewise, else `num_heads`.
    """

    def __init__(self, attn: nn.Module, num_heads: int | None = None, num_kv_heads: int | None = None):
        if not isinstance(attn, nn.Module):
            raise TypeError(f"attn: expected a torch.nn.Module, got {type(attn).__name__}")
        self.q_linear, self.k_linear = find_qk_linears(attn)
        self.num_heads = num_heads or self._read(attn, ("num_attention_heads", "num_heads", "n_heads"))
        if self.num_heads is None:
            raise ValueError("num_heads: could not read the head count from the module; pass num_heads=")
        self.num_kv_heads = num_kv_heads or self._read(attn, ("num_key_value_heads", "num_kv_heads")) or self.num_heads
        self.q: torch.Tensor | None = None  # [B, Nq, C]
        self.k: torch.Tensor | None = None  # [B, N, Ck]
        self._handles: list = []

    @staticmethod
    def _read(attn: nn.Module, names: tuple[str, ...]) -> int | None:
        for mod in attn.modules():
            for src in (mod, getattr(mod, "config", None)):
                for n in names:
                    v = getattr(src, n, None) if src is not None else None
                    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                        return v
        return None

    def __enter__(self) -> QKCapture:
        self.q = self.k = None

        def grab(which: str):
            def hook(_mod, _inp, out):
                setattr(self, which, out.detach())

            return hook

        self._handles = [self.q_linear.register_forward_hook(grab("q")),
                         self.k_linear.register_forward_hook(grab("k"))]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def scores(self, rows: int | Sequence[int] | torch.Tensor = 0, **kwargs) -> torch.Tensor:
        """[B, N] attention-row scores of the captured forward (see `attention_row_scores` for the options)."""
        if self.q is None or self.k is None:
            raise RuntimeError("QKCapture.scores: nothing captured; run the model's forward inside `with capture:`")
        return attention_row_scores(self.q, self.k, rows, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                    **kwargs)

    def signals(self, needs: EncoderNeeds, rows: int | Sequence[int] | torch.Tensor = 0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([B, N] scores, [B, N, d] metric or None) of the captured forward, as `needs` declares
        (see `encoder_signals`)."""
        if self.q is None or self.k is None:
            raise RuntimeError("QKCapture.signals: nothing captured; run the model's forward inside `with capture:`")
        return encoder_signals(self.q, self.k, needs, rows, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)


class QKCaptures:
    """`QKCapture` on several blocks at once, for a method whose `EncoderNeeds.layer` names S >= 2 blocks.

    Reads like one `QKCapture` (`q`, `k`, `num_heads` are the first block's), except that `signals` and `scores`
    return [B, N, S] scores, column s from block s (the first block's metric).

    Args:
        attns: the attention modules (or blocks holding exactly one), in the order of the score columns.
    """

    def __init__(self, attns: Sequence[nn.Module]):
        if len(attns) < 2:
            raise ValueError(f"attns: expected 2 or more attention modules, got {len(attns)} (use QKCapture)")
        self.caps = [QKCapture(a) for a in attns]

    def __getattr__(self, name: str):  # q, k, num_heads, num_kv_heads, ...: the first block's
        if name == "caps":
            raise AttributeError(name)
        return getattr(self.caps[0], name)

    def __enter__(self) -> QKCaptures:
        for c in self.caps:
            c.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for c in self.caps:
            c.__exit__(*exc)

    def scores(self, rows: int | Sequence[int] | torch.Tensor = 0, **kwargs) -> torch.Tensor:
        """[B, N, S] attention-row scores, one column per block."""
        return torch.stack([c.scores(rows, **kwargs) for c in self.caps], -1)

    def signals(self, needs: EncoderNeeds, rows: int | Sequence[int] | torch.Tensor = 0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([B, N, S] scores, the first block's [B, N, d] metric or None), as `needs` declares (`encoder_signals`)."""
        got = [c.signals(needs, rows) for c in self.caps]
        return torch.stack([s for s, _ in got], -1), got[0][1]
