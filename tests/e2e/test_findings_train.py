"""A variant of the paper's findings trained end to end (demo preset, a tiny generated dataset):
the one-column tanh net without LRN and conv4, 2/2 pooling, augmentation off, on a 1x2x1 grid
(GPipe). A run decoding on the data workers and one resumed from its mid-epoch checkpoint decoding
on the device end at bit-identical weights (exact resume, both decode paths); resuming that
checkpoint as the paper's net is refused before anything starts."""

from __future__ import annotations

import pytest
import torch

from cluster.checkpoint import load_checkpoint
from cluster.config import load_config
from cluster.coordinator import FINISHED
from cluster.job import run_training

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

VARIANT = {
    "model.columns": 1,
    "model.activation": "tanh",
    "model.lrn": "false",
    "model.pooling": "non_overlapping",
    "model.remove_blocks": "conv4",
    "data.crop": "center",
    "data.flip": "false",
    "data.lighting": "false",
    "grid.shape": "1x2x1",
    "grid.schedule": "gpipe",
    "eval.every_epochs": 0,
    "schedule.kind": "constant",
    "train.steps_per_call": 2,
    "data.workers": 1,  # not the demo's 2: each is a process importing torch and torchvision
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path_factory.mktemp("data") / "demo")
    build_synthetic(320, out, workers=1, progress=False)  # 288 train: 9 steps of 32 per epoch
    return out


def _cfg(**sets):
    return load_config(preset="demo", overrides={**VARIANT, **sets})


def test_a_variant_resumes_exactly_on_the_other_decode_path(ray_local, shards, tmp_path):
    n, k = 4, 2
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    cfg = _cfg(**{"train.steps": n, "checkpoint.every_steps": k, "data.decode": "worker"})
    res = run_training(cfg, shards, straight)
    assert res.state == FINISHED and res.step == n, res.error
    ck_k = f"{straight}/checkpoints/step-{k:08d}"
    assert set(load_checkpoint(ck_k).model) == {
        f"{b}.0.{p}"
        for b in ("conv1", "conv2", "conv3", "conv5", "fc6", "fc7", "fc8")
        for p in ("weight", "bias")
    }
    paper = load_config(preset="demo", overrides={"train.steps": n})
    with pytest.raises(ValueError, match="saved with model.activation='tanh'"):  # as the paper's net
        run_training(paper, shards, resumed, resume=True, from_checkpoint=ck_k)
    device = _cfg(**{"train.steps": n, "data.decode": "device"})
    res = run_training(device, shards, resumed, resume=True, from_checkpoint=ck_k)
    assert res.state == FINISHED and res.step == n, res.error
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a.step == b.step == n
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
        assert torch.equal(a.optimizer[key], b.optimizer[key]), key
    assert not torch.equal(a.model["fc8.0.weight"], load_checkpoint(ck_k).model["fc8.0.weight"])  # it trained
