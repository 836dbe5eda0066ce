#!/usr/bin/env python
"""Is `detail` answerable from ref-vlm's own image tokens? A small readout trained on the frozen DINOv2 features.

ref-vlm (DINOv2-S/14 at 112 px -> projector -> SmolLM2-135M) stays near chance on `detail` after the CPU training
this project can afford (issue 9). This script separates the two possible causes: it trains a small transformer
readout (3 layers, width 128, ~0.7 M parameters) on exactly the 64 patch features the projector sees, for the same
4,000 train scenes, and scores it on the `detail` test scenes, per question type, uncompressed and with compressors
applied to the features at 25% (16 of 64 tokens; merged tokens keep their representative's position embedding).
If the readout solves the task, the features carry the answers and the bottleneck is training the LLM; the
compressed rows show whether the benchmark separates methods for a model that does solve it.

    python scripts/detail_probe.py --epochs 20 --out runs/detail_probe     # 1,687 s on 2 CPU cores

Outputs in --out: ``report.md`` (tables), ``results.json`` and ``train_log.tsv``. Features are cached by
`mmcompress.evals.detail.image_features` (``<mmcompress cache>/features/detail_<split>_<n>_...pt``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mmcompress.evals import detail  # noqa: E402

import mmcompress as mmc  # noqa: E402

METHODS = ("none", "random", "uniform", "pool", "tome", "divprune")


@functools.cache
def _refvlm():
    """ref-vlm built once per run (both splits' features come from it)."""
    from mmcompress.zoo import refvlm

    return refvlm.build_refvlm(None)


def scene_features(split: str, n: int) -> torch.Tensor:
    """DINOv2 features [n, 64, 384] of the first n scenes of `split` (what ref-vlm's projector sees), cached."""
    from mmcompress.zoo import refvlm

    model, processor = _refvlm()
    return detail.image_features(split, n, model.model.vision_tower, processor.image_processor,
                                 refvlm.VISION_FEATURE_LAYER)


def oracle_tokens(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symbolic stand-ins for the image tokens, from the scene descriptions: one token per object ([n, 8, 384]:
    colour one-hot, shape one-hot, then a padding flag for scenes with fewer than 8 objects) at the grid cell
    ([n, 8]) of the object's centre. An upper bound for any readout of 8 x 8 patch tokens."""
    colours = list(detail.COLORS)
    feats, cells = torch.zeros(n, 8, 384), torch.zeros(n, 8, dtype=torch.long)
    feats[:, :, 12] = 1.0  # padding flag, cleared for real objects
    for i in range(n):
        for j, o in enumerate(detail.make_scene(detail.SPLIT_SEEDS[split] + i).objects):
            feats[i, j, 12] = 0.0
            feats[i, j, colours.index(o.color)] = 1.0
            feats[i, j, 7 + detail.SHAPES.index(o.shape)] = 1.0
            cells[i, j] = min(7, int(o.y // 14)) * 8 + min(7, int(o.x // 14))
    return feats, cells


class Vocab:
    """Word ids of the questions (lower-case, '?' split off) and answer ids."""

    def __init__(self, rows: list) -> None:
        words = sorted({w for r in rows for w in self.words(r[3])})
        self.word = {w: i + 1 for i, w in enumerate(words)}  # 0 = padding
        self.answer = {a: i for i, a in enumerate(sorted({r[4] for r in rows}))}

    @staticmethod
    def words(q: str) -> list[str]:
        return q.lower().replace("?", " ?").split()

    def encode(self, rows: list, scene_of: dict[int, int]) -> dict[str, torch.Tensor]:
        L = max(len(self.words(r[3])) for r in rows)
        q = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            ids = [self.word[w] for w in self.words(r[3])]
            q[i, : len(ids)] = torch.tensor(ids)
        return {"q": q, "scene": torch.tensor([scene_of[int(r[0].split("/")[1])] for r in rows]),
                "y": torch.tensor([self.answer[r[4]] for r in rows])}


class Readout(torch.nn.Module):
    """CLS + image tokens (+ position embedding of their grid cell) + question words -> answer logits."""

    def __init__(self, n_words: int, n_answers: int, d: int = 128, layers: int = 3, heads: int = 4,
                 coord_pos: bool = False) -> None:
        super().__init__()
        self.img = torch.nn.Sequential(torch.nn.LayerNorm(384), torch.nn.Linear(384, d))
        self.pos = torch.nn.Parameter(0.02 * torch.randn(64, d))
        if coord_pos:  # plus a linear map of each cell's (row, column) in [-1, 1]: 2-D order given, not learned
            rc = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).view(64, 2)
            self.register_buffer("coords", rc / 3.5 - 1.0)  # [64, 2]
            self.coord = torch.nn.Linear(2, d)
        else:
            self.coord = None
        self.word = torch.nn.Embedding(n_words + 1, d, padding_idx=0)
        self.qpos = torch.nn.Parameter(0.02 * torch.randn(32, d))
        self.cls = torch.nn.Parameter(0.02 * torch.randn(1, 1, d))
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, n_answers))

    def forward(self, feats: torch.Tensor, pos: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        # feats [B, M, 384], pos [B, M] grid cell of each token, q [B, L] word ids (0 = pad) -> [B, answers]
        B = feats.shape[0]
        img = self.img(feats) + self.pos[pos]  # [B, M, d]
        if self.coord is not None:
            img = img + self.coord(self.coords[pos])
        txt = self.word(q) + self.qpos[: q.shape[1]]  # [B, L, d]
        x = torch.cat([self.cls.expand(B, 1, -1), img, txt], 1)  # [B, 1 + M + L, d]
        pad = torch.cat([torch.zeros(B, 1 + img.shape[1], dtype=torch.bool), q == 0], 1)
        return self.head(self.enc(x, src_key_padding_mask=pad)[:, 0])


def compress(method: str, feats: torch.Tensor, keep: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [S, keep, 384], grid cells [S, keep]) of every scene, compressed on the features (8 x 8 grid)."""
    S = feats.shape[0]
    if method == "none":
        return feats, torch.arange(64).expand(S, 64)
    torch.manual_seed(seed)
    out = mmc.create(method, keep=keep)(feats, grid=(8, 8))
    return out.x, out.rep


def evaluate(model, toks, pos, data, types: list[str]) -> dict[str, float]:
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(toks[data["scene"][i:i + 512]], pos[data["scene"][i:i + 512]],
                                data["q"][i:i + 512]).argmax(-1) for i in range(0, len(data["y"]), 512)])
    ok = (pred == data["y"]).float()
    res = {"all": ok.mean().item(), "n": len(ok), "se": (ok.std() / math.sqrt(len(ok))).item()}
    for t in sorted(set(types)):
        m = torch.tensor([x == t for x in types])
        res[t] = ok[m].mean().item()
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-scenes", type=int, default=4000)
    p.add_argument("--test-scenes", type=int, default=500)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--keep", type=int, default=16, help="tokens kept by the compressors (of 64)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--types", default=",".join(detail.QUESTION_TYPES),
                   help="comma list of question types to train and score on (default: all)")
    p.add_argument("--coord-pos", action="store_true",
                   help="add each token's (row, column) through a linear map to its learned position embedding")
    p.add_argument("--oracle", action="store_true",
                   help="symbolic object tokens from the scene descriptions, not DINOv2 features (no compressors)")
    p.add_argument("--out", type=Path, default=Path("runs/detail_probe"))
    a = p.parse_args(argv)
    asked = [t for t in a.types.split(",") if t]
    bad = sorted(set(asked) - set(detail.QUESTION_TYPES))
    if bad or not asked:
        raise ValueError(f"--types: expected a comma list of {list(detail.QUESTION_TYPES)}, got {a.types!r}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)

    train_rows = [r for r in detail.split_questions("train", a.train_scenes) if r[2] in asked]
    test_rows = [r for r in detail.split_questions("test", a.test_scenes) if r[2] in asked]
    vocab = Vocab(train_rows + test_rows)
    if a.oracle:
        (train_feats, train_pos), (test_feats, test_pos) = (oracle_tokens("train", a.train_scenes),
                                                            oracle_tokens("test", a.test_scenes))
    else:
        train_feats, test_feats = scene_features("train", a.train_scenes), scene_features("test", a.test_scenes)
        train_pos, test_pos = (torch.arange(64).expand(a.train_scenes, 64), torch.arange(64).expand(a.test_scenes, 64))
    train = vocab.encode(train_rows, {i: i for i in range(a.train_scenes)})
    test = vocab.encode(test_rows, {i: i for i in range(a.test_scenes)})
    test_types = [r[2] for r in test_rows]
    model = Readout(len(vocab.word), len(vocab.answer), coord_pos=a.coord_pos)
    n_params = sum(t.numel() for t in model.parameters())
    steps = a.epochs * math.ceil(len(train["y"]) / a.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=steps, pct_start=0.05)
    log = ["epoch\tloss\ttest_acc\tseconds"]
    t0 = time.perf_counter()
    for epoch in range(a.epochs):
        model.train()
        perm, tot = torch.randperm(len(train["y"])), 0.0
        for i in range(0, len(perm), a.batch):
            b = perm[i : i + a.batch]
            sc = train["scene"][b]
            loss = F.cross_entropy(model(train_feats[sc], train_pos[sc], train["q"][b]), train["y"][b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(b)
        acc = evaluate(model, test_feats, test_pos, test, test_types)["all"]
        log.append(f"{epoch + 1}\t{tot / len(perm):.4f}\t{acc:.4f}\t{time.perf_counter() - t0:.0f}")
        print(f"epoch {epoch + 1}/{a.epochs}: loss {tot / len(perm):.4f}, test accuracy {acc:.3f}", file=sys.stderr,
              flush=True)
    (a.out / "train_log.tsv").write_text("\n".join(log) + "\n")

    results = {}
    for m in ("none",) if a.oracle else METHODS:
        toks, pos = (test_feats, test_pos) if m == "none" else compress(m, test_feats, a.keep, a.seed)
        results[m] = evaluate(model, toks, pos, test, test_types)
        print(f"{m:9s} {results[m]['all']:.3f}", file=sys.stderr, flush=True)
    types = sorted(set(test_types))
    base = results["none"]["all"]
    source = "symbolic object tokens (--oracle)" if a.oracle else "ref-vlm's frozen DINOv2 features"
    lines = [f"# detail probe: a {n_params / 1e6:.2f} M-parameter readout on {source}",
             "", f"Trained {a.epochs} epochs on {len(train['y'])} questions of {a.train_scenes} train scenes "
             f"({time.perf_counter() - t0:.0f} s, {a.threads} threads); scored on {len(test['y'])} questions of "
             f"{a.test_scenes} test scenes; compressors at keep = {a.keep} of 64 tokens, applied to the features.",
             f"Command: `python scripts/detail_probe.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             "| tokens | method | accuracy | % of none | " + " | ".join(types) + " |",
             "|---|---|---|---|" + "---|" * len(types)]
    for m, r in results.items():
        k = 64 if m == "none" else a.keep
        share = f"{100 * r['all'] / base:.1f}%" if base > 0 else "-"  # (none scored 0: no share)
        lines.append(f"| {k} | {m} | {r['all']:.3f} ± {r['se']:.3f} | {share} | "
                     + " | ".join(f"{r[t]:.3f}" for t in types) + " |")
    (a.out / "report.md").write_text("\n".join(lines) + "\n")
    (a.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                    "params": n_params, "results": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
