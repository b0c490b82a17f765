"""Checkpoints as hostile input, through ``alexnet eval`` and ``alexnet train --resume``.

A finished run (the real driver on the fake trainer group of ``tests/cluster/test_coordinator.py``:
checkpoints at steps 2, 3, 4 and 6) is copied once per case and its newest checkpoint damaged as
a user's copy, link or edit might; then eval (of the run and of that checkpoint) and ``--resume``
run in ONE subprocess whose data size is bounded (``RLIMIT_DATA``) and which has a timeout, so a
regression (a file read without limit, a model allocated from an edited config, a FIFO that
blocks) fails fast instead of exhausting the machine or hanging the suite. Each case must end with
step 4, the good older checkpoint beside the damaged one, being the one used, and each skipped
checkpoint named with why.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors.torch
import torch

import cluster.job as job
from alexnet.cli import main
from cluster.checkpoint import MANIFEST, MODEL_FILE, _digest
from tests.cluster.test_coordinator import FakeGroup

ROOT = Path(__file__).resolve().parents[2]
# torch's import and a small run use ~0.5 GiB of data segment; 1.5 GiB leaves room for them and
# none for /dev/zero read whole, nor for fc8 of 10^6 classes (4 GiB on the small model)
LIMIT_BYTES = 1536 << 20
# the cases but the FIFO in one process (~40 s on this 2-core machine), the FIFO in its own (~10 s),
# so a read that blocks fails that case alone, at this timeout
TIMEOUT_S = {"batch": 240, "fifo": 240}  # the two run side by side: each its own deadline

SETS = [
    arg
    for kv in (
        "checkpoint.every_steps=2",
        "checkpoint.keep=5",
        "checkpoint.background=false",
        "train.steps_per_call=2",
        "metrics.port=-1",
        "metrics.trace_steps=0",
    )
    for arg in ("--set", kv)
]


def train(data: str, run_dir, *more: str) -> list[str]:
    return ["train", "--preset", "demo", "--data", data, "--run-dir", str(run_dir), *SETS, *more]


def step_dir(run, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step-{step:08d}"


# -- damage, as a user's hand would do it -------------------------------------------------------------


def _resign(d: Path, edit: Callable[[dict], None]) -> None:
    """Edit the manifest of checkpoint ``d`` and sign it again (its own sha256 then holds): what a
    careful hand-edit looks like, so the check that must catch it is the one after the signature."""
    m = json.loads((d / MANIFEST).read_text())
    edit(m)
    m["manifest_sha256"] = _digest(m)
    (d / MANIFEST).write_text(json.dumps(m))


def _rewrite_model(d: Path, data: bytes) -> None:
    """Replace the model file, its manifest entry (size, sha256) updated to match."""
    (d / MODEL_FILE).write_bytes(data)
    entry = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _resign(d, lambda m: m["files"].update({MODEL_FILE: entry}))


def _edit_tensors(d: Path, edit: Callable[[dict], None]) -> None:
    tensors = safetensors.torch.load((d / MODEL_FILE).read_bytes())
    edit(tensors)
    _rewrite_model(d, safetensors.torch.save(tensors))


def _symlink_dev_zero(d: Path) -> None:
    (d / MODEL_FILE).unlink()
    (d / MODEL_FILE).symlink_to("/dev/zero")


def _fifo(d: Path) -> None:
    (d / MODEL_FILE).unlink()
    os.mkfifo(d / MODEL_FILE)


def _deep_manifest(d: Path) -> None:
    n = 200_000
    (d / MANIFEST).write_text("[" * n + "]" * n)


def _huge_manifest(d: Path) -> None:
    with open(d / MANIFEST, "r+b") as f:  # sparse: 500 MB that cost no disk
        f.truncate(500 << 20)


def _huge_header(d: Path) -> None:
    data = (d / MODEL_FILE).read_bytes()
    _rewrite_model(d, struct.pack("<Q", 1 << 40) + data[8:])


def _renamed(t: dict) -> None:
    t["conv1.x.weight"] = t.pop("conv1.0.weight")


def _reshaped(t: dict) -> None:
    t["fc8.0.weight"] = torch.zeros(6, t["fc8.0.weight"].shape[1])


def _classes(m: dict) -> None:
    m["config"]["model"]["num_classes"] = 1_000_000


# (damage, what the skip line says after "step-00000006: ", whether eval of that checkpoint alone runs)
CASES: dict[str, tuple[Callable[[Path], None], str, bool]] = {
    "symlink_to_dev_zero": (_symlink_dev_zero, f"{MODEL_FILE} is a symlink, not a regular file", True),
    "fifo": (_fifo, f"{MODEL_FILE} is a FIFO, not a regular file", True),
    "manifest_200000_deep": (
        _deep_manifest,
        f"{MANIFEST} is not valid JSON (nested too deep to read)",
        False,
    ),
    "manifest_500_MB": (
        _huge_manifest,
        f"{MANIFEST} has 524288000 bytes, a manifest is at most 4194304",
        False,
    ),
    "config_num_classes_1e6": (
        lambda d: _resign(d, _classes),
        f"{MANIFEST}: ValueError: inference.classes names 10 classes, the model has 1000000",
        True,
    ),
    "safetensors_huge_header": (
        _huge_header,
        f"{MODEL_FILE}: its safetensors header declares 1099511627776 bytes in a file of",
        True,
    ),
    "tensor_renamed": (
        lambda d: _edit_tensors(d, _renamed),
        f"{MODEL_FILE} holds tensors the model does not have (conv1.x.weight) and no conv1.0.weight",
        False,
    ),
    "tensor_reshaped": (
        lambda d: _edit_tensors(d, _reshaped),
        f"{MODEL_FILE}: tensor fc8.0.weight has shape [6, 512], the model of its manifest's config [5, 512]",
        False,
    ),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path_factory.mktemp("data") / "d")
    build_synthetic(120, out, size=36, shard_size=50, workers=1, progress=False)
    return out  # 10 classes of 36 px; 108 train images (3 steps of 32 per epoch), 12 val


@pytest.fixture(scope="module")
def base_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(job, "init_ray", lambda cfg, plan: None)
        mp.setattr(job, "_ray_group", lambda run: FakeGroup())
        assert main(train(data, run, "--steps", "6")) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-2:] == ["step-00000004", "step-00000006"]
    return run


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (LIMIT_BYTES, LIMIT_BYTES))


def run_bounded(commands: list[list[str]], timeout_s: float) -> list[tuple[str, str]]:
    """(exit code, output) of each ``alexnet`` command, all run in one subprocess of bounded data
    size on the fake trainer group (:mod:`tests.cluster.bounded_cli`). Past ``timeout_s`` the
    process is killed: a command it did not finish has exit code ``"timeout"``."""
    try:
        out = subprocess.run(
            [sys.executable, "-u", "-m", "tests.cluster.bounded_cli", json.dumps(commands)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            preexec_fn=_limit,
            check=True,
        ).stdout
    except subprocess.TimeoutExpired as e:  # the output so far says which command blocked
        out = e.output or b""
    parts = out.decode().split("=== rc ")
    done = [
        (rc.split()[0], text.rpartition("\n=== ")[2]) for text, rc in zip(parts[:-1], parts[1:], strict=True)
    ]
    late = f"no end after {timeout_s} s: {parts[-1][-2000:]}"
    return done + [("timeout", late)] * (len(commands) - len(done))


@pytest.fixture(scope="module")
def outcomes(base_run, data, tmp_path_factory) -> dict[str, dict[str, tuple[str, str]]]:
    """Per case: the (exit code, output) of ``eval`` of the run, of the damaged checkpoint alone
    (where the case is about reading one), and of ``--resume``; the cases in two bounded processes."""
    batches: dict[str, list[tuple[str, str, list[str]]]] = {"batch": [], "fifo": []}
    for case, (damage, _, alone) in CASES.items():
        run = tmp_path_factory.mktemp(case) / "run"
        shutil.copytree(base_run, run, symlinks=True)
        damage(step_dir(run, 6))
        cmds = {"eval_run": ["eval", "--checkpoint", str(run), "--data", data]}
        if alone:
            cmds["eval_alone"] = ["eval", "--checkpoint", str(step_dir(run, 6)), "--data", data]
        cmds["resume"] = train(data, run, "--steps", "7", "--resume")
        batches["fifo" if case == "fifo" else "batch"] += [(case, kind, argv) for kind, argv in cmds.items()]
    out: dict[str, dict[str, tuple[str, str]]] = {}
    with ThreadPoolExecutor(len(batches)) as pool:  # two processes, side by side
        runs = {
            b: pool.submit(run_bounded, [argv for _, _, argv in items], TIMEOUT_S[b])
            for b, items in batches.items()
        }
        for batch, items in batches.items():
            for (case, kind, _), res in zip(items, runs[batch].result(), strict=True):
                out.setdefault(case, {})[kind] = res
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_newest_checkpoint_is_skipped_for_the_older_one(case, outcomes):
    _, reason, alone = CASES[case]
    rc, text = outcomes[case]["eval_run"]
    assert rc == "0", text
    assert f"alexnet eval: skipped newer checkpoint step-00000006: {reason}" in text, text
    assert json.loads(text.strip().splitlines()[-1])["step"] == 4, text
    rc, text = outcomes[case]["resume"]
    assert rc == "0", text
    assert f"[alexnet] --resume: skipped newer checkpoint step-00000006: {reason}" in text, text
    assert "/checkpoints/step-00000004 (step 4)" in text and "finished at step 7" in text, text
    if alone:  # that checkpoint named on its own: refused with one line saying why, no traceback
        rc, text = outcomes[case]["eval_alone"]
        lines = [line for line in text.splitlines() if line.startswith("alexnet eval: error: ")]
        assert rc == "2" and len(lines) == 1 and "Traceback" not in text, text
        assert f"step-00000006: {reason}" in lines[0], lines


# -- in-process (nothing here can read without limit or block) -------------------------------------


@pytest.fixture
def fake_ray(monkeypatch) -> None:
    monkeypatch.setattr(job, "init_ray", lambda cfg, plan: None)
    monkeypatch.setattr(job, "_ray_group", lambda run: FakeGroup())


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (links as their target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_pruning_never_leaves_the_runs_checkpoints(fake_ray, base_run, data, tmp_path, capsys):
    """A step-N entry linking to another run's checkpoint (to resume from it): this run's pruning
    removes the link, never what it points to; the other run's checkpoints stay byte for byte."""
    other = tmp_path / "other"
    shutil.copytree(base_run, other, symlinks=True)
    before = _tree(other)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-00000003").symlink_to(step_dir(other, 3))
    argv = train(data, run, "--steps", "8", "--resume", "--set", "checkpoint.keep=2")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run}/checkpoints/step-00000003 (step 3)" in out, out
    link = f"{run}/checkpoints/step-00000003"
    assert f"pruning removed the link {link} only, not the checkpoint it points to" in out, out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]
    assert _tree(other) == before


def test_a_checkpoint_of_an_earlier_format_is_refused_with_one_line(
    fake_ray, base_run, data, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(base_run, run, symlinks=True)
    _resign(step_dir(run, 6), lambda m: m.update(format_version=1))
    for argv in (
        ["eval", "--checkpoint", str(run), "--data", data],
        train(data, run, "--steps", "7", "--resume"),
    ):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert f"step-00000006/{MANIFEST}: checkpoint format 1, written by an earlier release" in lines[0]
        assert "resume or evaluate it with the release that wrote it" in lines[0], lines


def test_eval_takes_the_preprocessing_from_the_checkpoint(base_run, data, tmp_path, capsys):
    """The numbers of alexnet eval are those of scoring with the dataset's mean and the config's
    input_scale (how eval scored before checkpoints carried them), and --data gives only the images:
    a dataset whose mean image is another scores the same."""
    import numpy as np

    from alexnet.data.index import DatasetIndex
    from alexnet.model import FusedAlexNet
    from cluster.checkpoint import load_checkpoint
    from cluster.config import from_dict
    from cluster.evaluate import crop_errors, load_for_inference, score_model

    assert main(["eval", "--checkpoint", str(base_run), "--data", data]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    ck = load_checkpoint(str(step_dir(base_run, 6)))
    cfg = from_dict(ck.manifest["config"])
    model = FusedAlexNet(cfg.model_config())
    model.load_state_dict(ck.model)
    index = DatasetIndex.load(data)
    size = cfg.model_config().input_size
    mean = index.mean_tensor(size, cfg.data.mean)
    totals = score_model(model.eval(), index, 32, size, mean, cfg.data.input_scale, ("center", "ten"))
    want = crop_errors(totals)
    assert {k: got[k] for k in want} == want and got["step"] == 6 and got["samples"] == 12

    loaded = load_for_inference(str(base_run), torch.device("cpu"))
    assert not loaded.model.training and loaded.step == 6
    assert list(loaded.preprocess.classes) == index.classes and loaded.preprocess.input_size == size
    assert torch.equal(loaded.preprocess.mean, mean)

    other = tmp_path / "other-mean"
    shutil.copytree(data, other)
    np.save(other / index.meta["mean_image_file"], np.zeros_like(index.mean_image()))
    assert main(["eval", "--checkpoint", str(base_run), "--data", str(other)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == got
