"""evals/features.py: one cached loop of vision-tower features for every task's images."""

from __future__ import annotations

import pytest
import torch
from mmcompress.evals import detail
from mmcompress.evals.features import tower_features


class Tower:
    """Fake tower: hidden_states[-1][b] = [CLS, the image's id, its id + 0.5], counting its calls."""

    calls = 0

    def __call__(self, pv, output_hidden_states=True):
        Tower.calls += 1
        ids = pv[:, 0, 0, 0]  # [b]
        hs = torch.stack([torch.full_like(ids, -1.0), ids, ids + 0.5], 1).unsqueeze(-1)  # [b, 3, 1]
        return type("Out", (), {"hidden_states": (hs,)})()


class Processor:
    size = 7

    def __call__(self, imgs):
        return {"pixel_values": torch.tensor(imgs, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)}


def test_rows_follow_image_order_and_the_cache_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    Tower.calls = 0
    feats = tower_features("toy", 7, lambda a, b: list(range(a, b)), Tower(), Processor(), batch_size=3)
    assert feats.shape == (7, 2, 1) and feats.dtype == torch.float32 and Tower.calls == 3  # CLS dropped
    assert feats[:, 0, 0].tolist() == list(range(7)) and feats[:, 1, 0].tolist() == [i + 0.5 for i in range(7)]
    again = tower_features("toy", 7, lambda a, b: list(range(a, b)), Tower(), Processor(), batch_size=3)
    assert torch.equal(again, feats) and Tower.calls == 3  # read from the cache, the tower not run again
    with_cls = tower_features("toy", 7, lambda a, b: list(range(a, b)), Tower(), Processor(), drop_cls=False)
    assert with_cls.shape == (7, 3, 1) and Tower.calls == 4  # another key: computed


def test_detail_features_name_the_bad_split():
    with pytest.raises(ValueError, match="split"):
        detail.image_features("dev", 3, Tower(), Processor())
