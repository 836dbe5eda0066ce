"""The result type every compressor returns (DESIGN §3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompressOutput:
    """Compressed tokens plus the provenance needed to undo, weight or place them.

    Attributes:
        x: [B, M, C] compressed tokens: prefix first, then kept/merged tokens in the order of their
            representative input token.
        assign: [B, N] int64 output slot of every input token, -1 if the token was dropped.
        size: [B, M] float32, how many input tokens each output token stands for (0 on padded slots).
        mask: [B, M] bool valid slots when samples got different budgets; None when all budgets are equal.
        pos: [B, M, len(grid)] int64 grid coordinate of each output token's representative input token
            (-1 for prefix tokens and padded slots); None when no grid was given.
        rep: [B, M] int64 index of the representative input token of each slot (-1 on padded slots).
        order: [B, M] int64 permutation of the slots: `x[b, order[b]]` is the sequence the method's authors' release
            hands the LLM (e.g. VisionZip: dominant tokens, then contextual ones; PruMerge: kept tokens by descending
            score, then the pruned tokens' summary). None: source order (the order of `x`). Padded slots come last.
            `ordered()` applies it. `x`, `assign`, `size`, `pos`, `rep` stay in source order whatever `order` says.
    """

    x: torch.Tensor
    assign: torch.Tensor
    size: torch.Tensor
    mask: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    rep: torch.Tensor | None = None
    order: torch.Tensor | None = None

    @property
    def counts(self) -> torch.Tensor:
        """[B] number of valid output tokens per sample (prefix included)."""
        if self.mask is None:
            return torch.full((self.x.shape[0],), self.x.shape[1], dtype=torch.long, device=self.x.device)
        return self.mask.sum(1)

    def unmerge(self) -> torch.Tensor:
        """[B, N, C] reconstruction of the inputs: each input token gets its slot's value, dropped ones 0."""
        B, N = self.assign.shape
        idx = self.assign.clamp(min=0)
        out = torch.gather(self.x, 1, idx.unsqueeze(-1).expand(B, N, self.x.shape[-1]))
        return out * (self.assign >= 0).unsqueeze(-1).to(out.dtype)

    def ordered(self) -> torch.Tensor:
        """[B, M, C] the output tokens in the order the method hands them to the LLM (`order`; source order if None)."""
        if self.order is None:
            return self.x
        B, M, C = self.x.shape
        if self.x.is_contiguous():  # row copies through index_select: several times faster on CPU than gather
            flat = (self.order + torch.arange(B, device=self.order.device).unsqueeze(1) * M).reshape(-1)
            return self.x.reshape(B * M, C).index_select(0, flat).view(B, M, C)
        return torch.gather(self.x, 1, self.order.unsqueeze(-1).expand(B, M, C))
