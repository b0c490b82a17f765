"""The run's plan: the dataset checked against the config once, and "what happens at step N"."""

from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.plan import Milestones, RunPlan, plan_run


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> str:
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path_factory.mktemp("syn") / "d")
    build_synthetic(120, out, size=36, shard_size=50, workers=1, progress=False)
    return out  # 10 classes of 36 px; 108 train images: 3 batches of 32


def test_plan_sizes_the_run(syn):
    plan, index = plan_run(load_config(preset="demo"), syn)
    assert plan == RunPlan(steps_per_epoch=3, total_steps=6 * 3, data_workers=2)  # demo: 6 epochs
    assert index.num_classes == 10
    plan, _ = plan_run(load_config(preset="demo", overrides={"train.steps": 7}), syn)
    assert plan.total_steps == 7


@pytest.mark.parametrize(
    "sets, words",
    [
        ({"model.num_classes": 7}, ["model.num_classes=7", "10 classes", "--set model.num_classes=10"]),
        ({"model.input_size": 40}, ["model.input_size=40", "larger than the stored images (36 px)"]),
        ({"optim.batch_size": 128, "grid.microbatches": 2}, ["optim.batch_size=128", "108 train images"]),
        ({"data.workers": 4}, ["data.workers=4", "3 batches"]),
    ],
)
def test_dataset_refusals_name_the_key(syn, sets, words):
    cfg = load_config(preset="demo", overrides=sets)
    with pytest.raises(ValueError) as e:
        plan_run(cfg, syn)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_no_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no dataset.json here; build shards"):
        plan_run(load_config(preset="demo"), str(tmp_path))


def _milestones(**kw) -> Milestones:
    args = dict(steps_per_epoch=5, total_steps=12, steps_per_call=3, checkpoint_every=4)
    return Milestones(**(args | kw))


def test_what_is_due_at_each_step():
    m = _milestones()
    due = {s: m.at(s) for s in range(13)}
    assert not any((due[0].epoch_end, due[0].evaluate, due[0].checkpoint, due[0].end, due[0].boundary))
    assert [s for s, d in due.items() if d.epoch_end] == [5, 10]
    assert [s for s, d in due.items() if d.evaluate] == [5, 10]
    assert [s for s, d in due.items() if d.checkpoint] == [4, 5, 8, 10, 12]
    assert [s for s, d in due.items() if d.end] == [12]
    assert [s for s, d in due.items() if d.boundary] == [4, 5, 8, 10, 12]
    # validation every 2nd epoch; no checkpoint at epoch ends: an epoch end is still a boundary
    m = _milestones(eval_every_epochs=2, checkpoint_at_epoch_end=False, checkpoint_every=0, total_steps=20)
    assert [s for s in range(21) if m.at(s).evaluate] == [10, 20]
    assert [s for s in range(21) if m.at(s).checkpoint] == []
    assert [s for s in range(21) if m.at(s).boundary] == [5, 10, 15, 20]
    assert not any(_milestones(eval_every_epochs=0).at(s).evaluate for s in range(13))


def test_chunks_stop_exactly_at_boundaries():
    m = _milestones()
    chunks, s = [], 0
    while s < m.total_steps:
        chunks.append((s, m.chunk(s)))
        s += chunks[-1][1]
    assert chunks == [(0, 3), (3, 1), (4, 1), (5, 3), (8, 2), (10, 2)]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(steps_per_epoch=7, total_steps=30, steps_per_call=4, checkpoint_every=6),
        dict(steps_per_epoch=3, total_steps=10, steps_per_call=10, checkpoint_every=0),
        dict(steps_per_epoch=100, total_steps=9, steps_per_call=2, checkpoint_every=0),
    ],
)
def test_a_chunk_never_runs_past_a_boundary(kw):
    m = _milestones(**kw)
    for s in range(m.total_steps):
        n = m.chunk(s)
        assert 1 <= n <= m.steps_per_call and s + n <= m.total_steps
        assert not any(m.at(s + k).boundary for k in range(1, n))
        assert n == m.steps_per_call or m.at(s + n).boundary


def test_milestones_of_a_config():
    cfg = load_config(preset="demo", overrides={"checkpoint.every_steps": 7, "eval.every_epochs": 2})
    m = Milestones.of(cfg, RunPlan(steps_per_epoch=9, total_steps=50, data_workers=2))
    assert (m.steps_per_epoch, m.total_steps, m.steps_per_call) == (9, 50, cfg.train.steps_per_call)
    assert (m.checkpoint_every, m.checkpoint_at_epoch_end, m.eval_every_epochs) == (7, True, 2)
