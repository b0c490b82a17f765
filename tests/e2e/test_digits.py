"""The small preset on real data, as a new user runs it: scikit-learn's 1,797 handwritten 8x8 digits
written out as an ImageFolder of PNGs, ``alexnet shards --size 36``, ``alexnet train --preset small``.
This is the short form (5 epochs, the rate cut after epochs 3 and 4): the validation error must fall
several times over and below 10 % (measured: 0.49, 0.23, 0.11, 0.09, 0.067). The README's full
recipe (15 epochs, <= 3 %, over seeds) is ``bench/digits.py`` (bench/RESULTS.md).

The run directory's ``config.toml`` must resolve (``alexnet config --config``) to the run's config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.digits import N_VAL, digits_imagefolder

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

BIN = Path(sys.executable).parent
EPOCHS = 5


def _run(argv: list[str], env: dict, timeout: float) -> str:
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout + p.stderr


def test_small_preset_learns_handwritten_digits(ray_local, tmp_path):
    digits_imagefolder(tmp_path / "src")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    shards, run = str(tmp_path / "shards"), str(tmp_path / "run")
    _run([str(BIN / "alexnet"), "shards", str(tmp_path / "src"), shards, "--size", "36", "--quiet"], env, 300)

    # README "Small datasets" (1,500 images, batch 64, lr 0.02, no dropout) in 5 epochs instead of 15:
    # the rate /10 after epochs 3 and 4 instead of 10 and 13
    recipe = ["--set", "optim.lr=0.02", "--set", "optim.batch_size=64", "--set", "schedule.kind=step"]
    recipe += ["--set", "schedule.milestones=[3, 4]", "--set", "model.dropout=0"]
    quick = ["--set", "eval.ten_crop=false", "--set", "checkpoint.at_epoch_end=false"]
    argv = [str(BIN / "alexnet"), "train", "--preset", "small", "--data", shards, "--run-dir", run]
    _run(argv + ["--epochs", str(EPOCHS), *recipe, *quick], env, 840)

    evals = [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    # every epoch validated on the whole val split; the error keeps falling after the first epoch
    errors = [round(e["top1_error"], 3) for e in evals]
    assert len(evals) == EPOCHS and all(e["samples"] == N_VAL for e in evals)
    assert evals[0]["top1_error"] > 4 * evals[-1]["top1_error"], errors
    assert evals[-1]["top1_error"] <= 0.10, errors  # chance is 0.9

    # RUN/config.toml is the run's config: 32 px crops (227/256 of 36) and the --set values
    resolved = _run([str(BIN / "alexnet"), "config", "--config", f"{run}/config.toml", "--json"], env, 120)
    cfg = json.loads(resolved[resolved.index("{") :])
    assert cfg["model"]["input_size"] == 32 and cfg["optim"]["lr"] == 0.02 and cfg["data"]["path"] == shards
