"""Bad input raises ValueError/TypeError naming the argument; nothing is silently truncated or reshaped."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc

X = torch.randn(2, 17, 8)


def call(x=X, keep=4, name="tome", **kw):
    return mmc.create(name, keep=keep)(x, **kw)


CASES = [
    ("x rank 2", lambda: call(torch.randn(17, 8)), ValueError, "x"),
    ("x rank 4", lambda: call(torch.randn(1, 2, 17, 8)), ValueError, "x"),
    ("x empty N", lambda: call(torch.randn(2, 0, 8)), ValueError, "x"),
    ("x empty B", lambda: call(torch.randn(0, 17, 8)), ValueError, "x"),
    ("x not a tensor", lambda: call([[1.0, 2.0]]), TypeError, "x"),
    ("x integer", lambda: call(torch.ones(2, 17, 8, dtype=torch.long)), TypeError, "x"),
    ("x NaN", lambda: call(X.clone().index_fill_(1, torch.tensor([3]), float("nan"))), ValueError, "x"),
    ("x inf", lambda: call(X.clone().index_fill_(1, torch.tensor([5]), float("inf"))), ValueError, "x"),
    ("keep 0", lambda: call(keep=0), ValueError, "keep"),
    ("keep negative", lambda: call(keep=-3), ValueError, "keep"),
    ("keep > N", lambda: call(keep=18), ValueError, "keep"),
    ("keep > N - prefix", lambda: call(keep=17, prefix=1), ValueError, "keep"),
    ("keep fraction > 1", lambda: call(keep=1.5), ValueError, "keep"),
    ("keep fraction 0", lambda: call(keep=0.0), ValueError, "keep"),
    ("keep bool", lambda: call(keep=True), TypeError, "keep"),
    ("keep other string", lambda: call(keep="half"), ValueError, "keep"),
    ("keep None", lambda: call(keep=None), TypeError, "keep"),
    ("prefix >= N", lambda: call(prefix=17), ValueError, "prefix"),
    ("prefix negative", lambda: call(prefix=-1), ValueError, "prefix"),
    ("prefix float", lambda: call(prefix=1.0), TypeError, "prefix"),
    ("grid mismatch", lambda: call(grid=(4, 5)), ValueError, "grid"),
    ("grid mismatch with prefix", lambda: call(grid=(4, 4)), ValueError, "grid"),
    ("grid rank 4", lambda: call(grid=(1, 1, 1, 17)), ValueError, "grid"),
    ("grid non-int", lambda: call(grid=(17.0,)), ValueError, "grid"),
    ("size shape", lambda: call(size=torch.ones(2, 16)), ValueError, "size"),
    ("size non-positive", lambda: call(size=torch.zeros(2, 17)), ValueError, "size"),
    ("metric shape", lambda: call(metric=torch.randn(2, 16, 4)), ValueError, "metric"),
    ("metric not tensor", lambda: call(metric=[1.0]), TypeError, "metric"),
    ("scores shape", lambda: call(scores=torch.randn(2, 16)), ValueError, "scores"),
    ("text channel mismatch", lambda: call(text=torch.randn(2, 3, 7)), ValueError, "text"),
    ("text batch mismatch", lambda: call(text=torch.randn(3, 8)), ValueError, "text"),
    ("unknown name", lambda: mmc.create("tomee", keep=4), ValueError, "did you mean 'tome'"),
    ("name not str", lambda: mmc.create(3, keep=4), TypeError, "name"),
    ("unknown option", lambda: mmc.create("tome", keep=4, foo=1), TypeError, "foo"),
    ("pool mode", lambda: mmc.create("pool", keep=4, mode="max"), ValueError, "mode"),
    ("random seed", lambda: mmc.create("random", keep=4, seed="x"), TypeError, "seed"),
]


@pytest.mark.parametrize("label,fn,exc,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(label, fn, exc, needle):
    with pytest.raises(exc) as info:
        fn()
    assert needle in str(info.value), f"{label}: message {str(info.value)!r} does not name {needle!r}"


def test_mismatched_devices():
    devs = ["meta"]
    x = torch.randn(2, 17, 8)
    for d in devs:
        with pytest.raises(ValueError, match="scores"):
            mmc.create("random", keep=4)(x, scores=torch.randn(2, 17, device=d))


def test_checks_can_be_disabled(monkeypatch):
    monkeypatch.setenv("MMCOMPRESS_CHECKS", "0")
    x = X.clone()
    x[0, 3, 0] = float("nan")
    out = mmc.create("uniform", keep=4)(x)  # no finiteness check: serving mode
    assert out.x.shape == (2, 4, 8)


def test_needs_are_enforced():
    for name in mmc.available():
        cls = mmc.get(name)
        for need in cls.needs:
            if need not in ("scores", "text"):
                continue
            kw = {"scores": torch.rand(2, 17), "text": torch.randn(2, 3, 8)}
            if "grid" in cls.needs:  # every other need given, so the error is about this one
                kw["grid"] = (17, 1, 1)
            kw.pop(need)
            with pytest.raises(ValueError, match=need):
                mmc.create(name, keep=4)(X, **kw)


@pytest.mark.parametrize("keep", [16, 9, 3, 17, "auto"])  # few merges, one full round, several rounds, identity
@pytest.mark.parametrize("where", [0, 3, 4, 16])  # prefix, an A token, a B token, the last token
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_tome_checks_its_output_for_every_non_finite_input(keep, where, bad):
    """tome checks finiteness on its output (Compressor.check_output): any NaN/inf token of x still raises."""
    x = torch.randn(2, 18, 8)
    x[1, where, 2] = bad
    with pytest.raises(ValueError, match="x: contains NaN or inf"):
        mmc.create("tome", keep=keep)(x, prefix=1)


def test_output_check_does_not_reject_a_finite_x():
    big = torch.full((1, 6, 4), 3e38)  # finite, but sums overflow (so does the merged mean, in float32)
    out = mmc.create("tome", keep=3)(big)  # the exact check on x decides: no error
    assert out.x.shape == (1, 3, 4)
