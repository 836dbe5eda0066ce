"""scripts/detail_probe.py end to end on random features (the real run reads DINOv2 features; see the README)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.script_module import load_script


@pytest.fixture(scope="module")
def probe():
    return load_script("scripts/detail_probe.py")


def test_vocab_encodes_every_question_and_answer(probe):
    rows = probe.detail.split_questions("train", 12)
    vocab = probe.Vocab(rows)
    enc = vocab.encode(rows, {i: i for i in range(12)})
    assert enc["q"].shape[0] == len(rows) and (enc["q"][:, 0] > 0).all()  # no empty question
    inv = {i: a for a, i in vocab.answer.items()}
    assert [inv[int(y)] for y in enc["y"]] == [r[4] for r in rows]
    assert enc["scene"].tolist() == [int(r[0].split("/")[1]) for r in rows]


def test_compressed_tokens_keep_their_grid_cells(probe):
    feats = torch.randn(3, 64, 384)
    toks, pos = probe.compress("none", feats, 16, 0)
    assert toks is feats and pos.shape == (3, 64)
    for m in ("random", "pool", "tome"):
        toks, pos = probe.compress(m, feats, 16, 0)
        assert toks.shape == (3, 16, 384) and pos.shape == (3, 16) and 0 <= int(pos.min()) <= int(pos.max()) < 64


def test_runs_end_to_end_and_reports_every_method(probe, monkeypatch, tmp_path):
    monkeypatch.setattr(probe, "scene_features", lambda split, n: torch.randn(n, 64, 384))
    probe.main(["--train-scenes", "16", "--test-scenes", "8", "--epochs", "1", "--batch", "32", "--threads", "1",
                "--out", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    res = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(res) == set(probe.METHODS)
    for m in probe.METHODS:
        assert f"| {m} |" in report and 0.0 <= res[m]["all"] <= 1.0


def test_types_filter_and_bad_types(probe, monkeypatch, tmp_path):
    monkeypatch.setattr(probe, "scene_features", lambda split, n: torch.randn(n, 64, 384))
    probe.main(["--train-scenes", "16", "--test-scenes", "8", "--epochs", "1", "--types", "relation,count",
                "--coord-pos", "--threads", "1", "--out", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert "| count | relation |" in report and "colour" not in report and "--types relation,count" in report
    with pytest.raises(ValueError, match="--types"):
        probe.main(["--types", "colour,size", "--out", str(tmp_path)])


def test_coordinate_positions_are_the_grid_cells(probe):
    model = probe.Readout(5, 3, coord_pos=True)
    assert model.coords.shape == (64, 2) and model.coords[0].tolist() == [-1.0, -1.0]
    assert torch.allclose(model.coords[9], torch.tensor([-1 + 1 / 3.5] * 2)) and model.coords[63].tolist() == [1, 1]
    assert probe.Readout(5, 3).coord is None


def test_oracle_tokens_describe_the_scene(probe):
    feats, cells = probe.oracle_tokens("test", 3)
    for i in range(3):
        objs = probe.detail.make_scene(probe.detail.SPLIT_SEEDS["test"] + i).objects
        assert int((feats[i, :, 12] == 0).sum()) == len(objs)  # one token per object, the rest flagged padding
        for j, o in enumerate(objs):
            assert feats[i, j, list(probe.detail.COLORS).index(o.color)] == 1
            assert feats[i, j, 7 + probe.detail.SHAPES.index(o.shape)] == 1 and feats[i, j, :12].sum() == 2
            assert cells[i, j] == int(o.y // 14) * 8 + int(o.x // 14)
