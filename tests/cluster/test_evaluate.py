"""Validation scoring shared by the trainer ranks and ``alexnet eval`` (the 10-crop included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alexnet.data.batch import ValBatch
from alexnet.scoring import average_crops, hits
from cluster.evaluate import ValScore, crop_errors, crop_kinds


def test_ten_crops_become_crop_major_rows():
    b, s = 3, 4
    images = np.arange(b * 10 * 3 * s * s, dtype=np.uint8).reshape(b, 10, 3, s, s)
    mean = torch.zeros(3, s, s)
    labels = np.zeros(b, np.int64)
    x = ValBatch(labels, ["k"] * b, images=images).model_input(mean, 1.0, torch.device("cpu"))
    assert x.shape == (10 * b, 3, s, s)
    for crop in range(10):
        for i in range(b):
            assert torch.equal(x[crop * b + i], torch.from_numpy(images[i, crop]).float())
    centre = ValBatch(labels, ["k"] * b, images=images[:, 0]).model_input(mean + 1, 0.5, torch.device("cpu"))
    assert torch.allclose(centre, (torch.from_numpy(images[:, 0]).float() - 1) * 0.5)


def test_val_score_counts_center_and_ten_crop():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    center = torch.randn(6, 7)
    ten = torch.randn(60, 7)
    score = ValScore(crop_kinds(True))
    score.add("center", center[:4], labels[:4])
    score.add("center", center[4:], labels[4:])
    score.add("ten", ten, labels)
    t = score.totals()
    h1, h5 = hits(center, labels)
    assert t["center"]["top1"] == h1 and t["center"]["top5"] == h5 and t["center"]["n"] == 6
    loss = torch.nn.functional.cross_entropy(center, labels, reduction="sum")
    assert t["center"]["loss_sum"] == pytest.approx(float(loss), rel=1e-6)
    t1, t5 = hits(average_crops(ten, 10), labels)
    assert (t["ten"]["top1"], t["ten"]["top5"], t["ten"]["loss_sum"]) == (t1, t5, 0.0)
    errs = crop_errors(t)
    assert errs == pytest.approx(
        {
            "top1_error": 1 - float(h1) / 6,
            "top5_error": 1 - float(h5) / 6,
            "top1_error_10crop": 1 - float(t1) / 6,
            "top5_error_10crop": 1 - float(t5) / 6,
        }
    )


def test_an_empty_pass_scores_as_all_wrong():
    assert crop_errors(ValScore(crop_kinds(False)).totals()) == {"top1_error": 1.0, "top5_error": 1.0}
