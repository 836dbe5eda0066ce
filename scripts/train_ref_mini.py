#!/usr/bin/env python
"""Train ref-vlm-mini (projector + a compact Llama decoder, from scratch) on cached DINOv2 features, on CPU.

Data: easy-VQA train (4,000 images, 38,575 questions; 200 images held out for validation) and the 20,000 `detail`
train scenes with the default question types (colour, shape, exist, count; ~75,000 questions). By default each
training sequence is one question, its image and its answer (``--turns N`` packs up to N questions of an image as a
multi-turn chat; the image tokens then see only the first question); the loss covers the answer word and its
``</s>``. The DINOv2 features are
standardised per channel for training and the standardisation is folded into the projector's first layer at
export, so the exported model is a plain ``LlavaForConditionalGeneration`` fed raw tower features.

    python scripts/train_ref_mini.py --steps 3000 --out-dir ~/.cache/mmcompress/train_mini   # add --resume
    python scripts/train_ref_mini.py --out-dir ~/.cache/mmcompress/train_mini --export-only \
        --assets mmcompress/zoo/assets

Checkpoints (``ckpt.pt``, atomic) every ``--ckpt-every`` steps; ``--resume`` continues exactly (same data order).
The log (``train_log.tsv``) records the loss and, every ``--eval-every`` steps, the first-turn greedy accuracy on
held-out questions (detail val scenes, per type; held-out easy-VQA train images). Export writes
``refvlm_mini.safetensors``, ``refvlm_mini_tokenizer.json``, ``refvlm_mini.json`` and the log to ``--assets``.
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


def features(split: str, kind: str, n: int | None = None) -> torch.Tensor:
    """Cached DINOv2 features [n, 64, 384] (computed on first use)."""
    from mmcompress.zoo.dinov2 import DinoImageProcessor, load_dinov2

    proc = DinoImageProcessor(mini.IMAGE_SIZE)
    tower = _Lazy(load_dinov2)
    if kind == "detail":
        return detail.image_features(split, n, tower, proc, mini.VISION_FEATURE_LAYER)
    return easyvqa.image_features(split, tower, proc, mini.VISION_FEATURE_LAYER)


class _Lazy:
    """The DINOv2 tower, loaded only if a feature cache misses."""

    def __init__(self, fn) -> None:
        self.fn, self.m = fn, None

    def __call__(self, *a, **k):
        if self.m is None:
            self.m = self.fn()
        return self.m(*a, **k)


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


def sequence(proc, conv: list[tuple], rng: random.Random) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation, its turns shuffled by `rng` (see `encode_turns`)."""
    turns = list(conv)
    rng.shuffle(turns)
    return encode_turns(proc, turns)


def encode_turns(proc, turns: list[tuple]) -> tuple[list[int], list[int]]:
    """Token ids of the turns as the chat template renders them (the image after the first question) and labels:
    each answer's ids and its ``</s>``, -100 elsewhere."""
    user, asst = (proc.tokenizer.convert_tokens_to_ids(t) for t in (mini.USER, mini.ASSISTANT))
    ids: list[int] = []
    labels: list[int] = []
    for i, (_, _, q, a) in enumerate(turns):
        head = [user] + q + ([proc.image_token_id] * proc.num_image_tokens if i == 0 else []) + [asst]
        ids += head + a
        labels += [-100] * len(head) + a
    return ids, labels


def batch_tensors(seqs, img_index, feats_of, pad_id: int):
    """Right-padded ids/labels/mask [B, L] and the image features [B, 64, 384] of a batch."""
    L = max(len(s[0]) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    feats = torch.stack([feats_of(k) for k in img_index])
    return ids, labels, mask, feats


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

    def forward(self, ids, mask, feats):  # ids/mask [B, L], feats [B, 64, 384] raw tower features
        emb = self.lm.model.embed_tokens(ids)  # [B, L, C]
        img = self.proj((feats - self.mean) / self.std)  # [B, 64, C]
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


@torch.no_grad()
def evaluate(model, proc, evalsets, bs: int = 64) -> dict[str, float]:
    """First-turn greedy accuracy (the answer word AND ``</s>`` predicted, teacher-forced = greedy decoding of a
    one-word answer) per evaluation set and, for detail, per type."""
    model.eval()
    out: dict[str, float] = {}
    for name, (convs, feats_of) in evalsets.items():
        rows = [(t[0], t[1], [t]) for conv in convs for t in conv]  # every question as a single turn
        hits: dict[str, list[float]] = {}
        for s in range(0, len(rows), bs):
            chunk = rows[s: s + bs]
            seqs = [sequence(proc, conv, random.Random(0)) for _, _, conv in chunk]
            ids, labels, mask, feats = batch_tensors(seqs, [r[0] for r in chunk], feats_of, proc.pad_token_id)
            pred = model(ids, mask, feats).argmax(-1)  # [B, L]
            tgt_pos = labels[:, 1:] != -100
            ok = ((pred[:, :-1] == labels[:, 1:]) | ~tgt_pos).all(1)
            for (_, t, _), o in zip(chunk, ok.tolist(), strict=False):
                hits.setdefault(t, []).append(float(o))
        allv = [v for vs in hits.values() for v in vs]
        out[f"{name}_acc"] = sum(allv) / len(allv)
        if len(hits) > 1:
            out.update({f"{name}_{t}": sum(v) / len(v) for t, v in sorted(hits.items())})
    model.train()
    return out


def plot_log(log_path: Path, out: Path) -> None:
    """Validation accuracy (detail per type, easy-VQA) against question presentations, from the training log."""
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
    for key, label, style in [("detail_val_acc", "detail (all default types)", "-o"), ("easyvqa_val_acc", "easy-VQA",
                              "-s")] + [(f"detail_val_{t}", f"detail: {t}", ":") for t in DEFAULT_TYPES]:
        if ev and key in ev[0]:
            ax.plot(xs, [e[key] for e in ev], style, label=label, markersize=3)
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
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="conversations per step (default %(default)s)")
    p.add_argument("--turns", type=int, default=1,
                   help="questions per conversation at most; 1: every question its own sequence (default %(default)s)")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak AdamW learning rate (default %(default)s)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (default %(default)s)")
    p.add_argument("--detail-scenes", type=int, default=20000, help="detail train scenes (default %(default)s)")
    p.add_argument("--types", default=",".join(DEFAULT_TYPES), help="detail question types (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=200, help="(default %(default)s)")
    p.add_argument("--ckpt-every", type=int, default=50, help="(default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out-dir", type=Path, default=Path("~/.cache/mmcompress/train_mini").expanduser())
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt")
    p.add_argument("--export-only", action="store_true", help="only export the checkpoint to --assets")
    p.add_argument("--assets", type=Path, default=None, help="export the result here (e.g. mmcompress/zoo/assets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, default=None, help="with --assets: also draw the learning curve to this PNG")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    types = tuple(t for t in a.types.split(",") if t)
    bad = [t for t in types if t not in detail.QUESTION_TYPES]
    if bad:
        p.error(f"--types: unknown {bad}; choose from {detail.QUESTION_TYPES}")
    a.out_dir = a.out_dir.expanduser()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = a.out_dir / "ckpt.pt"

    tok_path = a.out_dir / mini.TOKENIZER_FILE
    if not tok_path.is_file():
        mini.build_tokenizer().backend_tokenizer.save(str(tok_path))
    tok = mini.load_tokenizer(tok_path)
    proc = mini.RefVLMMiniProcessor(tok)
    cfg = mini.config(len(tok))

    # data: (image key, type, question, answer); image keys: ("d", i) detail train, ("e", i) easy-VQA train
    t0 = time.time()
    dfeat = features("train", "detail", a.detail_scenes)
    efeat = features("train", "easyvqa")
    vfeat = features("val", "detail", 500)
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
        return {"d": dfeat, "e": efeat, "v": vfeat}[src][i]

    train_convs = conversations(proc, rows_d, a.turns) + conversations(proc, rows_e, a.turns)
    evalsets = {"detail_val": (conversations(proc, rows_dv, 1), feats_of),
                "easyvqa_val": (conversations(proc, rows_ev, 1), feats_of)}
    n_q = len(rows_d) + len(rows_e)
    print(f"data: {len(rows_d)} detail + {len(rows_e)} easy-VQA questions in {len(train_convs)} conversations; "
          f"val {len(rows_dv)} detail + {len(rows_ev)} easy-VQA ({time.time() - t0:.0f} s)", flush=True)

    allf = torch.cat([dfeat.reshape(-1, dfeat.shape[-1])[::7], efeat.reshape(-1, efeat.shape[-1])[::7]])
    mean, std = allf.mean(0), allf.std(0).clamp_min(1e-3)
    torch.manual_seed(a.seed)
    model = Trainable(cfg, mean, std)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        prog = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))

    step, presented, elapsed = 0, 0, 0.0
    train_cmd = "python scripts/train_ref_mini.py " + " ".join(argv if argv is not None else sys.argv[1:])
    log_path = a.out_dir / "train_log.tsv"
    if (a.resume or a.export_only) and ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, presented, elapsed = ck["step"], ck["presented"], ck["elapsed"]
        train_cmd = ck.get("command", train_cmd)
        print(f"resumed at step {step} ({presented} question presentations, {elapsed:.0f} s)", flush=True)
    elif a.export_only:
        p.error(f"--export-only: no checkpoint at {ckpt_path}")
    elif log_path.exists():
        log_path.unlink()

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "presented": presented,
                    "elapsed": elapsed, "command": train_cmd}, tmp)
        tmp.replace(ckpt_path)

    header = ["step", "epoch", "presentations", "loss", "lr", "seconds"]
    if not log_path.exists():
        log_path.write_text("\t".join(header) + "\tevaluation\n")
    steps_per_epoch = len(train_convs) // a.batch_size
    model.train()
    run_loss, run_n = 0.0, 0
    while step < a.steps and not a.export_only:
        epoch, k = divmod(step, steps_per_epoch)
        order = list(range(len(train_convs)))
        random.Random(a.seed * 1000 + epoch).shuffle(order)  # the epoch's order: the same after --resume
        idx = order[k * a.batch_size: (k + 1) * a.batch_size]
        rng = random.Random(a.seed * 1_000_003 + step)
        seqs = [sequence(proc, train_convs[i], rng) for i in idx]
        t1 = time.time()
        ids, labels, mask, feats = batch_tensors(seqs, [train_convs[i][0][0] for i in idx], feats_of,
                                                 proc.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(ids, mask, feats)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        presented += sum(len(train_convs[i]) for i in idx)
        elapsed += time.time() - t1
        run_loss, run_n = run_loss + loss.item(), run_n + 1
        ev = ""
        if step % a.eval_every == 0 or step == a.steps:
            t2 = time.time()
            ev = json.dumps({k: round(v, 4) for k, v in evaluate(model, proc, evalsets).items()})
            elapsed += time.time() - t2
        if step % 10 == 0 or ev:
            row = [step, f"{step / steps_per_epoch:.3f}", presented, f"{run_loss / run_n:.4f}", f"{lr_at(step):.2e}",
                   f"{elapsed:.0f}"]
            with log_path.open("a") as f:
                f.write("\t".join(map(str, row)) + f"\t{ev}\n")
            print("\t".join(map(str, row)), ev, flush=True)
            run_loss, run_n = 0.0, 0
        if step % a.ckpt_every == 0 or step == a.steps:
            save()

    if a.assets is not None:
        from safetensors.torch import save_file

        a.assets.mkdir(parents=True, exist_ok=True)
        save_file(model.export(), str(a.assets / mini.WEIGHTS_FILE))
        shutil.copyfile(tok_path, a.assets / mini.TOKENIZER_FILE)
        shutil.copyfile(log_path, a.assets / "refvlm_mini_train_log.tsv")
        final = evaluate(model, proc, evalsets)
        info = {"steps": step, "question_presentations": presented, "train_seconds": round(elapsed),
                "parameters_trained": n_params, "train_questions": n_q, "detail_types": list(types),
                "detail_scenes": a.detail_scenes, "batch_size": a.batch_size, "turns": a.turns, "lr": a.lr,
                "validation": {k: round(v, 4) for k, v in final.items()},
                "command": train_cmd}
        (a.assets / "refvlm_mini.json").write_text(json.dumps(info, indent=1) + "\n")
        if a.plot is not None:
            plot_log(log_path, a.plot)
        print(f"exported to {a.assets}: {info}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
