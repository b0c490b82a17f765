"""Validation of a 2x2x2 trainer group (2 replicas x 2 stages x 2 columns, 2 data workers) on the
session's local Ray: the data workers decode each val image once per pass, and the result equals
the val split scored in one process with the same weights."""

from __future__ import annotations

import pytest
import ray

from alexnet.data.index import DatasetIndex
from alexnet.data.writer import build_synthetic
from alexnet.model import FusedAlexNet
from cluster.config import load_config
from cluster.evaluate import crop_errors, score_model
from cluster.group import RayTrainerGroup
from cluster.plan import plan_run
from cluster.run import resolve_run

pytestmark = [pytest.mark.e2e, pytest.mark.ray]
N_VAL = 30


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("data") / "val")
    build_synthetic(300, out, val_fraction=0.1, shard_size=12, workers=1, progress=False)
    return out  # 270 train, 30 val in shards of 12, 12, 6


def test_2x2x2_validation_decodes_once_per_pass_and_equals_one_process(ray_local, shards):
    sets = {"grid.shape": "2x2x2", "grid.cpus_per_rank": 0.5, "eval.batch_size": 4, "train.steps": 1}
    sets["grid.collective_timeout_s"] = 300  # also the data workers' start: 10 processes on 2 shared cores
    cfg = load_config(preset="demo", overrides=sets)  # 8 ranks x 0.5 CPU + 2 data workers: 6 of 8
    plan, index = plan_run(cfg, shards)
    group = RayTrainerGroup(resolve_run(cfg.for_data(shards), shards, plan))
    try:
        group.start(0, None)
        res = group.evaluate(ten_crop=True, max_samples=0)
        center_only = group.evaluate(ten_crop=False, max_samples=0)
        stats = ray.get([w.val_stats.remote() for w in group.pool.workers])
        model, _, _ = group.snapshot(0)
    finally:
        group.shutdown()

    # passes 1 (center) and 2 (ten) of the first evaluation, 3 (center) of the second
    assert [{p: s[p]["crop"] for p in s} for s in stats] == [{1: "center", 2: "ten", 3: "center"}] * 2
    for p in (1, 2, 3):  # every val image decoded exactly once per pass, over both workers
        assert sum(s[p]["samples"] for s in stats) == N_VAL, p
        assert all(s[p]["samples"] > 0 for s in stats)  # both workers took part
    assert res["samples"] == center_only["samples"] == N_VAL
    assert "top1_error_10crop" not in center_only
    for key in ("top1_error", "top5_error", "loss"):
        assert center_only[key] == res[key], key  # the same weights, the same center pass

    # the reference: the fused model with the group's weights, the val split decoded in one process
    fused = FusedAlexNet(cfg.model_config())
    fused.load_state_dict(model)
    fused.eval()
    mean = DatasetIndex.load(shards).mean_tensor(cfg.model.input_size, cfg.data.mean)
    totals = score_model(fused, index, 7, cfg.model.input_size, mean, cfg.data.input_scale, ("center", "ten"))
    want = crop_errors(totals)
    assert totals["center"]["n"] == totals["ten"]["n"] == N_VAL
    for key, value in want.items():
        assert res[key] == pytest.approx(value, abs=1e-9), key
    assert res["loss"] == pytest.approx(totals["center"]["loss_sum"] / N_VAL, rel=1e-4)
