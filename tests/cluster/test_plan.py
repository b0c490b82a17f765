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
    # demo: 6 epochs; 3 streams (min(3 batches, 16))
    assert plan == RunPlan(steps_per_epoch=3, total_steps=6 * 3, data_workers=2, data_streams=3)
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


def test_ten_crop_pass_every_k_epochs_and_at_the_last_validation():
    # 5 steps per epoch, 47 steps: 9 whole epochs, so the last validation is after epoch 9 (step 45)
    def ten(**kw) -> list[int]:
        m = _milestones(**({"total_steps": 47, "checkpoint_every": 0, "ten_crop": True} | kw))
        assert all(m.at(s).evaluate for s in range(48) if m.at(s).ten_crop)  # only with a validation
        return [s // 5 for s in range(48) if m.at(s).ten_crop]

    assert ten() == [9]  # 0: only the run's last validation
    assert ten(ten_crop_every_epochs=1) == list(range(1, 10))
    assert ten(ten_crop_every_epochs=4) == [4, 8, 9]
    assert ten(ten_crop_every_epochs=3, eval_every_epochs=2) == [6, 8]  # validations at 2, 4, 6, 8
    assert ten(ten_crop_every_epochs=1, ten_crop=False) == []  # eval.ten_crop=false: never
    assert ten(ten_crop_every_epochs=1, eval_every_epochs=0) == []  # no validation: never


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
    m = Milestones.of(cfg, RunPlan(steps_per_epoch=9, total_steps=50, data_workers=2, data_streams=2))
    assert (m.steps_per_epoch, m.total_steps, m.steps_per_call) == (9, 50, cfg.train.steps_per_call)
    assert (m.checkpoint_every, m.checkpoint_at_epoch_end, m.eval_every_epochs) == (7, True, 2)


# -- a val split when the run validates; every shard on disk ----------------------------------------


@pytest.fixture(scope="module")
def train_only(tmp_path_factory) -> str:
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path_factory.mktemp("syn") / "no-val")
    build_synthetic(108, out, size=36, shard_size=50, val_fraction=0.0, workers=1, progress=False)
    return out  # 108 train images, no val split: 3 steps of 32 per epoch


def test_a_run_that_validates_needs_a_val_split(train_only):
    with pytest.raises(ValueError) as e:
        plan_run(load_config(preset="demo"), train_only)
    msg = str(e.value)
    assert f"--data {train_only} has no val split" in msg and "validates at step 3" in msg, msg
    assert "--set eval.every_epochs=0" in msg, msg
    # said explicitly, or a run that ends before its first validation: nothing to refuse
    plan_run(load_config(preset="demo", overrides={"eval.every_epochs": 0}), train_only)
    plan_run(load_config(preset="demo", overrides={"train.steps": 2}), train_only)
    with pytest.raises(ValueError, match="validates at step 6"):
        plan_run(load_config(preset="demo", overrides={"eval.every_epochs": 2}), train_only)


def _copy(src: str, dst) -> tuple[str, dict]:
    import shutil

    from alexnet.data.index import DatasetIndex

    shutil.copytree(src, dst)
    return str(dst), DatasetIndex.load(str(dst)).meta


def test_every_shard_is_on_disk_with_its_recorded_size(syn, tmp_path):
    from pathlib import Path

    bad, meta = _copy(syn, tmp_path / "bad")
    train = [s["name"] for s in meta["splits"]["train"]["shards"]]
    assert all(s["bytes"] > 0 for s in meta["splits"]["train"]["shards"])  # recorded by alexnet shards
    (Path(bad) / train[0]).unlink()
    data = (Path(bad) / train[1]).read_bytes()
    (Path(bad) / train[1]).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        plan_run(load_config(preset="demo"), bad)
    msg = str(e.value)
    assert (
        f"--data {bad}: 2 damaged shard(s): {train[0]} is missing; {train[1]} has {len(data) // 2} bytes, "
        in msg
    )
    assert f"dataset.json says {len(data)}" in msg and "`alexnet shards`" in msg, msg
    val = meta["splits"]["val"]["shards"][0]["name"]
    (Path(bad) / val).unlink()
    (Path(bad) / train[0]).write_bytes(b"")
    # val shards are checked only when the run validates
    with pytest.raises(ValueError, match=f"3 damaged shard.*{val} is missing"):
        plan_run(load_config(preset="demo"), bad)
    with pytest.raises(ValueError) as e:
        plan_run(load_config(preset="demo", overrides={"eval.every_epochs": 0}), bad)
    assert "2 damaged shard(s)" in str(e.value) and val not in str(e.value), str(e.value)
