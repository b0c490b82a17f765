"""The one top-k / 10-crop scorer."""

from __future__ import annotations

import math

import pytest
import torch

from alexnet.scoring import Tally, average_crops, errors, hits


def test_hits_counts_top1_and_top5():
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1, 0], [-1.0, 0, 0, 9, 0, 0, 0]])
    labels = torch.tensor([6, 3, 0])  # top-1 hit; top-5 hit only; ranked last: a miss
    h1, h5 = hits(logits, labels)
    assert (int(h1), int(h5)) == (1, 2)


def test_hits_with_fewer_classes_than_k():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    h1, h5 = hits(logits, torch.tensor([0, 0]))
    assert (int(h1), int(h5)) == (1, 2)


def test_average_crops_is_log_of_mean_softmax_crop_major():
    b, n = 3, 4
    per_crop = torch.randn(2, b, n)  # crop-major: rows [i b, (i+1) b) are crop i
    got = average_crops(per_crop.flatten(0, 1), crops=2)
    want = per_crop.softmax(-1).mean(0).log()
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="crops"):
        average_crops(torch.randn(5, n), crops=2)


def test_tally_accumulates_and_reads_once():
    t = Tally()
    t.add(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
    t.add(torch.tensor([[0.0, 2.0]]), torch.tensor([1]))
    got = t.totals()
    assert (got["top1"], got["top5"], got["n"]) == (2.0, 3.0, 3.0)
    ce_hit, ce_miss = math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))
    assert got["loss_sum"] == pytest.approx(2 * ce_hit + ce_miss, rel=1e-6)
    assert errors(got["top1"], got["top5"], got["n"]) == pytest.approx(
        {"top1_error": 1 / 3, "top5_error": 0.0}
    )


def test_tally_sums_losses_in_float64_like_a_python_sum():
    parts = [torch.tensor(1e8, dtype=torch.float32), torch.tensor(1.0), torch.tensor(1.0)]
    t = Tally()
    for ce in parts:
        t.add_loss(ce)
    assert t.totals()["loss_sum"] == sum(float(ce) for ce in parts) == 1e8 + 2  # float32 would give 1e8
