"""Ray data workers: batches by step, one object per batch, parts per consumer, kill + restart,
resume (onto other worker counts), backpressure."""

from __future__ import annotations

import time

import numpy as np
import pytest

from alexnet.data.reader import ReaderSpec, epoch_batches
from alexnet.data.writer import build_synthetic

pytestmark = pytest.mark.ray
B = 20


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("syn") / "shards")
    build_synthetic(400, url, size=40, classes=4, shard_size=50, workers=1, progress=False)
    return url  # 360 train samples: 18 batches of 20 per epoch; 40 val


def _spec(url: str, workers: int = 2, streams: int = 0) -> ReaderSpec:
    return ReaderSpec(
        url,
        batch_size=B,
        input_size=32,
        workers=workers,
        seed=11,
        shuffle_buffer=40,
        streams=streams or workers,
    )


def _reference(url: str, workers: int, steps: int, streams: int = 0) -> list:
    spec = _spec(url, workers, streams)
    out = [b for e in range(2) for b in epoch_batches(spec, e)]
    return out[:steps]


def _assert_same(parts: list, ref) -> None:
    np.testing.assert_array_equal(np.concatenate([p.images for p in parts]), ref.images)
    np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), ref.labels)
    np.testing.assert_array_equal(np.concatenate([p.lighting for p in parts]), ref.lighting)
    assert [k for p in parts for k in p.keys] == ref.keys
    assert all((p.epoch, p.index) == (ref.epoch, ref.index) for p in parts)


def test_pool_stream_with_kill_equals_reference(ray_local, syn):
    from cluster.data import DataPool

    ray = ray_local
    steps = 26  # crosses the epoch boundary at 18
    ref = _reference(syn, 2, steps)
    pool = DataPool(_spec(syn), consumers=2, prefetch=2)
    try:
        client = pool.client()
        for s in range(steps):
            refs = [client.request(s, consumer=c) for c in range(2)]
            if s == 7:
                ray.kill(pool.workers[s % 2], no_restart=False)  # a call is in flight: Ray re-sends it
            if s == 12:  # the refs are out, the objects not yet fetched: they die with their owner
                ray.wait(refs, num_returns=2, timeout=120)
                ray.kill(pool.workers[s % 2], no_restart=False)
            parts = [client.resolve(r, s, consumer=c).part(c, 2) for c, r in enumerate(refs)]
            assert parts[0].images.shape == (B // 2, 3, 32, 32) and parts[0].images.dtype == np.uint8
            _assert_same(parts, ref[s])
        stats = pool.stats()
        assert stats["restarts"] == 2
        assert stats["skipped"] == {"corrupt": 0, "missing": 0, "truncated": 0, "unreadable": 0}
        assert len(stats["queue_depth"]) == 2 and stats["decode_images_per_second"] > 0
    finally:
        pool.shutdown()


def _get(pool, step: int) -> dict:
    """Step ``step``'s whole batch, as a trainer's feed fetches it."""
    client = pool.client()
    return client.resolve(client.request(step), step)


def test_checkpoint_positions_resume_exactly(ray_local, syn):
    from cluster.data import DataPool

    ray = ray_local
    ref = _reference(syn, 2, 24)
    pool = DataPool(_spec(syn), consumers=1, prefetch=1)
    try:
        for s in range(11):
            _get(pool, s)
        positions = pool.state(11)
    finally:
        pool.shutdown()
    assert [(p["epoch"], p["index"]) for p in positions] == [(0, 12), (0, 11)]
    pool = DataPool(_spec(syn), consumers=1, prefetch=1, positions=positions)
    try:
        for s in range(11, 24):
            _assert_same([_get(pool, s)], ref[s])
        with pytest.raises(ray.exceptions.RayTaskError, match="belongs to data worker"):
            ray.get(pool.workers[0].get_batch.remote(0, 1))
    finally:
        pool.shutdown()
    with pytest.raises(ValueError, match="data.streams the checkpoint was written with"):
        DataPool(_spec(syn, 3), positions=positions)


def test_mid_epoch_positions_resume_onto_another_worker_count(ray_local, syn):
    """Positions of 3 streams taken with 2 workers resume with 1 worker: the same batches (onto more
    workers than wrote them: tests/e2e/test_train.py resumes 1 worker's positions with 3)."""
    from cluster.data import DataPool

    ref = _reference(syn, 1, 22, streams=3)
    pool = DataPool(_spec(syn, 2, streams=3), consumers=1, prefetch=1)
    try:
        for s in range(10):
            _assert_same([_get(pool, s)], ref[s])
        positions = pool.state(10)
    finally:
        pool.shutdown()
    assert [p["stream"] for p in positions] == [0, 1, 2]
    pool = DataPool(_spec(syn, 1, streams=3), consumers=1, prefetch=1, positions=positions)
    try:
        for s in range(10, 22):  # crosses into epoch 1 at 18
            _assert_same([_get(pool, s)], ref[s])
    finally:
        pool.shutdown()


def test_one_object_per_batch_for_every_consumer(ray_local, syn):
    """Both consumers of a batch get the same object (put once); label-only consumers a small one."""
    from cluster.data import DataPool

    ray = ray_local
    pool = DataPool(_spec(syn, 1), consumers=3, prefetch=1)
    try:
        w = pool.workers[0]
        a, b = (ray.get(w.get_batch.remote(0, 0, consumer=c))[0] for c in range(2))
        labels = ray.get(w.get_batch.remote(0, 0, consumer=2, images=False))[0]
        assert a.hex() == b.hex() and labels.hex() != a.hex()
        small = ray.get(labels)
        assert small.images is None and small.lighting is None and small.labels.shape == (B,)
        np.testing.assert_array_equal(small.labels, ray.get(a).labels)
    finally:
        pool.shutdown()


def _until(pool, what: str, want, timeout_s: float = 120.0) -> None:
    """Wait (however busy the machine) until ``pool.stats()[what] == want``."""
    deadline = time.monotonic() + timeout_s
    while pool.stats()[what] != want:
        assert time.monotonic() < deadline, (what, pool.stats()[what], want)
        time.sleep(0.1)


def test_backpressure_bounds_the_queue(ray_local, syn):
    from cluster.data import DataPool

    pool = DataPool(_spec(syn, 1), consumers=1, prefetch=2)
    try:
        _until(pool, "queue_depth", [3])  # prefetch + the batch held until consumers move past
        time.sleep(1.0)  # time to run ahead, if nothing stopped it
        assert pool.stats()["queue_depth"] == [3] and pool.stats()["batches"] == 3
        _get(pool, 0)
        _get(pool, 1)
        _until(pool, "batches", 4)  # batch 0 released: one more made
        time.sleep(1.0)
        assert pool.stats()["queue_depth"] == [3] and pool.stats()["batches"] == 4
    finally:
        pool.shutdown()


def test_shards_built_by_ray_tasks(ray_local, tmp_path):
    """The writer's ``map_fn`` hook runs its shards as Ray tasks (a cluster-wide build)."""
    from alexnet.data.index import DatasetIndex
    from alexnet.data.writer import build_synthetic

    ray = ray_local

    def ray_map(fn, tasks):
        remote = ray.remote(num_cpus=1)(fn)
        pending = [remote.remote(t) for t in tasks]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])

    out = str(tmp_path / "out")
    s = build_synthetic(120, out, size=36, classes=3, shard_size=40, progress=False, map_fn=ray_map)
    assert s.counts == {"train": 108, "val": 12} and s.shards_written == 4
    assert [sh.count for sh in DatasetIndex.load(str(tmp_path / "out")).shards("train")] == [40, 40, 28]
