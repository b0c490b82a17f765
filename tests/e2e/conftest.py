"""What the end-to-end modules share: the demo shards and one undisturbed reference run.

The reference (demo preset, 1x2x2, 1 data worker, 12 steps inside the first epoch, a checkpoint
every 4) is what the exactness tests of ``test_train.py`` and ``test_faults.py`` compare with: a
resume, other worker counts and decode sites, killed trainers and data workers, a driver killed
inside a checkpoint write. It is trained once per session, as every one of them would otherwise
train it again.

Where a test is not about the pipeline, its run takes :data:`ONE_STAGE` (1x1x2): cutting the net
into stages changes no bit (the same kernels on the same tensors; what crosses a stage is copied
exactly), so such a run must still end bit-identical to the 1x2x2 reference, and it starts two
processes fewer. Killed trainers keep the reference's two stages.
"""

from __future__ import annotations

import pytest

from cluster.config import load_config
from tests.conftest import start_ray_local

N_IMAGES = 640  # 576 train (18 steps of 32 per epoch) + 64 val
# the settings every run of the modules takes (the reference's and its variants'); one data worker
# (the demo's 2 where a test says so): each is a process importing torch and torchvision
BASE = {
    "train.steps_per_call": 2,
    "train.log_every_steps": 5,
    "checkpoint.background": True,
    "data.workers": 1,
}
REFERENCE = {"train.steps": 12, "checkpoint.every_steps": 4, "checkpoint.keep": 5}
ONE_STAGE = {"grid.shape": "1x1x2"}  # the reference's columns, its two stages as one


def demo_cfg(**sets):
    """The demo preset with :data:`BASE` and ``sets``."""
    return load_config(preset="demo", overrides={**BASE, **sets})


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> str:
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path_factory.mktemp("data") / "demo")
    build_synthetic(N_IMAGES, out, workers=1, progress=False)
    return out


_REFERENCE: dict[str, str] = {}


@pytest.fixture
def reference(demo_shards, tmp_path_factory, _ray_finalizer) -> str:
    """The reference run's directory (trained once per session, on the session's local Ray)."""
    from cluster.coordinator import FINISHED
    from cluster.job import run_training

    if not _REFERENCE:
        start_ray_local()
        run_dir = str(tmp_path_factory.mktemp("reference") / "run")
        res = run_training(demo_cfg(**REFERENCE), demo_shards, run_dir)
        assert res.state == FINISHED and res.step == REFERENCE["train.steps"], res.error
        _REFERENCE["dir"] = run_dir
    return _REFERENCE["dir"]
