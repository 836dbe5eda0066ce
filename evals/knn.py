"""Encoder fidelity for `mmcompress bench`: DINOv2-S/14 k-NN accuracy on Fashion-MNIST with compressed tokens.

    mmcompress bench --model dinov2-s14 --task knn --methods tome,adaptive,divprune --keep 0.5,0.25,0.125 --limit 500

The patch tokens after encoder layer ``layer`` (default 6 of 12; ``--option <method>:layer=12`` compresses the final
tokens instead) are compressed (CLS passed through as prefix; grid = the patch grid), the remaining layers run on the
compressed sequence with proportional attention (log size added to the attention logits, as ToMe does), and the
image feature is the size-weighted mean of the output patch tokens after the final layer norm. A test image's label
is the majority vote of its k = 10 most cosine-similar train images (`mmcompress.zoo.metrics.knn_predict`; ties:
larger summed similarity); train images go through the same compression. Inputs the methods need: ``scores`` = the
CLS attention row of layer ``layer`` (heads averaged, from q/k, no eager attention); ``text`` = the CLS token of that
layer (DINOv2 has no text tower: the CLS is the global query in the tokens' space).

Subsets: ``numpy.random.default_rng(seed).permutation`` of each split, first ``n`` indices, sorted: test images
``limit`` (the bench's ``--limit``), train bank ``n_train`` (1,000). Images are upsampled to ``size`` px (112: 8 x 8
patches; 224: 16 x 16).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from mmcompress.evals.tasks import Sample, Task, register_task

__all__ = ["KNNTask", "EncoderBackend", "load_backend", "fmnist_subset", "extract", "CLASSES"]

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
MID = 6  # default: compress after this many of DINOv2-S's 12 layers


def fmnist_subset(n_train: int, n_test: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Seeded Fashion-MNIST subsets: ``{"train"|"test": (images [n, 28, 28] uint8, labels [n], indices [n])}``."""
    from mmcompress.zoo.data import load_fashion_mnist

    out = {}
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        img, lab = load_fashion_mnist(split)
        idx = np.sort(rng.permutation(len(lab))[:n])
        out[split] = (img[idx], lab[idx], idx)
    return out


@register_task("knn")
class KNNTask(Task):
    """Fashion-MNIST 10-NN classification with encoder features (see the module docstring)."""

    modality = "encoder"
    default_split = "test"
    max_new_tokens = 0

    def __init__(self, n_train: int = 1000) -> None:
        self.n_train = n_train

    def samples(self, data=None, split=None, limit=None, seed=0, skip_bad=False) -> list[Sample]:
        if data is not None:
            raise ValueError("data: knn reads the Debian dataset-fashion-mnist files; do not pass --data")
        n_test = 10_000 if limit is None else int(limit)
        sub = fmnist_subset(self.n_train, n_test, seed)
        imgs, labels, idx = sub["test"]
        bank = {"n_train": self.n_train, "seed": seed}
        return [Sample(id=f"test/{int(i)}", prompt="", answer=CLASSES[int(y)], image=im,
                       meta={"label": int(y), "bank": bank}) for im, y, i in zip(imgs, labels, idx, strict=True)]

    def score(self, prediction, sample):
        return {"score": float(prediction == sample.answer)}


def extract(model: Any, proc: Any, images: np.ndarray, layer: int, batch: int = 32) -> dict[str, Any]:
    """Tokens after `layer` ([n, 1 + N, C]) and the CLS attention row of that layer ([n, 1 + N]), grayscale images
    [n, H, W] uint8 converted to RGB and resized by `proc`."""
    import torch
    from PIL import Image

    from mmcompress.compressors.attention_scores import QKCapture

    layers = model.encoder.layer
    if not 1 <= layer <= len(layers):
        raise ValueError(f"layer: expected 1..{len(layers)}, got {layer}")
    toks, scores = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            px = proc([Image.fromarray(im).convert("RGB") for im in images[i : i + batch]])["pixel_values"]
            with QKCapture(layers[layer - 1].attention) as cap:
                out = model(pixel_values=px, output_hidden_states=True)
            toks.append(out.hidden_states[layer])
            scores.append(cap.scores(0))
    return {"x": torch.cat(toks), "scores": torch.cat(scores)}


def _run_rest(model: Any, x: Any, size: Any, mask: Any, layer: int) -> Any:
    """Layers after `layer` and the final norm on compressed tokens with proportional attention. [B, M, C]."""
    import torch

    logw = size.clamp(min=1e-6).log()
    if mask is not None:
        logw = logw.masked_fill(~mask, float("-inf"))
    bias = logw[:, None, None, :].to(x.dtype)  # [B, 1, 1, M] added to every query row
    h = x
    with torch.inference_mode():
        for blk in model.encoder.layer[layer:]:
            h = blk(h, attention_mask=bias)
            h = h[0] if isinstance(h, tuple) else h
        return model.layernorm(h)


class EncoderBackend:
    """DINOv2 features under a compression setting, classified by k-NN against an equally compressed train bank."""

    def __init__(self, model: Any, proc: Any, k: int = 10) -> None:
        self.model, self.proc, self.k = model, proc, k
        self.method, self.keep, self.options = "none", 1.0, {}
        self._tokens: dict[tuple, dict[str, Any]] = {}  # (layer, bank) -> uncompressed bank tokens (once)
        self._bank_feats: dict[tuple, Any] = {}  # (method, keep, options, bank) -> compressed bank features

    def configure(self, method: str, keep: float | int | str, options: dict[str, Any] | None = None) -> None:
        import mmcompress as mmc

        options = dict(options or {})
        layer = int(options.pop("layer", MID))
        if method != "none":
            mmc.create(method, keep=keep, **options)  # bad names/options fail here, before any work
        self.method, self.keep, self.layer, self.options = method, keep, layer, options

    def _features(self, toks: dict[str, Any]) -> tuple[Any, float, list[int]]:
        """(features [n, C], compress seconds, tokens per image) of extracted tokens under the current setting."""
        import mmcompress as mmc

        x, scores = toks["x"], toks["scores"]
        B, N1, _ = x.shape
        g = int(round((N1 - 1) ** 0.5))
        grid = (g, g) if g * g == N1 - 1 else None
        t0 = time.perf_counter()
        if self.method == "none":
            import torch

            cx, size, mask = x, torch.ones(B, N1), None
        else:
            comp = mmc.create(self.method, keep=self.keep, **self.options)
            needs = mmc.get(self.method).needs
            kw: dict[str, Any] = {"prefix": 1, "grid": grid}
            if "scores" in needs:
                kw["scores"] = scores
            if "text" in needs:
                kw["text"] = x[:, 0]
            out = comp(x, **kw)
            cx, size, mask = out.x, out.size, out.mask
        dt = time.perf_counter() - t0
        h = _run_rest(self.model, cx, size, mask, self.layer)
        w = size[:, 1:] * (mask[:, 1:] if mask is not None else 1)
        feat = (h[:, 1:].float() * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)  # [B, C]
        n_tok = (mask.sum(1) - 1).tolist() if mask is not None else [int(cx.shape[1]) - 1] * B
        return feat, dt, n_tok

    def predict(self, samples: Sequence[Sample], max_new_tokens: int = 0) -> list[dict[str, Any]]:
        import torch

        bank = samples[0].meta["bank"]
        bkey = (self.layer, bank["n_train"], bank["seed"])
        if bkey not in self._tokens:
            tr_img, tr_lab, _ = fmnist_subset(bank["n_train"], 1, bank["seed"])["train"]
            self._tokens[bkey] = {**extract(self.model, self.proc, tr_img, self.layer),
                                  "labels": torch.from_numpy(tr_lab)}
        from mmcompress.zoo.metrics import knn_predict

        fkey = (self.method, str(self.keep), tuple(sorted(self.options.items())), bkey)
        if fkey not in self._bank_feats:
            self._bank_feats[fkey] = self._features(self._tokens[bkey])[0]
        t0 = time.perf_counter()
        toks = extract(self.model, self.proc, np.stack([s.image for s in samples]), self.layer)
        t_enc = time.perf_counter() - t0
        feats, t_comp, n_tok = self._features(toks)
        t_rest = time.perf_counter() - t0 - t_enc - t_comp
        bank = self._bank_feats[fkey]
        pred = knn_predict(bank, self._tokens[bkey]["labels"], feats, min(self.k, len(bank)))
        share = 1e3 / len(samples)
        return [{"prediction": CLASSES[int(p)], "tokens": int(n), "encode_ms": (t_enc + t_rest) * share,
                 "compress_ms": t_comp * share, "prefill_ms": 0.0, "decode_ms": 0.0, "peak_mem_mb": 0.0}
                for p, n in zip(pred.tolist(), n_tok, strict=True)]


def load_backend(model: str = "dinov2-s14", device: str = "cpu", dtype: str = "float32", size: int = 112,
                 ) -> EncoderBackend:
    """The encoder backend: ``dinov2-s14`` (built-in, offline) at `size` px."""
    if device != "cpu" or dtype != "float32":
        raise ValueError("device/dtype: the knn task runs DINOv2 in float32 on the CPU")
    if model != "dinov2-s14":
        raise ValueError(f"model: the knn task needs dinov2-s14, got {model!r}")
    from mmcompress import zoo
    from mmcompress.zoo.dinov2 import DinoImageProcessor

    m, _ = zoo.load("dinov2-s14")
    return EncoderBackend(m.eval(), DinoImageProcessor(size))
