#!/usr/bin/env python
"""Train ref-vlm-mini (projector + a compact Llama decoder, from scratch) on cached DINOv2 features, on CPU.

Data: easy-VQA train (4,000 images, 38,575 questions; 200 images held out for validation) and the `detail` train
scenes (``--detail-scenes``, default 20,000) with the default question types (colour, shape, exist, count). Each
training sequence is one question, its image and its answer; the loss covers the answer word and its ``</s>``.

Variable token counts (TokenFLEX-style): a step feeds all its images at ONE budget. With probability
``--full-frac`` the full grid; otherwise a budget drawn log-uniformly from ``--min-frac`` to 100% of the tokens, and
each image compressed to it by a method drawn from ``--mix`` (the library's own compressors, where ``mmc.apply`` runs
them: ``random``, ``uniform``, ``pool``, ``tome`` on the tower features before the projector, ``divprune`` after it,
``cls_random`` = the tower's CLS first + a random subset, the layout VisionZip hands the LLM). The image tokens keep the
order the compressor gives them and sit where ``mmc.apply`` puts them: one run of placeholders, right after the
question. The DINOv2 features are standardised per channel for training and the standardisation is folded into the
projector's first layer at export, so the exported model is a plain ``LlavaForConditionalGeneration`` fed raw
tower features.

    python scripts/train_ref_mini.py --out-dir ~/.cache/mmcompress/train_mini_v2            # add --resume
    python scripts/train_ref_mini.py --out-dir ~/.cache/mmcompress/train_mini_v2 --export-only \
        --assets mmcompress/zoo/assets --plot docs/ref_vlm_mini_training.png

Features are cached per 1,000-image shard (fp16, CLS kept) under the mmcompress cache, so an interrupted caching
run resumes at its shard. Checkpoints (``ckpt.pt``, atomic) every ``--ckpt-every`` steps; ``--resume`` continues
exactly (same data order, budgets and methods). ``--light-ckpt FILE`` writes the checkpoint's weights alone (bf16,
~7 MB) to carry a run to another machine: copied there as ``ckpt.pt``, ``--resume`` continues from it with fresh
AdamW moments and a 50-step re-warm-up of the learning rate. The log (``train_log.tsv``) records the loss and, every
``--eval-every`` steps, the first-turn greedy accuracy on held-out questions (detail val scenes, per type; held-out
easy-VQA train images) uncompressed and at fixed budgets (``random``/``pool`` at 25%, ``random`` at 12.5%).
Export writes ``refvlm_mini.safetensors``, ``refvlm_mini_tokenizer.json``, ``refvlm_mini.json`` (with the
``arch``) and the log to ``--assets``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mmcompress.evals import detail, easyvqa  # noqa: E402

from mmcompress.zoo import refvlm_mini as mini  # noqa: E402

DEFAULT_TYPES = ("colour", "shape", "exist", "count")
EASY_VAL_IMAGES = 200  # easy-VQA train images 3800..3999 held out for validation
SHARD = 1000  # images per feature-cache shard
MIX = ("random", "uniform", "pool", "tome", "divprune", "cls_random")
EVAL_BUDGETS = (("full", 1.0), ("random", 0.25), ("pool", 0.25), ("random", 0.125))


def features(kind: str, n: int, image_size: int, device: str = "cpu") -> torch.Tensor:
    """Cached DINOv2 features ``[n, 1 + N, 384]`` (fp16 on the CPU, CLS first) of the first `n` images of `kind`
    (``"detail"`` train scenes, ``"detail_val"`` scenes, ``"easyvqa"`` train images), computed shard by shard on
    first use (the tower on `device`)."""
    from mmcompress.evals.features import tower_features
    from PIL import Image

    from mmcompress.zoo.dinov2 import DinoImageProcessor, load_dinov2

    proc = DinoImageProcessor(image_size)
    tower = _Lazy(load_dinov2, device)

    def images(lo: int):
        if kind == "easyvqa":
            return lambda a, b: [Image.open(easyvqa.image_path("train", lo + i)).convert("RGB") for i in range(a, b)]
        seed = detail.SPLIT_SEEDS["val" if kind == "detail_val" else "train"]
        return lambda a, b: [detail.render(detail.make_scene(seed + lo + i)) for i in range(a, b)]

    name = {"detail": "detail_train", "detail_val": "detail_val", "easyvqa": "easyvqa_train"}[kind]
    out = []
    for lo in range(0, n, SHARD):
        hi = min(n, lo + SHARD)
        out.append(tower_features(f"{name}_{lo}_{hi}", hi - lo, images(lo), tower, proc, mini.VISION_FEATURE_LAYER,
                                  drop_cls=False, dtype="float16"))
    return torch.cat(out)


class _Lazy:
    """The DINOv2 tower, loaded (onto `device`) only if a feature cache misses; outputs come back to the CPU."""

    def __init__(self, fn, device: str = "cpu") -> None:
        self.fn, self.m, self.device = fn, None, device

    def __call__(self, pixel_values, **k):
        if self.m is None:
            self.m = self.fn().to(self.device)
        out = self.m(pixel_values.to(self.device), **k)
        out.hidden_states = tuple(h.cpu() for h in out.hidden_states)
        return out


def conversations(proc, rows: list[tuple[int, str, str, str]], turns: int) -> list[list[tuple]]:
    """Group question rows ``(image, type, question, answer)`` by image into conversations of <= `turns` turns;
    each turn holds ``(image, type, question ids, answer ids)``."""
    by: dict[int, list[tuple]] = {}
    for img, t, q, a in rows:
        by.setdefault(img, []).append((img, t, proc.tokenizer(q, add_special_tokens=False)["input_ids"],
                                       proc.encode_answer(a)))
    out = []
    for img in sorted(by):
        qs = by[img]
        for i in range(0, len(qs), turns):
            out.append(qs[i: i + turns])
    return out


def sequence(proc, conv: list[tuple], rng: random.Random, n_image: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation, its turns shuffled by `rng` (see `encode_turns`)."""
    turns = list(conv)
    rng.shuffle(turns)
    return encode_turns(proc, turns, n_image)


def encode_turns(proc, turns: list[tuple], n_image: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the turns as the chat template renders them (the image, `n_image` image tokens, default the
    full grid, after the first question) and labels: each answer's ids and its ``</s>``, -100 elsewhere."""
    user, asst = (proc.tokenizer.convert_tokens_to_ids(t) for t in (mini.USER, mini.ASSISTANT))
    n_image = proc.num_image_tokens if n_image is None else n_image
    ids: list[int] = []
    labels: list[int] = []
    for i, (_, _, q, a) in enumerate(turns):
        head = [user] + q + ([proc.image_token_id] * n_image if i == 0 else []) + [asst]
        ids += head + a
        labels += [-100] * len(head) + a
    return ids, labels


def pad_batch(seqs, pad_id: int):
    """Right-padded ids/labels/mask ``[B, L]`` of ``(ids, labels)`` pairs."""
    L = max(len(s[0]) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    return ids, labels, mask


class Trainable(torch.nn.Module):
    """Projector + language model, fed standardised features: the same computation as the assembled Llava
    (placeholder embeddings replaced by the projected image features, then the decoder and the tied head)."""

    def __init__(self, cfg, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        parts = mini.fresh_parts(cfg)
        self.proj, self.lm = parts["proj"], parts["lm"]
        self.image_token_id = cfg.image_token_id
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def project(self, feats: torch.Tensor) -> torch.Tensor:  # [B, M, 384] raw tower features -> [B, M, C]
        return self.proj((feats.float() - self.mean) / self.std)

    def forward(self, ids, mask, feats):  # ids/mask [B, L], feats [B, M, 384] raw tower features
        return self.forward_tokens(ids, mask, self.project(feats))

    def forward_tokens(self, ids, mask, img):  # img: [B, M, C] or list of [M_i, C], projected, in sequence order
        emb = self.lm.model.embed_tokens(ids)  # [B, L, C]
        img = torch.cat(list(img)) if isinstance(img, (list, tuple)) else img.reshape(-1, img.shape[-1])
        emb = emb.masked_scatter((ids == self.image_token_id)[..., None], img.to(emb.dtype))
        h = self.lm.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        return self.lm.lm_head(h)  # [B, L, V]

    def export(self) -> dict[str, torch.Tensor]:
        """Weights for the assembled model, the standardisation folded into linear_1: W' = W / std,
        b' = b - W' @ mean."""
        sd = {f"multi_modal_projector.{k}": v.detach().clone() for k, v in self.proj.state_dict().items()}
        w = sd["multi_modal_projector.linear_1.weight"] / self.std[None, :]
        sd["multi_modal_projector.linear_1.weight"] = w
        sd["multi_modal_projector.linear_1.bias"] = sd["multi_modal_projector.linear_1.bias"] - w @ self.mean
        sd.update({f"language_model.{k}": v.detach().clone() for k, v in self.lm.model.state_dict().items()})
        return {k: v.contiguous() for k, v in sd.items()}


def grow_from(model: Trainable, path: Path) -> None:
    """Load a shallower export into `model` by block expansion (LLaMA Pro, arXiv 2401.02415): the export's decoder
    layer i goes to layer ``i * k`` (``k`` = depth ratio) and layers ``i * k + 1 .. i * k + k - 1`` are copies of it
    whose ``o_proj`` and ``down_proj`` are zero, i.e. identity blocks at first; embeddings, final norm and projector
    are taken as they are (the export's folded standardisation unfolded against this model's ``mean``/``std``), so
    the grown model computes exactly the export's function."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    n_old = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("language_model.layers."))
    n_new = len(model.lm.model.layers)
    if n_new % n_old:
        raise ValueError(f"--grow-from: {n_new} layers is not a multiple of the export's {n_old}")
    k = n_new // n_old
    lm = {}
    for name, v in sd.items():
        if not name.startswith("language_model."):
            continue
        rest = name[len("language_model."):]
        if not rest.startswith("layers."):
            lm[rest] = v
            continue
        _, i, tail = rest.split(".", 2)
        for j in range(k):
            zero = j > 0 and tail.endswith(("o_proj.weight", "down_proj.weight"))
            lm[f"layers.{int(i) * k + j}.{tail}"] = torch.zeros_like(v) if zero else v.clone()
    model.lm.model.load_state_dict(lm)
    w = sd["multi_modal_projector.linear_1.weight"]  # folded: W / std_old; bias: b - W' @ mean_old
    proj = {k2[len("multi_modal_projector."):]: v for k2, v in sd.items() if k2.startswith("multi_modal_projector.")}
    proj["linear_1.weight"] = w * model.std[None, :].to(w.dtype)
    proj["linear_1.bias"] = sd["multi_modal_projector.linear_1.bias"] + w @ model.mean.to(w.dtype)
    model.proj.load_state_dict(proj)


def compress_group(model: Trainable, method: str, raw: torch.Tensor, keep: int, grid: tuple[int, int],
                   seed: int = 0) -> torch.Tensor:
    """Projected image tokens ``[b, M, C]`` of `raw` ``[b, 1 + N, 384]`` (CLS first) compressed by `method` to `keep`
    tokens, at the stage where ``mmc.apply`` runs it (before the projector, except ``divprune``); `seed`: the
    random methods' seed (each row draws from it and its own tokens)."""
    import mmcompress as mmc

    x = raw[:, 1:].float()  # [b, N, 384] the grid tokens LLaVA's "default" strategy hands on
    if method == "full" or keep >= x.shape[1]:
        return model.project(x)
    if method == "divprune":
        return mmc.create("divprune", keep=keep)(model.project(x)).x
    if method == "cls_random":
        return model.project(mmc.create("random", keep=keep - 1, seed=seed)(raw.float(), prefix=1).x)
    opts = {"seed": seed} if method == "random" else {}
    return model.project(mmc.create(method, keep=keep, **opts)(x, grid=grid).x)


def image_tokens(model: Trainable, keys, feats_of, method_of, keep: int, grid, seed: int = 0) -> list[torch.Tensor]:
    """Each sample's projected image tokens ``[M_i, C]``: the samples grouped by method, each group compressed at
    once (every group at the same budget `keep`; `seed` for the random methods)."""
    out: list[torch.Tensor | None] = [None] * len(keys)
    groups: dict[str, list[int]] = {}
    for i in range(len(keys)):
        groups.setdefault(method_of(i), []).append(i)
    for method, idx in groups.items():
        raw = torch.stack([feats_of(keys[i]) for i in idx])  # [b, 1 + N, 384]
        tok = compress_group(model, method, raw, keep, grid, seed)  # [b, M, C]
        for j, i in enumerate(idx):
            out[i] = tok[j]
    return out  # type: ignore[return-value]


def step_plan(seed: int, step: int, n_tokens: int, full_frac: float, min_frac: float, mix: tuple[str, ...],
              batch: int) -> tuple[int, list[str]]:
    """The budget and per-sample methods of `step` (a pure function of the seed and step, so ``--resume`` repeats
    it): the full grid with probability `full_frac`, else a log-uniform fraction in [`min_frac`, 1]."""
    rng = random.Random(seed * 7_919 + step)
    if rng.random() < full_frac:
        return n_tokens, ["full"] * batch
    frac = math.exp(rng.uniform(math.log(min_frac), 0.0))
    keep = max(2, min(n_tokens, round(frac * n_tokens)))
    return keep, [rng.choice(mix) for _ in range(batch)]


@torch.no_grad()
def evaluate(model, proc, evalsets, grid, bs: int = 128) -> dict[str, float]:
    """First-turn greedy accuracy (the answer word AND ``</s>`` predicted, teacher-forced = greedy decoding of a
    one-word answer) per evaluation set, uncompressed (per detail type too) and at `EVAL_BUDGETS`."""
    model.eval()
    n_tokens = grid[0] * grid[1]
    out: dict[str, float] = {}
    for name, (convs, feats_of) in evalsets.items():
        rows = [(t[0], t[1], [t]) for conv in convs for t in conv]  # every question as a single turn
        for method, frac in EVAL_BUDGETS:
            keep = max(2, round(frac * n_tokens))
            hits: dict[str, list[float]] = {}
            for s in range(0, len(rows), bs):
                chunk = rows[s: s + bs]
                img = image_tokens(model, [r[0] for r in chunk], feats_of, lambda i, m=method: m, keep, grid)
                seqs = [sequence(proc, conv, random.Random(0), len(img[i])) for i, (_, _, conv) in enumerate(chunk)]
                ids, labels, mask = (t.to(model.mean.device) for t in pad_batch(seqs, proc.pad_token_id))
                pred = model.forward_tokens(ids, mask, img).argmax(-1)  # [B, L]
                tgt_pos = labels[:, 1:] != -100
                ok = ((pred[:, :-1] == labels[:, 1:]) | ~tgt_pos).all(1)
                for (_, t, _), o in zip(chunk, ok.tolist(), strict=False):
                    hits.setdefault(t, []).append(float(o))
            allv = [v for vs in hits.values() for v in vs]
            tag = "" if method == "full" else f"@{method}{frac:g}"
            out[f"{name}_acc{tag}"] = sum(allv) / len(allv)
            if len(hits) > 1 and method == "full":
                out.update({f"{name}_{t}": sum(v) / len(v) for t, v in sorted(hits.items())})
    model.train()
    return out


def merge_logs(prior: Path, log: Path) -> tuple[str, dict[str, int]]:
    """The log of a run that continued another one's export (``--grow-from`` at the same depth): `prior`'s rows,
    then `log`'s with step, epoch, presentations and seconds counted on from `prior`'s last row. Returns the text
    and the offsets added."""
    head, *rows_p = prior.read_text().splitlines()
    _, *rows = log.read_text().splitlines()
    last = rows_p[-1].split("\t")
    off = {"step": int(last[0]), "presentations": int(last[2]), "seconds": int(last[5])}
    epoch0 = float(last[1])
    out = [head, *rows_p]
    for line in rows:
        c = line.split("\t")
        c[0] = str(int(c[0]) + off["step"])
        c[1] = f"{float(c[1]) + epoch0:.3f}"
        c[2] = str(int(c[2]) + off["presentations"])
        c[5] = str(int(c[5]) + off["seconds"])
        out.append("\t".join(c))
    return "\n".join(out) + "\n", off


def plot_log(log_path: Path, out: Path) -> None:
    """Validation accuracy (detail and easy-VQA, uncompressed and at fixed budgets) against question
    presentations, from the training log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ev = [], []
    for line in log_path.read_text().splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) > 6 and cols[6].strip():
            xs.append(int(cols[2]) / 1000)
            ev.append(json.loads(cols[6]))
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    curves = [("detail_val_acc", "detail, all tokens", "-o"), ("detail_val_acc@pool0.25", "detail, pool 25%", "-^"),
              ("detail_val_acc@random0.25", "detail, random 25%", "-v"),
              ("detail_val_acc@random0.125", "detail, random 12.5%", ":v"), ("easyvqa_val_acc", "easy-VQA, all", "-s"),
              ("easyvqa_val_acc@random0.125", "easy-VQA, random 12.5%", ":s")]
    for key, label, style in curves:
        if ev and key in ev[-1]:
            ax.plot([x for x, e in zip(xs, ev, strict=True) if key in e], [e[key] for e in ev if key in e], style,
                    label=label, markersize=3)
    ax.set_xlabel("question presentations (thousands)")
    ax.set_ylabel("validation accuracy (greedy, first turn)")
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("ref-vlm-mini training (scripts/train_ref_mini.py)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="questions per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak AdamW learning rate (default %(default)s)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (default %(default)s)")
    p.add_argument("--detail-scenes", type=int, default=20000, help="detail train scenes (default %(default)s)")
    p.add_argument("--types", default=",".join(DEFAULT_TYPES), help="detail question types (default %(default)s)")
    p.add_argument("--full-frac", type=float, default=0.25,
                   help="share of steps fed the full grid (default %(default)s)")
    p.add_argument("--min-frac", type=float, default=0.04,
                   help="smallest budget, as a fraction of the grid (default %(default)s)")
    p.add_argument("--mix", default=",".join(MIX), help="compressors of the compressed steps (default %(default)s)")
    p.add_argument("--v1", action="store_true", help="train the v1 shape (112 px, 4 layers, full grids only)")
    p.add_argument("--eval-every", type=int, default=250, help="(default %(default)s)")
    p.add_argument("--ckpt-every", type=int, default=25, help="(default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="where the tower (feature caching) and training run: cpu, cuda")
    p.add_argument("--out-dir", type=Path, default=Path("~/.cache/mmcompress/train_mini_v2").expanduser())
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt")
    p.add_argument("--export-only", action="store_true", help="only export the checkpoint to --assets")
    p.add_argument("--cache-only", action="store_true", help="only compute the feature caches, then stop")
    p.add_argument("--light-ckpt", type=Path, default=None,
                   help="write the checkpoint's weights (bf16, no optimizer state) to this file and stop: small enough "
                        "to carry to another machine, where `--resume` from it re-warms the learning rate")
    p.add_argument("--assets", type=Path, default=None, help="export the result here (e.g. mmcompress/zoo/assets)")
    p.add_argument("--grow-from", type=Path, default=None,
                   help="start from a shallower export (e.g. v1's refvlm_mini.safetensors) by block expansion: "
                        "its layer i becomes layer i*k and the k-1 layers after it are copies of it with o_proj and "
                        "down_proj zeroed, so training starts from exactly the smaller model's function")
    p.add_argument("--prior-log", type=Path, default=None,
                   help="with --assets, for a run that continues an export (--grow-from at the same depth): that "
                        "export's training log; the exported log and curve are it followed by this run, counted on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, default=None, help="with --assets: also draw the learning curve to this PNG")
    a = p.parse_args(argv)
    if a.prior_log is not None:
        if a.assets is None or not a.prior_log.is_file():
            p.error("--prior-log: needs --assets and an existing log file")
        if a.prior_log.resolve() == (a.assets / "refvlm_mini_train_log.tsv").resolve():
            p.error("--prior-log: give a copy, not the log file the export overwrites")
    if a.threads:
        torch.set_num_threads(a.threads)
    types = tuple(t for t in a.types.split(",") if t)
    bad = [t for t in types if t not in detail.QUESTION_TYPES]
    if bad:
        p.error(f"--types: unknown {bad}; choose from {detail.QUESTION_TYPES}")
    mix = tuple(m for m in a.mix.split(",") if m)
    bad = [m for m in mix if m not in MIX]
    if bad or not mix:
        p.error(f"--mix: expected a comma list from {MIX}, got {a.mix!r}")
    if not 0.0 < a.min_frac <= 1.0 or not 0.0 <= a.full_frac <= 1.0:
        p.error("--min-frac must be in (0, 1] and --full-frac in [0, 1]")
    shape = mini.ARCH_V1 if a.v1 else mini.ARCH_V2
    full_frac = 1.0 if a.v1 else a.full_frac
    side = shape.image_size // 14
    grid, n_tokens = (side, side), side * side
    a.out_dir = a.out_dir.expanduser()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = a.out_dir / "ckpt.pt"
    if a.light_ckpt is not None:
        if not ckpt_path.is_file():
            p.error(f"--light-ckpt: no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        ck["model"] = {k: v if k in ("mean", "std") else v.to(torch.bfloat16)  # the standardisation stays exact
                       for k, v in ck["model"].items()}
        ck.pop("opt", None)
        torch.save(ck, a.light_ckpt)
        print(f"light checkpoint of step {ck['step']} written to {a.light_ckpt}", flush=True)
        return 0

    tok_path = a.out_dir / mini.TOKENIZER_FILE
    if not tok_path.is_file():
        mini.build_tokenizer().backend_tokenizer.save(str(tok_path))
    tok = mini.load_tokenizer(tok_path)
    proc = mini.RefVLMMiniProcessor(tok, shape.image_size)
    cfg = mini.config(len(tok), shape=shape)

    # data: (image key, type, question, answer); image keys: ("d", i) detail train, ("e", i) easy-VQA train
    t0 = time.time()
    vfeat = features("detail_val", 500, shape.image_size, a.device)
    efeat = features("easyvqa", 4000, shape.image_size, a.device)
    dfeat = features("detail", a.detail_scenes, shape.image_size, a.device)
    if a.cache_only:
        print(f"features cached ({time.time() - t0:.0f} s)", flush=True)
        return 0
    rows_d = [(("d", int(i.split("/")[1])), t, q, ans) for i, _, t, q, ans in
              detail.split_questions("train", a.detail_scenes) if t in types]
    easy = easyvqa.load_split("train")
    n_easy_train = efeat.shape[0] - EASY_VAL_IMAGES
    rows_e = [(("e", s.image_id), "easyvqa", s.question, s.answer) for s in easy if s.image_id < n_easy_train]
    rows_ev = [(("e", s.image_id), "easyvqa", s.question, s.answer) for s in easy if s.image_id >= n_easy_train]
    rows_dv = [(("v", int(i.split("/")[1])), t, q, ans) for i, _, t, q, ans in detail.split_questions("val", 500)
               if t in types]
    rows_ev = random.Random(1).sample(rows_ev, min(400, len(rows_ev)))  # validation subsets, fixed
    rows_dv = random.Random(2).sample(rows_dv, min(800, len(rows_dv)))

    def feats_of(key):
        src, i = key
        return {"d": dfeat, "e": efeat, "v": vfeat}[src][i].to(a.device)

    train_convs = conversations(proc, rows_d, 1) + conversations(proc, rows_e, 1)
    evalsets = {"detail_val": (conversations(proc, rows_dv, 1), feats_of),
                "easyvqa_val": (conversations(proc, rows_ev, 1), feats_of)}
    n_q = len(rows_d) + len(rows_e)
    print(f"data: {len(rows_d)} detail + {len(rows_e)} easy-VQA questions; val {len(rows_dv)} detail + "
          f"{len(rows_ev)} easy-VQA ({time.time() - t0:.0f} s)", flush=True)

    allf = torch.cat([dfeat[:, 1:].reshape(-1, dfeat.shape[-1])[::7], efeat[:, 1:].reshape(-1, efeat.shape[-1])[::7]])
    allf = allf.float()
    mean, std = allf.mean(0), allf.std(0).clamp_min(1e-3)
    torch.manual_seed(a.seed)
    model = Trainable(cfg, mean, std).to(a.device)
    if a.grow_from is not None and not (a.resume and ckpt_path.is_file()):
        grow_from(model, a.grow_from)
        print(f"grown from {a.grow_from} (block expansion to {cfg.text_config.num_hidden_layers} layers)", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))

    rewarm = [0]  # a resume without optimizer state warms up again over 50 steps from where it starts

    def lr_at(step: int) -> float:
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        if step < rewarm[0] + 50:
            return lr_cos(step) * (step - rewarm[0] + 1) / 50
        return lr_cos(step)

    def lr_cos(step: int) -> float:
        prog = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))

    step, presented, elapsed, tokens_fed = 0, 0, 0.0, 0
    train_cmd = "python scripts/train_ref_mini.py " + " ".join(argv if argv is not None else sys.argv[1:])
    log_path = a.out_dir / "train_log.tsv"
    if (a.resume or a.export_only) and ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False, map_location=a.device)
        model.load_state_dict(ck["model"])
        step, presented, elapsed = ck["step"], ck["presented"], ck["elapsed"]
        if "opt" in ck:
            opt.load_state_dict(ck["opt"])
        else:  # a light checkpoint (`--light-ckpt`): weights only, fresh AdamW moments
            rewarm[0] = step
        tokens_fed = ck.get("tokens_fed", 0)
        train_cmd = ck.get("command", train_cmd)
        print(f"resumed at step {step} ({presented} question presentations, {elapsed:.0f} s)", flush=True)
    elif a.export_only:
        p.error(f"--export-only: no checkpoint at {ckpt_path}")
    elif log_path.exists():
        log_path.unlink()

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "presented": presented,
                    "elapsed": elapsed, "tokens_fed": tokens_fed, "command": train_cmd}, tmp)
        tmp.replace(ckpt_path)

    header = ["step", "epoch", "presentations", "loss", "lr", "seconds", "evaluation", "image_tokens"]
    if not log_path.exists():
        log_path.write_text("\t".join(header) + "\n")
    steps_per_epoch = len(train_convs) // a.batch_size
    model.train()
    run_loss, run_n, run_tok = 0.0, 0, 0
    while step < a.steps and not a.export_only:
        epoch, k = divmod(step, steps_per_epoch)
        order = list(range(len(train_convs)))
        random.Random(a.seed * 1000 + epoch).shuffle(order)  # the epoch's order: the same after --resume
        idx = order[k * a.batch_size: (k + 1) * a.batch_size]
        keep, methods = step_plan(a.seed, step, n_tokens, full_frac, a.min_frac, mix, len(idx))
        t1 = time.time()
        img = image_tokens(model, [train_convs[i][0][0] for i in idx], feats_of, methods.__getitem__, keep, grid,
                           seed=a.seed * 1_000_003 + step)  # the random draws: the same after --resume
        rng = random.Random(a.seed * 1_000_003 + step)
        seqs = [sequence(proc, train_convs[i], rng, len(img[j])) for j, i in enumerate(idx)]
        ids, labels, mask = (t.to(a.device) for t in pad_batch(seqs, proc.pad_token_id))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model.forward_tokens(ids, mask, img)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        presented += len(idx)
        n_img = sum(len(t) for t in img)
        tokens_fed += n_img
        elapsed += time.time() - t1
        run_loss, run_n, run_tok = run_loss + loss.item(), run_n + 1, run_tok + n_img / len(idx)
        ev = ""
        if step % a.eval_every == 0 or step == a.steps:
            t2 = time.time()
            ev = json.dumps({k: round(v, 4) for k, v in evaluate(model, proc, evalsets, grid).items()})
            elapsed += time.time() - t2
        if step % 10 == 0 or ev:
            row = [step, f"{step / steps_per_epoch:.3f}", presented, f"{run_loss / run_n:.4f}", f"{lr_at(step):.2e}",
                   f"{elapsed:.0f}", ev, f"{run_tok / run_n:.1f}"]
            with log_path.open("a") as f:
                f.write("\t".join(map(str, row)) + "\n")
            print("\t".join(map(str, row)), flush=True)
            run_loss, run_n, run_tok = 0.0, 0, 0
        if step % a.ckpt_every == 0 or step == a.steps:
            save()

    if a.assets is not None:
        from safetensors.torch import save_file

        a.assets.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu() for k, v in model.export().items()}, str(a.assets / mini.WEIGHTS_FILE))
        shutil.copyfile(tok_path, a.assets / mini.TOKENIZER_FILE)
        off = {"step": 0, "presentations": 0, "seconds": 0}
        if a.prior_log is not None:
            merged, off = merge_logs(a.prior_log, log_path)
            (a.assets / "refvlm_mini_train_log.tsv").write_text(merged)
        else:
            shutil.copyfile(log_path, a.assets / "refvlm_mini_train_log.tsv")
        final = evaluate(model, proc, evalsets, grid)
        info = {"arch": shape.to_dict(), "steps": step + off["step"],
                "question_presentations": presented + off["presentations"],
                "train_seconds": round(elapsed) + off["seconds"], "image_tokens_fed": tokens_fed,
                "parameters_trained": n_params,
                "train_questions": n_q, "detail_types": list(types), "detail_scenes": a.detail_scenes,
                "batch_size": a.batch_size, "lr": a.lr, "full_frac": full_frac, "min_frac": a.min_frac,
                "mix": list(mix), "validation": {k: round(v, 4) for k, v in final.items()},
                "command": train_cmd}
        if a.prior_log is not None:
            info["continued_from"] = {"export": str(a.grow_from), "log": str(a.prior_log), **off}
        (a.assets / "refvlm_mini.json").write_text(json.dumps(info, indent=1) + "\n")
        if a.plot is not None:
            plot_log(a.assets / "refvlm_mini_train_log.tsv", a.plot)
        print(f"exported to {a.assets}: {info}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
