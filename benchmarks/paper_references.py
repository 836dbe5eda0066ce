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


def _neighbour_sums(x: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, kept: list[int],
                    knn: int) -> torch.Tensor:
    """[len(kept) + 1, C]: each kept token plus the score-weighted sum of its knn nearest other tokens (one loop step
    per kept token), then the score-weighted sum of the tokens not kept."""
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


def prumerge_plain(x: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, K: int, knn: int = 32) -> torch.Tensor:
    """x [N, C], scores [N], metric [N, d] -> [K + 1, C]: the top-K tokens by descending score, each plus the
    score-weighted sum of its knn nearest other tokens, then the score-weighted sum of the pruned tokens."""
    return _neighbour_sums(x, scores, metric, scores.topk(K).indices.tolist(), knn)


def prumerge_plus_plain(x: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, knn: int = 32) -> torch.Tensor:
    """PruMerge+ at its adaptive budget: x [N, C], scores [N], metric [N, d] -> [K + U + 1, C]. n_out = scores above
    Q3 + 1.5 IQR (linear quartiles), K = int(N * n_out / N) top tokens (descending), then the raster positions 0, t,
    2t, ... < N - 1 (t = int(int(N / n_out) / 3)) not kept yet, merged as in `prumerge_plain`."""
    N = x.shape[0]
    q1, q3 = torch.quantile(scores.double(), torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    n_out = int((scores.double() > q3 + 1.5 * (q3 - q1)).sum())
    kept = scores.topk(int(N * (n_out / N))).indices.tolist()
    step = int(1 / (n_out / N)) if n_out else N
    kept += [i for i in range(0, N - 1, max(1, int(step / 3))) if i not in kept]
    return _neighbour_sums(x, scores, metric, kept, knn)


def visiontrim_plain(x: torch.Tensor, scores: torch.Tensor, text: torch.Tensor, kd: int, kc: int,
                     rounds: int = 3) -> torch.Tensor:
    """VisionTrim's DVTS + TGVC: x [N, C], scores [N] (the DVTS score), text [L, C] -> [kd + kc, C] in the release's
    order: the top-kd tokens by score (source order), then the kc remaining tokens with the highest mean cosine to
    the text tokens (source order), each grown over `rounds` rounds by the mean of the other remaining tokens that
    join it (argmax over targets of sum_l cos(x_i, t_l) cos(t_l, T_j), T_j its current value)."""
    x, text = x.double(), text.double()
    order = sorted(range(x.shape[0]), key=lambda i: (-float(scores[i]), i))
    dom = sorted(order[:kd])
    rest = sorted(order[kd:])
    tn = text / text.norm(dim=1, keepdim=True)
    cos_t = {i: tn @ (x[i] / x[i].norm()) for i in rest}  # [L] per remaining token
    tgt = sorted(sorted(rest, key=lambda i: (-float(cos_t[i].mean()), i))[:kc])
    merged = [i for i in rest if i not in tgt]
    val = {j: x[j].clone() for j in tgt}
    for _ in range(rounds):
        groups: dict[int, list[int]] = {j: [] for j in tgt}
        for i in merged:
            m = [float(cos_t[i] @ (tn @ (val[j] / val[j].norm()))) for j in tgt]
            groups[tgt[max(range(kc), key=lambda a: (m[a], -a))]].append(i)
        for j in tgt:
            if groups[j]:
                val[j] = val[j] + x[groups[j]].mean(0)
    return torch.stack([x[i] for i in dom] + [val[j] for j in tgt]).to(torch.float32)


def dycoke_plain(x: torch.Tensor, T: int, prune: float = 0.7) -> torch.Tensor:
    """x [T * P, C] -> the kept tokens in order: frame pairs (2i+1 vs 2i, then 4j+2 vs 4j), least similar first;
    the first stage compares F.normalize'd frames, the second the frames, and topk picks, as the release does."""
    F = torch.nn.functional
    P = x.shape[0] // T
    frames = list(x.view(T, P, -1))
    q = int((1.0 - prune) * P)
    out = list(frames)
    pairs = {i + 1: i for i in range(0, T - 1, 2)} | {i + 2: i for i in range(0, T - 4, 4)}
    for f, g in pairs.items():
        if f % 2:
            sim = F.cosine_similarity(F.normalize(frames[g], dim=1), F.normalize(frames[f], dim=1), dim=1)
        else:
            sim = F.cosine_similarity(frames[g], frames[f], dim=1)
        out[f] = frames[f][sim.topk(q, largest=False).indices]
    return torch.cat(out)


def idpruner_plain(x: torch.Tensor, scores: torch.Tensor, k: int, lam: float = 0.5) -> torch.Tensor:
    """IDPruner's MMR: x [N, C], scores [N] -> [k, C], the kept tokens in source order. Importance = scores min-max
    scaled (+1e-6); the most important token first, then one token per step maximising lam * importance - (1 - lam) *
    (its highest cosine to the chosen tokens, recomputed from the chosen list at every step; ties: the lower index)."""
    imp = (scores - scores.min()) / (scores.max() - scores.min() + 1e-6)
    u = x / (x.norm(dim=1, keepdim=True) + 1e-8)
    chosen = [int(imp.argmax())]
    while len(chosen) < k:
        v = lam * imp - (1 - lam) * (u @ u[chosen].T).max(dim=1).values  # [N]
        v[chosen] = float("-inf")
        chosen.append(int(v.argmax()))
    return x[sorted(chosen)]


def trio_encoder_plain(x: torch.Tensor, shallow: torch.Tensor, deep: torch.Tensor, k: int, side: int = 24,
                       window: int = 6) -> torch.Tensor:
    """TRIO's encoder stage: x [side * side, C], shallow and deep [side * side] -> [k, C] in source order. Window by
    window (row-major), the top (k // 2) // (side // window)^2 tokens by `shallow`; then the top of `deep` among the
    others up to k; every other token joins its most cosine-similar kept token (one loop step per token), and each
    kept token becomes the plain mean of itself and its joiners."""
    n_win = (side // window) ** 2
    per = (k // 2) // n_win
    kept: list[int] = []
    for wy in range(side // window):
        for wx in range(side // window):
            cells = [(wy * window + dy) * side + wx * window + dx for dy in range(window) for dx in range(window)]
            kept += sorted(cells, key=lambda i: (-float(shallow[i]), i))[:per]
    rest = sorted((i for i in range(x.shape[0]) if i not in kept), key=lambda i: (-float(deep[i]), i))
    kept = sorted(kept + rest[: k - len(kept)])
    u = x / x.norm(dim=1, keepdim=True)
    groups: dict[int, list[int]] = {t: [t] for t in kept}
    for i in range(x.shape[0]):
        if i not in groups:
            groups[kept[int((u[kept] @ u[i]).argmax())]].append(i)
    return torch.stack([x[groups[t]].mean(0) for t in kept])
