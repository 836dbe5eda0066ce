"""The compressor contract (DESIGN §3): input checks, budgets, prefix handling, ragged batches, result assembly.

A method implements one function, `plan(inp, k)`, that decides which input tokens go to which of `k` output slots
for a batch whose samples all get the same budget. Everything else is done here once for every method.

Letters: B batch, N tokens in (N' without the prefix), M tokens out, C channels, L text length.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from mmcompress.compressors.budget import estimate_keep
from mmcompress.compressors.merge_ops import gather_tokens, grid_coords, segment_mean, segment_sum
from mmcompress.types import CompressOutput


def checks_enabled() -> bool:
    """Whether the finiteness checks on x and on the optional tensors run (off with MMCOMPRESS_CHECKS=0)."""
    return os.environ.get("MMCOMPRESS_CHECKS", "1").strip().lower() not in ("0", "false", "off", "no")


@dataclass(frozen=True)
class EncoderNeeds:
    """What a compressor asks `mmcompress.apply` to read off the encoder for it: the ONE place where a method declares
    which signals its authors' release uses, so that every integration hands it those and not an approximation.

    A compressor class sets `encoder_needs = EncoderNeeds(...)`; model adapters read it and provide `scores=` (when
    "scores" is in `needs`), `metric=` (when `metric` is set) and the CLS prefix (when `cls_prefix`), all recomputed
    from the hooked q/k Linear outputs of one encoder block (no eager attention: SDPA/FlashAttention models keep their
    fast path; `attention_scores.encoder_signals` does the arithmetic). The default reproduces what every integration
    gave before: the head-averaged CLS row of the block that outputs the selected features, no metric.

    Attributes:
        layer: which block's attention is read: "feature" (the block whose output is the features handed to the LLM,
            e.g. LLaVA's `vision_feature_layer`; VisionZip), "last" (the tower's last block; PruMerge), or an int
            index into the blocks (negative from the end). A tuple of S >= 2 of these asks for S rows: `scores=` is
            then [B, N, S], column s read at block `layer[s]` (TRIO's encoder stage: a shallow and a deep block),
            and `metric` comes from `layer[0]`. Integrations that read one block only refuse such a method.
        heads: "mean": per-head softmax rows averaged over heads (VisionZip sums them: same ranking); "single": one
            head over all channels, softmax(q . k / sqrt(C)) with C the full width (PruMerge).
        metric: similarity features handed as `metric=`: None (the compressor compares `x`), "keys_mean" (the
            block's keys averaged over heads, [N, C / H]; VisionZip) or "keys" (all channels, [N, C]; PruMerge).
            Keys are the k Linear's outputs (bias included), before any scaling.
        cls_prefix: True when the release hands the LLM the tower's CLS token too (VisionZip counts it as a dominant
            token): where the selected features drop the CLS (LLaVA's "default" strategy), the integration puts the
            CLS of the same hidden state ahead of them as `prefix=1`. Pair with `Compressor.prefix_in_budget`.
        stage: where the method runs when the caller names no stage: None (the integration's default, before the
            projector), "projector" (after it, in the LLM's input space, as DyCoke does), or "pixels" (BEFORE the
            vision encoder: the method picks patches from the processor's pixels and the encoder runs on those
            only; `mmcompress.hf.pixels`, Qwen2/2.5/3-VL; PixelPrune).
        scores: what `scores=` holds: "row" (the CLS row, or without a CLS the mean attention each token receives)
            or "row+received" (VisionTrim's DVTS: 0.5 * row / ||row|| + 0.5 * r / ||r|| over the patches, r the
            attention each patch receives from the other patches, itself excluded; needs heads="mean").

    Integrations that cannot provide a signal say so (e.g. Qwen2-VL gives no `metric`: its keys are rotated), and
    the compressor falls back to what it documents (`x` for similarity).
    """

    layer: str | int | tuple[str | int, ...] = "feature"
    heads: str = "mean"
    metric: str | None = None
    cls_prefix: bool = False
    stage: str | None = None
    scores: str = "row"

    def __post_init__(self) -> None:
        if isinstance(self.layer, list):
            object.__setattr__(self, "layer", tuple(self.layer))
        many = isinstance(self.layer, tuple)
        for one in self.layer if many else (self.layer,):
            is_int = isinstance(one, int) and not isinstance(one, bool)
            if not (is_int or one in ("feature", "last")):
                raise ValueError(f"layer: expected 'feature', 'last', an int block index or a tuple of them, got "
                                 f"{self.layer!r}")
        if many and len(self.layer) < 2:
            raise ValueError(f"layer: a tuple names 2 or more blocks (one block: pass it alone), got {self.layer!r}")
        if self.heads not in ("mean", "single"):
            raise ValueError(f"heads: expected 'mean' or 'single', got {self.heads!r}")
        if self.metric not in (None, "keys_mean", "keys"):
            raise ValueError(f"metric: expected None, 'keys_mean' or 'keys', got {self.metric!r}")
        if self.stage not in (None, "vision", "projector", "pixels"):
            raise ValueError(f"stage: expected None, 'vision', 'projector' or 'pixels', got {self.stage!r}")
        if self.scores not in ("row", "row+received"):
            raise ValueError(f"scores: expected 'row' or 'row+received', got {self.scores!r}")
        if self.scores == "row+received" and self.heads != "mean":
            raise ValueError(f"scores: 'row+received' averages the heads; needs heads='mean', got {self.heads!r}")

    @property
    def layers(self) -> tuple[str | int, ...]:
        """The blocks read, in the order of the score columns (one block: a 1-tuple)."""
        return self.layer if isinstance(self.layer, tuple) else (self.layer,)


@dataclass
class Inputs:
    """Checked inputs of one call, with the prefix split off.

    Attributes:
        x: [B, N', C] tokens to compress (prefix removed).
        size: [B, N'] float32 sizes, or None when all ones.
        grid: grid of the N' tokens, or None.
        coords: [N', len(grid)] int64 coordinates, or None.
        text: [B, L, C] query embeddings (a [B, C] input becomes L = 1), or None.
        scores: [B, N'] importance ([B, N', S] for a method that reads S encoder blocks), or None.
        metric: [B, N', d] similarity features, or None.
        head: [B, P, C] the prefix tokens (kept as they are), or None when P = 0. A method may write them into its
            output itself (`Plan.x_head`), which saves the base class a copy of the whole output.
    """

    x: torch.Tensor
    size: torch.Tensor | None = None
    grid: tuple[int, ...] | None = None
    coords: torch.Tensor | None = None
    text: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    metric: torch.Tensor | None = None
    head: torch.Tensor | None = None

    @property
    def sim(self) -> torch.Tensor:
        """[B, N', d] features to compare tokens by: `metric` if given, else `x`."""
        return self.x if self.metric is None else self.metric

    def sizes(self) -> torch.Tensor:
        """[B, N'] float32 sizes (ones when none were given)."""
        if self.size is not None:
            return self.size
        return torch.ones(self.x.shape[:2], dtype=torch.float32, device=self.x.device)

    def take(self, rows: torch.Tensor) -> Inputs:
        """The sub-batch at batch indices `rows`."""

        def pick(t):
            return None if t is None else t.index_select(0, rows)

        return Inputs(pick(self.x), pick(self.size), self.grid, self.coords, pick(self.text), pick(self.scores),
                      pick(self.metric), pick(self.head))


@dataclass
class Plan:
    """What a method decided for a batch with budget k.

    Attributes:
        assign: [B, N'] int64 slot in [0, M) of each token, -1 if dropped. Slot numbering may be arbitrary.
        rep: [B, M] int64 representative input token of each slot (a member of it); slots are put in rep order.
        x: optional [B, M, C] output tokens, for methods whose outputs are not size-weighted means of members.
        size: optional [B, M] float32 sizes when they are not the sums of member sizes.
        x_head: True when `x` is [B, P + M, C] and already starts with the P prefix tokens (`Inputs.head`).
        order: optional [B, M] int64 slot ids (the plan's numbering) in the order the method hands them to the LLM
            (becomes `CompressOutput.order`, prefix first); None: source order.
        probe: optional tensor computed from EVERY element of `Inputs.x` (e.g. the norms of all its tokens), so that
            NaN/inf in x show in it: for a class with `check_in_plan`, the finiteness check reads it instead of
            making its own pass over x. None: the check reads x.
    """

    assign: torch.Tensor
    rep: torch.Tensor
    x: torch.Tensor | None = None
    size: torch.Tensor | None = None
    x_head: bool = False
    order: torch.Tensor | None = None
    probe: torch.Tensor | None = None


def _check_keep(keep: Any) -> int | float | str:
    if isinstance(keep, bool) or not isinstance(keep, (int, float, str)):
        raise TypeError(f"keep: expected an int, a float in (0, 1] or 'auto', got {type(keep).__name__} {keep!r}")
    if isinstance(keep, str):
        if keep != "auto":
            raise ValueError(f"keep: the only string accepted is 'auto', got {keep!r}")
        return keep
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"keep: an int budget must be >= 1 token, got {keep}")
        return keep
    if not (0.0 < keep <= 1.0) or math.isnan(keep):
        raise ValueError(f"keep: a float budget is a fraction in (0, 1], got {keep}")
    return keep


def _check_tensor(name: str, t: Any, x: torch.Tensor, shapes: list[tuple], what: str) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name}: is on {t.device} but x is on {x.device}; move both to one device")
    for shape in shapes:
        if t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape, strict=True)):
            return t
    raise ValueError(f"{name}: expected shape {what}, got {tuple(t.shape)}")


def _check_finite(x: torch.Tensor, probe: torch.Tensor) -> None:
    """Raise if x holds NaN or inf. `probe` is x, or an output every token of x reached with a positive weight.

    One cheap reduction: NaN/inf propagate through the sum; only when it is not finite does the exact check on x
    run (a finite x whose sum overflows passes).
    """
    if not bool(torch.isfinite(probe.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError("x: contains NaN or inf (set MMCOMPRESS_CHECKS=0 to skip this check)")


def _check_finite_args(named: list[tuple[str, torch.Tensor | None]]) -> None:
    """Raise naming the first of the given optional tensors (text, scores, metric) that holds NaN or inf.

    One sum per tensor and ONE device sync for all of them: NaN/inf propagate through a sum; only when a sum is not
    finite does the exact check of that tensor run (a finite tensor whose sum overflows passes).
    """
    named = [(n, t) for n, t in named if t is not None and t.numel()]
    if not named:
        return
    sums = torch.stack([t.sum(dtype=torch.float32) if t.is_floating_point() else t.sum().float() for _, t in named])
    if bool(torch.isfinite(sums).all()):
        return
    for n, t in named:
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{n}: contains NaN or inf (set MMCOMPRESS_CHECKS=0 to skip this check)")


class Compressor:
    """Base class of every compressor. Subclasses set the class facts and implement `plan`.

    Args:
        keep: tokens out per sample (int, prefix not counted), fraction of the non-prefix tokens in (0, 1]
            (rounded, at least 1), or "auto" (per-sample budget from the method's adaptive rule).
        epsilon: target relative reconstruction error used by keep="auto" (see `adaptive`).
    """

    name: str = ""
    family: str = ""
    modality: str = "any"
    needs: tuple[str, ...] = ()
    #: True when each output token is the size-weighted mean of the inputs assigned to it.
    exact_mean: bool = True
    #: True when every slot holds exactly one input token (outputs are then gathered, not averaged).
    select_only: bool = False
    #: True when every input token reaches some output with a positive weight (nothing is dropped), so NaN/inf in x
    #: always shows in the output: the finiteness check then reads the output (smaller, and still in cache) instead
    #: of making its own pass over x.
    check_output: bool = False
    #: True when `plan` may return `Plan.probe` (a reduction it computes over every element of x anyway): the
    #: finiteness check then reads the probe (and the prefix) instead of making its own pass over x.
    check_in_plan: bool = False
    #: True when the prefix tokens count in `keep` (VisionZip counts the CLS as a dominant token): an int keep k gives
    #: k outputs in all (max(1, k - P) non-prefix ones), a float keep f gives round(f * N) in all (N prefix included).
    prefix_in_budget: bool = False
    #: What `apply` reads off the encoder for this method (scores' layer and head reduction, metric, CLS prefix).
    encoder_needs: EncoderNeeds = EncoderNeeds()

    def __init__(self, keep: int | float | str = 0.5, *, epsilon: float = 0.1):
        self.keep = _check_keep(keep)
        if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not 0 < epsilon < 1:
            raise ValueError(f"epsilon: expected a float in (0, 1), got {epsilon!r}")
        self.epsilon = float(epsilon)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, keep={self.keep!r})"

    # ---- to implement -------------------------------------------------------------------------------
    def plan(self, inp: Inputs, k: int) -> Plan:
        """Decide the k output slots for a batch whose samples all get budget k (1 <= k <= N')."""
        raise NotImplementedError

    def auto_keep(self, inp: Inputs) -> torch.Tensor:
        """[B] int64 per-sample budgets for keep="auto"; default: the `adaptive` estimator at `self.epsilon`."""
        return estimate_keep(inp, self.epsilon)

    # ---- the call -----------------------------------------------------------------------------------
    def __call__(
        self,
        x: torch.Tensor,
        *,
        grid: tuple[int, ...] | list[int] | None = None,
        prefix: int = 0,
        size: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
        metric: torch.Tensor | None = None,
    ) -> CompressOutput:
        """Compress x [B, N, C]; see DESIGN §3 for the arguments and `CompressOutput` for the result."""
        inp, head, head_size = self._inputs(x, grid, prefix, size, text, scores, metric)
        Nb = inp.x.shape[1]
        plan = None
        if self.keep == "auto":
            ks = self.auto_keep(inp).to(torch.long).clamp(1, Nb)
            if bool((ks == ks[0]).all()):
                plan = self._plan_checked(inp, int(ks[0]))
                out = self._finish(inp, plan, head, head_size)
            else:
                out = self._ragged(inp, ks, head, head_size)
        else:
            plan = self._plan_checked(inp, self._budget(Nb, head.shape[1]))
            out = self._finish(inp, plan, head, head_size)
        if self.check_output and checks_enabled():
            _check_finite(x, out.x)
        elif self.check_in_plan and checks_enabled():
            if plan is None or plan.probe is None:
                _check_finite(x, x)
            else:  # the probe covers the non-prefix tokens; the prefix is read directly
                _check_finite(x, plan.probe)
                _check_finite(x, head)
        return out

    def _budget(self, Nb: int, P: int = 0) -> int:
        """Non-prefix tokens out for a fixed keep (`prefix_in_budget`: the P prefix tokens count in keep)."""
        P = P if self.prefix_in_budget else 0
        if isinstance(self.keep, int):
            if self.keep > Nb + P:
                what = f"N = {Nb + P} tokens" if P else f"N - prefix = {Nb} tokens"
                raise ValueError(f"keep: {self.keep} tokens asked but x has only {what}")
            return max(1, self.keep - P)
        return max(1, min(Nb, round(self.keep * (Nb + P)) - P))

    def _plan_checked(self, inp: Inputs, k: int) -> Plan:
        Nb = inp.x.shape[1]
        if k >= Nb:  # identity: every token is its own slot
            B = inp.x.shape[0]
            idx = torch.arange(Nb, device=inp.x.device).expand(B, Nb)
            return Plan(assign=idx, rep=idx, x=inp.x)
        return self.plan(inp, k)

    def _inputs(self, x, grid, prefix, size, text, scores, metric):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor [B, N, C], got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating point tensor, got dtype {x.dtype}")
        if x.dim() != 3:
            raise ValueError(f"x: expected shape [B, N, C], got {tuple(x.shape)} (rank {x.dim()})")
        B, N, C = x.shape
        if B == 0 or N == 0 or C == 0:
            raise ValueError(f"x: is empty, shape {tuple(x.shape)}; need B, N, C >= 1")
        if isinstance(prefix, bool) or not isinstance(prefix, int):
            raise TypeError(f"prefix: expected an int, got {type(prefix).__name__}")
        if not 0 <= prefix < N:
            raise ValueError(f"prefix: expected 0 <= prefix < N = {N}, got {prefix}")
        Nb = N - prefix
        coords = None
        if grid is not None:
            if not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3 or not all(
                isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid
            ):
                raise ValueError(f"grid: expected (W,), (H, W) or (T, H, W) of positive ints, got {grid!r}")
            grid = tuple(grid)
            if math.prod(grid) != Nb:
                raise ValueError(f"grid: {grid} holds {math.prod(grid)} tokens but N - prefix = {N} - {prefix} = {Nb}")
            coords = grid_coords(grid, x.device)
        size = _check_tensor("size", size, x, [(B, N)], f"[B, N] = [{B}, {N}]")
        text = _check_tensor("text", text, x, [(B, None, C), (B, C)], f"[B, L, C] or [B, C] with B={B}, C={C}")
        S = len(self.encoder_needs.layers)  # score rows declared (one per encoder block read)
        scores = _check_tensor("scores", scores, x, [(B, N)] + ([(B, N, S)] if S > 1 else []),
                               f"[B, N] = [{B}, {N}]" + (f" or [B, N, S] = [{B}, {N}, {S}]" if S > 1 else ""))
        metric = _check_tensor("metric", metric, x, [(B, N, None)], f"[B, N, d] with B={B}, N={N}")
        for nm, t in (("text", text), ("metric", metric)):
            if t is not None and not t.is_floating_point():
                raise TypeError(f"{nm}: expected a floating point tensor, got dtype {t.dtype}")
        if text is not None and text.dim() == 2:
            text = text.unsqueeze(1)
        if text is not None and text.shape[1] == 0:
            raise ValueError("text: is empty (L = 0)")
        for need in self.needs:
            if need in ("text", "scores", "grid") and locals()[need] is None:
                raise ValueError(f"{need}: compressor {self.name!r} needs `{need}=` and did not get it")
        if checks_enabled():
            if not (self.check_output or self.check_in_plan):
                _check_finite(x, x)
            if size is not None and not bool(((size > 0) & torch.isfinite(size)).all()):
                raise ValueError("size: every entry must be finite and > 0")
            _check_finite_args([("text", text), ("scores", scores), ("metric", metric)])
        if scores is not None:
            scores = scores.float()
        if size is not None:
            size = size.float()
        head = x[:, :prefix]
        head_size = (
            torch.ones(B, prefix, dtype=torch.float32, device=x.device) if size is None else size[:, :prefix]
        )
        inp = Inputs(
            x=x[:, prefix:],
            size=None if size is None else size[:, prefix:],
            grid=grid,
            coords=coords,
            text=text,
            scores=None if scores is None else scores[:, prefix:],
            metric=None if metric is None else metric[:, prefix:],
            head=head if prefix else None,
        )
        return inp, head, head_size

    def _finish(self, inp: Inputs, plan: Plan, head: torch.Tensor, head_size: torch.Tensor) -> CompressOutput:
        x, P = inp.x, head.shape[1]
        B, Nb, C = x.shape
        M = plan.rep.shape[1]
        rep = plan.rep
        assign = plan.assign
        out_x, out_size = plan.x, plan.size
        seq = plan.order  # [B, M] slot ids in the method's output order, or None
        if plan.x_head and (out_x is None or out_x.shape[1] != P + M):
            raise RuntimeError(f"{self.name}: Plan.x_head needs x of [B, P + M] = [{B}, {P + M}] tokens")
        if M > 1 and not bool((rep[:, 1:] > rep[:, :-1]).all()):  # put slots in representative order
            order = rep.argsort(dim=1)
            inv = order.argsort(dim=1)
            rep = rep.gather(1, order)
            assign = torch.where(assign >= 0, inv.gather(1, assign.clamp(min=0)), assign)
            if seq is not None:
                seq = inv.gather(1, seq)
            if out_x is not None and plan.x_head:
                out_x = torch.cat([out_x[:, :P], gather_tokens(out_x[:, P:], order)], 1)
            elif out_x is not None:
                out_x = gather_tokens(out_x, order)
            if out_size is not None:
                out_size = out_size.gather(1, order)
        if out_x is None:
            if self.select_only:
                out_x = gather_tokens(x, rep)
            else:
                out_x = segment_mean(x, inp.size, assign, M)
        if out_size is None and self.select_only:  # one member per slot: its own size
            out_size = (torch.ones(B, M, dtype=torch.float32, device=x.device) if inp.size is None
                        else inp.size.gather(1, rep))
        elif out_size is None:
            out_size = segment_sum(inp.sizes(), assign, M).float()
        pos = None
        if inp.coords is not None:
            pos = inp.coords[rep]  # [B, M, len(grid)]
            if P:
                pos = torch.cat([pos.new_full((B, P, pos.shape[-1]), -1), pos], 1)
        if P:
            ar = torch.arange(P, device=x.device).expand(B, P)
            out = CompressOutput(
                x=out_x if plan.x_head else torch.cat([head, out_x], 1),
                assign=torch.cat([ar, torch.where(assign >= 0, assign + P, assign)], 1),
                size=torch.cat([head_size, out_size], 1),
                pos=pos,
                rep=torch.cat([ar, rep + P], 1),
                order=None if seq is None else torch.cat([ar, seq + P], 1),
            )
        else:
            out = CompressOutput(x=out_x, assign=assign, size=out_size, pos=pos, rep=rep, order=seq)
        return out

    def _ragged(self, inp: Inputs, ks: torch.Tensor, head: torch.Tensor, head_size: torch.Tensor) -> CompressOutput:
        """Samples with different budgets: plan each budget group, pad to the largest, set `mask`."""
        B, Nb, C = inp.x.shape
        P = head.shape[1]
        Mmax = int(ks.max()) + P
        dev = inp.x.device
        x = inp.x.new_zeros(B, Mmax, C)
        assign = torch.full((B, P + Nb), -1, dtype=torch.long, device=dev)
        size = torch.zeros(B, Mmax, dtype=torch.float32, device=dev)
        mask = torch.zeros(B, Mmax, dtype=torch.bool, device=dev)
        rep = torch.full((B, Mmax), -1, dtype=torch.long, device=dev)
        order = torch.arange(Mmax, device=dev).repeat(B, 1)  # padded slots keep their places, after the valid ones
        ordered = False
        pos = None if inp.coords is None else torch.full((B, Mmax, inp.coords.shape[1]), -1, dtype=torch.long,
                                                         device=dev)
        for k in torch.unique(ks).tolist():
            rows = (ks == k).nonzero().squeeze(1)
            sub = inp.take(rows)
            o = self._finish(sub, self._plan_checked(sub, int(k)), head.index_select(0, rows),
                             head_size.index_select(0, rows))
            m = o.x.shape[1]
            x[rows, :m] = o.x
            assign[rows] = o.assign
            size[rows, :m] = o.size
            mask[rows, :m] = True
            rep[rows, :m] = o.rep
            if o.order is not None:
                order[rows, :m] = o.order
                ordered = True
            if pos is not None:
                pos[rows, :m] = o.pos
        return CompressOutput(x=x, assign=assign, size=size, mask=mask, pos=pos, rep=rep,
                              order=order if ordered else None)
