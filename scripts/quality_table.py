"""Encoder-fidelity quality table: DINOv2-S/14 10-NN accuracy on Fashion-MNIST under every registered compressor.

    python scripts/quality_table.py                     # all compressors, keep 1, 0.5, 0.25, 0.125, settings (a)+(b)
    python scripts/quality_table.py --stages a --n-train 1000 --n-test 500

Fixed seeded subset of Fashion-MNIST (default 1,000 train / 500 test, seed 0), images upsampled to 224 px
(16 x 16 = 256 patch tokens + CLS). Features are cached under runs/quality/cache/ so reruns only redo compression.

(a) final layer: compress the 256 final-layer patch tokens (prefix = CLS untouched), kNN feature = size-weighted mean
    of the output patch tokens (`mean` column) and [CLS ; mean] with both parts L2-normalised (`cls+mean` column).
(b) inside the encoder: compress the patch tokens after layer 6 of 12, run layers 7-12 on the compressed sequence
    with proportional attention (log size added to the attention logits, as in ToMe) and the final layer norm, then
    the same two features. Train and test images go through the same compression.

Inputs the methods need: `scores` = CLS row of the attention of the layer whose output is compressed (layer 12 for
(a), layer 6 for (b)), heads averaged, computed with `mmcompress.compressors.attention_scores.QKCapture` (the model
runs SDPA; no output_attentions); `text` for text_recovery = the CLS token of the same layer (DINOv2 has no text
tower: the CLS embedding is the global query living in the tokens' space); `metric` = none (x itself).

Writes runs/quality/quality.csv and runs/quality/quality.md.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mmcompress as mmc  # noqa: E402
from mmcompress.compressors.attention_scores import QKCapture  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
MID = 6  # compress after this many layers in setting (b)


def load_fmnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, 28, 28] uint8, labels [n] int64) of the train or t10k split."""
    with gzip.open(FMNIST / f"{split}-images-idx3-ubyte.gz") as f:
        img = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST / f"{split}-labels-idx1-ubyte.gz") as f:
        lab = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return img, lab


def subset(n_train: int, n_test: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        img, lab = load_fmnist(split)
        idx = np.sort(rng.permutation(len(lab))[:n])
        out[split] = (img[idx], lab[idx])
    return out


def load_model():
    """(Dinov2Model, processor) from the zoo (`mmcompress.zoo.load` when present, else the dinov2 module)."""
    try:
        from mmcompress.zoo import load

        return load("dinov2-s14")
    except (ImportError, AttributeError):
        from mmcompress.zoo.dinov2 import load

        return load()


@torch.no_grad()
def extract(model, proc, images: np.ndarray, batch: int = 16) -> dict[str, torch.Tensor]:
    """Final tokens, layer-MID tokens and the CLS attention rows of layers 12 and MID."""
    from PIL import Image

    layers = model.encoder.layer
    fin, mid, s_fin, s_mid = [], [], [], []
    for i in range(0, len(images), batch):
        pil = [Image.fromarray(im).convert("RGB") for im in images[i : i + batch]]
        px = proc(pil)["pixel_values"]
        with QKCapture(layers[-1].attention) as c_last, QKCapture(layers[MID - 1].attention) as c_mid:
            o = model(pixel_values=px, output_hidden_states=True)
        fin.append(o.last_hidden_state)
        mid.append(o.hidden_states[MID])
        s_fin.append(c_last.scores(0))
        s_mid.append(c_mid.scores(0))
        print(f"  extracted {min(i + batch, len(images))}/{len(images)}", flush=True)
    return {"final": torch.cat(fin), "mid": torch.cat(mid), "s_final": torch.cat(s_fin), "s_mid": torch.cat(s_mid)}


def features(cls: torch.Tensor, out) -> tuple[torch.Tensor, torch.Tensor]:
    """(size-weighted mean of the output patch tokens, [CLS ; mean] normalised) from a CompressOutput (prefix 1)."""
    x, size = out.x[:, 1:].float(), out.size[:, 1:]
    if out.mask is not None:
        size = size * out.mask[:, 1:]
    mean = (x * size.unsqueeze(-1)).sum(1) / size.sum(1, keepdim=True)
    n = torch.nn.functional.normalize
    return mean, torch.cat([n(cls.float(), dim=-1), n(mean, dim=-1)], 1)


def knn_accuracy(train: torch.Tensor, ytr: torch.Tensor, test: torch.Tensor, yte: torch.Tensor, k: int = 10) -> float:
    """Cosine k-NN accuracy, majority vote (ties: larger summed similarity)."""
    n = torch.nn.functional.normalize
    sim = n(test, dim=-1) @ n(train, dim=-1).T  # [n_test, n_train]
    top = sim.topk(k, dim=1)
    lab = ytr[top.indices]  # [n_test, k]
    C = int(ytr.max()) + 1
    votes = torch.zeros(len(test), C).scatter_add_(1, lab, torch.ones_like(top.values))
    votes += 1e-3 * torch.zeros(len(test), C).scatter_add_(1, lab, top.values)
    return float((votes.argmax(1) == yte).float().mean())


def compress(name: str, keep, x: torch.Tensor, scores: torch.Tensor, batch: int = 64):
    """Run compressor `name` on x [B, 257, C] (prefix 1, grid 16 x 16) in batches; returns a list of outputs."""
    comp = mmc.create(name, keep=keep)
    needs = mmc.get(name).needs
    outs = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        kw = {"prefix": 1, "grid": (16, 16)}
        if "scores" in needs:
            kw["scores"] = scores[i : i + batch]
        if "text" in needs:
            kw["text"] = xb[:, 0]
        outs.append(comp(xb, **kw))
    return outs


@torch.no_grad()
def run_rest(model, out) -> torch.Tensor:
    """Layers MID+1..12 and the final norm on compressed tokens, proportional attention. Returns [B, M, C]."""
    h = out.x
    logw = out.size.clamp(min=1e-6).log()
    if out.mask is not None:
        logw = logw.masked_fill(~out.mask, float("-inf"))
    bias = logw[:, None, None, :].to(h.dtype)  # [B, 1, 1, M] added to every query row
    for layer in model.encoder.layer[MID:]:
        h = layer(h, attention_mask=bias)
        h = h[0] if isinstance(h, tuple) else h
    return model.layernorm(h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keeps", default="1,0.5,0.25,0.125")
    ap.add_argument("--stages", default="a,b")
    ap.add_argument("--b-keeps", default=None, help="keeps for stage (b) (default: --keeps)")
    ap.add_argument("--methods", default=None, help="comma list (default: every registered compressor)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "quality"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on busy CPUs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out_dir = Path(args.out)
    (out_dir / "cache").mkdir(parents=True, exist_ok=True)
    data = subset(args.n_train, args.n_test, args.seed)
    cache = out_dir / "cache" / f"dinov2_fmnist_{args.n_train}_{args.n_test}_{args.seed}.pt"
    model = None
    if cache.is_file():
        feats = torch.load(cache)
    else:
        model, proc = load_model()
        feats = {}
        for split in ("train", "t10k"):
            t = time.time()
            print(f"extracting {split} ({len(data[split][1])} images)", flush=True)
            feats[split] = extract(model, proc, data[split][0])
            print(f"  {time.time() - t:.0f}s", flush=True)
        torch.save(feats, cache)
    ytr, yte = torch.from_numpy(data["train"][1]), torch.from_numpy(data["t10k"][1])
    methods = args.methods.split(",") if args.methods else mmc.available()
    keeps = [float(k) for k in args.keeps.split(",")]
    b_keeps = [float(k) for k in args.b_keeps.split(",")] if args.b_keeps else keeps
    rows = []
    csv_path = out_dir / "quality.csv"

    def record(stage, name, keep, outs_tr, outs_te, fea_tr, fea_te, secs):
        tokens = float(torch.cat([o.counts for o in outs_te]).float().mean()) - 1
        row = {"stage": stage, "method": name, "keep": keep, "tokens": round(tokens, 1),
               "acc_mean": round(knn_accuracy(fea_tr[0], ytr, fea_te[0], yte), 4),
               "acc_cls_mean": round(knn_accuracy(fea_tr[1], ytr, fea_te[1], yte), 4), "seconds": round(secs, 1)}
        rows.append(row)
        print(row, flush=True)
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            w.writeheader()
            w.writerows(rows)

    def cat_feats(outs, cls_list):
        m, cm = zip(*[features(c, o) for c, o in zip(cls_list, outs, strict=True)], strict=True)
        return torch.cat(m), torch.cat(cm)

    if "a" in args.stages:
        for name in methods:
            for keep in keeps:
                if keep == 1.0 and name != methods[0]:
                    continue  # identity for every method: one row
                t = time.time()
                kk = keep if keep < 1 else 1.0
                o_tr = compress(name, kk, feats["train"]["final"], feats["train"]["s_final"])
                o_te = compress(name, kk, feats["t10k"]["final"], feats["t10k"]["s_final"])
                f_tr = cat_feats(o_tr, feats["train"]["final"][:, 0].split(64))
                f_te = cat_feats(o_te, feats["t10k"]["final"][:, 0].split(64))
                record("a", "none" if keep == 1.0 else name, keep, o_tr, o_te, f_tr, f_te, time.time() - t)
    if "b" in args.stages:
        if model is None:
            model, _ = load_model()
        for keep in b_keeps:
            for name in methods:
                if keep == 1.0 and name != methods[0]:
                    continue
                t = time.time()
                fs = {}
                for split in ("train", "t10k"):
                    outs = compress(name, keep, feats[split]["mid"], feats[split]["s_mid"])
                    res = []
                    for o in outs:
                        h = run_rest(model, o)
                        o.x = h
                        res.append(features(h[:, 0], o))
                    fs[split] = (torch.cat([r[0] for r in res]), torch.cat([r[1] for r in res]), outs)
                record("b", "none" if keep == 1.0 else name, keep, fs["train"][2], fs["t10k"][2],
                       fs["train"][:2], fs["t10k"][:2], time.time() - t)
    write_markdown(rows, out_dir / "quality.md", args)


def write_markdown(rows: list[dict], path: Path, args) -> None:
    lines = [f"DINOv2-S/14, Fashion-MNIST 10-NN accuracy ({args.n_train} train / {args.n_test} test, seed {args.seed}, "
             "224 px = 256 patch tokens + CLS). Command: `python scripts/quality_table.py`", ""]
    for stage, title in (("a", "(a) final-layer tokens compressed"), ("b", "(b) compressed after layer 6 of 12")):
        sub = [r for r in rows if r["stage"] == stage]
        if not sub:
            continue
        keeps = sorted({r["keep"] for r in sub}, reverse=True)
        base = {r["keep"]: r for r in sub if r["method"] == "none"}
        lines += [f"### {title}", "", "feature: size-weighted mean of output patch tokens [ / CLS ; mean ]", "",
                  "| method | " + " | ".join(f"keep {k:g}" for k in keeps) + " |",
                  "|---|" + "---|" * len(keeps)]
        names = [r["method"] for r in sub]
        for name in dict.fromkeys(names):
            cells = []
            for k in keeps:
                r = next((r for r in sub if r["method"] == name and r["keep"] == k), None)
                if r is None and k in base:
                    r = base[k]
                cells.append("" if r is None else f"{r['acc_mean']:.3f} / {r['acc_cls_mean']:.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    path.write_text("\n".join(lines))
    print(path.read_text())


if __name__ == "__main__":
    main()
