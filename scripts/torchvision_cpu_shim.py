"""Let PyPI's CUDA-built torchvision import beside a CPU-only torch (a test/CI environment fix, not library code).

PyPI's torchvision 0.28.0 links CUDA libraries that the CPU torch wheel lacks, so its C extension does not load
and `import torchvision` dies registering a fake kernel for the missing `torchvision::nms` operator. Defining the
`nms`/`qnms` schemas (with a plain-PyTorch CPU nms) just before torchvision is first imported fixes the import.

`make test` installs this module plus a one-line .pth file into the virtualenv ONLY when that import failure is
detected; users with a matching torchvision never load it. The .pth adds a meta-path finder that does nothing
until `torchvision` is imported, so interpreter start-up stays cheap (torch is not imported early).
"""

from __future__ import annotations

import sys


def _define_ops() -> None:
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018  (defined already: the real extension loaded)
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

    def nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
        """Greedy non-maximum suppression over [K, 4] boxes (x1, y1, x2, y2); indices kept, by score."""
        if dets.numel() == 0:
            return torch.empty(0, dtype=torch.long, device=dets.device)
        x1, y1, x2, y2 = dets.unbind(1)
        area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
        alive = torch.ones(dets.shape[0], dtype=torch.bool, device=dets.device)
        kept = []
        for i in scores.argsort(descending=True).tolist():
            if not alive[i]:
                continue
            kept.append(i)
            iw = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
            ih = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
            inter = iw * ih
            alive &= inter / (area[i] + area - inter) <= iou_threshold
        return torch.tensor(kept, dtype=torch.long, device=dets.device)

    lib.impl("nms", nms, "CPU")
    globals()["_LIB"] = lib  # the Library must stay alive


class _BeforeTorchvision:
    """Meta-path finder that defines the ops once, right before torchvision is imported, then leaves."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _define_ops()
        return None


def install() -> None:
    """Register the finder (idempotent)."""
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
