"""The paper's augmentation and evaluation crops; draws are functions of (seed, epoch, key) only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alexnet.data.index import DatasetIndex
from alexnet.data.reader import ReaderSpec, epoch_batches
from alexnet.data.transforms import (
    AugDraw,
    center_crop,
    draw_augmentation,
    lighting_matrix,
    lighting_offset,
    ten_crop,
    to_model_input,
    train_crop,
)
from alexnet.data.writer import build_synthetic


def test_draws_deterministic_bounded_and_distributed():
    draws = [draw_augmentation(7, 3, f"train_{i:08d}", 40, 32) for i in range(4000)]
    assert draws[:50] == [draw_augmentation(7, 3, f"train_{i:08d}", 40, 32) for i in range(50)]
    assert draws[0] != draw_augmentation(7, 4, "train_00000000", 40, 32)  # a new epoch redraws
    xs, ys = np.array([d.x for d in draws]), np.array([d.y for d in draws])
    assert xs.min() == 0 and xs.max() == 8 and ys.min() == 0 and ys.max() == 8  # all 9 positions, none beyond
    assert abs(np.bincount(xs).std() / np.bincount(xs).mean()) < 0.15  # roughly uniform
    assert 0.46 < np.mean([d.flip for d in draws]) < 0.54
    a = np.array([d.alpha for d in draws])  # (N, 3)
    np.testing.assert_allclose(a.std(0), 0.1, rtol=0.06)
    np.testing.assert_allclose(a.mean(0), 0.0, atol=0.006)
    assert abs(np.corrcoef(a.T)[0, 1]) < 0.05
    with pytest.raises(ValueError, match="larger than the stored"):
        draw_augmentation(0, 0, "k", 30, 32)


def test_crops_larger_than_the_image_are_the_one_input_size_error():
    img = torch.zeros(3, 30, 40, dtype=torch.uint8)
    for crop in (center_crop, ten_crop):
        with pytest.raises(
            ValueError, match=r"model.input_size=32 is larger than the stored images \(30 px\)"
        ):
            crop(img, 32)
    with pytest.raises(ValueError, match=r"model.input_size=32 is larger than the stored images \(30 px\)"):
        draw_augmentation(0, 0, "k", 30, 32)


def test_lighting_offset_covariance():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    evals = np.array([4000.0, 300.0, 50.0])
    m = lighting_matrix(evals, q)
    offs = np.stack([lighting_offset(draw_augmentation(0, 0, str(i), 8, 8).alpha, m) for i in range(6000)])
    expected = q @ np.diag((0.1 * evals / 255.0) ** 2) @ q.T  # V diag((0.1 l / 255)^2) V^T
    np.testing.assert_allclose(np.cov(offs.T), expected, rtol=0.08, atol=0.02 * expected.max())
    assert offs.dtype == np.float32


def test_crops_and_flip_match_numpy():
    img = torch.arange(3 * 10 * 12, dtype=torch.int32).reshape(3, 10, 12).to(torch.uint8)
    ref = img.numpy()
    out = train_crop(img, AugDraw(x=3, y=1, flip=False, alpha=(0, 0, 0)), 6)
    np.testing.assert_array_equal(out.numpy(), ref[:, 1:7, 3:9])
    out = train_crop(img, AugDraw(x=3, y=1, flip=True, alpha=(0, 0, 0)), 6)
    np.testing.assert_array_equal(out.numpy(), ref[:, 1:7, 3:9][:, :, ::-1])
    np.testing.assert_array_equal(center_crop(img, 6).numpy(), ref[:, 2:8, 3:9])
    ten = ten_crop(img, 6).numpy()
    assert ten.shape == (10, 3, 6, 6)
    corners = [ref[:, :6, :6], ref[:, :6, 6:], ref[:, 4:, :6], ref[:, 4:, 6:], ref[:, 2:8, 3:9]]
    for i, c in enumerate(corners):
        np.testing.assert_array_equal(ten[i], c)
        np.testing.assert_array_equal(ten[i + 5], c[:, :, ::-1])


def test_to_model_input():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean = torch.rand(3, 4, 4) * 255
    light = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -0.5]])
    y = to_model_input(x, light, mean)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 4, 4)
    torch.testing.assert_close(y, x.float() - mean + light[:, :, None, None])
    torch.testing.assert_close(to_model_input(x, light, mean, scale=0.5), 0.5 * y)


def test_same_sample_same_augmentation_in_any_worker(tmp_path):
    """A sample's crop, flip and lighting do not depend on which worker (of 1 or 3) decodes it."""
    url = str(tmp_path / "syn")
    build_synthetic(400, url, size=40, classes=4, shard_size=50, workers=1, progress=False)

    def by_key(workers: int) -> dict:
        spec = ReaderSpec(
            url, batch_size=20, input_size=32, workers=workers, seed=5, shuffle_buffer=30, streams=workers
        )
        out = {}
        for b in epoch_batches(spec, epoch=2):
            for i, k in enumerate(b.keys):
                out[k] = (b.images[i].copy(), b.lighting[i].copy(), int(b.labels[i]))
        return out

    one, three = by_key(1), by_key(3)
    assert set(one) == set(three) and len(one) == 360
    # the lighting is the transforms module's formula of the sample's own draw
    ix = DatasetIndex.load(url)
    m = lighting_matrix(ix.eigenvalues, ix.eigenvectors)
    for k in list(one)[:20]:
        alpha = draw_augmentation(5, 2, k, 40, 32).alpha
        np.testing.assert_array_equal(one[k][1], lighting_offset(alpha, m))
    for k, (img, light, label) in one.items():
        np.testing.assert_array_equal(img, three[k][0])
        np.testing.assert_array_equal(light, three[k][1])
        assert label == three[k][2]
    assert not np.allclose(np.stack([v[1] for v in one.values()]), 0)
