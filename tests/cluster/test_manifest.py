"""The checkpoint manifest: typed, JSON both ways (old checkpoints too), the resume checks."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.checkpoint import MANIFEST, load_checkpoint, write_checkpoint
from cluster.config import load_config
from cluster.manifest import Manifest, RunCheckpoints, load_resume
from cluster.plan import RunPlan

PLAN = RunPlan(steps_per_epoch=5, total_steps=20, data_workers=2)


def _cfg(**sets):
    return load_config(preset="demo", overrides=sets)


def _manifest(step=7, workers=2, spe=5, cfg=None, **kw) -> Manifest:
    cfg = cfg or _cfg()
    return Manifest(
        step=step,
        epoch=step // spe,
        lr_schedule={"lr": 0.005, "best": None, "bad_epochs": 0, "reductions": 0},
        data_workers=workers,
        data_positions=[{"w": w} for w in range(workers)],
        steps_per_epoch=spe,
        config=cfg.to_dict(),
        **kw,
    )


def test_json_round_trip():
    m = _manifest(grid={"replicas": 1})
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m
    d = m.to_json()
    assert d["schedule"] == m.lr_schedule and d["data"] == {
        "workers": 2,
        "streams": None,
        "rotate": False,
        "positions": [{"w": 0}, {"w": 1}],
        "steps_per_epoch": 5,
    }


def test_the_epoch_plan_rotation_is_kept_from_the_manifest():
    """A manifest written before the per-epoch rotation (no "rotate") resumes into the unrotated
    plan, whose sample order its positions belong to; one written with it says so."""
    d = _manifest().to_json()
    del d["data"]["rotate"]
    assert Manifest.from_json(d).data_rotate is False
    d["data"]["rotate"] = True
    assert Manifest.from_json(d).data_rotate is True


def test_an_older_manifest_loads():
    """Written before this format's clean-up: epoch_complete and rng (torch_cpu: 5056 ints) are
    read past; the rest is as written."""
    d = _manifest().to_json()
    d.update(epoch_complete=False, rng={"seed": 0, "torch_cpu": [0] * 5056}, format_version=1, files={})
    m = Manifest.from_json(d)
    assert m == _manifest()


def test_run_checkpoints_write_the_manifest(tmp_path):
    cfg = _cfg(**{"checkpoint.background": False})
    cks = RunCheckpoints(str(tmp_path), cfg.checkpoint, PLAN, cfg.to_dict(), cfg.to_grid().to_dict())
    t = {"w": torch.arange(3.0)}
    lr_state = {"lr": 0.1, "best": 0.5, "bad_epochs": 1, "reductions": 0}
    cks.save(10, dict(t), dict(t), [{"p": 0}, {"p": 1}], lr_state)
    assert cks.last_step == 10 and cks.newest()[0] == 10 and cks.last.step == 10
    raw = json.loads((tmp_path / "checkpoints" / "step-00000010" / MANIFEST).read_text())
    assert "rng" not in raw and "epoch_complete" not in raw  # nothing read them
    m = Manifest.from_json(raw)
    assert (m.step, m.epoch, m.data_workers, m.data_streams, m.steps_per_epoch) == (10, 2, 2, 2, 5)
    assert m.data_positions == [{"p": 0}, {"p": 1}] and m.lr_schedule["best"] == 0.5
    assert m.config == cfg.to_dict() and m.grid == cfg.to_grid().to_dict()
    ck, skipped = cks.load_newest()
    assert torch.equal(ck.model["w"], t["w"]) and skipped == []
    cks.close()


@pytest.mark.parametrize(
    "saved, sets, words",
    [
        ({}, {"model.dropout": 0.3}, ["saved with model", "same [model] section"]),
        ({}, {"optim.batch_size": 64}, ["optim.batch_size=32", "--set optim.batch_size=32"]),
        ({"spe": 4}, {}, ["saved with 4 steps per epoch", "gives 5", "the shards the run was started on"]),
        ({"workers": 3}, {"data.streams": 2}, ["step 7 is inside an epoch", "--set data.streams=3"]),
        ({"data_streams": 4}, {"data.streams": 2}, ["sample order belongs to data.streams=4"]),
        ({"workers": 1}, {}, ["data.workers=2 exceeds the run's data.streams=1", "--set data.workers=1"]),
    ],
)
def test_resume_refusals(saved, sets, words):
    m = _manifest(**saved)
    with pytest.raises(ValueError) as e:
        m.check_resume(_cfg(**sets), PLAN, "RUN/checkpoints/step-00000007")
    for w in words:
        assert w in str(e.value), str(e.value)


def test_another_worker_count_resumes_from_an_epoch_end():
    m = _manifest(step=10, workers=3)
    m.check_resume(_cfg(), PLAN, "ck")  # an epoch end: allowed
    assert m.positions_for(2) is None  # the new workers start at the epoch's beginning
    assert m.positions_for(3) == m.data_positions


def test_another_worker_count_resumes_mid_epoch():
    """The streams, not the workers, define the batches: data.workers may change mid-epoch; a run
    with data.streams = 0 reads the checkpoint's streams."""
    m = _manifest(step=7, workers=2, data_streams=4)
    cfg = _cfg(**{"data.workers": 3})
    m.check_resume(cfg, PLAN, "ck")
    assert m.streams_for(cfg, PLAN) == 4 and m.positions_for(4) == m.data_positions
    old = _manifest(step=7, workers=2)  # written before streams: its 2 workers are 2 streams
    assert old.streams == 2 and old.streams_for(_cfg(**{"data.workers": 1}), PLAN) == 2
    old.check_resume(_cfg(**{"data.workers": 1}), PLAN, "ck")


def test_a_manifest_without_steps_per_epoch_is_not_refused_for_it():
    d = _manifest().to_json()
    del d["data"]["steps_per_epoch"]
    Manifest.from_json(d).check_resume(_cfg(), PLAN, "ck")


def test_load_resume(tmp_path):
    assert load_resume(str(tmp_path), _cfg(), PLAN) == (None, [])
    t = {"w": torch.zeros(1)}
    write_checkpoint(str(tmp_path), 7, t, t, _manifest().to_json())
    assert load_resume(str(tmp_path), _cfg(), PLAN)[0].step == 7
    with pytest.raises(ValueError, match="optim.batch_size"):
        load_resume(str(tmp_path), _cfg(**{"optim.batch_size": 64}), PLAN)
    assert load_checkpoint(str(tmp_path)).manifest["format_version"] == 1
