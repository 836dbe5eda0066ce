"""Plain per-sample references of the paper-named methods' release rules (our own code, written from the rules in
docs/fidelity.md, one sample at a time with Python loops where the papers describe loops): the peers that
`compressor_speed.py --only fidelity` times our batched compressors against, and checks them with.

Letters: N tokens (prefix removed), C channels, d metric channels, k budget, T frames, S tokens per frame.
"""

from __future__ import annotations

import math

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


def prunesid_plain(x: torch.Tensor, scores: torch.Tensor, K: int, seed: int = 0) -> torch.Tensor:
    """PruneSID's LLaVA path: x [1 + N, C] with the CLS first, scores [N] (the CLS attention row over the patches)
    -> [K, C]: the CLS, then group by group (0, 1, ...) each group's first d_g tokens of its ranking.

    Groups: torch.pca_lowrank(sigmoid(patches)^T, q = G) (the release's call) with the global RNG seeded with `seed`
    just before it (restored after), G = floor(K / 4) clamped to [1, min(K - 1, C, N)]; each patch joins the
    component of its largest |V|. NMS per group, one token at a time in descending score (ties: the lower index):
    kept unless a kept token of its group has cosine above (K / 32) x the mean cosine over the pairs i < j. Budgets:
    one per non-empty group; caps min(5 ceil(K / 64), size, NMS count), all raised by one (each at most its size)
    until they sum to min(K, N); the other K - 1 - (non-empty groups) shared by rounded cumulative NMS fractions
    (float32, as the release computes them), each group capped; the shortfall filled group by group in the order
    of torch.argsort(NMS counts, descending=True), the release's call (its order among equal counts is torch's).
    A group's ranking: its NMS survivors in NMS order, then the rest by descending score."""
    p = x[1:].float()  # [N, C] patches
    N, C = p.shape
    G = max(1, min(K // 4, K - 1, C, N))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loads = torch.pca_lowrank(torch.sigmoid(p).T, q=G)[2].abs()  # [N, G]
    group = loads.argmax(dim=1).tolist()
    u = p / p.norm(dim=1, keepdim=True)
    sim = u @ u.T  # [N, N]
    iu = torch.triu_indices(N, N, offset=1)
    thr = (K / 32) * sim[iu[0], iu[1]].mean()  # float32, as the release's
    ranked: list[list[int]] = []
    nms: list[int] = []
    for g in range(G):
        members = sorted((i for i in range(N) if group[i] == g), key=lambda i: (-float(scores[i]), i))
        kept: list[int] = []
        for i in members:
            if not kept or not bool((sim[kept, i] > thr).any()):
                kept.append(i)
        ranked.append(kept + [i for i in members if i not in kept])
        nms.append(len(kept))
    sizes = [len(r) for r in ranked]
    lower = [min(1, s) for s in sizes]
    upper = [min(5 * math.ceil(K / 64), s, n) for s, n in zip(sizes, nms, strict=True)]
    while sum(upper) < min(K, N):
        upper = [min(c + 1, s) for c, s in zip(upper, sizes, strict=True)]
    other = max(K - 1 - sum(lower), 0)
    cum = ((torch.tensor(nms) / sum(nms)).cumsum(0) * other).round().long().tolist()  # [G] rounded cumulative shares
    d = [min(c - prev + lo, up) for c, prev, lo, up in zip(cum, [0] + cum[:-1], lower, upper, strict=True)]
    for g in torch.argsort(torch.tensor(nms), descending=True).tolist():
        missing = other + sum(lower) - sum(d)
        if missing <= 0:
            break
        d[g] += min(upper[g] - d[g], missing)
    seq = [i for g in range(G) for i in ranked[g][: d[g]]]
    return x[[0] + [1 + i for i in seq]]


def _dpc_knn(f: torch.Tensor, n: int, knn: int) -> list[list[int]]:
    """DPC-kNN of f [m, C] into n clusters -> the member rows of each cluster, its centre first, clusters in source
    order of their centres. d = Euclidean / sqrt(C); density exp(-mean of the knn smallest d^2, self included);
    delta = d to the nearest denser row (none: the largest d); the n highest delta x density are the centres (ties:
    the lower row); every other row joins its nearest centre (ties: the higher-scored centre)."""
    m, C = f.shape
    d = torch.cdist(f, f) / math.sqrt(C)  # [m, m]
    dens = torch.stack([torch.exp(-(d[i].topk(knn, largest=False).values ** 2).mean()) for i in range(m)])  # [m]
    far = d.max()
    delta = torch.stack([min((d[i, j] for j in range(m) if dens[j] > dens[i]), default=far) for i in range(m)])
    score = (delta * dens).tolist()
    centres = sorted(range(m), key=lambda i: (-score[i], i))[:n]
    members: dict[int, list[int]] = {c: [c] for c in centres}
    for i in range(m):
        if i not in members:
            members[centres[int(d[i, centres].argmin())]].append(i)
    return [members[c] for c in sorted(centres)]


def flashvid_plain(x: torch.Tensor, a: torch.Tensor, b: int, alpha: float = 0.7, tau: float = 0.8,
                   seg_th: float = 0.9, min_seg: int = 8, knn: int = 7) -> torch.Tensor:
    """FlashVID before the LLM at per-frame budget b: x [T, S, C] frames, a [T, S] attention -> [M, C] in source
    order (of the selected tokens and of the clusters' centres). n_sel = ceil(b * alpha), n_sttm = b - n_sel.

    1. Segments: a cut after frame t where cos(mean of frame t, mean of frame t + 1) < seg_th; below min_seg
       segments, the lowest-similarity uncut transitions are cut too.
    2. Per frame, D[i, j] = (1 - cos(x_i, x_j)) * a_j * 1e6 * r_j, r_j = mean over the segment's frames c of
       x_j . mean(frame c); first the token whose column has the largest second-smallest entry, then one at a time
       the unselected token with the largest min over the selected rows (ties: the lower index); n_sel tokens.
    3. In a segment, frame by frame, each unselected token of frame t > 0 finds its most similar unselected token of
       frame t - 1 and merges into it when the cosine exceeds tau (when fewer than b L tokens of the L frames would
       stay, tau becomes the (L S - b L)-th largest of those cosines, at least -1 + 1e-6). From the last frame back,
       a merged token adds its value (itself plus what merged into it) to its anchor, whose count grows by one; a
       token that stays (a tree's root) is worth its value over its count.
    4. The roots of frame t (a one-frame segment: its unselected tokens) go into ceil(n_t * n_sttm L / roots of the
       segment) DPC-kNN clusters (knn = min(clusters, 7)) when that ratio is below 1, each output the mean of its
       roots' values at its centre's place; otherwise each root is output. n_sttm = 0: the unselected are dropped.
    """
    T, S, C = x.shape
    x = x.float()
    unit = x / x.norm(dim=-1, keepdim=True)  # [T, S, C]
    fm = x.mean(1)  # [T, C] frame means
    fu = fm / fm.norm(dim=1, keepdim=True)
    trans = [fu[t] @ fu[t + 1] for t in range(T - 1)]  # [T - 1] transition similarities
    cuts = {t for t in range(T - 1) if trans[t] < seg_th}
    if len(cuts) + 1 < min_seg:
        extra = sorted((t for t in range(T - 1) if t not in cuts), key=lambda t: (float(trans[t]), t))
        cuts |= set(extra[: min_seg - 1 - len(cuts)])
    bounds = [0] + [t + 1 for t in sorted(cuts)] + [T]
    n_sel = math.ceil(b * alpha)
    n_sttm = b - n_sel
    out: dict[int, torch.Tensor] = {}  # source index of the representative -> output token
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        L = e - s
        means = fm[s:e]  # [L, C]
        sel: list[list[int]] = []
        for t in range(s, e):
            rel = (x[t] @ means.T).mean(1)  # [S] event relevance
            dist = (1.0 - unit[t] @ unit[t].T) * (a[t].float() * 1e6) * rel  # [S, S], column j calibrated
            picks = [int(dist.topk(2, dim=0, largest=False).values[1].argmax())] if n_sel else []
            while len(picks) < n_sel:
                m = dist[picks].min(0).values
                m[picks] = float("-inf")
                picks.append(int(m.argmax()))
            sel.append(picks)
            for i in picks:
                out[t * S + i] = x[t, i]
        if n_sttm == 0:
            continue
        free = [[i for i in range(S) if i not in sel[t]] for t in range(L)]
        val = x[s:e].clone()  # [L, S, C] each token's value (its own plus what merges into it)
        cnt = [[1] * S for _ in range(L)]
        merged = [[False] * S for _ in range(L)]
        if L > 1:
            best = torch.full((L, S), -1.0)  # [L, S] best cosine to the previous frame's unselected tokens
            anchor = [[-1] * S for _ in range(L)]
            for t in range(1, L):
                for i in free[t]:
                    c = unit[s + t - 1, free[t - 1]] @ unit[s + t, i]  # [S - n_sel]
                    j = int(c.argmax())
                    best[t, i], anchor[t][i] = c[j], free[t - 1][j]
            th = torch.tensor(tau)
            if int((best <= th).sum()) < b * L:
                soft = best.flatten().sort(descending=True).values[L * S - b * L - 1]
                th = soft if soft > -1.0 + 1e-6 else torch.tensor(-1.0 + 1e-6)
            merged = (best > th).tolist()
            for t in range(L - 1, 0, -1):
                for i in range(S):
                    if merged[t][i]:
                        val[t - 1, anchor[t][i]] += val[t, i]
                        cnt[t - 1][anchor[t][i]] += 1
        roots = [[i for i in free[t] if not merged[t][i]] for t in range(L)]
        ratio = n_sttm * L / sum(len(r) for r in roots)
        for t in range(L):
            tree = [val[t, i] / cnt[t][i] for i in roots[t]]  # each root's tree value
            nc = math.ceil(len(roots[t]) * ratio)
            if nc == 0:
                continue
            if ratio >= 1.0:
                for i, v in zip(roots[t], tree, strict=True):
                    out[(s + t) * S + i] = v
                continue
            for rows in _dpc_knn(torch.stack(tree), nc, min(nc, knn)):
                out[(s + t) * S + roots[t][rows[0]]] = torch.stack([tree[r] for r in rows]).mean(0)
    return torch.stack([out[i] for i in sorted(out)])
