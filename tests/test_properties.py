"""Hypothesis property tests of the contract: random shapes, dtypes, prefixes and budgets at their edges."""

from __future__ import annotations

import torch
from conftest import call_kwargs, square_grid
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_contract import check_output

import mmcompress as mmc

NAMES = mmc.available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def cases(draw):
    name = draw(st.sampled_from(NAMES))
    B = draw(st.integers(1, 4))
    N = draw(st.integers(1, 700))
    C = draw(st.integers(1, 64))
    prefix = draw(st.integers(0, min(2, N - 1)))
    Nb = N - prefix
    keep = draw(st.one_of(
        st.sampled_from([1, Nb, max(1, Nb // 2), max(1, Nb - 1)]),
        st.integers(1, Nb),
        st.sampled_from([1.0, 0.5, 1e-3]),
        st.floats(1e-3, 1.0, allow_nan=False),
    ))
    dtype = draw(st.sampled_from(DTYPES))
    use_grid = draw(st.booleans())
    use_size = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return name, B, N, C, prefix, keep, dtype, use_grid, use_size, seed


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_contract_properties(case):
    name, B, N, C, prefix, keep, dtype, use_grid, use_size, seed = case
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, N, C, generator=g) * 3).to(dtype)
    size = torch.rand(B, N, generator=g) + 0.25 if use_size else None
    grid = square_grid(N - prefix) if use_grid else None
    comp = mmc.create(name, keep=keep)
    kw = call_kwargs(name, x, prefix, grid, seed)
    out = comp(x, size=size, **kw)
    Nb = N - prefix
    if comp.prefix_in_budget:  # keep counts the prefix (visionzip's CLS): a float keep is a fraction of all N
        k = keep if isinstance(keep, int) else max(1, min(N, round(keep * N)))
        whole = k == N
    else:
        k = keep if isinstance(keep, int) else max(1, min(Nb, round(keep * Nb)))
        whole = k == Nb
    check_output(comp, x, out, prefix=prefix, size=size, grid=kw.get("grid"), k=k)
    if whole:
        assert torch.equal(out.x, x)
