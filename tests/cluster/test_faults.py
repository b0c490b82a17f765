"""Fault handling without Ray: the coordinator's state machine driven step by step with a fake
trainer group (failures, restarts, NaN loss, too many failures; every transition logged and
exported), and the reader's handling of truncated and unreadable shards.

The same failures on real Ray actors are in ``tests/e2e/test_faults.py``.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alexnet.data.index import DatasetIndex
from alexnet.data.records import ReaderStats, Segment, read_segment
from cluster.checkpoint import list_checkpoints
from cluster.config import load_config
from cluster.coordinator import FAILED, FINISHED, RECOVERING, RUNNING, STARTING
from cluster.faults import FailurePolicy, FaultPlan, NonFiniteLoss, RankFaults, TrainerDied
from cluster.feed import Fed, NoFeed
from cluster.metrics import STATES
from tests.cluster.test_coordinator import FakeGroup, _coordinator


def _state_values(c) -> dict[str, float]:
    reg = c.report.metrics.registry
    return {s: reg.get_sample_value("alexnet_state", {"run": "t", "alexnet_state": s}) for s in STATES}


def _transitions(c, state: str) -> float:
    v = c.report.metrics.registry.get_sample_value(
        "alexnet_state_transitions_total", {"run": "t", "to_state": state}
    )
    return v or 0.0


def test_every_transition_is_logged_and_exported_step_by_step(tmp_path):
    g = FakeGroup(die_at=9)
    lines: list[str] = []
    c = _coordinator(tmp_path, g, log=lines.append)
    assert c.state == STARTING and _state_values(c)["starting"] == 1
    seen = [STARTING]
    while c.state not in (FINISHED, FAILED):
        before = c.state
        new = c.step()
        assert new == c.state
        # the exported enum follows the state machine at every step
        assert _state_values(c) == {s: float(s == new) for s in STATES}
        if new != before:
            assert f"[coordinator] {before} -> {new} at step {c.step_no}" in lines[-1] or any(
                f"[coordinator] {before} -> {new}" in x for x in lines[-3:]
            ), lines[-3:]
        seen.append(new)
    assert c.state == FINISHED and c.step_no == 12
    # the failure at step 9 -> recovering -> starting (restored step 8) -> running
    i = seen.index(RECOVERING)
    assert seen[i + 1] == STARTING and seen[i + 2] == RUNNING
    counts = {s: _transitions(c, s) for s in STATES}
    changes = [b for a, b in zip(seen, seen[1:], strict=False) if a != b]
    for s in STATES:
        # +1: the initial "starting" is exported when the coordinator is built
        assert counts[s] == changes.count(s) + (s == STARTING), (s, counts, changes)
    assert counts["recovering"] == 1 and counts["checkpointing"] >= 3 and counts["failed"] == 0
    # validation at the two epoch ends (5, 10), once each; the final checkpoint in its own state
    assert counts["evaluating"] == 2 and counts["finishing"] == 1
    assert any("trainer failure 1 at step" in x and "rank 1 died at step 9" in x for x in lines), lines
    assert any("restart 1 of at most faults.max_failures=3" in x and "(step 8)" in x for x in lines), lines
    # the history holds the final trajectory only: each step once, steps 8..9 not doubled
    assert [r["step"] for r in c.report.history.steps] == list(range(12))


def test_failure_before_any_checkpoint_restarts_from_step_0(tmp_path):
    class Fresh(FakeGroup):
        def start(self, step, data_positions):
            super().start(step, data_positions)
            self.steps_done = step  # new actors: fresh weights (nothing loaded yet)

    g = Fresh(die_at=2)
    c = _coordinator(tmp_path, g)
    assert c.run() == FINISHED and c.step_no == 12
    starts = [x for x in g.calls if x[0] == "start"]
    assert len(starts) == 2 and starts[1] == ("start", None)  # fresh data position, no load
    assert not any(x[0] == "load" for x in g.calls)
    assert [r["step"] for r in c.report.history.steps] == list(range(12))


def test_exceeding_max_failures_lists_each_failure(tmp_path):
    class DiesTwice(FakeGroup):
        def __init__(self):
            super().__init__()
            self.deaths = 0

        def train(self, first_step, steps, lr):
            if first_step >= 5 and self.deaths < 3:
                self.deaths += 1
                raise TrainerDied(f"rank {self.deaths} died (death {self.deaths})")
            return super().train(first_step, steps, lr)

    g = DiesTwice()
    c = _coordinator(tmp_path, g, **{"faults.max_failures": 2})
    assert c.run() == FAILED
    msg = str(c.error)
    assert "3 trainer failures exceed faults.max_failures=2" in msg, msg
    for k in (1, 2, 3):
        assert f"death {k}" in msg, msg
    assert msg.count("step 5:") == 3  # each failure with the step it happened at
    assert _transitions(c, RECOVERING) == 2 and _transitions(c, FAILED) == 1
    reg = c.report.metrics.registry
    assert reg.get_sample_value("alexnet_restarts_total", {"run": "t", "reason": "trainer_failure"}) == 2
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [4, 5]  # none after the failures (at 5+)


def test_nan_loss_stops_without_checkpointing_over_a_good_one(tmp_path):
    class NanAt(FakeGroup):
        def train(self, first_step, steps, lr):
            out = super().train(first_step, steps, lr)
            for r in out:
                if r["step"] >= 6:  # the weights are NaN from step 6 on
                    r["loss"] = math.nan
            return out

    g = NanAt()
    lines: list[str] = []
    c = _coordinator(tmp_path, g, log=lines.append, **{"faults.nan_step": 6})
    assert c.run() == FAILED
    assert isinstance(c.error, NonFiniteLoss)
    msg = str(c.error)
    assert "loss is nan at step 6 (injected by faults.nan_step)" in msg, msg
    assert "step-00000005 (step 5)" in msg and "--resume" in msg, msg
    # checkpoints at 4 and the epoch end 5 (before the NaN); the one due at 8 never written
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [4, 5]
    assert not any(Path(tmp_path, "checkpoints").glob("step-0000000[6-9]"))
    assert any("running -> failed" in x for x in lines), lines
    loss = c.report.metrics.registry.get_sample_value("alexnet_loss", {"run": "t", "split": "train"})
    assert math.isnan(loss)  # exported, so the AlexNetLossNaN alert fires


# -- the fault plan and the failure policy, as plain Python -------------------------------------


def test_injected_faults_fire_once():
    f = load_config(
        preset="demo",
        overrides={
            "faults.kill_rank": 3,
            "faults.kill_step": 7,
            "faults.kill_data_worker": 1,
            "faults.kill_data_step": 5,
            "faults.nan_step": 6,
        },
    ).faults
    plan = FaultPlan(f)
    assert plan.for_rank(3) == RankFaults(kill_step=7, nan_step=6)
    assert plan.for_rank(2) == RankFaults(kill_step=-1, nan_step=6)
    assert plan.data_worker_to_kill(0, 5) is None  # steps 0..4
    assert plan.data_worker_to_kill(4, 2) == 1  # steps 4..5 reach step 5
    assert plan.data_worker_to_kill(4, 2) is None  # once
    plan.trainer_failed()
    assert plan.for_rank(3).kill_step == -1  # the restarted group is not killed again
    feed = SimpleNamespace(get=lambda step: Fed(step, torch.ones(2, 3), None, []))
    faulty = RankFaults(nan_step=6).inputs(feed)
    assert torch.equal(faulty.get(5).images, torch.ones(2, 3))
    assert torch.isnan(faulty.get(6).images).all()
    assert RankFaults(nan_step=6).inputs(NoFeed()).get(6).images is None  # a rank without images
    assert RankFaults().inputs(feed) is feed  # nothing injected: the feed as it is
    off = FaultPlan(load_config(preset="demo").faults)
    assert off.for_rank(0) == RankFaults() and off.data_worker_to_kill(0, 10**6) is None


def test_failure_policy_budget_and_nan_rule():
    policy = FailurePolicy(load_config(preset="demo", overrides={"faults.max_failures": 1}).faults)
    assert policy.trainer_died(5, TrainerDied("rank 1 died"))
    assert not policy.trainer_died(9, TrainerDied("rank 2 died"))
    assert str(policy.exhausted()) == (
        "2 trainer failures exceed faults.max_failures=1:\n  step 5: rank 1 died\n  step 9: rank 2 died"
    )
    rows = [{"step": 3, "loss": 1.0}, {"step": 4, "loss": math.inf}, {"step": 5, "loss": math.nan}]
    assert policy.first_non_finite(rows[:1]) is None and policy.first_non_finite(rows) is rows[1]
    msg = str(policy.non_finite_error(rows[1], (2, "RUN/checkpoints/step-00000002")))
    assert msg.startswith("loss is inf at step 4: training diverged") and "(step 2)" in msg, msg
    assert "no checkpoint was written yet" in str(policy.non_finite_error(rows[1], None))


# -- the reader: truncated and unreadable shards --------------------------------------------------


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> str:
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path_factory.mktemp("syn") / "d")
    build_synthetic(120, out, size=36, shard_size=50, workers=1, progress=False)
    return out


def test_truncated_shard_counts_the_samples_it_lost(syn, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(syn, bad)
    shard = DatasetIndex.load(str(bad)).shards("train")[0]
    data = Path(shard.url).read_bytes()
    Path(shard.url).write_bytes(data[: len(data) // 3])
    stats = ReaderStats()
    got = list(read_segment(Segment(shard.url, 0, shard.count), stats, retries=0))
    intact = [r for r in got if "jpg" in r and "cls" in r]
    assert 0 < len(intact) < shard.count
    assert stats.truncated_shards == 1 and stats.unreadable_shards == 0
    # every planted loss is accounted for: a partial last record (if any) + the records never read
    assert (len(got) - len(intact)) + stats.skipped_truncated == shard.count - len(intact)
    # a segment that ends before the cut loses nothing
    stats2 = ReaderStats()
    assert len(list(read_segment(Segment(shard.url, 0, 3), stats2, retries=0))) == 3
    assert stats2.skipped == 0 and stats2.truncated_shards == 0


def test_a_shard_that_is_not_a_tar_is_skipped_at_once_not_retried(syn, tmp_path, caplog):
    """Its bytes are there and are not a tar: reading them again gives the same answer, so no try
    and no wait is spent on it (the retries are for an ``OSError``: a missing file, the network)."""
    bad = tmp_path / "bad"
    shutil.copytree(syn, bad)
    shard = DatasetIndex.load(str(bad)).shards("train")[1]
    Path(shard.url).write_bytes(b"this is not a tar archive\n" * 40)
    stats = ReaderStats()
    with caplog.at_level(logging.WARNING, logger="alexnet.data"):
        got = list(read_segment(Segment(shard.url, 5, 20), stats, retries=2, wait_s=60))
    assert got == [] and stats.unreadable_shards == 1 and stats.skipped_unreadable == 15
    assert not [r for r in caplog.records if "cannot read it" in r.getMessage()]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "after 1 tries" in errors[0].getMessage()


def test_unopenable_shard_is_retried_then_skipped_with_an_error_naming_it(syn, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(syn, bad)
    shard = DatasetIndex.load(str(bad)).shards("train")[1]
    Path(shard.url).unlink()
    stats = ReaderStats()
    with caplog.at_level(logging.WARNING, logger="alexnet.data"):
        got = list(read_segment(Segment(shard.url, 5, 20), stats, retries=2, wait_s=0.01))
    assert got == []
    assert stats.unreadable_shards == 1 and stats.skipped_unreadable == 15 and stats.skipped == 15
    tries = [r for r in caplog.records if "cannot read it" in r.getMessage()]
    assert len(tries) == 2  # two retries after the first failure
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and shard.url in errors[0].getMessage() and "15 samples" in errors[0].getMessage()


def test_retry_recovers_a_transient_failure(syn, tmp_path, monkeypatch):
    """A shard that fails to open once and then opens is read whole (nothing skipped or doubled)."""
    import alexnet.data.records as reader

    shard = DatasetIndex.load(syn).shards("train")[0]
    real_open, calls = reader.fsspec.open, []

    def flaky_open(url, *a, **k):
        calls.append(url)
        if len(calls) == 1:
            raise OSError("connection reset (simulated)")
        return real_open(url, *a, **k)

    monkeypatch.setattr(reader.fsspec, "open", flaky_open)
    stats = ReaderStats()
    got = list(read_segment(Segment(shard.url, 0, shard.count), stats, retries=2, wait_s=0.01))
    assert len(calls) == 2 and len(got) == shard.count and stats.skipped == 0
    assert len({r["__key__"] for r in got}) == shard.count


def test_lost_samples_are_counted_per_epoch_and_shard(syn, tmp_path):
    """What data.max_skipped_fraction judges: each epoch's losses by shard and reason, counted once
    (the padding pass that refills the worker's batches re-reads the run without counting again)."""
    from alexnet.data.reader import ReaderSpec, Stream, epoch_segments

    bad = tmp_path / "bad"
    shutil.copytree(syn, bad)
    index = DatasetIndex.load(str(bad))
    shards = index.shards("train")
    gone = shards[1].url
    Path(gone).write_bytes(b"this is not a tar archive\n" * 40)  # unreadable, and not retried
    spec = ReaderSpec(str(bad), batch_size=16, input_size=32, workers=1, shuffle_buffer=0)
    stream = Stream(spec, 0, index=index)
    for _ in range(2 * stream.steps_per_epoch):  # two epochs
        stream.next_batch()
    want = {
        (e, gone, "unreadable"): sum(
            s.stop - s.start for s in epoch_segments(shards, e, 0, 1, 16)[0] if s.url == gone
        )
        for e in (0, 1)
    }
    assert all(n > 0 for n in want.values())
    assert stream.stats.lost == want
    assert stream.stats.skipped_unreadable == sum(want.values())


def test_data_loss_bound_is_per_epoch_and_survives_restarted_counters():
    from cluster.faults import DataLoss, DataLossBound

    bound = DataLossBound(0.05, 100)  # 5 samples per epoch may be lost
    bound.check({(0, "a.tar", "corrupt"): 3, (1, "a.tar", "corrupt"): 3})  # 3 + 3: two epochs
    bound.check({(0, "a.tar", "corrupt"): 1})  # a restarted worker counts from 0: not 3 + 1
    bound.check({(0, "a.tar", "corrupt"): 5})
    with pytest.raises(DataLoss) as e:
        bound.check({(1, "a.tar", "corrupt"): 3, (1, "b.tar", "truncated"): 4})
    assert str(e.value).startswith(
        "epoch 1 lost 7 of its 100 samples (7.0%), more than data.max_skipped_fraction=0.05"
    )
    assert "b.tar (4 truncated), a.tar (3 corrupt)" in str(e.value)
    with pytest.raises(DataLoss):
        DataLossBound(0.0, 100).check({(0, "a.tar", "missing"): 1})  # 0: any loss fails
    DataLossBound(1.0, 100).check({(0, "a.tar", "unreadable"): 100})  # 1: never


def test_the_checkpoint_crash_is_a_faults_setting_off_by_default():
    """faults.kill_in_checkpoint_step: the writer's hook between tensor files and manifest (the e2e
    test tests/e2e/test_faults.py kills a driver with it); off, there is no hook at all."""
    from cluster.config import FaultsSection
    from cluster.faults import checkpoint_crash

    assert checkpoint_crash(FaultsSection()) is None
    crash = checkpoint_crash(FaultsSection(kill_in_checkpoint_step=8))
    crash(4)  # another step: nothing happens (step 8 would SIGKILL this process)
    with pytest.raises(ValueError, match="faults.kill_in_checkpoint_step"):
        FaultsSection(kill_in_checkpoint_step=-2)
