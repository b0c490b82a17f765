"""The checkpoint manifest: typed, JSON both ways, strict (no entry read past), the resume checks."""

from __future__ import annotations

import json

import pytest
import torch

from alexnet.model import TwoColumnAlexNet
from cluster.checkpoint import (
    MANIFEST,
    MEAN_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    load_checkpoint,
    write_checkpoint,
)
from cluster.config import load_config
from cluster.manifest import Manifest, RunCheckpoints, expected_tensors, load_resume
from cluster.plan import RunPlan

PLAN = RunPlan(steps_per_epoch=5, total_steps=20, data_workers=2, data_streams=2)


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
        data_streams=kw.pop("data_streams", workers),
        **kw,
    )


def _model():
    """The demo preset's model (``small``, 10 classes, 32 px): what its checkpoints must hold."""
    return TwoColumnAlexNet(_cfg().model_config()).state_dict()


def test_json_round_trip():
    m = _manifest(grid={"replicas": 1})
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m
    d = m.to_json()
    assert d["schedule"] == m.lr_schedule and d["data"] == {
        "workers": 2,
        "streams": 2,
        "positions": [{"w": 0}, {"w": 1}],
        "steps_per_epoch": 5,
    }


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d["data"].pop("streams"), "'streams'"),  # written before streams existed
        (lambda d: d["data"].pop("steps_per_epoch"), "'steps_per_epoch'"),
        (lambda d: d["data"].update(positions=None), "data.positions is not a list"),
        (lambda d: d.update(step="7"), "'7' is not an integer"),
        (lambda d: d.update(config=[]), "config is not a table"),
    ],
)
def test_a_manifest_missing_an_entry_is_damaged_not_read_past(edit, words):
    """No entry has a fallback for checkpoints of earlier formats: one missing is a damaged
    manifest (expected_tensors raises; the loaders take an older checkpoint)."""
    d = _manifest().to_json()
    edit(d)
    with pytest.raises((KeyError, TypeError, ValueError)) as e:
        expected_tensors(d)
    assert words in str(e.value), str(e.value)


def test_expected_tensors_come_from_the_config_without_allocating():
    cfg = _cfg(**{"model.num_classes": 1_000_000})
    want = expected_tensors(_manifest(cfg=cfg).to_json())  # two 500,000-logit fc8 halves: meta only
    shapes, exact = want[MODEL_FILE]
    assert exact and shapes["fc8.0.weight"][0] == shapes["fc8.1.weight"][0] == 500_000
    assert set(shapes) == set(_model()) and want[OPTIMIZER_FILE] == (shapes, False)
    assert MEAN_FILE not in want  # no inference entry: a checkpoint to resume from only
    inf = {"classes": [str(c) for c in range(10)], "input_size": 32, "input_scale": 1.0, "mean": "image"}
    assert expected_tensors(_manifest(inference=inf).to_json())[MEAN_FILE] == ({"mean": [3, 32, 32]}, True)
    for bad, words in (
        ({"classes": ["a"]}, "names 1 classes, the model has 10"),
        ({"input_size": 64}, "inference.input_size=64, the model's is 32"),
        ({"mean": "median"}, "'median': not 'image' or 'rgb'"),
    ):
        with pytest.raises(ValueError, match=words):
            expected_tensors(_manifest(inference={**inf, **bad}).to_json())


def test_run_checkpoints_write_the_manifest(tmp_path):
    cfg = _cfg(**{"checkpoint.background": False})
    cks = RunCheckpoints(str(tmp_path), cfg.checkpoint, PLAN, cfg.to_dict(), cfg.to_grid().to_dict())
    t = _model()
    lr_state = {"lr": 0.1, "best": 0.5, "bad_epochs": 1, "reductions": 0}
    cks.save(10, dict(t), dict(t), [{"p": 0}, {"p": 1}], lr_state)
    assert cks.last_step == 10 and cks.newest()[0] == 10 and cks.last.step == 10
    raw = json.loads((tmp_path / "checkpoints" / "step-00000010" / MANIFEST).read_text())
    assert "rng" not in raw and "epoch_complete" not in raw  # nothing read them
    m = Manifest.from_json(raw)
    assert (m.step, m.epoch, m.data_workers, m.data_streams, m.steps_per_epoch) == (10, 2, 2, 2, 5)
    assert m.data_positions == [{"p": 0}, {"p": 1}] and m.lr_schedule["best"] == 0.5
    assert m.config == cfg.to_dict() and m.grid == cfg.to_grid().to_dict()
    point, skipped = cks.load_newest()
    assert torch.equal(point.checkpoint.model["conv1.0.weight"], t["conv1.0.weight"]) and skipped == []
    assert point.step == 10 and point.manifest.data_positions == [{"p": 0}, {"p": 1}]
    cks.close()


@pytest.mark.parametrize(
    "saved, sets, words",
    [
        ({}, {"model.dropout": 0.3}, ["saved with model", "same [model] section"]),
        ({}, {"optim.batch_size": 64}, ["optim.batch_size=32", "--set optim.batch_size=32"]),
        ({"spe": 4}, {}, ["saved with 4 steps per epoch", "gives 5", "the shards the run was started on"]),
        (  # a per-replica batch on another replica count: another global batch
            {"cfg": _cfg(**{"optim.replica_batch_size": 16})},
            {"optim.replica_batch_size": 16, "grid.shape": "2x2x2"},
            ["saved with a global batch of 16", "this run's is 32", "--set grid.shape=1x2x2"],
        ),
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


def test_load_resume(tmp_path):
    assert load_resume(str(tmp_path), _cfg(), PLAN) == (None, [])
    t = _model()
    write_checkpoint(str(tmp_path), 7, t, t, _manifest().to_json())
    assert load_resume(str(tmp_path), _cfg(), PLAN)[0].step == 7
    with pytest.raises(ValueError, match="already holds checkpoints: pass --resume"):
        load_resume(str(tmp_path), _cfg(), PLAN, resume=False)  # a new run never writes over one
    with pytest.raises(ValueError, match="optim.batch_size"):
        load_resume(str(tmp_path), _cfg(**{"optim.batch_size": 64}), PLAN)
    assert load_checkpoint(str(tmp_path)).manifest["format_version"] == 2


def test_in_run_recovery_skips_a_damaged_newest_checkpoint(tmp_path):
    """What the coordinator restores after a trainer died (RunCheckpoints.load_newest): the newest
    checkpoint that verifies, with each newer one named; a model file linked to /dev/zero or with
    tensors the config does not give is a damaged checkpoint, not a read without limit or a traceback."""
    import os

    import safetensors.torch

    cfg = _cfg(**{"checkpoint.background": False, "checkpoint.keep": 5})
    cks = RunCheckpoints(str(tmp_path), cfg.checkpoint, PLAN, cfg.to_dict())
    t = _model()
    lr = {"lr": 0.1, "best": None, "bad_epochs": 0, "reductions": 0}
    for step in (4, 8, 12):
        cks.save(step, dict(t), dict(t), [{"p": 0}, {"p": 1}], lr)
    cks.wait()
    d = tmp_path / "checkpoints"
    (d / "step-00000012" / MODEL_FILE).unlink()
    (d / "step-00000012" / MODEL_FILE).symlink_to("/dev/zero")
    # the optimizer file of step 8 with one buffer of another shape (its manifest entry matching)
    opt = safetensors.torch.load((d / "step-00000008" / OPTIMIZER_FILE).read_bytes())
    opt["fc7.0.weight"] = torch.zeros(2, 2)
    _replace(d / "step-00000008", OPTIMIZER_FILE, safetensors.torch.save(opt))
    ck, skipped = cks.load_newest()
    assert ck.step == 4, skipped
    assert skipped[0] == f"step-00000012: {MODEL_FILE} is a symlink, not a regular file (a checkpoint's " + (
        "files are never followed elsewhere)"
    )
    assert skipped[1].startswith(f"step-00000008: {OPTIMIZER_FILE}: tensor fc7.0.weight has shape [2, 2]"), (
        skipped
    )
    assert os.path.exists("/dev/zero")
    cks.close()


def _replace(d, name: str, data: bytes) -> None:
    """Replace file ``name`` of checkpoint ``d`` and re-sign its manifest to match (a careful edit)."""
    import hashlib

    from cluster.checkpoint import _digest

    (d / name).write_bytes(data)
    m = json.loads((d / MANIFEST).read_text())
    m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    m["manifest_sha256"] = _digest(m)
    (d / MANIFEST).write_text(json.dumps(m))
