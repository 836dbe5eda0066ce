"""The contract every registered compressor meets (DESIGN §3): one test set over `mmc.available()`."""

from __future__ import annotations

import pytest
import torch
from conftest import call_kwargs

import mmcompress as mmc
from mmcompress.catalog import BUILTINS
from mmcompress.compressors.merge_ops import grid_coords, segment_mean, segment_sum


def check_output(comp, x, out, *, prefix=0, size=None, grid=None, k=None):
    """Invariants of one result of compressor `comp`; returns nothing, asserts everything."""
    name = comp.name
    B, N, C = x.shape
    M = out.x.shape[1]
    assert out.x.shape[0] == B and out.x.shape[2] == C
    assert out.x.dtype == x.dtype and out.x.device == x.device
    assert out.assign.shape == (B, N) and out.assign.dtype == torch.int64
    assert out.size.shape == (B, M) and out.size.dtype == torch.float32
    valid = torch.ones(B, M, dtype=torch.bool) if out.mask is None else out.mask
    counts = valid.sum(1)
    if k is not None:
        if name == "pool":  # pool's budget is an upper bound (exact when k factorises within the grid)
            assert (counts <= prefix + k).all() and (counts >= prefix + 1).all()
        elif comp.prefix_in_budget:  # the prefix counts in keep; at least one non-prefix token
            assert (counts == prefix + max(1, k - prefix)).all(), (counts, prefix, k)
        else:
            assert (counts == prefix + k).all(), (counts, prefix, k)
    if out.order is not None:  # a declared output order: a permutation, prefix first, padded slots last
        assert out.order.shape == (B, M) and out.order.dtype == torch.int64
        assert torch.equal(out.order.sort(1).values, torch.arange(M).expand(B, M))
        assert torch.equal(out.order[:, :prefix], torch.arange(prefix).expand(B, prefix))
        assert (valid.gather(1, out.order) == valid).all()
        assert torch.equal(out.ordered(), torch.gather(out.x, 1, out.order.unsqueeze(-1).expand(B, M, C)))
    assert ((out.assign >= -1) & (out.assign < M)).all()
    # prefix untouched
    assert torch.equal(out.assign[:, :prefix], torch.arange(prefix).expand(B, prefix))
    assert torch.equal(out.x[:, :prefix], x[:, :prefix])
    # every valid slot has members, no invalid slot does
    members = segment_sum(torch.ones(B, N), out.assign, M)
    assert (members[valid] >= 1).all() and (members[~valid] == 0).all()
    # sizes: sums of member sizes; total equals the inputs not dropped
    s_in = torch.ones(B, N) if size is None else size.float()
    torch.testing.assert_close(out.size, segment_sum(s_in, out.assign, M), rtol=1e-5, atol=1e-5)
    kept_total = (s_in * (out.assign >= 0)).sum(1)
    torch.testing.assert_close(out.size.sum(1), kept_total, rtol=1e-5, atol=1e-4)
    assert torch.isfinite(out.x.float()).all()
    assert (out.x[~valid] == 0).all()
    # representative: a member of its slot, slots in increasing representative order
    assert out.rep is not None
    for b in range(B):
        r = out.rep[b, valid[b]]
        assert (r[1:] > r[:-1]).all()
        assert torch.equal(out.assign[b, r], torch.arange(len(r)))
    if grid is not None:
        coords = grid_coords(grid)
        pos = out.pos
        assert pos.shape == (B, M, len(grid)) and pos.dtype == torch.int64
        assert (pos[:, :prefix] == -1).all()
        body = out.rep[:, prefix:] - prefix
        ok = valid[:, prefix:]
        assert torch.equal(pos[:, prefix:][ok], coords[body[ok]])
    else:
        assert out.pos is None
    # merging methods: every output is the size-weighted mean of its members
    if comp.exact_mean:
        ref = segment_mean(x.double(), None if size is None else size.double(), out.assign, M)
        tol = 1e-5 if x.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.x[valid].double(), ref[valid], rtol=tol, atol=tol)


def test_catalogue_matches_classes(name):
    cls = mmc.get(name)
    if name in BUILTINS:
        _, family, modality, needs, _ = BUILTINS[name]
        assert (cls.family, cls.modality, tuple(cls.needs)) == (family, modality, needs)
    assert cls.name == name


@pytest.mark.parametrize("B,N,C,prefix,grid", [(2, 64, 16, 0, (8, 8)), (3, 37, 8, 1, (6, 6)), (1, 50, 4, 2, None),
                                               (2, 2 * 4 * 4, 8, 0, (2, 4, 4))])
@pytest.mark.parametrize("keep", [1, 0.5, 0.25, 7])
def test_contract(name, B, N, C, prefix, grid, keep):
    g = torch.Generator().manual_seed(N + B)
    x = torch.randn(B, N, C, generator=g)
    size = torch.rand(B, N, generator=g) + 0.5 if B == 2 else None
    comp = mmc.create(name, keep=keep)
    kw = call_kwargs(name, x, prefix, grid)
    out = comp(x, size=size, **kw)
    Nb = N - prefix
    if comp.prefix_in_budget:  # k counts the prefix
        k = keep if isinstance(keep, int) else max(1, round(keep * N) - prefix) + prefix
    else:
        k = keep if isinstance(keep, int) else max(1, round(keep * Nb))
    check_output(comp, x, out, prefix=prefix, size=size, grid=kw.get("grid"), k=k)
    again = comp(x, size=size, **kw)  # deterministic
    assert torch.equal(out.x, again.x) and torch.equal(out.assign, again.assign)


@pytest.mark.parametrize("grid", [(4, 6), (2, 3, 4)])  # an image, and two frames (video methods compare them)
@pytest.mark.parametrize("keep", [0.5, 3])
def test_gradients_follow_assign(name, keep, grid):
    """Under autograd (float64 x and sizes that require grad, a prefix row), x's and the sizes' gradients are those of
    the output's definition from `assign`: the size-weighted mean of each slot's members (exact-mean methods), or
    their score-weighted mean for prumerge's family (then only x's gradient on the kept prefix row is checked)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 1 + 24, 4, dtype=torch.float64, generator=g).requires_grad_()
    size = (torch.rand(2, 25, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    comp = mmc.create(name, keep=keep)
    kw = call_kwargs(name, x.detach(), 1, grid)
    out = comp(x, size=size, **kw)
    w = torch.randn(out.x.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((out.x * w).sum(), (x, size), allow_unused=True)
    assert got[0] is not None and got[0][:, 0].abs().sum() > 0  # the prefix row gets its gradient
    if not comp.exact_mean:
        torch.testing.assert_close(got[0][:, 0], w[:, 0])
        return
    M = out.x.shape[1]
    want = torch.autograd.grad((segment_mean(x, size, out.assign, M) * w).sum(), (x, size), allow_unused=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-8)
    if got[1] is not None or want[1] is not None:  # select-only methods: no gradient reaches the sizes
        zero = torch.zeros_like(size)
        torch.testing.assert_close(zero if got[1] is None else got[1], zero if want[1] is None else want[1],
                                   rtol=1e-6, atol=1e-8)


def test_identity_at_full_budget(name):
    x = torch.randn(2, 17, 8)
    kw = call_kwargs(name, x, 1)
    for keep in (17 if mmc.get(name).prefix_in_budget else 16, 1.0):
        out = mmc.create(name, keep=keep)(x, **kw)
        assert torch.equal(out.x, x)
        assert torch.equal(out.assign, torch.arange(17).expand(2, 17))
        assert torch.equal(out.size, torch.ones(2, 17)) and out.mask is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(name, dtype):
    x = torch.randn(2, 36, 8).to(dtype)
    kw = call_kwargs(name, x, 0, (6, 6))
    comp = mmc.create(name, keep=9)
    out = comp(x, **kw)
    check_output(comp, x, out, grid=(6, 6), k=9)


def test_batch_equals_single(name):
    x = torch.randn(3, 26, 8)
    kw = call_kwargs(name, x, 1, (5, 5))
    comp = mmc.create(name, keep=6)
    out = comp(x, **kw)
    for b in range(3):
        kb = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        ob = comp(x[b:b + 1], **kb)
        torch.testing.assert_close(out.x[b:b + 1], ob.x, rtol=1e-5, atol=1e-6)
        assert torch.equal(out.assign[b:b + 1], ob.assign)


def test_does_not_modify_inputs(name):
    x = torch.randn(2, 30, 8)
    size = torch.rand(2, 30) + 0.5
    kw = call_kwargs(name, x, 2)
    copies = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    x0, s0 = x.clone(), size.clone()
    mmc.create(name, keep=5)(x, size=size, **kw)
    assert torch.equal(x, x0) and torch.equal(size, s0)
    for k, v in copies.items():
        assert torch.equal(kw[k], v)


def test_auto_keep_is_ragged_and_valid(name):
    x = torch.cat([torch.randn(1, 40, 8), torch.randn(1, 1, 8).expand(1, 40, 8) + 0.01 * torch.randn(1, 40, 8)])
    kw = call_kwargs(name, x, 0)
    try:
        comp = mmc.create(name, keep="auto")
        out = comp(x, **kw)
    except ModuleNotFoundError as e:  # the adaptive estimator lands with its own issue
        pytest.skip(f"keep='auto' needs {e.name}")
    check_output(comp, x, out, grid=kw.get("grid"))  # a method that needs a grid gets one from call_kwargs
    if out.mask is not None:
        assert out.mask.sum(1)[1] < out.mask.sum(1)[0]  # the redundant sample gets fewer tokens


def test_cuda_device_kept(name):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    x = torch.randn(2, 36, 8, device="cuda")
    kw = call_kwargs(name, x, 0, (6, 6))
    out = mmc.create(name, keep=9)(x, **kw)
    assert out.x.device == x.device and out.assign.device == x.device
