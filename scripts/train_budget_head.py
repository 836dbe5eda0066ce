"""Train the learned budget head of `adaptive` (KARL-style: budget conditioned on the target error epsilon).

    python scripts/train_budget_head.py            # writes mmcompress/compressors/assets/budget_head.pt
                                                   # and runs/budget_head/report.{json,md}

Data: real DINOv2-S/14 tokens (224 px, 256 patch tokens; the CLS is the prefix and is not compressed) of
* Fashion-MNIST: the seeded subset of `mmcompress.evals.knn.fmnist_subset` (1,000 train / 500 test images;
  extracted here when the cache is absent), final-layer and layer-6 tokens (two token distributions);
* real photos shipped in matplotlib (grace_hopper.jpg for training, Minduka_Present_Blue_Pack.png held out),
  several random crops/resizes each.
Targets: for every sample, ONE full Ward hierarchy (`build_hierarchy`) gives the error curve of all cuts, hence the
minimal budget k*(eps) for every epsilon on a log grid 0.02..0.3 (above ~0.3 one
token already suffices for these tokens). The head sees `token_features` (O(N·C) statistics)
and log(epsilon) and outputs the logit of k / N; its form logit = f(z) + softplus(g(z))·u + softplus(h(z))·u²,
u = -log(epsilon), makes the budget monotone in epsilon. Loss: pinball (quantile tau = 0.9) on the logit, so that the
predicted budget meets epsilon on about 90% of samples. Held-out evaluation: Fashion-MNIST test images (tokens of
both layers) and the held-out photo: the rate at which the cut at the predicted k meets epsilon (k >= k*), and the mean
excess k - k* over the minimal count; a per-epsilon constant fraction (the train 90% quantile) is the baseline.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from mmcompress.compressors.adaptive import HEAD_PATH, BudgetHead, build_hierarchy, token_features  # noqa: E402

EPS = torch.exp(torch.linspace(math.log(0.02), math.log(0.3), 14))
TAU = 0.9
OUT = ROOT / "runs" / "budget_head"


def photo_crops(path: Path, n: int, seed: int) -> list:
    """n random square crops (25-100% of the short side), resized later to 224 px by the processor."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    W, H = img.size
    rng = np.random.default_rng(seed)
    out = [img]
    for _ in range(n - 1):
        s = int(min(W, H) * rng.uniform(0.25, 1.0))
        x0, y0 = int(rng.integers(0, W - s + 1)), int(rng.integers(0, H - s + 1))
        out.append(img.crop((x0, y0, x0 + s, y0 + s)))
    return out


@torch.no_grad()
def photo_tokens(model, proc, images: list) -> dict[str, torch.Tensor]:
    fin, mid = [], []
    for i in range(0, len(images), 8):
        o = model(pixel_values=proc(images[i : i + 8])["pixel_values"], output_hidden_states=True)
        fin.append(o.last_hidden_state)
        mid.append(o.hidden_states[6])
    return {"final": torch.cat(fin), "mid": torch.cat(mid)}


def curves(x: torch.Tensor) -> torch.Tensor:
    """[S, N', C] patch tokens -> [S, N'] relative error of the cut with N' - t slots, t = 0..N'-1 (one hierarchy)."""
    return torch.stack([build_hierarchy(x[s]).errors()[: x.shape[1]] for s in range(len(x))])


def kstar(curve: torch.Tensor) -> torch.Tensor:
    """[S, N'] error curves -> [S, len(EPS)] minimal budgets k*(eps)."""
    N = curve.shape[1]
    ok = curve.unsqueeze(1) <= EPS.double().view(1, -1, 1)  # [S, E, N'] cut after t merges meets eps
    t = torch.where(ok, torch.arange(N), -1).amax(2)  # errors grow with t: the last t that meets eps
    return N - t


def dataset(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [S, F], error curves [S, N']) of patch tokens x [S, N', C]."""
    feats = torch.cat([token_features(x[i : i + 64]) for i in range(0, len(x), 64)])
    return feats, curves(x)


def pinball(pred: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    d = target - pred
    return torch.maximum(tau * d, (tau - 1) * d).mean()


def evaluate(head: BudgetHead, feats: torch.Tensor, kstar: torch.Tensor, N: int) -> dict:
    S, E = kstar.shape
    with torch.no_grad():
        logit = head(feats.repeat_interleave(E, 0), EPS.repeat(S))
    k = (torch.sigmoid(logit) * N).ceil().clamp(1, N).view(S, E).long()
    meet = (k >= kstar).float()
    excess = (k - kstar).float()
    hard = kstar > 1  # pairs where one token is not already enough
    return {"meet_rate": round(float(meet.mean()), 4), "mean_excess_tokens": round(float(excess.mean()), 2),
            "mean_excess_when_met": round(float((k - kstar)[k >= kstar].float().mean()), 2),
            "meet_rate_k_star_gt_1": round(float(meet[hard].mean()), 4) if bool(hard.any()) else None,
            "mean_kstar": round(float(kstar.float().mean()), 2), "mean_k": round(float(k.float().mean()), 2),
            "meet_rate_per_eps": [round(float(v), 3) for v in meet.mean(0)]}


def constant_baseline(kstar_tr: torch.Tensor, kstar_te: torch.Tensor, N: int) -> dict:
    q = torch.quantile(kstar_tr.float(), TAU, dim=0).ceil().long()  # [E] one budget per epsilon
    k = q.expand_as(kstar_te)
    return {"meet_rate": round(float((k >= kstar_te).float().mean()), 4),
            "mean_excess_tokens": round(float((k - kstar_te).float().mean()), 2)}


def main() -> None:
    torch.set_num_threads(1)  # the hierarchy loop is latency bound; one thread avoids oversubscription
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    from mmcompress.evals.knn import fmnist_subset
    from PIL import Image

    from mmcompress import zoo

    def load_model():
        return zoo.load("dinov2-s14")

    cache = ROOT / "runs" / "quality" / "cache" / "dinov2_fmnist_1000_500_0.pt"
    model = proc = None
    if cache.is_file():
        fm = torch.load(cache)
    else:
        model, proc = load_model()
        data = fmnist_subset(1000, 500, 0)  # the subset the removed quality_table.py drew (same seeded order)
        fm = {s: photo_tokens(model, proc, [Image.fromarray(im).convert("RGB") for im in data[k][0]])
              for s, k in (("train", "train"), ("t10k", "test"))}
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(fm, cache)
    photo_cache = OUT / "photo_tokens.pt"
    if photo_cache.is_file():
        ph = torch.load(photo_cache)
    else:
        if model is None:
            model, proc = load_model()
        sample = Path(__import__("matplotlib").get_data_path()) / "sample_data"
        ph = {"train": photo_tokens(model, proc, photo_crops(sample / "grace_hopper.jpg", 32, 0)),
              "test": photo_tokens(model, proc, photo_crops(sample / "Minduka_Present_Blue_Pack.png", 32, 1))}
        torch.save(ph, photo_cache)
    t = time.time()
    parts_cache = OUT / "parts.pt"
    parts = torch.load(parts_cache) if parts_cache.is_file() else {}
    for name, src in (("fmnist_train", fm["train"]), ("fmnist_test", fm["t10k"]), ("photo_train", ph["train"]),
                      ("photo_test", ph["test"])):
        for layer in ("final", "mid"):
            if f"{name}_{layer}" in parts:
                continue
            parts[f"{name}_{layer}"] = dataset(src[layer][:, 1:].float())
            print(f"{name}_{layer}: {len(parts[f'{name}_{layer}'][0])} samples, {time.time() - t:.0f}s", flush=True)
    torch.save(parts, parts_cache)
    parts = {k: (f, kstar(c)) for k, (f, c) in parts.items()}
    N = fm["train"]["final"].shape[1] - 1
    tr = [k for k in parts if "_train_" in k]
    te = [k for k in parts if "_test_" in k]
    F = torch.cat([parts[k][0] for k in tr])
    K = torch.cat([parts[k][1] for k in tr])
    head = BudgetHead(hidden=32)
    head.mu.copy_(F.mean(0))
    head.sd.copy_(F.std(0).clamp(min=1e-6))
    S, E = K.shape
    fx, ex = F.repeat_interleave(E, 0), EPS.repeat(S)
    frac = ((K.float() - 0.5).clamp(min=0.5) / N).clamp(max=1 - 0.5 / N).view(-1)  # k* - 0.5: ceil recovers k*
    y = torch.log(frac / (1 - frac))
    opt = torch.optim.Adam(head.parameters(), lr=3e-3, weight_decay=1e-5)
    for step in range(3000):
        loss = pinball(head(fx, ex), y, TAU)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0:
            print(f"step {step} loss {float(loss.detach()):.4f}", flush=True)
    head.eval()
    report = {"tau": TAU, "epsilons": [round(float(e), 4) for e in EPS], "N": N, "train_samples": S, "held_out": {}}
    for k in te + tr:
        ev = evaluate(head, parts[k][0], parts[k][1], N)
        tr_match = k.replace("_test_", "_train_")
        if k in te:
            ev["constant_baseline"] = constant_baseline(parts[tr_match][1], parts[k][1], N)
        report["held_out" if k in te else "train"] = report.get("held_out" if k in te else "train", {})
        report["held_out" if k in te else "train"][k] = ev
        print(k, ev, flush=True)
    HEAD_PATH.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hidden": 32, "state_dict": head.state_dict(), "epsilons": EPS, "tau": TAU}, HEAD_PATH)
    (OUT / "report.json").write_text(json.dumps(report, indent=1))
    lines = ["| held-out set | samples x eps | meet rate | meet rate where k* > 1 | mean excess (tokens of 256) | "
             "mean k* | constant-budget baseline: meet / excess |", "|---|---|---|---|---|---|---|"]
    for k, ev in report["held_out"].items():
        n = len(parts[k][0])
        cb = ev["constant_baseline"]
        lines.append(f"| {k} | {n} x {E} | {ev['meet_rate']:.3f} | {ev['meet_rate_k_star_gt_1']} | "
                     f"{ev['mean_excess_tokens']:.1f} | "
                     f"{ev['mean_kstar']:.1f} | {cb['meet_rate']:.3f} / {cb['mean_excess_tokens']:.1f} |")
    lines += ["", "Training-free `adaptive` (keep=\"auto\"): meets epsilon on every sample by construction; its "
              "budget k* (mean over held-out Fashion-MNIST test images) vs the head's prediction:", "",
              "| epsilon | k* final layer | head k final layer | k* layer 6 | head k layer 6 |",
              "|---|---|---|---|---|"]
    with torch.no_grad():
        hk = {}
        for k in ("fmnist_test_final", "fmnist_test_mid"):
            f, ks = parts[k]
            lg = head(f.repeat_interleave(E, 0), EPS.repeat(len(f)))
            hk[k] = ((torch.sigmoid(lg) * N).ceil().clamp(1, N).view(len(f), E).float().mean(0), ks.float().mean(0))
    for j, e in enumerate(EPS.tolist()):
        fin, mid = hk["fmnist_test_final"], hk["fmnist_test_mid"]
        lines.append(f"| {e:.3f} | {fin[1][j]:.1f} | {fin[0][j]:.1f} | {mid[1][j]:.1f} | {mid[0][j]:.1f} |")
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"saved {HEAD_PATH} ({HEAD_PATH.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
