"""scripts/compare_timing.py: the gaps of two runs' prefill ratios, the kept copies and the plot."""

from __future__ import annotations

import csv

from tests.script_module import load_script

cmp = load_script("scripts/compare_timing.py")

HEADER = "task,method,keep,tokens,prefill_gflops,flops_ratio,accuracy,prefill_ms,prefill_ratio,ratio_spread,timing\n"


def write(path, rows):
    path.mkdir()
    (path / "summary.csv").write_text(HEADER + "".join(f"detail,{m},{k},36,0.3,0.27,0.7,5.0,{r},0.01,x7\n"
                                                        for m, k, r in rows))


def test_gaps_within_the_bar_the_copies_and_the_plot(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, [("none", "1", 1.0), ("pool", "0.25", 0.30), ("tome", "0.25", 0.20), ("fastv", "0.5", "nan")])
    write(b, [("none", "1", 1.0), ("pool", "0.25", 0.32), ("tome", "0.25", 0.25), ("fastv", "0.5", 0.5)])
    assert cmp.main([str(a), str(b), "--export", str(tmp_path / "kept"), "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    # pool: |0.32 - 0.30| / 0.30 = 6.7 %; tome: 25 %; none and a missing ratio are left out
    assert "| detail | pool | 0.25 | 0.300 | 0.320 | 6.7% |" in out and "| tome | 0.25 | 0.200 | 0.250 | 25.0% |" in out
    assert "2 settings: median gap 15.8%, largest 25.0%, 1/2 within ±10%" in out and "fastv" not in out
    rows = list(csv.DictReader((tmp_path / "kept" / "second.csv").open()))
    assert [r["method"] for r in rows] == ["none", "pool", "tome", "fastv"] and "accuracy" not in rows[0]
    # the kept copies compare as the folders did
    assert cmp.ratios(tmp_path / "kept" / "first.csv") == cmp.ratios(a)
    assert (tmp_path / "p.png").stat().st_size > 5_000


def test_runs_that_share_nothing_say_so(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, [("pool", "0.25", 0.3)])
    write(b, [("tome", "0.25", 0.3)])
    assert cmp.main([str(a), str(b)]) == 2
    assert "share no timed setting" in capsys.readouterr().err
