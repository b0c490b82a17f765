"""Which ranks' numbers count, and their reduction to one result per step or validation (no Ray)."""

from __future__ import annotations

import pytest

from cluster.reduce import reduce_eval, reduce_step, scoring_ranks, state_ranks
from pipeline.grid import Grid

GRID = Grid.parse("2x2x2", microbatches=2, global_batch=8)  # ranks (r * 2 + s) * 2 + c


def _rank(i: int) -> dict:
    """A rank's step result; only the last stage's column 0 holds a meaningful loss and hits."""
    r, s, c = GRID.coords(i)
    scoring = s == 1 and c == 0
    return {
        "loss": 1.0 + r if scoring else 99.0,
        "top1": 2.0 + r if scoring else 99.0,
        "top5": 3.0 + r if scoring else 99.0,
        "samples": 4.0,
        "compute_s": 0.1 * i,
        "exchange_s": 0.01,
        "pipeline_wait_s": 0.1 * (s + 1),
        "grad_sync_s": 0.02 * i,
        "optimizer_s": 0.001,
        "data_wait_s": 0.05 if s == 0 else 0.0,
        "step_s": 1.0 + 0.1 * c,
    }


def test_rank_roles():
    assert scoring_ranks(GRID) == [2, 6]  # (replica, stage 1, column 0) of each replica
    assert state_ranks(GRID) == [0, 1, 2, 3]  # replica 0: every block and column once


def test_reduce_step():
    ranks = [_rank(i) for i in range(GRID.world_size)]
    out = reduce_step(GRID, 8, 17, ranks)
    assert out["step"] == 17
    assert out["loss"] == pytest.approx((1.0 + 2.0) / 2)  # mean of the replicas' means
    assert out["top1_error"] == pytest.approx(1 - (2 + 3) / 8)
    assert out["top5_error"] == pytest.approx(1 - (3 + 4) / 8)
    assert out["step_s"] == pytest.approx(1.1) and out["data_wait_s"] == 0.05  # the slowest rank's
    assert out["compute_s"] == pytest.approx(0.7) and out["grad_sync_s"] == pytest.approx(0.14)
    assert set(out["parts"]) == {(0, 0), (0, 1), (1, 0), (1, 1)}  # replica 0's stages and columns
    assert out["parts"][(1, 1)] == {k: v for k, v in ranks[3].items() if k.endswith("_s")}
    # a stage's bubble: its columns' pipeline wait over their step time, averaged
    assert out["bubble"][0] == pytest.approx((0.1 / 1.0 + 0.1 / 1.1) / 2)
    assert out["bubble"][1] == pytest.approx((0.2 / 1.0 + 0.2 / 1.1) / 2)


def test_reduce_eval_counts_the_scoring_ranks_only():
    junk = {"center": {"top1": 50, "top5": 50, "loss_sum": 50.0, "n": 50}}
    ranks = [junk] * GRID.world_size
    ranks[2] = {"center": dict(top1=3, top5=8, loss_sum=12.0, n=10), "ten": dict(top1=4, top5=9, n=10)}
    ranks[6] = {"center": dict(top1=5, top5=9, loss_sum=8.0, n=10), "ten": dict(top1=6, top5=10, n=10)}
    out = reduce_eval(GRID, ranks)
    assert out == pytest.approx(
        {
            "top1_error": 1 - 8 / 20,
            "top5_error": 1 - 17 / 20,
            "loss": 20.0 / 20,
            "samples": 20.0,
            "top1_error_10crop": 1 - 10 / 20,
            "top5_error_10crop": 1 - 19 / 20,
        }
    )
    center, ten = ["top1_error", "top5_error", "loss", "samples"], ["top1_error_10crop", "top5_error_10crop"]
    assert list(out) == center + ten  # the key order of metrics.jsonl's eval lines
    for i in (2, 6):  # an evaluation without the 10-crop pass reports the center crop alone
        ranks[i] = {"center": ranks[i]["center"]}
    assert set(reduce_eval(GRID, ranks)) == {"top1_error", "top5_error", "loss", "samples"}
