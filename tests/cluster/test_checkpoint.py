"""Checkpoints: canonical keys, manifest last, verification, keep-last-K, fsspec URLs."""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest
import torch

from alexnet.config import ModelConfig
from alexnet.model import FusedAlexNet, TwoColumnAlexNet
from cluster.checkpoint import (
    MANIFEST,
    CheckpointManager,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    merge_rank_states,
    prune_checkpoints,
    resolve_checkpoint,
    write_checkpoint,
)


def _state():
    m = TwoColumnAlexNet(ModelConfig.small())
    model = m.state_dict()
    opt = {k: torch.randn_like(v) for k, v in model.items()}
    return model, opt


@pytest.fixture(params=["local", "file", "memory"])
def run_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    if request.param == "file":
        return f"file://{tmp_path}/run"
    return f"memory://ckpt-test-{uuid.uuid4().hex}/run"


def test_round_trip_and_manifest(run_dir):
    model, opt = _state()
    rec = write_checkpoint(run_dir, 12, model, opt, {"epoch": 1, "data_positions": [{"a": 1}]})
    assert rec.step == 12 and rec.url.endswith("checkpoints/step-00000012") and rec.bytes > 0
    ck = load_checkpoint(run_dir)  # a run dir means: its newest checkpoint
    assert ck.step == 12 and ck.manifest["epoch"] == 1 and ck.manifest["data_positions"] == [{"a": 1}]
    assert sorted(ck.model) == sorted(model)  # safetensors stores keys sorted
    for k in model:
        assert torch.equal(ck.model[k], model[k]) and torch.equal(ck.optimizer[k], opt[k])
    assert set(ck.model) == set(TwoColumnAlexNet(ModelConfig.small()).state_dict())  # canonical keys


def test_loads_into_fused_execution(tmp_path):
    model, opt = _state()
    write_checkpoint(str(tmp_path), 1, model, opt)
    fused = FusedAlexNet(ModelConfig.small())
    fused.load_state_dict(load_checkpoint(str(tmp_path)).model)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, model[k])


def test_only_dirs_with_manifest_count(tmp_path):
    run = str(tmp_path)
    model, opt = _state()
    write_checkpoint(run, 5, model, opt)
    write_checkpoint(run, 9, model, opt)
    (tmp_path / "checkpoints" / "step-00000009" / MANIFEST).unlink()  # a write killed before its manifest
    assert [s for s, _ in list_checkpoints(run)] == [5]
    assert latest_checkpoint(run).endswith("step-00000005")
    assert resolve_checkpoint(run).endswith("step-00000005")


def test_corruption_is_detected(tmp_path):
    model, opt = _state()
    rec = write_checkpoint(str(tmp_path), 3, model, opt)
    p = tmp_path / "checkpoints" / "step-00000003" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(rec.url)


def test_no_pickle_in_checkpoint(tmp_path):
    model, opt = _state()
    write_checkpoint(str(tmp_path), 3, model, opt, {"x": 1})
    from safetensors.torch import load_file

    step_dir = tmp_path / "checkpoints" / "step-00000003"
    # every file is safetensors or JSON (a torch.save zip or a pickle fails one of the two loads)
    for f in step_dir.iterdir():
        if f.name == MANIFEST:
            json.loads(f.read_text())
        else:
            assert f.suffix == ".safetensors", f
            assert set(load_file(str(f))), f


def test_resolve_refuses_empty_dir(tmp_path):
    with pytest.raises(ValueError, match="neither a checkpoint"):
        resolve_checkpoint(str(tmp_path))


def test_keep_last_k_never_deletes_newest(tmp_path):
    run = str(tmp_path)
    model, opt = _state()
    for s in (1, 2, 3, 4):
        write_checkpoint(run, s, model, opt)
    # an incomplete dir older than the newest (crash leftover) and one newer (write in progress)
    (tmp_path / "checkpoints" / "step-00000000").mkdir()
    (tmp_path / "checkpoints" / "step-00000099").mkdir()
    prune_checkpoints(run, keep=2)
    assert [s for s, _ in list_checkpoints(run)] == [3, 4]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000003", "step-00000004", "step-00000099"]
    prune_checkpoints(run, keep=1)
    assert [s for s, _ in list_checkpoints(run)] == [4]
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(run, keep=0)


@pytest.mark.timeout(60)
def test_manager_background_write_and_prune(run_dir):
    model, opt = _state()
    mgr = CheckpointManager(run_dir, keep=2, background=True)
    futures = [mgr.save(s, model, opt, {"epoch": 0}) for s in (10, 20, 30)]
    rec = mgr.wait()
    mgr.close()
    assert all(f.done() for f in futures)
    assert rec.step == 30
    assert [s for s, _ in list_checkpoints(run_dir)] == [20, 30]
    fs, p = fsspec.core.url_to_fs(run_dir)
    assert fs.exists(p)


def test_save_copies_before_returning(tmp_path):
    """Training may overwrite its tensors as soon as save() returns: the write must not see that."""
    model, opt = _state()
    mgr = CheckpointManager(str(tmp_path), keep=1)
    key = next(iter(model))
    want = model[key].clone()
    mgr.save(1, model, opt)
    model[key].add_(1.0)
    mgr.close()
    assert torch.equal(load_checkpoint(str(tmp_path)).model[key], want)


def test_merge_rank_states_takes_first_copy():
    a = {"model": {"x": torch.zeros(1)}, "optimizer": {"x": torch.zeros(1)}}
    b = {"model": {"x": torch.ones(1), "y": torch.ones(1)}, "optimizer": {"y": torch.ones(1)}}
    model, opt = merge_rank_states([a, b])
    assert model["x"].item() == 0 and set(model) == {"x", "y"} and set(opt) == {"x", "y"}
