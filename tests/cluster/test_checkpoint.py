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
    MODEL_FILE,
    CheckpointManager,
    CorruptCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_newest,
    merge_rank_states,
    prune_checkpoints,
    scan_checkpoints,
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


def test_loading_refuses_an_empty_dir(tmp_path):
    with pytest.raises(ValueError, match="neither a checkpoint"):
        load_checkpoint(str(tmp_path))


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


# -- completeness: every file the manifest lists, present with its size; sha256 at load ------------


def _run_with(tmp_path, steps=(4, 8)) -> str:
    run = str(tmp_path / "run")
    model, opt = _state()
    for s in steps:
        write_checkpoint(run, s, model, opt, {"epoch": 0})
    return run


def _file(run: str, step: int, name: str):
    from pathlib import Path

    return Path(run) / "checkpoints" / f"step-{step:08d}" / name


def test_a_checkpoint_missing_a_file_is_skipped_for_the_older_one(tmp_path):
    run = _run_with(tmp_path)
    _file(run, 8, "optimizer.safetensors").unlink()
    assert [s for s, _ in list_checkpoints(run)] == [4]
    assert [(d.step, d.problem) for d in scan_checkpoints(run)] == [
        (4, None),
        (8, "optimizer.safetensors is missing"),
    ]
    ck, skipped = load_newest(run)
    assert ck.step == 4 and skipped == ["step-00000008: optimizer.safetensors is missing"]
    # the model file alone is complete: what alexnet eval reads
    ck, skipped = load_newest(run, (MODEL_FILE,))
    assert ck.step == 8 and ck.optimizer == {} and skipped == []
    with pytest.raises(CorruptCheckpoint) as e:
        load_checkpoint(f"{run}/checkpoints/step-00000008")
    assert "step-00000008: optimizer.safetensors is missing" in str(e.value)
    assert "--resume --from-checkpoint RUN_DIR/checkpoints/step-N" in str(e.value)


def test_a_wrong_size_is_found_by_the_scan_a_wrong_hash_by_the_load(tmp_path):
    run = _run_with(tmp_path, (4, 8, 12))
    p = _file(run, 12, "model.safetensors")
    p.write_bytes(p.read_bytes()[:-10])  # truncated: the scan sees it
    p = _file(run, 8, "model.safetensors")
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only the sha256 says so
    p.write_bytes(bytes(data))
    problems = {d.step: d.problem for d in scan_checkpoints(run)}
    assert problems[4] is None and problems[8] is None
    assert "model.safetensors has" in problems[12] and "manifest.json says" in problems[12]
    ck, skipped = load_newest(run)
    assert ck.step == 4
    assert skipped[0].startswith("step-00000012: model.safetensors has")
    assert skipped[1] == (
        "step-00000008: model.safetensors: size or sha256 differs from manifest.json "
        "(corrupt or partly overwritten)"
    )
    with pytest.raises(ValueError, match="sha256 differs"):
        load_checkpoint(f"{run}/checkpoints/step-00000008")


def test_invalid_json_in_a_manifest_names_the_file(tmp_path):
    run = _run_with(tmp_path)
    m = _file(run, 8, MANIFEST)
    m.write_text(m.read_text()[:40])
    with pytest.raises(ValueError) as e:
        load_checkpoint(f"{run}/checkpoints/step-00000008")
    assert "step-00000008: manifest.json is not valid JSON (" in str(e.value), str(e.value)
    ck, skipped = load_newest(run)
    assert ck.step == 4 and skipped[0].startswith("step-00000008: manifest.json is not valid JSON")


def test_no_complete_checkpoint_names_what_was_skipped(tmp_path):
    run = _run_with(tmp_path, (4,))
    _file(run, 4, "model.safetensors").unlink()
    assert load_newest(run) == (None, ["step-00000004: model.safetensors is missing"])
    with pytest.raises(ValueError, match="skipped: step-00000004: model.safetensors is missing"):
        load_checkpoint(run)


def test_a_damaged_checkpoint_is_not_one_of_the_kept(tmp_path):
    run = _run_with(tmp_path, (1, 2, 3))
    _file(run, 3, "optimizer.safetensors").unlink()
    model, opt = _state()
    write_checkpoint(run, 4, model, opt)
    prune_checkpoints(run, keep=2)
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]  # 2 kept: 3 does not count
    assert _file(run, 3, MANIFEST).exists()  # damaged, newer than the oldest kept: left alone
    write_checkpoint(run, 5, model, opt)
    prune_checkpoints(run, keep=2)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-00000004",
        "step-00000005",
    ]


def test_rewriting_a_step_is_never_its_old_checkpoint_with_new_files(tmp_path):
    run = _run_with(tmp_path, (4, 8))
    model, opt = _state()

    def crash(step):
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_checkpoint(run, 8, {k: v + 1 for k, v in model.items()}, opt, before_manifest=crash)
    assert [s for s, _ in list_checkpoints(run)] == [4]  # the old manifest went first
    assert not _file(run, 8, MANIFEST).exists()


def test_manager_records_failed_writes_until_one_succeeds(tmp_path, monkeypatch):
    import cluster.checkpoint as checkpoint

    real = checkpoint.write_checkpoint

    def disk_full_at(bad):
        def write(run_dir, step, *args):
            if step in bad:
                raise OSError(28, "No space left on device")
            return real(run_dir, step, *args)

        return write

    model, opt = _state()
    monkeypatch.setattr(checkpoint, "write_checkpoint", disk_full_at({1, 2}))
    mgr = CheckpointManager(str(tmp_path), keep=2, background=True)
    f1 = mgr.save(1, model, opt)
    f2 = mgr.save(2, model, opt)  # does not raise for the failed write before it
    with pytest.raises(OSError, match="No space left"):
        mgr.wait()
    assert [(s, e.errno) for s, e in mgr.failures] == [(1, 28), (2, 28)]
    assert isinstance(f1.exception(), OSError) and isinstance(f2.exception(), OSError)
    mgr.save(3, model, opt)
    assert mgr.wait().step == 3 and mgr.failures == []
    mgr.close()


# -- untrusted: links, edits -----------------------------------------------------------------------


def test_an_edited_manifest_entry_is_a_damaged_checkpoint(tmp_path):
    """Every entry (config, positions, ...) is covered by the manifest's own sha256."""
    run = _run_with(tmp_path)
    m = _file(run, 8, MANIFEST)
    d = json.loads(m.read_text())
    d["epoch"] = 3
    m.write_text(json.dumps(d))
    ck, skipped = load_newest(run)
    assert ck.step == 4
    assert skipped == ["step-00000008: manifest.json: its entries differ from its sha256 (edited or damaged)"]


def test_a_write_never_goes_through_a_link_into_another_run(tmp_path, capsys):
    other = _run_with(tmp_path / "other", (4,))
    before = {p.name: p.read_bytes() for p in _file(other, 4, "").iterdir()}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-00000004").symlink_to(_file(other, 4, ""))
    model, opt = _state()
    write_checkpoint(str(run), 4, {k: v + 1 for k, v in model.items()}, opt)
    assert "removed a symlink" in capsys.readouterr().out
    assert not (run / "checkpoints" / "step-00000004").is_symlink()
    assert {p.name: p.read_bytes() for p in _file(other, 4, "").iterdir()} == before
    assert torch.equal(load_checkpoint(str(run)).model["conv1.0.bias"], model["conv1.0.bias"] + 1)
