"""The augmentation switches (data.crop, data.flip, data.lighting) act where a sample's draw is
made, so both decode paths follow them: off, every training sample is its stored image's center
crop, unflipped, without lighting, from the workers' decode and from the device decode alike."""

from __future__ import annotations

import dataclasses
import glob
import tarfile

import numpy as np
import pytest
import torch

from alexnet.data.reader import ReaderSpec, Stream
from alexnet.data.transforms import Augmentation, center_crop, decode_image, draw_augmentation
from alexnet.data.writer import build_synthetic

B, S = 20, 32


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("syn") / "shards")
    build_synthetic(100, url, size=40, classes=4, shard_size=50, workers=1, progress=False)
    return url


def _stored(url: str) -> dict[str, bytes]:
    """Every training image's stored JPEG bytes, by sample key."""
    out = {}
    for path in glob.glob(f"{url}/train-*.tar"):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    out[m.name[: -len(".jpg")]] = tar.extractfile(m).read()
    return out


def test_each_switch_changes_only_its_part_of_the_draw():
    keys = [f"train_{i:08d}" for i in range(200)]
    full = [draw_augmentation(3, 1, k, 40, S) for k in keys]
    assert len({(d.x, d.y) for d in full}) > 20 and any(d.flip for d in full)  # the paper's: random
    for aug, what in (
        (Augmentation(crop="center"), {"x": 4, "y": 4}),
        (Augmentation(flip=False), {"flip": False}),
        (Augmentation(lighting=False), {"alpha": (0.0, 0.0, 0.0)}),
    ):
        for k, d in zip(keys, full, strict=True):
            assert draw_augmentation(3, 1, k, 40, S, aug) == dataclasses.replace(d, **what), aug
    with pytest.raises(ValueError, match="data.crop='corner'"):
        Augmentation(crop="corner")


@pytest.mark.parametrize("encoded", [False, True], ids=["worker_decode", "device_decode"])
def test_augmentation_off_gives_center_crops_without_flip_or_lighting(syn, encoded):
    stored = _stored(syn)
    spec = ReaderSpec(
        syn, B, S, seed=3, shuffle_buffer=10, encoded=encoded, crop="center", flip=False, lighting=False
    )
    seen = 0
    for stream in (Stream(spec, 0), Stream(dataclasses.replace(spec, crop="random"), 0)):
        batch = stream.next_batch()
        images, bad = batch.pixels(S, torch.device("cpu"), torch.from_numpy)
        assert (bad is not None) == encoded and (bad is None or not bool(bad.any()))
        images = images.numpy()
        np.testing.assert_array_equal(batch.lighting, np.zeros((B, 3), np.float32))
        centers = np.stack([center_crop(decode_image(stored[k]), S).numpy() for k in batch.keys])
        if stream.spec.crop == "center":
            np.testing.assert_array_equal(images, centers)
            seen += B
        else:  # the control: random crops of the same samples are not the center crops
            assert (images != centers).any(axis=(1, 2, 3)).sum() > B // 2
    assert seen == B
