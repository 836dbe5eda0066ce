"""The `knn` task: the k-NN vote, and (real) DINOv2 on Fashion-MNIST through the runner."""

from __future__ import annotations

import pytest
import torch

from mmcompress.zoo.metrics import knn_predict


def test_knn_vote_and_tie_break():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
    ytr = torch.tensor([0, 0, 1, 1, 2])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_predict(train, ytr, test, k=3).tolist() == [0, 1]
    # k = 2 on [1, 1]: the two nearest are class 2 (0.7, 0.7) and one of the diagonals; a 1-1 vote between class 2
    # and the nearer side is won by the larger summed similarity, i.e. class 2 (cos = 1)
    assert knn_predict(train, ytr, torch.tensor([[1.0, 1.0]]), k=2).tolist() == [2]


@pytest.mark.real
def test_knn_task_through_the_runner(tmp_path):
    from mmcompress.evals.knn import KNNTask
    from mmcompress.evals.runner import BenchConfig, run

    KNNTask.__init__.__defaults__ = (200,)  # a 200-image train bank keeps the test short
    try:
        res = run(BenchConfig(model="dinov2-s14", tasks=["knn"], methods=["tome"], keeps=[0.25], limit=60,
                              batch_size=30, out=tmp_path / "knn", progress=False))
    finally:
        KNNTask.__init__.__defaults__ = (1000,)
    rows = {r["method"]: r for r in res["summary"]}
    assert rows["none"]["n"] == 60 and rows["none"]["tokens"] == 64
    assert rows["none"]["accuracy"] > 0.35  # 10 classes: chance is 0.1 (measured 0.50 with this small bank)
    assert rows["tome"]["tokens"] == 16 and rows["random"]["tokens"] == 16
