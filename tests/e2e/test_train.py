"""The training job end to end on the session's local Ray (demo preset, a tiny generated dataset).

* the demo trains, its loss falls, it validates and checkpoints, and the metrics endpoint serves
  every documented metric with plausible values while it runs;
* exact resume: N steps straight == k steps + --resume + N-k steps, bit for bit on CPU (same grid,
  also onto another data worker count mid-epoch), and within float tolerance on another grid;
* the weights do not depend on data.workers or on where the JPEGs are decoded (data.decode);
* a bad config and a grid larger than the cluster fail with clear errors before training;
* SIGTERM to the driver mid-run leaves a complete checkpoint at the step reached; --resume goes on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cluster.checkpoint import list_checkpoints, load_checkpoint
from cluster.config import load_config
from cluster.coordinator import FAILED, FINISHED
from cluster.job import run_training
from cluster.metrics import PREFIX, SPECS, exported_names

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

BIN = Path(sys.executable).parent
N_IMAGES = 640  # 576 train (18 steps of 32 per epoch) + 64 val


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path_factory.mktemp("data") / "demo")
    build_synthetic(N_IMAGES, out, workers=1, progress=False)
    return out


# The undisturbed run the exactness tests compare with (resume, worker counts and decode sites,
# injected faults): one run, shared, as every one of them would otherwise train it again
REFERENCE = {"train.steps": 12, "checkpoint.every_steps": 4}
_REFERENCE: dict[str, str] = {}


@pytest.fixture
def reference(ray_local, shards, tmp_path_factory) -> str:
    """The reference run's directory (trained once per module; a function fixture, as ray_local)."""
    if not _REFERENCE:
        run_dir = str(tmp_path_factory.mktemp("reference") / "run")
        res = run_training(_cfg(**REFERENCE), shards, run_dir)
        assert res.state == FINISHED and res.step == REFERENCE["train.steps"], res.error
        _REFERENCE["dir"] = run_dir
    return _REFERENCE["dir"]


def _cfg(**sets):
    base = {"train.steps_per_call": 2, "train.log_every_steps": 5, "checkpoint.background": True}
    base.update(sets)
    return load_config(preset="demo", overrides=base)


def _scrape(url: str) -> dict[str, list]:
    """Families by name, and samples by sample name (``..._total``, ``..._info``) under ``"samples"``."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    samples: dict[str, list] = {}
    for fam in families.values():
        for smp in fam:
            samples.setdefault(smp.name, []).append(smp)
    return {"families": families, "samples": samples}


def test_demo_trains_and_serves_every_metric(ray_local, shards, tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = _cfg(**{"train.steps": 30})
    holder, scraped, errors = {}, {}, []

    def scrape_when_ready():
        try:
            while "coord" not in holder:
                time.sleep(0.1)
            coord = holder["coord"]
            deadline = time.monotonic() + 240
            # after the first epoch's validation and checkpoint (step 18), before the end (30)
            while coord.step_no < 19 or not coord.checkpoints.last:
                assert time.monotonic() < deadline and coord.state not in (FINISHED, FAILED), coord.state
                time.sleep(0.05)
            scraped.update(_scrape(holder["url"]))
        except BaseException as e:
            errors.append(e)

    def on_coord(coord):
        holder["coord"] = coord
        port = coord.report.metrics._server.server_address[1]
        holder["url"] = f"http://127.0.0.1:{port}/metrics"

    t = threading.Thread(target=scrape_when_ready, daemon=True)
    t.start()
    res = run_training(cfg, shards, run_dir, on_coordinator=on_coord)
    t.join(30)
    assert not errors, errors
    assert res.state == FINISHED and res.step == 30 and res.exit_code == 0, res.error

    # the loss falls; validation ran at the epoch end over the whole val split
    coord = holder["coord"]
    losses = [r["loss"] for r in coord.report.history.steps]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    # the net starts at the chance loss (ln 10 ~ 2.30, issue 13's init; it was ~20 before, when this
    # asked for half): in 30 steps at lr 0.005 the loss falls ~10 %, to below chance
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first and last < math.log(10), losses
    (ev,) = coord.report.history.evals
    assert ev["samples"] == 64 and 0 <= ev["top1_error"] <= 1 and "top5_error_10crop" in ev
    assert [s for s, _ in list_checkpoints(run_dir)] == [18, 30]
    for key in ("metrics", "plot", "trace"):
        assert Path(res.files[key]).stat().st_size > 0, key

    # every documented metric is served, with plausible values
    missing = exported_names() - set(scraped["samples"])
    assert not missing, f"not served: {sorted(missing)}"
    assert len(exported_names()) == len(SPECS)

    def value(name, **labels):
        got = scraped["samples"].get(PREFIX + name, [])
        vals = [s.value for s in got if all(s.labels.get(k) == v for k, v in labels.items())]
        assert vals, (name, labels, got)
        return vals[0]

    assert value("images_per_second") > 0
    assert value("images_total", run="run") >= 19 * 32
    assert 19 <= value("step") <= 30 and value("epoch") == 1
    assert 0 < value("loss", split="train") < 50 and 0 < value("loss", split="val") < 50
    for crops, split in (("train", "train"), ("center", "val"), ("10crop", "val")):
        assert 0 <= value("top1_error_ratio", split=split, crops=crops) <= 1
        assert 0 <= value("top5_error_ratio", split=split, crops=crops) <= 1
    assert value("learning_rate") == pytest.approx(cfg.optim.lr)
    for stage in ("0", "1"):
        for column in ("0", "1"):
            for part in ("compute", "exchange", "pipeline_wait", "data_wait", "optimizer", "grad_sync"):
                assert value("step_time_seconds", part=part, stage=stage, column=column) >= 0
            assert value("step_time_seconds", part="compute", stage=stage, column=column) > 0
        assert 0 <= value("pipeline_bubble_ratio", stage=stage) < 1
    assert value("step_seconds") > 0
    assert value("data_queue_depth_batches", worker="0") >= 0
    assert value("decode_images_per_second") > 0
    assert value("skipped_samples_total", reason="corrupt") == 0
    assert value("checkpoint_bytes") > 1e5 and value("checkpoint_duration_seconds") > 0
    assert value("checkpoints_total") >= 1 and value("restarts_total", reason="trainer_failure") == 0
    assert value("state", alexnet_state="running") == 1
    assert value("run_info", grid="1x2x2", model="small") == 1

    # alexnet eval: the fused one-process execution reproduces the run's own validation (step 18)
    ck18 = f"{run_dir}/checkpoints/step-00000018"
    argv = [str(BIN / "alexnet"), "eval", "--checkpoint", ck18, "--data", shards]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["samples"] == 64
    for key in ("top1_error", "top5_error", "top1_error_10crop", "top5_error_10crop"):
        assert got[key] == pytest.approx(ev[key], abs=1e-9), key


def _weights(run_dir: str):
    ck = load_checkpoint(run_dir)
    return ck.step, ck.model, ck.optimizer


def test_exact_resume_same_grid_and_other_grid(ray_local, shards, reference, tmp_path):
    n, k = REFERENCE["train.steps"], 5  # k inside the first epoch: the data position must resume mid-epoch
    straight, split, other = reference, str(tmp_path / "split"), str(tmp_path / "other")
    # the run's config.toml is the run's config, resolved against the shards: `--config` reruns it
    assert load_config(path=f"{straight}/config.toml") == _cfg(**REFERENCE).for_data(shards)
    assert run_training(_cfg(**{"train.steps": k}), shards, split).state == FINISHED
    shutil.copytree(split, other)
    with pytest.raises(ValueError, match="data.streams=16"):  # mid-epoch: the sample order is 16 streams'
        run_training(_cfg(**{"train.steps": n, "data.streams": 3}), shards, split, resume=True)
    # the checkpoint was written with 2 data workers; resumed with 3 (they host the same 16 streams)
    res = run_training(_cfg(**{"train.steps": n, "data.workers": 3}), shards, split, resume=True)
    assert res.state == FINISHED and res.step == n
    step_a, model_a, opt_a = _weights(straight)
    step_b, model_b, opt_b = _weights(split)
    assert step_a == step_b == n
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
        assert torch.equal(opt_a[key], opt_b[key]), key

    # the step-k checkpoint of the 1x2x2 run, resumed on 2x1x2 (2 replicas of 1 stage x 2 columns:
    # each replica reads its half of every batch from the data workers)
    other_grid = {"train.steps": n, "grid.shape": "2x1x2", "grid.microbatches": 1}
    res = run_training(_cfg(**other_grid), shards, other, resume=True)
    assert res.state == FINISHED and res.step == n
    _, model_c, _ = _weights(other)
    for key in model_a:
        torch.testing.assert_close(model_c[key], model_a[key], rtol=1e-4, atol=1e-5)


def test_batches_independent_of_workers_and_decode(ray_local, shards, reference, tmp_path):
    """data.workers 1, 2 and 3 end at bit-identical weights (the workers host the epoch's streams),
    and data.decode=device (the stage-0 ranks decode the JPEG bytes, here on their CPU) trains to
    the same weights as data.decode=worker: the same pixels either way. Three runs prove both (the
    3-worker run decodes on the device; tests/cluster/test_data_workers.py holds worker counts
    against each other with one decode, tests/alexnet/test_data_reader.py the decodes); the
    reference run is the 2-worker, worker-decode one."""
    runs = {
        "w1": {"data.workers": 1, "data.decode": "worker"},
        "w3-device": {"data.workers": 3, "data.decode": "device"},
    }
    ref = _cfg(**REFERENCE).data
    assert ref.workers == 2 and ref.decode == "auto"  # auto: the data workers decode on a CPU run
    weights = {}
    for name, sets in runs.items():
        res = run_training(_cfg(**{**REFERENCE, **sets}), shards, str(tmp_path / name))
        assert res.state == FINISHED and res.step == REFERENCE["train.steps"], res.error
        weights[name] = _weights(str(tmp_path / name))
    _, model_a, opt_a = _weights(reference)
    for name in ("w1", "w3-device"):
        _, model_b, opt_b = weights[name]
        for key in model_a:
            assert torch.equal(model_a[key], model_b[key]), (name, key)
            assert torch.equal(opt_a[key], opt_b[key]), (name, key)


def test_killed_trainer_and_data_worker_recover_bit_exact(ray_local, shards, reference, tmp_path):
    """Fault injection (faults.*): a data worker dies at step 5 (Ray restarts it, its stream resumes),
    the last-stage column-1 trainer at step 7 (the group restarts from the step-4 checkpoint)."""
    sets = REFERENCE
    faults = {
        "faults.kill_data_worker": 1,
        "faults.kill_data_step": 5,
        "faults.kill_rank": 3,
        "faults.kill_step": 7,
    }
    holder = {}
    res = run_training(
        _cfg(**sets, **faults), shards, str(tmp_path / "b"), on_coordinator=lambda c: holder.update(c=c)
    )
    assert res.state == FINISHED and res.step == 12, res.error
    coord = holder["c"]
    failures = coord.policy.failures
    assert len(failures) == 1 and "rank 3" in failures[0].split(";")[0], failures
    reg = coord.report.metrics.registry
    assert reg.get_sample_value("alexnet_restarts_total", {"run": "b", "reason": "trainer_failure"}) == 1
    _, model_a, opt_a = _weights(reference)
    _, model_b, opt_b = _weights(str(tmp_path / "b"))
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]) and torch.equal(opt_a[key], opt_b[key]), key


def test_demo_trains_in_bf16(ray_local, shards, tmp_path):
    """``--set train.precision=bf16`` on CPU: every rank autocasts to bfloat16 (what crosses stages
    and columns is bf16), the loss falls, and the checkpoint keeps float32 master weights."""
    holder = {}
    # 30 steps, as the fp32 demo: both curves fall ~2.37 -> ~2.30 by step 20, just short of the 5 %
    # fall this asks for (measured: bf16 and fp32 track each other to ~0.01 at every step)
    cfg = _cfg(**{"train.steps": 30, "train.precision": "bf16"})
    res = run_training(cfg, shards, str(tmp_path / "run"), on_coordinator=lambda c: holder.update(c=c))
    assert res.state == FINISHED and res.step == 30, res.error
    losses = [r["loss"] for r in holder["c"].report.history.steps]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5  # from the chance loss, as the fp32 demo
    assert last < 0.95 * first and last < math.log(10), losses
    _, model, opt = _weights(str(tmp_path / "run"))
    assert {v.dtype for v in model.values()} == {v.dtype for v in opt.values()} == {torch.float32}


def test_bad_config_is_refused_before_anything_starts(shards, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [
        str(BIN / "alexnet"),
        "train",
        "--preset",
        "demo",
        "--data",
        shards,
        "--run-dir",
        str(tmp_path / "r"),
    ]
    r = subprocess.run(cmd + ["--set", "optim.lr=fast"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "optim.lr='fast'" in r.stderr and "number" in r.stderr, r.stderr
    r = subprocess.run(
        cmd + ["--set", "grid.shape=1x2x3"], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 2 and "grid.shape" in r.stderr, r.stderr
    r = subprocess.run(
        cmd + ["--set", "model.num_classes=7"], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 2 and "model.num_classes=10" in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


def test_grid_larger_than_cluster_is_a_clear_error(ray_local, shards, tmp_path):
    # 2x2x2 = 8 trainer ranks + 2 data workers > the session's 8 CPUs
    cfg = _cfg(**{"grid.shape": "2x2x2", "grid.placement_timeout_s": 3, "train.steps": 4})
    t0 = time.monotonic()
    res = run_training(cfg, shards, str(tmp_path / "r"))
    assert time.monotonic() - t0 < 60
    assert res.state == FAILED and res.step == 0 and res.exit_code == 1
    assert "cannot hold grid.shape='2x2x2'" in res.error and "placement_timeout_s" in res.error, res.error
    assert list_checkpoints(str(tmp_path / "r")) == []
    # the placement group was released: the demo grid still fits afterwards
    avail = ray_local.available_resources().get("CPU", 0)
    assert avail >= 6, avail


class _Proc:
    """A subprocess whose output lines are collected by a thread (never blocks the test)."""

    def __init__(self, argv: list[str], env: dict) -> None:
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(pattern in x for x in self.lines):
            if self.p.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {pattern!r} in output:\n{''.join(self.lines)[-3000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)

    @property
    def text(self) -> str:
        return "".join(self.lines)


def test_sigterm_checkpoints_and_resume_continues(ray_local, shards, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    argv = [str(BIN / "alexnet"), "train", "--preset", "demo", "--data", shards, "--run-dir", str(run_dir)]
    argv += ["--set", "train.steps_per_call=2", "--set", "train.log_every_steps=2"]
    proc = _Proc(argv + ["--steps", "400"], env)
    try:
        proc.wait_for("step 6/400", 180)
        t0 = time.monotonic()
        proc.p.send_signal(signal.SIGTERM)
        rc = proc.p.wait(60)
        proc.t.join(10)
    finally:
        proc.kill()
    assert time.monotonic() - t0 < 60
    assert rc == 143, proc.text[-3000:]
    assert "stopped at step" in proc.text, proc.text[-3000:]
    stopped = int(proc.text.split("stopped at step ")[1].split(";")[0])
    assert 6 <= stopped < 400
    assert [s for s, _ in list_checkpoints(str(run_dir))][-1] == stopped
    assert load_checkpoint(str(run_dir)).step == stopped  # complete: sizes and sha256 verified

    proc = _Proc(argv + ["--steps", str(stopped + 4), "--resume"], env)
    try:
        rc = proc.p.wait(180)
        proc.t.join(10)
    finally:
        proc.kill()
    assert rc == 0, proc.text[-3000:]
    assert f"(step {stopped})" in proc.text and f"finished at step {stopped + 4}" in proc.text
    assert load_checkpoint(str(run_dir)).step == stopped + 4
