"""``alexnet train`` / ``alexnet eval`` on bad input, through the command line (in-process, no Ray).

* Refusals come before Ray starts: ``init_ray`` is replaced by a tripwire that raises
  :class:`RayStarted`, so a refused input returns 2 without reaching it, and an accepted one
  reaches it. Each refusal is one line on stderr naming the setting or file and the fix.
* What a run meets later (a checkpoint it cannot write, a damaged newest checkpoint,
  ``--from-checkpoint``) runs the real driver on the fake trainer group of
  ``tests/cluster/test_coordinator.py``: exit code and summary as a user sees them, and what is
  or is not written. The same on real Ray actors: ``tests/e2e/test_faults.py``.
"""

from __future__ import annotations

import errno
import json
import shutil
import socket
from pathlib import Path

import pytest

import cluster.checkpoint as checkpoint
import cluster.job as job
from alexnet.cli import main
from alexnet.data.index import DatasetIndex
from cluster.checkpoint import list_checkpoints
from tests.cluster.test_coordinator import FakeGroup


class RayStarted(Exception):
    """The run got past every check that needs no Ray."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path_factory.mktemp("data") / "d")
    build_synthetic(120, out, size=36, shard_size=50, workers=1, progress=False)
    return out  # 10 classes of 36 px; 108 train images (3 steps of 32 per epoch), 12 val


@pytest.fixture(scope="module")
def train_only(tmp_path_factory) -> str:
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path_factory.mktemp("data") / "no-val")
    build_synthetic(108, out, size=36, shard_size=50, val_fraction=0.0, workers=1, progress=False)
    return out


@pytest.fixture
def tripwire(monkeypatch) -> list:
    """``init_ray`` raises RayStarted; the list gets each config it was called with."""
    seen = []

    def init_ray(cfg, plan):
        seen.append(cfg)
        raise RayStarted

    monkeypatch.setattr(job, "init_ray", init_ray)
    return seen


def train(data: str, run_dir, *more: str) -> list[str]:
    return ["train", "--preset", "demo", "--data", data, "--run-dir", str(run_dir), *more]


def refused(capsys, argv: list[str], command: str = "train") -> str:
    """The one-line error of a command that must exit 2 (before Ray, when the tripwire is set)."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"alexnet {command}: error: "), lines
    return lines[0]


# -- refused before Ray starts -------------------------------------------------------------------


def test_no_val_split_is_refused_unless_validation_is_off(tripwire, train_only, tmp_path, capsys):
    msg = refused(capsys, train(train_only, tmp_path / "r"))
    assert f"--data {train_only} has no val split" in msg and "--set eval.every_epochs=0" in msg, msg
    assert not (tmp_path / "r").exists() and tripwire == []
    with pytest.raises(RayStarted):
        main(train(train_only, tmp_path / "r", "--set", "eval.every_epochs=0"))


def test_a_metrics_port_in_use_is_refused_and_a_free_one_stays_ours(
    tripwire, data, tmp_path, capsys, monkeypatch
):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        msg = refused(capsys, train(data, tmp_path / "r", "--metrics-port", str(port)))
    assert f"metrics.port={port} (--metrics-port): 127.0.0.1:{port} is already in use" in msg, msg
    assert "--metrics-port 0" in msg and tripwire == []

    def init_ray(cfg, plan):  # by the time Ray would start, the endpoint holds its port
        with socket.socket() as s, pytest.raises(OSError) as e:
            s.bind(("127.0.0.1", cfg.metrics.port))
        assert e.value.errno == errno.EADDRINUSE
        raise RayStarted

    monkeypatch.setattr(job, "init_ray", init_ray)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(RayStarted):
        main(train(data, tmp_path / "r", "--metrics-port", str(port)))


def test_a_metrics_address_not_of_this_machine_is_refused(tripwire, data, tmp_path, capsys):
    msg = refused(capsys, train(data, tmp_path / "r", "--set", "metrics.addr=192.0.2.1"))
    assert "metrics.addr='192.0.2.1': cannot listen on 192.0.2.1:0" in msg and "0.0.0.0" in msg, msg


def test_a_run_dir_that_is_a_file_or_under_one_is_refused(tripwire, data, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine\n")
    msg = refused(capsys, train(data, f))
    assert f"--run-dir {f} is a file: give a directory" in msg, msg
    msg = refused(capsys, train(data, f / "run"))
    assert f"--run-dir {f}/run: cannot create or write it ({f} is a file)" in msg, msg
    assert f.read_text() == "mine\n" and tripwire == []


def test_a_run_dir_that_cannot_be_written_is_refused(tripwire, data, tmp_path, capsys, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    def read_only(self, path, mode="rb", **kw):  # as on a read-only mount (root writes anywhere)
        if "w" in mode:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(self, path, mode, **kw)

    real_open = LocalFileSystem.open
    monkeypatch.setattr(LocalFileSystem, "open", read_only)
    msg = refused(capsys, train(data, tmp_path / "r"))
    assert f"--run-dir {tmp_path}/r: cannot create or write it (Permission denied)" in msg, msg


def test_missing_and_truncated_shards_are_refused(tripwire, data, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    shards = DatasetIndex.load(str(bad)).shards("train")
    Path(shards[0].url).unlink()
    size = Path(shards[1].url).stat().st_size
    Path(shards[1].url).write_bytes(Path(shards[1].url).read_bytes()[:1000])
    msg = refused(capsys, train(str(bad), tmp_path / "r"))
    name0, name1 = (Path(s.url).name for s in shards[:2])
    assert f"2 damaged shard(s): {name0} is missing; {name1} has 1000 bytes, dataset.json says {size}" in msg
    assert tripwire == []


def test_unknown_grid_cuts_and_steps_0_are_refused(tripwire, data, tmp_path, capsys):
    msg = refused(capsys, train(data, tmp_path / "r", "--set", "grid.cuts=conv9"))
    assert "grid.cuts=['conv9']" in msg and "unknown block(s) ['conv9']" in msg and "fc6" in msg, msg
    msg = refused(capsys, train(data, tmp_path / "r", "--steps", "0"))
    assert msg.endswith("--steps 0: use >= 1, or leave it out to run train.epochs"), msg
    msg = refused(capsys, train(data, tmp_path / "r", "--epochs", "0"))
    assert msg.endswith("--epochs 0: use >= 1"), msg
    msg = refused(capsys, train(data, tmp_path / "r", "--from-checkpoint", str(tmp_path)))
    assert "continues a run: add --resume" in msg, msg
    assert tripwire == [] and not (tmp_path / "r").exists()


# -- later, on a fake trainer group ----------------------------------------------------------------


@pytest.fixture
def fake_ray(monkeypatch) -> list[FakeGroup]:
    """The driver runs for real on FakeGroup (no Ray); the list gets each group it built."""
    groups: list[FakeGroup] = []

    def group(run):
        groups.append(FakeGroup())
        return groups[-1]

    monkeypatch.setattr(job, "init_ray", lambda cfg, plan: None)
    monkeypatch.setattr(job, "_ray_group", group)
    return groups


_SETS = (
    "checkpoint.every_steps=2",
    "checkpoint.keep=5",
    "checkpoint.background=false",
    "train.steps_per_call=2",
    "metrics.port=-1",
    "metrics.trace_steps=0",
)
SETS = [arg for kv in _SETS for arg in ("--set", kv)]


def _steps(run_dir) -> list[int]:
    return [s for s, _ in list_checkpoints(str(run_dir))]


def _ckpt(run_dir, step: int, name: str = "") -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}" / name


def test_resume_and_eval_skip_a_damaged_newest_checkpoint(fake_ray, data, train_only, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train(data, run, "--steps", "6", *SETS)) == 0
    assert _steps(run) == [2, 3, 4, 6]  # every 2 steps and the epoch ends (3, 6)
    _ckpt(run, 6, "optimizer.safetensors").unlink()
    capsys.readouterr()
    msg = refused(capsys, ["eval", "--checkpoint", str(run), "--data", train_only], "eval")
    assert f"--data {train_only} has no val images" in msg, msg

    # eval needs only the weights: the newest checkpoint still scores
    for where in (run, _ckpt(run, 6)):
        assert main(["eval", "--checkpoint", str(where), "--data", data]) == 0
        out = capsys.readouterr().out.strip().splitlines()[-1]
        assert json.loads(out)["step"] == 6 and json.loads(out)["samples"] == 12

    assert main(train(data, run, "--steps", "9", "--resume", *SETS)) == 0
    out = capsys.readouterr().out
    assert "skipped newer checkpoint step-00000006: optimizer.safetensors is missing" in out, out
    assert f"resuming from {run}/checkpoints/step-00000004 (step 4)" in out, out
    assert "finished at step 9" in out
    assert fake_ray[-1].calls[1] == ("load", 4)
    assert _steps(run) == [3, 4, 6, 8, 9]  # step 6 written again, whole

    # invalid JSON in the newest manifest: eval names the file, --resume goes to the one before
    m = _ckpt(run, 9, "manifest.json")
    m.write_text(m.read_text()[:200])
    msg = refused(capsys, ["eval", "--checkpoint", str(_ckpt(run, 9)), "--data", data], "eval")
    assert f"{_ckpt(run, 9)}: manifest.json is not valid JSON (" in msg, msg
    assert main(train(data, run, "--steps", "10", "--resume", *SETS)) == 0
    out = capsys.readouterr().out
    assert "skipped newer checkpoint step-00000009: manifest.json is not valid JSON" in out, out
    assert "step-00000008 (step 8)" in out, out


def test_resume_from_a_chosen_checkpoint(fake_ray, data, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(train(data, a, "--steps", "6", *SETS)) == 0
    before = sorted(p.name for p in (a / "checkpoints").iterdir())
    chosen = str(_ckpt(a, 3))
    # into the run dir that holds newer complete checkpoints: two histories would mix
    msg = refused(capsys, train(data, a, "--steps", "8", "--resume", "--from-checkpoint", chosen, *SETS))
    assert f"--from-checkpoint {chosen} is step 3" in msg, msg
    assert "newer complete checkpoints (step-00000004, step-00000006)" in msg and "new --run-dir" in msg, msg

    assert main(train(data, b, "--steps", "8", "--resume", "--from-checkpoint", chosen, *SETS)) == 0
    out = capsys.readouterr().out
    assert f"resuming from {chosen} (step 3), writing into {b}" in out, out
    assert fake_ray[-1].calls[1] == ("load", 3)
    assert _steps(b) == [4, 6, 8]
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == before  # untouched

    # a run dir whose checkpoints are all damaged: --resume does not start it over silently
    for s in _steps(a):
        _ckpt(a, s, "model.safetensors").unlink()
    msg = refused(capsys, train(data, a, "--steps", "8", "--resume", *SETS))
    assert (
        f"--resume: no complete checkpoint in --run-dir {a} (step-00000006: model.safetensors is missing;"
        in msg
    )
    assert "--from-checkpoint DIR" in msg, msg


def test_a_checkpoint_write_that_fails_ends_the_run_with_its_summary(
    fake_ray, data, tmp_path, capsys, monkeypatch
):
    def disk_full(run_dir, step, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_checkpoint", disk_full)
    run = tmp_path / "run"
    assert main(train(data, run, "--steps", "6", *SETS)) == 1
    out = capsys.readouterr().out
    assert (
        "[alexnet] run FAILED at step 2: CheckpointWriteFailed: the checkpoint of step 2 could not be "
        f"written to --run-dir {run} (OSError: [Errno 28] No space left on device)"
    ) in out, out
    assert "checkpoint.max_failed_writes=0" in out and "[alexnet] latest checkpoint: None" in out, out
    assert [c[1:3] for c in fake_ray[-1].calls if c[0] == "train"] == [(0, 2)]  # stopped at once
    assert (run / "metrics.jsonl").exists() and _steps(run) == []


def test_outputs_that_cannot_be_written_fail_the_run_without_a_traceback(
    fake_ray, data, tmp_path, capsys, monkeypatch
):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(job, "write_outputs", disk_full)
    run = tmp_path / "run"
    assert main(train(data, run, "--steps", "3", *SETS)) == 1
    out = capsys.readouterr().out
    assert f"metrics.jsonl, the plot and the trace could not be written to --run-dir {run}" in out, out
    assert _steps(run) == [2, 3]  # the checkpoints are there


def test_eval_reads_exactly_max_samples_and_fails_on_a_short_val_shard(fake_ray, data, tmp_path, capsys):
    """``alexnet eval`` reads through the run's validation plan: ``--max-samples`` cuts exactly; a val
    shard shorter than dataset.json says ends it with exit 1 naming the shard, and no JSON line."""
    run = tmp_path / "run"
    assert main(train(data, run, "--steps", "2", *SETS)) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--data", data, "--max-samples", "5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 5
    cut = tmp_path / "cut"
    shutil.copytree(data, cut)
    shard = cut / DatasetIndex.load(str(cut)).meta["splits"]["val"]["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 4])
    assert main(["eval", "--checkpoint", str(run), "--data", str(cut)]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == "" and "val samples that dataset.json promises could not be read" in err
    assert repr(str(shard)) in err and "alexnet shards" in err
