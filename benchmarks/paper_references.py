"""Plain per-sample references of the paper-named methods' release rules (our own code, written from the rules in
docs/fidelity.md, one sample at a time with Python loops where the papers describe loops): the peers that
`compressor_speed.py --only fidelity` times our batched compressors against, and checks them with.

Letters: N tokens (prefix removed), C channels, d metric channels, k budget.
"""

from __future__ import annotations

import torch


def divprune_plain(m: torch.Tensor, k: int) -> torch.Tensor:
    """m [N, d] -> [k] greedy max-min picks: full cosine-distance matrix, min over the chosen rows at every step."""
    u = m / m.norm(dim=1, keepdim=True)
    dist = 1.0 - u @ u.T  # [N, N]
    picks = [int(dist.topk(2, dim=0, largest=False).values[1].argmax())]
    for _ in range(1, k):
        picks.append(int(dist[picks].min(0).values.argmax()))
    return torch.tensor(picks)


def visionzip_plain(x: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, kd: int, kc: int) -> torch.Tensor:
    """x [1 + N, C] with CLS, scores [1 + N], metric [1 + N, d] -> [1 + kd + kc, C] in the release's order."""
    top = (scores[1:].topk(kd).indices + 1).tolist()
    dom = sorted([0] + top)
    rest = [i for i in range(x.shape[0]) if i not in dom]
    tgt = rest[:: max(1, len(rest) // kc)][:kc]
    unit = metric / metric.norm(dim=1, keepdim=True)
    groups: dict[int, list[int]] = {t: [] for t in tgt}
    for i in rest:
        if i not in groups:
            groups[tgt[int((unit[tgt] @ unit[i]).argmax())]].append(i)
    ctx = [x[t] + (x[g].mean(0) if g else 0.0) for t, g in groups.items()]
    return torch.stack([x[i] for i in dom] + ctx)


def prumerge_plain(x: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, K: int, knn: int = 32) -> torch.Tensor:
    """x [N, C], scores [N], metric [N, d] -> [K + 1, C]: each top-K token plus the score-weighted sum of its knn
    nearest other tokens (one loop step per kept token), then the score-weighted sum of the pruned tokens."""
    kept = scores.topk(K).indices.tolist()
    unit = metric / metric.norm(dim=1, keepdim=True)
    out = []
    for i in kept:
        sim = unit @ unit[i]
        sim[i] = float("-inf")
        nb = sim.topk(min(knn, x.shape[0] - 1)).indices
        out.append(x[i] + (scores[nb, None] * x[nb]).sum(0))
    pruned = [j for j in range(x.shape[0]) if j not in kept]
    out.append((scores[pruned, None] * x[pruned]).sum(0))
    return torch.stack(out)


def dycoke_plain(x: torch.Tensor, T: int, prune: float = 0.7) -> torch.Tensor:
    """x [T * P, C] -> the kept tokens in order: frame pairs (2i+1 vs 2i, then 4j+2 vs 4j), least similar first."""
    P = x.shape[0] // T
    frames = list(x.view(T, P, -1))
    q = int((1.0 - prune) * P)
    out = list(frames)
    pairs = {i + 1: i for i in range(0, T - 1, 2)} | {i + 2: i for i in range(0, T - 4, 4)}
    for f, g in pairs.items():
        sim = torch.nn.functional.cosine_similarity(frames[f], frames[g], dim=1)
        out[f] = frames[f][torch.sort(sim, stable=True).indices[:q]]
    return torch.cat(out)
