"""``--init-from``, ``train.freeze`` and the run's TensorBoard files, fast: the real driver on the fake
trainer group (no Ray, as in ``tests/cluster/test_bad_input.py``), and the engine's freeze on two
gloo ranks. The same on real actors: ``tests/e2e/test_trained_network.py``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import cluster.job as job
from alexnet.cli import main
from alexnet.config import ModelConfig
from alexnet.model import init_column_params
from cluster.checkpoint import latest_checkpoint, load_checkpoint
from cluster.config import load_config
from tests.cluster.test_bad_input import SETS, refused, train
from tests.cluster.test_coordinator import FakeGroup


class InitGroup(FakeGroup):
    """FakeGroup that keeps what ``--init-from`` loads (no optimizer state) apart from a resume."""

    def __init__(self) -> None:
        super().__init__()
        self.init: dict[str, torch.Tensor] | None = None

    def load(self, model, optimizer):
        if optimizer:
            return super().load(model, optimizer)
        self.calls.append(("init",))
        self.init = {k: v.clone() for k, v in model.items()}
        self.model = {k: v.clone() for k, v in model.items()}
        self.steps_done = 0  # a fine-tuning run starts at step 0

    def snapshot(self, step):
        self.calls.append(("snapshot", step))
        return super().snapshot(step)


@pytest.fixture
def groups(monkeypatch) -> list[InitGroup]:
    built: list[InitGroup] = []

    def group(run):
        built.append(InitGroup())
        return built[-1]

    monkeypatch.setattr(job, "init_ray", lambda cfg, plan: None)
    monkeypatch.setattr(job, "_ray_group", group)
    return built


def _synthetic(tmp_path_factory, name: str, **kw) -> str:
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path_factory.mktemp("data") / name)
    build_synthetic(120, out, shard_size=50, workers=1, progress=False, **kw)
    return out


@pytest.fixture(scope="module")
def ten(tmp_path_factory) -> str:
    return _synthetic(tmp_path_factory, "ten", size=36)


@pytest.fixture(scope="module")
def five(tmp_path_factory) -> str:
    return _synthetic(tmp_path_factory, "five", size=36, classes=5)


@pytest.fixture
def source(groups, ten, tmp_path) -> str:
    """A finished 6-step run (fake group) to fine-tune from."""
    run = tmp_path / "src"
    assert main(train(ten, run, "--steps", "6", *SETS)) == 0
    return str(run)


def test_init_from_takes_the_weights_and_nothing_else(groups, source, ten, tmp_path, capsys):
    capsys.readouterr()
    assert main(train(ten, tmp_path / "b", "--steps", "3", "--init-from", source, *SETS)) == 0
    out = capsys.readouterr().out
    g = groups[-1]
    src = load_checkpoint(latest_checkpoint(source), ("model.safetensors",)).model
    # from step 0 and the epoch's start: no optimizer state, data position or LR state came over
    assert g.calls[:3] == [("start", None), ("init",), ("train", 0, 2, g.calls[2][3])]
    assert set(g.init) == set(src) and all(torch.equal(g.init[k], src[k]) for k in src)  # fc8 kept too
    assert f"--init-from {source}/checkpoints/step-00000006 (step 6): its weights" in out, out
    assert "fc8 re-initialised" not in out and "finished at step 3" in out


def test_init_from_other_classes_redraws_fc8(groups, source, five, tmp_path, capsys):
    capsys.readouterr()
    argv = train(five, tmp_path / "b", "--steps", "3", "--init-from", source, "--set", "model.num_classes=5")
    assert main(argv + ["--set", 'train.freeze=["conv1"]', *SETS]) == 0
    out = capsys.readouterr().out
    said = "the checkpoint's 10 classes are not this dataset's 5 ([class_000, class_001, class_002, ...] vs"
    assert said in out, out
    assert "fc8 re-initialised" in out and "train.freeze: conv1 stay as loaded" in out, out
    init, src = groups[-1].init, load_checkpoint(latest_checkpoint(source), ("model.safetensors",)).model
    cfg = ModelConfig.small(num_classes=5, input_size=32)
    for c in (0, 1):
        w, b = init_column_params(cfg, "fc8", c)  # as a fresh run of this config draws it
        assert torch.equal(init[f"fc8.{c}.weight"], w) and torch.equal(init[f"fc8.{c}.bias"], b)
        assert torch.equal(init[f"fc7.{c}.weight"], src[f"fc7.{c}.weight"])
    # its checkpoints are of the 5-class model and verify as such
    ck = load_checkpoint(latest_checkpoint(str(tmp_path / "b")), ("model.safetensors",))
    assert ck.model["fc8.0.weight"].shape[0] + ck.model["fc8.1.weight"].shape[0] == 5


def test_init_from_refuses_another_model_and_a_missing_checkpoint(groups, source, tmp_path_factory, capsys):
    big = _synthetic(tmp_path_factory, "big", size=48)
    msg = refused(capsys, train(big, tmp_path_factory.mktemp("r") / "b", "--set", "model.input_size=48",
                                "--init-from", source, *SETS))  # fmt: skip
    assert f"--init-from {source}: its fc6 is (256, 576), this run's is (256, 1600)" in msg, msg
    assert "small/32 there, small/48 here" in msg, msg
    msg = refused(capsys, train(big, tmp_path_factory.mktemp("r") / "c", "--init-from", "/none", *SETS))
    assert "/none" in msg, msg


def test_resume_of_a_fine_tuning_run_takes_its_own_checkpoint(groups, source, ten, tmp_path, capsys):
    run = tmp_path / "b"
    assert main(train(ten, run, "--steps", "2", "--init-from", source, *SETS)) == 0
    capsys.readouterr()
    assert main(train(ten, run, "--steps", "4", "--init-from", source, "--resume", *SETS)) == 0
    out = capsys.readouterr().out
    assert "--init-from" not in out and f"resuming from {run}/checkpoints/step-00000002 (step 2)" in out, out
    assert ("init",) not in groups[-1].calls


def test_freeze_is_checked_against_the_blocks_and_the_grid():
    with pytest.raises(ValueError, match=r"train.freeze=\['conv9'\]: \['conv9'\] are not blocks"):
        load_config(preset="demo", overrides={"train.freeze": ["conv9"]})
    every = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    with pytest.raises(ValueError, match="every block frozen leaves nothing to train"):
        load_config(preset="demo", overrides={"train.freeze": every, "grid.shape": "1x1x2"})
    # demo's 2 stages: stage 0 frozen whole has no gradient to compute
    with pytest.raises(ValueError, match=r"stage 0 \(conv1, .*\) and every block before it are frozen"):
        load_config(preset="demo", overrides={"train.freeze": every[:5], "grid.cuts": ["fc6"]})
    cfg = load_config(preset="demo", overrides={"train.freeze": every[:3], "grid.cuts": ["conv5"]})
    assert cfg.train.freeze == tuple(every[:3])  # stage 0 (conv1-conv4) trains conv4
    cfg = load_config(preset="demo", overrides={"train.freeze": every[:7], "grid.shape": "1x1x2"})
    assert cfg.train.freeze == tuple(every[:7])  # one stage: fc8 alone trains


def test_the_run_writes_tensorboard_scalars_and_kernels(groups, ten, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from alexnet.filters import kernel_grid

    run = tmp_path / "r"
    assert main(train(ten, run, "--steps", "6", *SETS)) == 0  # validations at the epoch ends, 3 and 6
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(6))
    loss = [e.value for e in acc.Scalars("train/loss")]
    np.testing.assert_allclose(loss, [2.0 / (1 + s) for s in range(6)], rtol=1e-6)
    assert [(e.step, e.value) for e in acc.Scalars("val/top1_error")] == [(3, 0.5), (6, pytest.approx(0.4))]
    assert {"train/lr", "train/images_per_second", "val/top5_error"} <= set(acc.Tags()["scalars"])
    img = acc.Images("conv1/column1")
    assert [e.step for e in img] == [3, 6]
    final = load_checkpoint(latest_checkpoint(str(run)), ("model.safetensors",)).model
    got = np.asarray(Image.open(io.BytesIO(img[-1].encoded_image_string)))
    assert np.array_equal(got, kernel_grid(final["conv1.1.weight"]))
    # one snapshot per step: the validation's kernels and the checkpoint at that step share it
    # (checkpoints every 2 steps and at the epoch ends; validations at 3 and 6)
    assert [c[1] for c in groups[-1].calls if c[0] == "snapshot"] == [2, 3, 4, 6]


def _freeze_worker(rank: int, world_size: int, port: int) -> dict:
    from pipeline.dist import destroy, init_distributed
    from pipeline.engine import Engine, EngineConfig
    from pipeline.grid import Grid

    cfg = ModelConfig.small(num_classes=4, input_size=32)
    grid = Grid.parse("2x1x1", microbatches=1, global_batch=4)
    groups = init_distributed(grid, rank, "127.0.0.1", port, backend="gloo", timeout_s=30)
    try:
        eng = Engine(cfg, grid, rank, groups, EngineConfig(frozen=("conv1", "conv2")))
        before = {k: v.clone() for k, v in eng.state_dict()["model"].items()}
        gen = torch.Generator().manual_seed(rank)
        images, labels = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 4, (2,), generator=gen)
        eng.step(0, 0.1, images, labels)
        after = eng.state_dict()
        return {
            "changed": sorted(k for k in before if not torch.equal(before[k], after["model"][k])),
            "momentum": sorted(k for k, v in after["optimizer"].items() if bool(v.any())),
            "conv3": after["model"]["conv3.0.weight"].numpy(),
        }
    finally:
        destroy()


@pytest.mark.dist
def test_frozen_blocks_keep_their_weights_across_replicas():
    from pipeline.launch import spawn_ranks

    a, b = spawn_ranks(_freeze_worker, 2, timeout_s=120)
    assert a["changed"] == b["changed"] and a["changed"]
    assert not any(k.startswith(("conv1.", "conv2.")) for k in a["changed"]), a["changed"]
    assert {"conv3.0.weight", "conv3.1.weight", "fc8.0.weight"} <= set(a["changed"])
    assert not any(k.startswith(("conv1.", "conv2.")) for k in a["momentum"])  # none made: zeros
    assert "conv3.0.weight" in a["momentum"]
    np.testing.assert_array_equal(a["conv3"], b["conv3"])  # the replicas' gradients still summed


def test_a_restart_before_the_first_checkpoint_loads_the_init_weights_again(tmp_path):
    from cluster.coordinator import FINISHED, Coordinator
    from cluster.metrics import Metrics
    from cluster.plan import RunPlan
    from cluster.reporting import Reporter
    from cluster.run import resolve_run

    cfg = load_config(preset="demo", overrides={"train.steps_per_call": 2, "checkpoint.background": False})
    plan = RunPlan(steps_per_epoch=5, total_steps=6, data_workers=2, data_streams=2)
    g = InitGroup()
    g.die_at = 1  # a trainer dies at step 1, before any checkpoint
    init = {k: v + 1.0 for k, v in g.model.items()}
    report = Reporter(Metrics("t"), plan, 32, 10, log=lambda s: None)
    c = Coordinator(resolve_run(cfg, "unused", plan), g, str(tmp_path), report, init=init)
    assert c.run() == FINISHED, c.error
    starts = [x[0] for x in g.calls if x[0] in ("start", "init", "shutdown")]
    assert starts[:4] == ["start", "init", "shutdown", "start"] and starts[4] == "init", starts
    assert torch.equal(g.init["fc7.0.weight"], init["fc7.0.weight"])  # the init, not what step 0 made
