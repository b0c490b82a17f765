"""Ray data workers: batches by step, parts per consumer, kill + restart, resume, backpressure."""

from __future__ import annotations

import time

import numpy as np
import pytest

from alexnet.data.reader import ReaderSpec, epoch_batches
from alexnet.data.writer import build_synthetic

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]
B = 20


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("syn") / "shards")
    build_synthetic(400, url, size=40, classes=4, shard_size=50, workers=1, progress=False)
    return url  # 360 train samples: 18 batches of 20 per epoch; 40 val


def _spec(url: str, workers: int = 2) -> ReaderSpec:
    return ReaderSpec(url, batch_size=B, input_size=32, workers=workers, seed=11, shuffle_buffer=40)


def _reference(url: str, workers: int, steps: int) -> list[dict]:
    spec = _spec(url, workers)
    out = [b for e in range(2) for b in epoch_batches(spec, e)]
    return out[:steps]


def _assert_same(parts: list[dict], ref: dict) -> None:
    np.testing.assert_array_equal(np.concatenate([p["images"] for p in parts]), ref["images"])
    np.testing.assert_array_equal(np.concatenate([p["labels"] for p in parts]), ref["labels"])
    np.testing.assert_array_equal(np.concatenate([p["lighting"] for p in parts]), ref["lighting"])
    assert [k for p in parts for k in p["keys"]] == ref["keys"]
    assert all((p["epoch"], p["index"]) == (ref["epoch"], ref["index"]) for p in parts)


def test_pool_stream_with_kill_equals_reference(ray_local, syn):
    from cluster.data import DataPool

    ray = ray_local
    steps = 26  # crosses the epoch boundary at 18
    ref = _reference(syn, 2, steps)
    pool = DataPool(_spec(syn), consumers=2, prefetch=2)
    try:
        client = pool.client()
        for s in range(steps):
            refs = [client.get_ref(s, part=c, parts=2, consumer=c) for c in range(2)]
            if s == 7:
                ray.kill(pool.workers[s % 2], no_restart=False)  # a call is in flight: Ray re-sends it
            parts = ray.get(refs, timeout=120)
            assert parts[0]["images"].shape == (B // 2, 3, 32, 32) and parts[0]["images"].dtype == np.uint8
            _assert_same(parts, ref[s])
        stats = pool.stats()
        assert stats["restarts"] == 1
        assert stats["skipped"] == {"corrupt": 0, "missing": 0, "truncated": 0, "unreadable": 0}
        assert len(stats["queue_depth"]) == 2 and stats["decode_images_per_second"] > 0
    finally:
        pool.shutdown()


def test_checkpoint_positions_resume_exactly(ray_local, syn):
    from cluster.data import DataPool

    ray = ray_local
    ref = _reference(syn, 2, 24)
    pool = DataPool(_spec(syn), consumers=1, prefetch=1)
    try:
        for s in range(11):
            pool.get(s)
        positions = pool.state(11)
    finally:
        pool.shutdown()
    assert [(p["epoch"], p["index"]) for p in positions] == [(0, 12), (0, 11)]
    pool = DataPool(_spec(syn), consumers=1, prefetch=1, positions=positions)
    try:
        for s in range(11, 24):
            _assert_same([pool.get(s)], ref[s])
        with pytest.raises(ray.exceptions.RayTaskError, match="belongs to data worker"):
            ray.get(pool.workers[0].get_batch.remote(0, 1))
    finally:
        pool.shutdown()
    with pytest.raises(ValueError, match="worker count"):
        DataPool(_spec(syn, 3), positions=positions)


def test_backpressure_bounds_the_queue(ray_local, syn):
    from cluster.data import DataPool

    pool = DataPool(_spec(syn, 1), consumers=1, prefetch=2)
    try:
        time.sleep(2.0)  # plenty of time to run ahead if nothing stopped it
        assert pool.stats()["queue_depth"] == [3]  # prefetch + the batch held until consumers move past
        pool.get(0)
        pool.get(1)
        time.sleep(1.0)
        assert pool.stats()["queue_depth"] == [3] and pool.stats()["batches"] == 4  # batch 0 released
    finally:
        pool.shutdown()


def test_val_on_ray_every_sample_once(ray_local, syn):
    from cluster.data import val_batches_ray

    batches = list(val_batches_ray(syn, 16, 32, crop="ten", workers=2))
    assert sorted(k for b in batches for k in b["keys"]) == [f"val_{i:08d}" for i in range(40)]
    assert batches[0]["images"].shape[1:] == (10, 3, 32, 32)


def test_shards_built_by_ray_tasks(ray_local, tmp_path):
    from alexnet.data.index import DatasetIndex
    from cluster.data import build_shards_on_ray

    s = build_shards_on_ray(120, str(tmp_path / "out"), size=36, classes=3, shard_size=40, progress=False)
    assert s.counts == {"train": 108, "val": 12} and s.shards_written == 4
    assert [sh.count for sh in DatasetIndex.load(str(tmp_path / "out")).shards("train")] == [40, 40, 28]
