"""Encoder memo of `mmcompress bench`: a batch's vision tower runs once per run, and later settings on the same
pixels get its output back, re-running only the tower blocks their method hooks.

Why: on the benchmark host the tower costs ~90 % of a question's compute and no compressor after it changes it, yet
every setting (method x budget) encodes the same images again. With the memo a setting pays the tower once per batch
and run; a method that reads the tower's attention (VisionZip, PruMerge, ...) hooks one or two blocks, and those
blocks alone are re-run from their recorded inputs, so the hooks see exactly the tensors of a full forward.

Exactness, by construction and tested (tests/test_encoder_memo.py: predictions with and without the memo are equal
for methods with and without encoder hooks):

- A hit needs the same pixels (a hash of every tensor argument's bytes, with shapes and dtypes) and the same
  non-tensor arguments.
- The tower runs in full whenever anything the memo cannot replay is present: a hook on the tower's embeddings,
  final norm or any module outside its blocks, an instance-level ``forward`` on any submodule (a ViT-internal merge),
  or a global module hook. Hooks on the tower module itself fire as usual (they wrap the memo).
- Hooks that transformers installs inside the forward and keeps (its lazy output-capture hooks) are learned as
  the tower's own, so they do not count as a method's.
- The stored output is a shallow copy taken before the caller sees it (LLaVA writes ``pooler_output`` on it).

Only ``predict`` batches use it; the interleaved timing (`mmcompress.evals.timing`) never does, so the time columns
always include a real encoder forward.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

__all__ = ["EncoderMemo"]


def _hooks(mod: nn.Module) -> set[int]:
    """Ids of the forward (pre-)hooks registered on `mod` itself."""
    return set(mod._forward_hooks) | set(mod._forward_pre_hooks)


def _key(args: tuple, kwargs: dict) -> tuple:
    """Identity of a tower call: each tensor's dtype, shape and bytes (hashed), every other argument's repr."""
    parts: list[Any] = []
    for k, v in [(i, a) for i, a in enumerate(args)] + sorted(kwargs.items()):
        if isinstance(v, torch.Tensor):
            t = v.detach().contiguous().cpu()
            raw = t.reshape(-1).view(torch.uint8)  # the bytes, whatever the dtype
            parts.append((k, str(t.dtype), tuple(t.shape), hashlib.blake2b(raw.numpy()).hexdigest()))
        else:
            parts.append((k, repr(v)))
    return tuple(parts)


def _nbytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages in `obj` (a block's input is the previous block's output: counted
    once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o, seen) for o in obj.values())
    return 0


def _copy(out: Any) -> Any:
    """A shallow copy of a tower output (a ``ModelOutput``, tuple or tensor): new container, the same tensors."""
    if isinstance(out, dict):  # ModelOutput is an OrderedDict
        return type(out)(**dict(out.items()))
    return out


class EncoderMemo:
    """Memo of one vision tower's forward, active inside ``with memo:`` (an instance-level ``forward``, removed on
    exit).

    Args:
        tower: The vision tower (e.g. LLaVA's ``vision_tower``).
        blocks: Its transformer blocks, in order (default: `mmcompress.hf.llava.vision_layers`).
        max_bytes: Memory for stored outputs and block inputs; the least recently used batches go first.
    """

    def __init__(self, tower: nn.Module, blocks: nn.ModuleList | None = None, max_bytes: int = 4 << 30) -> None:
        if not isinstance(tower, nn.Module):
            raise TypeError(f"tower: expected an nn.Module, got {type(tower).__name__}")
        if blocks is None:
            from mmcompress.hf.llava import vision_layers

            blocks = vision_layers(tower)
        self.tower, self.blocks, self.max_bytes = tower, list(blocks), int(max_bytes)
        block_mods = {id(m) for b in self.blocks for m in b.modules()}
        self._outside = [m for m in tower.modules() if m is not tower and id(m) not in block_mods]
        self._own: dict[int, set[int]] = {id(m): _hooks(m) for m in tower.modules()}  # hooks present at creation
        self._store: OrderedDict[tuple, tuple[Any, list[tuple[tuple, dict]], int]] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = self.bypassed = 0

    def __enter__(self) -> EncoderMemo:
        if "forward" in self.tower.__dict__:
            raise RuntimeError("EncoderMemo: the tower already has an instance-level forward")
        orig = self.tower.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._forward(orig, args, kwargs)

        self.tower.forward = forward
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tower.__dict__.pop("forward", None)

    def clear(self) -> None:
        self._store.clear()
        self._bytes = 0

    def _foreign(self, mod: nn.Module) -> bool:
        return bool(_hooks(mod) - self._own.get(id(mod), set()))

    def _replayable(self) -> bool:
        from torch.nn.modules import module as tmod

        if tmod._global_forward_hooks or tmod._global_forward_pre_hooks:
            return False
        if any("forward" in m.__dict__ for m in self.tower.modules() if m is not self.tower):
            return False
        return not any(self._foreign(m) for m in self._outside)

    def _forward(self, orig: Any, args: tuple, kwargs: dict) -> Any:
        if not self._replayable():
            self.bypassed += 1
            return orig(*args, **kwargs)
        key = _key(args, kwargs)
        hit = self._store.get(key)
        if hit is not None:
            self.hits += 1
            self._store.move_to_end(key)
            out, inputs, _ = hit
            for block, (a, kw) in zip(self.blocks, inputs, strict=True):
                if any(self._foreign(m) for m in block.modules()):
                    block(*a, **kw)  # fires the method's hooks on exactly the tensors of the full forward
            return _copy(out)
        self.misses += 1
        inputs: list[tuple[tuple, dict]] = []
        handles = [b.register_forward_pre_hook(lambda m, a, kw: inputs.append((a, dict(kw))), with_kwargs=True)
                   for b in self.blocks]
        before = {id(m): _hooks(m) for m in self.tower.modules()}
        try:
            out = orig(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for m in self.tower.modules():  # hooks the forward installed and kept (transformers' output capture)
            self._own.setdefault(id(m), set()).update(_hooks(m) - before.get(id(m), set()))
        if len(inputs) != len(self.blocks):  # a block ran twice or not at all: not replayable, do not store
            return out
        seen: set[int] = set()
        size = _nbytes(inputs, seen) + _nbytes(dict(out.items()) if isinstance(out, dict) else out, seen)
        if size <= self.max_bytes:
            self._store[key] = (_copy(out), inputs, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, _, s) = self._store.popitem(last=False)
                self._bytes -= s
        return out
