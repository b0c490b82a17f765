"""Fault tolerance on real Ray actors (demo grid 1x2x2, small model, CPU, one short epoch).

The session's undisturbed reference run (tests/e2e/conftest.py, shared with test_train.py) is
compared with:

* a trainer actor killed (``faults.kill_rank/kill_step``) on the first stage: the run finishes at
  the same step, one restart counted, final weights and optimizer state bit for bit equal to the
  reference (so the same samples consumed: a sample lost, repeated or out of order changes a
  gradient); the last stage's second column killed together with a data worker (which Ray restarts
  without the trainers noticing) is tests/e2e/test_train.py's;
* NaN injected at step k: the run fails clearly and the newest complete checkpoint is from before k;
* the driver SIGKILLed inside a checkpoint write: the previous checkpoint is complete and
  ``--resume`` continues from it to the reference's weights;
* a corrupt JPEG, a truncated tar and an unreadable shard: within ``data.max_skipped_fraction`` the
  run completes and the skipped count equals what was planted; beyond it (the default 1%) the run
  fails naming the shards;
* a node removed from a 2-node ``ray.cluster_utils.Cluster`` (fake GPUs): recovery onto the
  remaining node (last: it replaces the session Ray). When the grid no longer fits what is left,
  the restart fails with the reservation's error: tests/cluster/test_coordinator.py (the refusal),
  tests/cluster/test_placement.py (its message on a real two-node cluster).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

from alexnet.data.index import DatasetIndex
from cluster.checkpoint import list_checkpoints, load_checkpoint
from cluster.config import load_config
from cluster.coordinator import FAILED, FINISHED
from cluster.job import run_training
from tests.e2e import conftest as shared

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

BIN = Path(sys.executable).parent
STEPS = 10  # one epoch: 324 train images // batch 32
BASE = {
    "train.steps": STEPS,
    "train.steps_per_call": 2,
    "train.log_every_steps": 5,
    "checkpoint.every_steps": 4,
    "checkpoint.keep": 5,
    "eval.every_epochs": 0,
    "metrics.port": -1,
    "metrics.trace_steps": 0,
    "grid.collective_timeout_s": 60.0,
    "data.workers": 1,  # each is a process importing torch and torchvision
    # 2 trainer ranks, not the demo's 4 (each a process importing torch): what these runs check
    # (data losses, the NaN rule, a node's loss) does not depend on the grid; the killed trainer,
    # the driver killed in a checkpoint write and test_train.py run the demo's 1x2x2
    "grid.shape": "1x1x2",
}


def _cfg(**sets):
    return load_config(preset="demo", overrides={**BASE, **sets})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path_factory.mktemp("data") / "demo")
    build_synthetic(360, out, shard_size=50, workers=1, progress=False)
    return out


def _run(cfg, shards: str, run_dir: str):
    holder = {}
    res = run_training(cfg, shards, run_dir, on_coordinator=lambda c: holder.update(c=c))
    return res, holder["c"]


def _counter(coord, name: str, **labels) -> float:
    m = coord.report.metrics
    return m.registry.get_sample_value(f"alexnet_{name}", {"run": m.run, **labels}) or 0.0


def _assert_same_weights(ck, ref_ck) -> None:
    assert ck.step == ref_ck.step
    assert set(ck.model) == set(ref_ck.model)
    for k in ref_ck.model:
        assert torch.equal(ck.model[k], ref_ck.model[k]), k
        assert torch.equal(ck.optimizer[k], ref_ck.optimizer[k]), k


@pytest.mark.parametrize(
    "rank, step, where",
    # rank 0: stage 0, column 0 (rank 3, the last stage's second column, killed mid-run together
    # with a data worker: tests/e2e/test_train.py::test_killed_trainer_and_data_worker_recover_bit_exact,
    # which also shows that a killed data worker loses and repeats no sample)
    [(0, 5, "first stage")],
    ids=["first-stage"],
)
def test_killed_trainer_restarts_and_matches_the_undisturbed_run(
    ray_local, demo_shards, reference, tmp_path, rank, step, where
):
    cfg = shared.demo_cfg(**shared.REFERENCE, **{"faults.kill_rank": rank, "faults.kill_step": step})
    steps = shared.REFERENCE["train.steps"]
    r, s, c = cfg.to_grid().coords(rank)
    assert (s, c) == ((0, 0) if where == "first stage" else (1, 1))
    run_dir = str(tmp_path / "run")
    res, coord = _run(cfg, demo_shards, run_dir)
    assert res.state == FINISHED and res.step == steps, res.error
    failures = coord.policy.failures
    assert len(failures) == 1, failures
    assert failures[0].split(";")[0].split(": ", 1)[1].startswith("train steps")
    assert f"rank {rank}: " in failures[0] and "ActorDiedError" in failures[0], failures
    assert _counter(coord, "restarts_total", reason="trainer_failure") == 1
    assert _counter(coord, "state_transitions_total", to_state="recovering") == 1
    # restored from the newest checkpoint before the kill, then exactly the reference's steps
    assert [row["step"] for row in coord.report.history.steps] == list(range(steps))
    _assert_same_weights(load_checkpoint(run_dir), load_checkpoint(reference))


def test_nan_loss_stops_the_run_keeping_the_last_good_checkpoint(ray_local, shards, tmp_path):
    run_dir = str(tmp_path / "run")
    res, coord = _run(_cfg(**{"faults.nan_step": 6}), shards, run_dir)
    assert res.state == FAILED and res.exit_code == 1
    assert "NonFiniteLoss: loss is nan at step 6 (injected by faults.nan_step)" in res.error, res.error
    assert "step-00000004 (step 4)" in res.error and "optim.lr" in res.error, res.error
    assert [s for s, _ in list_checkpoints(run_dir)] == [4]
    assert not (Path(run_dir) / "checkpoints" / "step-00000008").exists()
    ck = load_checkpoint(run_dir)
    assert ck.step == 4 and all(torch.isfinite(v).all() for v in ck.model.values())


def test_driver_killed_inside_a_checkpoint_write_resumes_from_the_previous(
    ray_local, demo_shards, reference, tmp_path
):
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    argv = [
        str(BIN / "alexnet"),
        "train",
        "--preset",
        "demo",
        "--data",
        demo_shards,
        "--run-dir",
        str(run_dir),
    ]
    sets = {**shared.BASE, **shared.REFERENCE, **shared.ONE_STAGE}  # the reference's run, to step 8
    for k, v in sets.items():
        if k != "train.steps":
            argv += ["--set", f"{k}={str(v).lower()}"]
    argv += ["--steps", "8"]
    # SIGKILL between the tensor files and the manifest of the step-8 checkpoint ([faults])
    kill = ["--set", "faults.kill_in_checkpoint_step=8"]
    r = subprocess.run(argv + kill, env=env, capture_output=True, text=True, timeout=150)
    assert r.returncode == -9, r.stdout[-3000:] + r.stderr[-3000:]
    step8 = run_dir / "checkpoints" / "step-00000008"
    assert (step8 / "model.safetensors").exists() and not (step8 / "manifest.json").exists()
    assert [s for s, _ in list_checkpoints(str(run_dir))] == [4]
    assert load_checkpoint(str(run_dir)).step == 4  # complete: sizes and hashes verified

    # resumed in this process (the CLI's --resume: test_ray_job.py): from the complete step 4
    holder = {}
    cfg = shared.demo_cfg(**{**sets, "train.steps": 8})
    res = run_training(
        cfg, demo_shards, str(run_dir), resume=True, on_coordinator=lambda c: holder.update(c=c)
    )
    assert res.state == FINISHED and res.step == 8, res.error
    assert [row["step"] for row in holder["c"].report.history.steps] == [4, 5, 6, 7]
    assert [s for s, _ in list_checkpoints(str(run_dir))] == [4, 8]
    ck = load_checkpoint(str(run_dir))
    ref8 = load_checkpoint(f"{reference}/checkpoints/step-00000008")
    _assert_same_weights(ck, ref8)


def _planted_in_epoch_0(cfg, dst: str, planted: dict[str, tuple[str, range]]) -> dict[str, int]:
    """Per reason, the planted samples that epoch 0 of ``cfg``'s run reads (its plan drops the last
    4 of 324, and the per-epoch rotation decides which)."""
    from alexnet.data.reader import epoch_segments, resolve_streams

    shards = DatasetIndex.load(dst).shards("train")
    streams = resolve_streams(cfg.data.streams, STEPS)
    plan = epoch_segments(shards, 0, cfg.data.seed, streams, cfg.optim.batch_size)
    read = {(g.url, i) for segs in plan for g in segs for i in range(g.start, g.stop)}
    out = {reason: sum((url, i) in read for i in idx) for reason, (url, idx) in planted.items()}
    return {"missing": 0, **out}


def _record_sizes(dst: str) -> None:
    """Write each shard's size on disk into the copy's dataset.json (as a user who damaged the
    shards and rebuilt only the index would have)."""
    import json

    meta = json.loads((Path(dst) / "dataset.json").read_text())
    for split in meta["splits"].values():
        for shard in split["shards"]:
            shard["bytes"] = (Path(dst) / shard["name"]).stat().st_size
    (Path(dst) / "dataset.json").write_text(json.dumps(meta))


def _plant_damage(src: str, dst: str) -> dict[str, tuple[str, range]]:
    """Copy the shards and damage three training shards; returns, per skip reason, the shard and
    the indices of the samples made unusable.

    The copy's index records the damaged shards' sizes, so the damage is met by the data workers,
    not refused before the run starts (the pre-run size check: tests/cluster/test_plan.py).
    """
    import webdataset as wds

    shutil.copytree(src, dst)
    shards = DatasetIndex.load(dst).shards("train")
    # 1. two undecodable JPEGs: one without a frame header (the data workers find it, also when they
    # only read the header to draw the crop: data.decode=device), one with its scan zeroed (on the
    # device path only the trainer's decode finds it)
    corrupt = shards[0].url
    samples = list(wds.WebDataset(corrupt, shardshuffle=False))
    samples[4]["jpg"] = b"\xff\xd8\xff\xe0" + b"\x00" * 100
    scan = bytearray(samples[7]["jpg"])
    scan[len(scan) // 2 :] = b"\x00" * (len(scan) - len(scan) // 2)
    samples[7]["jpg"] = bytes(scan)
    with wds.TarWriter(corrupt, encoder=False) as tw:
        for smp in samples:
            tw.write({k: v for k, v in smp.items() if k in ("__key__", "jpg", "cls")})
    # 2. a tar cut inside the header of the member after sample 20: samples 20.. are lost
    truncated = shards[2]
    with tarfile.open(truncated.url) as tf:
        members = tf.getmembers()
    per_sample = len(members) // truncated.count
    cut = members[20 * per_sample].offset + 100
    data = Path(truncated.url).read_bytes()
    Path(truncated.url).write_bytes(data[:cut])
    # 3. a shard that is not a tar at all: every sample of it lost
    unreadable = shards[4]
    Path(unreadable.url).write_bytes(b"this is not a tar archive\n" * 40)
    _record_sizes(dst)
    return {
        "corrupt": (corrupt, range(4, 8, 3)),
        "truncated": (truncated.url, range(20, truncated.count)),
        "unreadable": (unreadable.url, range(unreadable.count)),
    }


@pytest.mark.parametrize("decode", ["worker", "device"])
def test_corrupt_truncated_and_unreadable_shards_are_skipped_and_counted(ray_local, shards, tmp_path, decode):
    """Within data.max_skipped_fraction the run finishes and counts exactly the damage it read, on
    both decode paths: with data.decode=device (the stage-0 ranks decode; here on their CPU) one of
    the JPEGs is found broken only by the trainer's decode, and is counted like the workers' finds."""
    bad = str(tmp_path / "bad")
    sets = {"checkpoint.every_steps": 0, "data.max_skipped_fraction": 0.5, "data.decode": decode}
    cfg = _cfg(**sets)
    planted = _planted_in_epoch_0(cfg, bad, _plant_damage(shards, bad))
    assert planted["corrupt"] + planted["truncated"] + planted["unreadable"] > 70  # of 320
    res, coord = _run(cfg, bad, str(tmp_path / "run"))
    assert res.state == FINISHED and res.step == STEPS, res.error
    assert coord.policy.failures == []
    got = {
        reason: _counter(coord, "skipped_samples_total", reason=reason)
        for reason in ("corrupt", "missing", "truncated", "unreadable")
    }
    assert got == planted, got
    assert [row["step"] for row in coord.report.history.steps] == list(range(STEPS))


def test_an_epoch_losing_more_than_max_skipped_fraction_fails_naming_the_shards(ray_local, shards, tmp_path):
    bad = str(tmp_path / "bad")
    _plant_damage(shards, bad)
    run_dir = str(tmp_path / "run")
    res, coord = _run(_cfg(**{"checkpoint.every_steps": 0}), bad, run_dir)  # default: 1%
    assert res.state == FAILED and res.exit_code == 1
    assert res.error.startswith("DataLoss: epoch 0 lost "), res.error
    assert "of its 320 samples" in res.error and "data.max_skipped_fraction=0.01" in res.error, res.error
    train = DatasetIndex.load(bad).shards("train")
    named = [s.url for s in (train[0], train[2], train[4]) if s.url in res.error]
    assert named, res.error  # the damaged shards met so far, by name
    assert all(s.url not in res.error for s in (train[1], train[3]))
    assert list_checkpoints(run_dir) == []  # the epoch's end was never checkpointed


# -- multi-node: must stay last in this module (it shuts the session's Ray down) ---------------------


def test_node_loss_recovers_on_the_remaining_node(ray_local_shutdown, shards, tmp_path):
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    fast_detect = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "num_gpus": 2, "_system_config": fast_detect},
    )
    try:
        worker = cluster.add_node(num_cpus=4, num_gpus=2)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        cluster.wait_for_nodes()
        head_id = ray.get_runtime_context().get_node_id()

        # the head's GPUs are taken (another job) when the run starts: the group lands on the worker
        @ray.remote(num_cpus=0, num_gpus=2)
        class Holder:
            def ping(self) -> int:
                return 1

        holder = Holder.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)
        ).remote()
        ray.get(holder.ping.remote(), timeout=60)

        def lose_worker_node(coord, before=None):
            # after the step-4 checkpoint is on disk: free the head, lose the worker node
            deadline = time.monotonic() + 120
            while coord.checkpoints.last is None or coord.step_no < 5:
                if time.monotonic() > deadline or coord.state in (FINISHED, FAILED):
                    return
                time.sleep(0.02)
            if before is not None:
                before()
            cluster.remove_node(worker)

        sets = {
            "grid.gpus_per_rank": 1.0,
            "grid.placement_timeout_s": 20.0,
            "train.steps": 30,
            "checkpoint.every_steps": 4,
        }
        watcher: dict = {}

        def on_coord(c):
            watcher["t"] = threading.Thread(
                target=lose_worker_node, args=(c, lambda: ray.kill(holder)), daemon=True
            )
            watcher["t"].start()
            watcher["c"] = c

        res = run_training(_cfg(**sets), shards, str(tmp_path / "a"), on_coordinator=on_coord)
        watcher["t"].join(30)
        coord = watcher["c"]
        assert res.state == FINISHED and res.step == 30, res.error
        assert len(coord.policy.failures) == 1, coord.policy.failures
        assert _counter(coord, "restarts_total", reason="trainer_failure") == 1
        assert len(ray.nodes()) >= 1 and sum(n["Alive"] for n in ray.nodes()) == 1
        assert load_checkpoint(str(tmp_path / "a")).step == 30

    finally:
        ray.shutdown()
        cluster.shutdown()
