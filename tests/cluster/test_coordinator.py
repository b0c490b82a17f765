"""The coordinator's state machine, advanced step by step with a fake trainer group (no Ray)."""

from __future__ import annotations

import torch

from alexnet.config import ModelConfig
from alexnet.model import TwoColumnAlexNet
from cluster.checkpoint import list_checkpoints, load_checkpoint
from cluster.config import load_config
from cluster.coordinator import (
    CHECKPOINTING,
    EVALUATING,
    FAILED,
    FINISHED,
    FINISHING,
    RECOVERING,
    RUNNING,
    STARTING,
    Coordinator,
)
from cluster.faults import CheckpointWriteFailed, DataLoss, TrainerDied
from cluster.manifest import ResumePoint
from cluster.metrics import Metrics
from cluster.plan import RunPlan
from cluster.reporting import Reporter, plot_history
from cluster.run import resolve_run


class FakeGroup:
    """Trains a counter: weights = step count, so resume/restore are visible in the numbers.

    ``submit`` only records the chunk; ``collect`` runs it (chunks are collected in order)."""

    def __init__(self, die_at: int | None = None) -> None:
        self.model = TwoColumnAlexNet(ModelConfig.small()).state_dict()
        self.calls: list[tuple] = []
        self.steps_done = 0
        self.die_at = die_at
        self.val_errors = [0.5, 0.4, 0.4, 0.4, 0.4, 0.4]

    def start(self, step, data_positions):
        self.calls.append(("start", data_positions))

    def load(self, model, optimizer):
        self.calls.append(("load", int(model["conv1.0.bias"][0].item())))
        self.model = {k: v.clone() for k, v in model.items()}
        self.steps_done = int(model["conv1.0.bias"][0].item())

    def train(self, first_step, steps, lr):
        self.calls.append(("train", first_step, steps, lr))
        assert first_step == self.steps_done
        out = []
        for s in range(first_step, first_step + steps):
            if self.die_at is not None and s == self.die_at:
                self.die_at = None
                raise TrainerDied(f"rank 1 died at step {s}")
            self.steps_done += 1
            out.append(
                {"step": s, "loss": 2.0 / (1 + s), "top1_error": 0.5, "top5_error": 0.1, "step_s": 0.01}
            )
        self.model["conv1.0.bias"].fill_(self.steps_done)
        return out

    def submit(self, first_step, steps, lr):
        return (first_step, steps, lr)

    def collect(self, handle):
        return self.train(*handle)

    def evaluate(self, ten_crop, max_samples):
        self.calls.append(("evaluate", ten_crop, max_samples))
        e = self.val_errors.pop(0)
        res = {"top1_error": e, "top5_error": e / 2, "samples": 100, "loss": 1.0}
        if ten_crop:  # the group runs the 10-crop pass only when asked
            res.update(top1_error_10crop=e, top5_error_10crop=e / 2)
        return res

    def snapshot(self, step):
        return (
            dict(self.model),
            {k: torch.zeros_like(v) for k, v in self.model.items()},
            [{"w": self.steps_done}],
        )

    def data_stats(self):
        return {"queue_depth": [1, 2], "decode_images_per_second": 100.0, "skipped": {"corrupt": 0}}

    def trace(self, steps):
        return None

    def shutdown(self):
        self.calls.append(("shutdown",))


def _coordinator(tmp_path, group, total=12, spe=5, resume=None, log=None, **sets):
    overrides = {"train.steps_per_call": 3, "checkpoint.every_steps": 4, "checkpoint.background": False}
    overrides.update(sets)
    cfg = load_config(preset="demo", overrides=overrides)
    plan = RunPlan(steps_per_epoch=spe, total_steps=total, data_workers=2, data_streams=2)
    report = Reporter(
        Metrics("t"), plan, cfg.optim.batch_size, cfg.train.log_every_steps, log=log or (lambda s: None)
    )
    return Coordinator(resolve_run(cfg, "unused", plan), group, str(tmp_path), report, resume=resume)


def test_steps_through_states_and_chunks(tmp_path):
    g = FakeGroup()
    c = _coordinator(tmp_path, g)
    assert c.state == STARTING
    assert c.step() == RUNNING
    states = []
    while c.state not in (FINISHED, FAILED):
        states.append(c.step())
    assert c.state == FINISHED and c.step_no == 12
    trains = [x[1:3] for x in g.calls if x[0] == "train"]
    # chunks stop at checkpoint steps (4, 8, 12) and epoch ends (5, 10)
    assert trains == [(0, 3), (3, 1), (4, 1), (5, 3), (8, 2), (10, 2)]
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [8, 10, 12]  # keep = 3
    assert CHECKPOINTING in states


def test_ten_crop_pass_is_asked_for_when_due(tmp_path):
    # 22 steps of 5 per epoch: validations after epochs 1..4; the 10-crop pass every 3rd and at the last
    g = FakeGroup()
    log: list[str] = []
    sets = {"eval.ten_crop_every_epochs": 3, "eval.max_samples": 7}
    c = _coordinator(tmp_path, g, total=22, log=log.append, **sets)
    assert c.run() == FINISHED
    assert [x[1:] for x in g.calls if x[0] == "evaluate"] == [(False, 7), (False, 7), (True, 7), (True, 7)]
    evals = c.report.history.evals
    assert ["top1_error_10crop" in e for e in evals] == [False, False, True, True]
    ten = [line for line in log if "validation" in line and "10-crop" in line]
    assert [line.split()[1] for line in ten] == ["2", "3"]  # epochs counted from 0 in the log
    plot_history(c.report.history)  # the plot copes with validations without the 10-crop pass
    g2 = FakeGroup()
    off = {"eval.ten_crop": False, "eval.ten_crop_every_epochs": 1}
    assert _coordinator(tmp_path / "off", g2, total=22, **off).run() == FINISHED
    assert [x[1] for x in g2.calls if x[0] == "evaluate"] == [False] * 4


def test_stop_request_checkpoints_and_finishes(tmp_path):
    g = FakeGroup()
    c = _coordinator(tmp_path, g, **{"checkpoint.every_steps": 0, "checkpoint.at_epoch_end": False})
    c.step()
    c.step()  # 3 steps done, steps 3..4 queued on the trainers (look-ahead)
    assert c.step_no == 3 and c._inflight[:2] == (3, 2)  # up to the epoch end (5)
    c.request_stop()
    assert c.step() == EVALUATING  # the queued chunk is collected, nothing new is submitted
    assert c.step_no == 5 and c._inflight is None
    assert c.step() == FINISHING  # the epoch end's validation first (the LR rule is checkpointed)
    assert c.report.history.evals[-1]["step"] == 5
    assert c.step() == FINISHED
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [5]


def test_resume_continues_from_manifest(tmp_path):
    g = FakeGroup()
    c = _coordinator(tmp_path, g, total=7)
    assert c.run() == FINISHED
    ck = load_checkpoint(str(tmp_path))
    assert ck.step == 7 and ck.manifest["data"]["positions"] == [{"w": 7}]
    g2 = FakeGroup()
    c2 = _coordinator(tmp_path, g2, total=12, resume=ResumePoint.of(ck))
    assert c2.run() == FINISHED
    assert g2.calls[0] == ("start", [{"w": 7}]) and g2.calls[1] == ("load", 7)
    assert [x[1] for x in g2.calls if x[0] == "train"][0] == 7
    assert load_checkpoint(str(tmp_path)).step == 12


def test_trainer_failure_recovers_from_newest_checkpoint(tmp_path):
    g = FakeGroup(die_at=9)
    c = _coordinator(tmp_path, g)
    seen = []
    while c.state not in (FINISHED, FAILED):
        seen.append(c.step())
    assert c.state == FINISHED and RECOVERING in seen
    assert ("load", 8) in g.calls  # restored the step-8 checkpoint
    assert (
        c.report.metrics.registry.get_sample_value(
            "alexnet_restarts_total", {"run": "t", "reason": "trainer_failure"}
        )
        == 1
    )


def test_a_restart_the_cluster_can_no_longer_hold_fails_clearly_keeping_the_checkpoints(tmp_path):
    """A node lost with its trainer: the restart's reservation is refused (what
    ``cluster.placement`` says, tests/cluster/test_placement.py), and the run fails with that
    message at once, its checkpoints kept (on a real two-node cluster: tests/e2e/test_faults.py)."""
    refusal = "cannot hold grid.shape='1x2x2' on this cluster (...); add nodes"

    class NodeLost(FakeGroup):
        def start(self, step, data_positions):
            if any(c[0] == "start" for c in self.calls):
                raise ValueError(refusal)
            super().start(step, data_positions)

    c = _coordinator(tmp_path, NodeLost(die_at=9))
    assert c.run() == FAILED
    assert refusal in str(c.error), c.error
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [4, 5, 8]  # 5: the epoch end


def test_too_many_failures_fail_with_the_list(tmp_path):
    class Dying(FakeGroup):
        def train(self, first_step, steps, lr):
            raise TrainerDied("boom")

    c = _coordinator(tmp_path, Dying(), **{"faults.max_failures": 1})
    assert c.run() == FAILED
    assert "faults.max_failures=1" in str(c.error) and str(c.error).count("boom") == 2


# -- a failed checkpoint write, a damaged newest checkpoint, an epoch that loses too much data ------


def _disk_full_at(monkeypatch, steps):
    """Checkpoint writes of ``steps`` fail as on a full disk (the others are written)."""
    import cluster.checkpoint as checkpoint

    real = checkpoint.write_checkpoint

    def write(run_dir, step, *args):
        if step in steps:
            raise OSError(28, "No space left on device")
        return real(run_dir, step, *args)

    monkeypatch.setattr(checkpoint, "write_checkpoint", write)


def test_a_failed_checkpoint_write_fails_the_run_at_once(tmp_path, monkeypatch):
    _disk_full_at(monkeypatch, {4})
    g = FakeGroup()
    c = _coordinator(tmp_path, g)
    assert c.run() == FAILED and c.step_no == 4
    assert [x[1:3] for x in g.calls if x[0] == "train"] == [(0, 3), (3, 1)]  # nothing after step 4
    assert isinstance(c.error, CheckpointWriteFailed)
    msg = str(c.error)
    assert "checkpoint of step 4 could not be written" in msg and "No space left on device" in msg, msg
    assert "checkpoint.max_failed_writes=0" in msg and "--resume" in msg, msg
    assert list_checkpoints(str(tmp_path)) == []


def test_failed_writes_within_max_failed_writes_are_ridden_out(tmp_path, monkeypatch):
    _disk_full_at(monkeypatch, {4})
    c = _coordinator(tmp_path, FakeGroup(), **{"checkpoint.max_failed_writes": 1})
    assert c.run() == FINISHED and c.error is None
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [8, 10, 12]


def test_more_failed_writes_in_a_row_than_allowed_fail_the_run(tmp_path, monkeypatch):
    _disk_full_at(monkeypatch, {4, 5})
    c = _coordinator(tmp_path, FakeGroup(), **{"checkpoint.max_failed_writes": 1})
    assert c.run() == FAILED and c.step_no == 5
    assert "2 write(s) in a row failed, more than checkpoint.max_failed_writes=1" in str(c.error)


def test_the_last_checkpoint_must_be_written(tmp_path, monkeypatch):
    _disk_full_at(monkeypatch, {12})
    c = _coordinator(tmp_path, FakeGroup(), **{"checkpoint.max_failed_writes": 3})
    assert c.run() == FAILED and c.step_no == 12
    assert "the run's last checkpoint is not on disk" in str(c.error)
    assert "newest complete checkpoint is" in str(c.error) and "(step 10)" in str(c.error)


def test_recovery_skips_a_damaged_newest_checkpoint(tmp_path):
    class LosesItsNewest(FakeGroup):
        def train(self, first_step, steps, lr):
            if first_step == 8 and self.die_at is not None:  # step-8's optimizer state is lost
                (tmp_path / "checkpoints" / "step-00000008" / "optimizer.safetensors").unlink()
            return super().train(first_step, steps, lr)

    lines = []
    g = LosesItsNewest(die_at=9)
    c = _coordinator(tmp_path, g, log=lines.append)
    assert c.run() == FINISHED
    # checkpoints at 4, 5 (the epoch end) and 8: the newest complete one is 5's
    assert ("load", 5) in g.calls and ("load", 8) not in g.calls
    assert "[coordinator] skipped newer checkpoint step-00000008: optimizer.safetensors is missing" in lines
    assert any("from checkpoint" in x and "step-00000005 (step 5)" in x for x in lines), lines


class LosesData(FakeGroup):
    """Data workers that lost ``lost`` samples of epoch 0 by the first chunk (a deleted shard)."""

    def __init__(self, lost: dict) -> None:
        super().__init__()
        self.lost = lost

    def data_stats(self):
        return {**super().data_stats(), "lost": self.lost}


def test_an_epoch_that_loses_too_much_data_fails_early_with_the_shards(tmp_path):
    lost = {(0, "d/train-000001.tar", "unreadable"): 50, (0, "d/train-000000.tar", "corrupt"): 1}
    g = LosesData(lost)
    c = _coordinator(tmp_path, g)  # 5 steps of 32 per epoch: 1% is 1.6 samples
    assert c.run() == FAILED and c.step_no == 3  # the first chunk, before the epoch's end
    assert isinstance(c.error, DataLoss)
    msg = str(c.error)
    assert "epoch 0 lost 51 of its 160 samples (31.9%)" in msg, msg
    assert "more than data.max_skipped_fraction=0.01" in msg, msg
    assert "d/train-000001.tar (50 unreadable), d/train-000000.tar (1 corrupt)" in msg, msg
    assert list_checkpoints(str(tmp_path)) == []


def test_losses_within_max_skipped_fraction_do_not_stop_the_run(tmp_path):
    lost = {(0, "d/train-000000.tar", "corrupt"): 1}
    c = _coordinator(tmp_path, LosesData(lost))
    assert c.run() == FINISHED
    lost = {(0, "d/train-000001.tar", "unreadable"): 50}
    c = _coordinator(tmp_path / "b", LosesData(lost), **{"data.max_skipped_fraction": 0.5})
    assert c.run() == FINISHED


def test_a_stop_right_after_a_tolerated_failed_write_writes_again(tmp_path, monkeypatch):
    import cluster.checkpoint as checkpoint

    real, tries = checkpoint.write_checkpoint, []

    def write(run_dir, step, *args):
        tries.append(step)
        if tries.count(step) == 1 and step == 4:  # the first try of step 4 fails
            raise OSError(28, "No space left on device")
        return real(run_dir, step, *args)

    monkeypatch.setattr(checkpoint, "write_checkpoint", write)
    c = _coordinator(tmp_path, FakeGroup(), **{"checkpoint.max_failed_writes": 1})
    while c.step_no < 4 or c.state != RUNNING:
        c.step()
    c.request_stop()
    assert c.run() == FINISHED and c.step_no == 4
    assert tries == [4, 4] and [s for s, _ in list_checkpoints(str(tmp_path))] == [4]
