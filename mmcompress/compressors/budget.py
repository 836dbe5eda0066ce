"""Per-sample token budgets for a target reconstruction error epsilon: one Ward merge hierarchy per sample (KARL-
style), the `estimate_keep` estimator behind every compressor's keep="auto", and the learned budget head.

Quality target. For tokens x [N, C] with sizes w (ones by default) and a partition of them into slots whose value is
the size-weighted mean of their members (x̂ = `CompressOutput.unmerge()`), the relative reconstruction error is

    err = sqrt( sum_i w_i |x_i - x̂_i|^2 / sum_i w_i |x_i|^2 )        (= |x - x̂| / |x| when w = 1).

Single pass, no search over compressions. The method builds ONE merge hierarchy per sample with Ward's criterion:
merging clusters a and b (weights n_a, n_b, means mu_a, mu_b) raises the numerator of err² by exactly

    cost(a, b) = n_a n_b / (n_a + n_b) * |mu_a - mu_b|^2,

so the error after any set of merges is known in closed form: the sum of their costs. The hierarchy is built by
reciprocal-nearest-neighbour rounds (each round: every cluster finds its cheapest partner in row chunks; all pairs
that are each other's cheapest partner merge at once). Ward's cost is reducible, so this yields the same dendrogram
as greedy Ward agglomeration, with monotone merge heights; the merges sorted by height (ties: creation order) form a
chain of nested partitions, and the cut after t merges has N - t slots and squared error sum(cost[:t]).

* keep="auto": merges are only formed while a pair costing <= T = epsilon² * sum_i w_i |x_i|^2 exists (a merge
  dearer than T can never be part of a cut within budget), then k = N - max{t : cumsum(cost)[t] <= T}: the
  smallest cut of this hierarchy whose error is <= epsilon. The compressor then returns exactly that cut, so its
  error meets epsilon by construction (up to float rounding).
* int/float keep: the rounds run until at most k clusters remain, and the hierarchy is cut after N - k merges.

Complexity per sample: a round over n clusters costs O(r·n·C) time for the r clusters whose partner changed (all n in
the first round) and O(chunk·n) memory (never an N x N matrix when N > chunk). Ward is reducible, so a cluster whose
partner was not merged keeps it; the first all-pairs search, O(N²·C), dominates. Measured on a busy 2-core CPU,
1 thread: DINOv2-S tokens (N = 256, C = 384) 40 ms for the full dendrogram; N = 576, C = 1024: 0.2-0.35 s;
N = 2880, C = 1024: 3-6 s exact, 1.6 s with `search_dim=64` (partners searched in a 64-dim principal subspace:
approximate hierarchy, ~4% more tokens for the same epsilon, errors still exact).

Learned budget head (`head=True`). A tiny MLP conditioned on epsilon (upside-down-RL style: the command is the
target error, the action the budget) maps cheap token statistics (O(N·C), no hierarchy) and log(epsilon) to a
predicted fraction k / N. It is trained by `scripts/train_budget_head.py` on real DINOv2-S/14 tokens against the
minimal k of the hierarchy above; weights live in `mmcompress/compressors/assets/budget_head.pt`.

Letters: B batch, N tokens (prefix removed), k budget, C channels, t merges.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmcompress.compressors.merge_ops import segment_sum

if TYPE_CHECKING:  # `Inputs` only annotates; importing base here would close the base -> budget -> base circle
    from mmcompress.compressors.base import Inputs

__all__ = ["Hierarchy", "build_hierarchy", "cut_hierarchy", "estimate_keep", "relative_error", "BudgetHead",
           "token_features", "load_head", "HEAD_PATH"]

HEAD_PATH = Path(__file__).with_name("assets") / "budget_head.pt"


@dataclass
class Hierarchy:
    """Merges of one sample, in the order they can be undone (sorted by height, ties by creation).

    Attributes:
        left: [t] int64 node ids merged (leaves 0..N-1, merge m creates node N + m in creation order).
        right: [t] int64 the other node.
        node: [t] int64 id of the node each merge creates.
        cost: [t] float64 exact increase of the weighted squared error caused by each merge.
        total: float64 sum_i w_i |x_i|^2 (the denominator of err²).
        n: number of leaves N.
    """

    left: torch.Tensor
    right: torch.Tensor
    node: torch.Tensor
    cost: torch.Tensor
    total: float
    n: int

    def errors(self) -> torch.Tensor:
        """[t + 1] float64 relative error after 0, 1, ..., t merges (cut with N, N-1, ... slots)."""
        sse = torch.cat([self.cost.new_zeros(1), self.cost.cumsum(0)])
        return (sse.clamp(min=0) / max(self.total, 1e-300)).sqrt()

    def keep_for(self, epsilon: float) -> int:
        """Smallest slot count of a cut with relative error <= epsilon."""
        ok = self.errors() <= epsilon
        t = int(ok.nonzero().max()) if bool(ok.any()) else 0
        return self.n - t


def _nearest(mu: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cheapest Ward partner of the clusters `rows`.

    Args:
        mu: [n, C] float32 cluster means.
        w: [n] float32 cluster weights.
        rows: [r] int64 clusters to search for.
        chunk: rows per block (peak memory chunk * n floats).

    Returns:
        (cost [r], partner [r]); ties go to the lowest partner index.
    """
    sq = (mu * mu).sum(1)  # [n]
    best = torch.empty(rows.numel(), dtype=mu.dtype, device=mu.device)
    arg = torch.empty(rows.numel(), dtype=torch.long, device=mu.device)
    for i in range(0, rows.numel(), chunk):
        r = rows[i : i + chunk]
        d = (sq[r, None] + sq[None, :] - 2.0 * (mu[r] @ mu.T)).clamp_(min=0)  # [c, n] squared distances
        d.mul_(w[r, None] * w[None, :] / (w[r, None] + w[None, :]))
        d[torch.arange(r.numel(), device=mu.device), r] = float("inf")
        best[i : i + chunk], arg[i : i + chunk] = d.min(dim=1)
    return best, arg


@torch.no_grad()
def build_hierarchy(x: torch.Tensor, w: torch.Tensor | None = None, *, epsilon: float | None = None,
                    min_clusters: int = 1, chunk: int = 1024, search_dim: int | None = None) -> Hierarchy:
    """Ward merge hierarchy of one sample by reciprocal-nearest-neighbour rounds.

    Args:
        x: [N, C] tokens.
        w: [N] positive sizes (None: ones).
        epsilon: when given, only merges costing <= epsilon² * total are formed (enough for `keep_for(epsilon)`).
        min_clusters: stop once at most this many clusters remain.
        chunk: rows per block of the partner search (peak memory chunk * N floats).
        search_dim: when set and < C, partners are searched in the top-`search_dim` principal subspace of x
            (randomised SVD, O(N·C·search_dim)): the search is C / search_dim times cheaper, the hierarchy is Ward's
            in that subspace (an approximation), while merge costs, errors and cuts stay exact in the full space.

    Returns:
        the `Hierarchy` (merges sorted by height).
    """
    N, C = x.shape
    dev = x.device
    x64 = x.double()
    w64 = torch.ones(N, dtype=torch.float64, device=dev) if w is None else w.double()
    total = float((w64 * (x64 * x64).sum(1)).sum())
    limit = math.inf if epsilon is None else epsilon * epsilon * total
    mu64, wc = x64.clone(), w64.clone()  # current clusters: means, weights
    ids = torch.arange(N, device=dev)  # node id of each current cluster
    height = torch.zeros(N, dtype=torch.float64, device=dev)  # monotone height of each current cluster
    L, R, NODE, COST, KEY = [], [], [], [], []
    next_id = N
    n = N
    if search_dim is not None and search_dim < min(N, C):
        g = torch.Generator(device="cpu").manual_seed(0)  # deterministic randomised range finder
        xc = (x64 - x64.mean(0)).float()
        Q = torch.linalg.qr(xc.T @ (xc @ torch.randn(C, search_dim + 8, generator=g).to(dev))).Q  # [C, r+8]
        V = torch.linalg.svd(xc @ Q, full_matrices=False).Vh[:search_dim].T  # [r+8, r]
        ms = xc @ (Q @ V)  # [N, r] search coordinates (a linear map: cluster means map to means)
    else:
        ms = x64.float()
    best, arg = _nearest(ms, w64.float(), torch.arange(N, device=dev), chunk) if N > 1 else (None, None)
    while n > max(1, min_clusters):
        ar = torch.arange(n, device=dev)
        ok = best <= limit * (1 + 1e-6) + 1e-30
        pair = (arg[arg] == ar) & (ar < arg) & ok
        if not bool(pair.any()):  # float asymmetry hid every reciprocal pair: merge the cheapest pair alone
            i = int(best.argmin())
            if not bool(ok[i]):
                break  # every possible merge costs more than the whole error budget
            a = torch.tensor([min(i, int(arg[i]))], device=dev)
            b = torch.tensor([max(i, int(arg[i]))], device=dev)
        else:
            a = pair.nonzero().squeeze(1)  # [p] first cluster of each pair
            b = arg[a]  # [p] its partner
        p = a.numel()
        wa, wb = wc[a], wc[b]
        diff = mu64[a] - mu64[b]
        cost = wa * wb / (wa + wb) * (diff * diff).sum(1)  # [p] exact, float64
        new_mu = (wa[:, None] * mu64[a] + wb[:, None] * mu64[b]) / (wa + wb)[:, None]
        new_id = torch.arange(next_id, next_id + p, device=dev)
        next_id += p
        new_h = torch.maximum(torch.maximum(height[a], height[b]), cost)
        L.append(ids[a])
        R.append(ids[b])
        NODE.append(new_id)
        COST.append(cost)
        KEY.append(new_h)
        merged = torch.zeros(n, dtype=torch.bool, device=dev)
        merged[a] = True
        merged[b] = True
        keep = torch.ones(n, dtype=torch.bool, device=dev)
        keep[b] = False
        # Reducibility: a cluster whose partner was not merged keeps that partner; only the new clusters and
        # the clusters that pointed at a merged one need a new search.
        dirty = merged | merged[arg]
        newpos = keep.long().cumsum(0) - 1
        wa32, wb32 = wa.float()[:, None], wb.float()[:, None]
        ms[a] = (wa32 * ms[a] + wb32 * ms[b]) / (wa32 + wb32)
        mu64[a], wc[a], ids[a], height[a] = new_mu, wa + wb, new_id, new_h
        mu64, wc, ids, height, ms = mu64[keep], wc[keep], ids[keep], height[keep], ms[keep]
        best, arg, dirty = best[keep], newpos[arg[keep]], dirty[keep]
        n = mu64.shape[0]
        if n > 1 and bool(dirty.any()):
            rows = dirty.nonzero().squeeze(1)
            best[rows], arg[rows] = _nearest(ms, wc.float(), rows, chunk)
        if epsilon is not None and n > 1:
            # Every later merge has height >= the cheapest current partner cost: merges below it are final in the
            # sorted order, and once their costs exceed the budget the cut is decided.
            floor = float(best.min())
            keys, costs = torch.cat(KEY), torch.cat(COST)
            if float(costs[keys < floor].sum()) > limit:
                break
    if not L:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return Hierarchy(e, e, e, torch.zeros(0, dtype=torch.float64, device=dev), total, N)
    left, right, node = torch.cat(L), torch.cat(R), torch.cat(NODE)
    cost, key = torch.cat(COST), torch.cat(KEY)
    order = torch.sort(key, stable=True).indices  # creation order breaks ties: children before parents
    return Hierarchy(left[order], right[order], node[order], cost[order], total, N)


def cut_hierarchy(h: Hierarchy, k: int) -> torch.Tensor:
    """[N] int64 slot in [0, k) of every leaf after the first N - k merges of `h` (slots numbered by root id)."""
    N = h.n
    t = N - k
    if t > h.left.numel():
        raise ValueError(f"k: the hierarchy holds {h.left.numel()} merges, cannot cut {N} leaves to {k} slots")
    dev = h.left.device
    parent = torch.arange(N + h.left.numel(), device=dev)  # node ids: leaves, then merges in creation order
    parent[h.left[:t]] = h.node[:t]
    parent[h.right[:t]] = h.node[:t]
    while True:  # pointer jumping: O(log depth) passes
        nxt = parent[parent]
        if torch.equal(nxt, parent):
            break
        parent = nxt
    roots = parent[:N]
    return torch.unique(roots, return_inverse=True)[1]


def relative_error(x: torch.Tensor, assign: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """[B] relative error of x [B, N, C] replaced by its size-weighted slot means (assign [B, N]; -1: dropped, 0)."""
    B, N, C = x.shape
    x64 = x.double()
    w64 = torch.ones(B, N, dtype=torch.float64, device=x.device) if w is None else w.double()
    M = int(assign.max()) + 1
    mean = segment_sum(x64 * w64.unsqueeze(-1), assign, M) / segment_sum(w64, assign, M).clamp(min=1e-300).unsqueeze(-1)
    xh = mean.gather(1, assign.clamp(min=0).unsqueeze(-1).expand(B, N, C)) * (assign >= 0).unsqueeze(-1)
    num = (w64 * ((x64 - xh) ** 2).sum(-1)).sum(1)
    den = (w64 * (x64 * x64).sum(-1)).sum(1)
    return (num / den.clamp(min=1e-300)).sqrt()


def _check_eps(epsilon: float) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon < 1:
        raise ValueError(f"epsilon: expected a float in (0, 1), got {epsilon!r}")
    return float(epsilon)


def estimate_keep(inp: Inputs, epsilon: float, *, search_dim: int | None = None) -> torch.Tensor:
    """Per-sample budget meeting a relative reconstruction error epsilon, from one Ward hierarchy per sample.

    Args:
        inp: checked inputs (prefix removed); uses x and size.
        epsilon: target relative error in (0, 1).
        search_dim: optional partner-search subspace (see `build_hierarchy`).

    Returns:
        [B] int64 budgets in [1, N'].
    """
    eps = _check_eps(epsilon)
    B, N, _ = inp.x.shape
    out = torch.empty(B, dtype=torch.long)
    for b in range(B):
        w = None if inp.size is None else inp.size[b]
        out[b] = build_hierarchy(inp.x[b], w, epsilon=eps, search_dim=search_dim).keep_for(eps)
    return out.to(inp.x.device)


# ---- learned budget head ---------------------------------------------------------------------------------------
N_FEATURES = 12


@torch.no_grad()
def token_features(x: torch.Tensor, w: torch.Tensor | None = None, proj_dim: int = 32) -> torch.Tensor:
    """Cheap O(N·C) statistics of each sample that predict how compressible it is.

    Features: log N; fraction of the energy in the weighted mean (1 - total variance share); mean and spread of the
    cosine to the mean direction; mean and std of token norms relative to their RMS; the cumulative share of the
    variance in the top 1, 2, 4, 8, 16 principal directions of a fixed random 32-dim projection (a sketch of the
    spectrum), and the effective rank of that spectrum over N.

    Args:
        x: [B, N, C] tokens.
        w: [B, N] sizes or None.
        proj_dim: sketch dimension.

    Returns:
        [B, N_FEATURES] float32.
    """
    B, N, C = x.shape
    xf = x.float()
    wf = torch.ones(B, N, device=x.device) if w is None else w.float()
    ws = wf / wf.sum(1, keepdim=True)  # [B, N]
    mean = (ws.unsqueeze(-1) * xf).sum(1)  # [B, C]
    energy = (ws * (xf * xf).sum(-1)).sum(1).clamp(min=1e-12)  # [B]
    mean_share = (mean * mean).sum(1) / energy
    cos = torch.nn.functional.cosine_similarity(xf, mean.unsqueeze(1).expand_as(xf), dim=-1)  # [B, N]
    norms = xf.norm(dim=-1)
    rms = energy.sqrt().unsqueeze(1)
    g = torch.Generator(device="cpu").manual_seed(1234)
    P = (torch.randn(C, proj_dim, generator=g) / math.sqrt(proj_dim)).to(x.device)
    z = (xf - mean.unsqueeze(1)) @ P * ws.sqrt().unsqueeze(-1)  # [B, N, p]
    ev = torch.linalg.svdvals(z).pow(2)  # [B, min(N, p)]
    ev = torch.nn.functional.pad(ev, (0, max(0, proj_dim - ev.shape[1])))
    share = ev.cumsum(1) / ev.sum(1, keepdim=True).clamp(min=1e-12)
    tops = torch.stack([share[:, i - 1] for i in (1, 2, 4, 8, 16)], 1)
    p = ev / ev.sum(1, keepdim=True).clamp(min=1e-12)
    erank = torch.exp(-(p * (p + 1e-12).log()).sum(1)) / proj_dim
    feats = [torch.full((B,), math.log(N), device=x.device), mean_share, cos.mean(1), cos.std(1) if N > 1 else
             cos.new_zeros(B), (norms / rms).mean(1), (norms / rms).std(1) if N > 1 else norms.new_zeros(B)]
    return torch.cat([torch.stack(feats, 1), tops, erank.unsqueeze(1)], 1).float()


class BudgetHead(torch.nn.Module):
    """MLP (features, epsilon) -> logit of the budget fraction k / N, monotone (non-increasing) in epsilon.

    logit = a(z) + softplus(b(z)) * u + softplus(c(z)) * u², u = -log(epsilon) > 0, z = standardised features:
    a looser target never asks for more tokens.

    Args:
        hidden: hidden width.
    """

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.register_buffer("mu", torch.zeros(N_FEATURES))
        self.register_buffer("sd", torch.ones(N_FEATURES))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(N_FEATURES, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
            torch.nn.GELU(), torch.nn.Linear(hidden, 3))

    def forward(self, feats: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
        """feats [B, N_FEATURES], epsilon [B] -> [B] logit of k / N."""
        a, b, c = self.net((feats - self.mu) / self.sd).unbind(1)
        u = -epsilon.log()
        sp = torch.nn.functional.softplus
        return a + sp(b) * u + sp(c) * u * u

    def predict_keep(self, x: torch.Tensor, epsilon: float, w: torch.Tensor | None = None) -> torch.Tensor:
        """[B] int64 predicted budgets in [1, N] for tokens x [B, N, C]."""
        B, N, _ = x.shape
        f = token_features(x, w).to(self.mu.device)
        with torch.no_grad():
            frac = torch.sigmoid(self(f, torch.full((B,), float(epsilon), device=f.device)))
        return (frac * N).ceil().long().clamp(1, N).to(x.device)


_HEAD: dict[str, BudgetHead] = {}
_HEAD_LOCK = threading.Lock()


def load_head(path: str | Path | None = None) -> BudgetHead:
    """The trained budget head (cached per path); raises FileNotFoundError naming the training script if absent."""
    p = Path(path) if path is not None else HEAD_PATH
    with _HEAD_LOCK:
        if str(p) not in _HEAD:
            if not p.is_file():
                raise FileNotFoundError(f"head: no budget-head weights at {p}; train them with "
                                        "`python scripts/train_budget_head.py`")
            blob = torch.load(p, map_location="cpu", weights_only=True)
            head = BudgetHead(hidden=int(blob["hidden"]))
            head.load_state_dict(blob["state_dict"])
            _HEAD[str(p)] = head.eval()
        return _HEAD[str(p)]
