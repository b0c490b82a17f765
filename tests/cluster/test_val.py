"""Validation through the data workers (cluster.val): the plan, each image decoded once per pass and
read by every consumer of its replica, short and empty batches, the bounded buffer, a new pass."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from alexnet.data.index import DatasetIndex
from alexnet.data.records import ReaderStats
from alexnet.data.transforms import center_crop, decode_image, ten_crop
from alexnet.data.val import ValPlan, worker_batches
from alexnet.data.writer import build_synthetic
from cluster.val import BUFFER, ValServer, start_pass

N_VAL = 30  # in val shards of 12, 12, 6


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("val") / "shards")
    build_synthetic(120, url, size=40, classes=4, val_fraction=0.25, shard_size=12, workers=1, progress=False)
    assert [s.count for s in DatasetIndex.load(url).shards("val")] == [12, 12, 6]
    return url


def _reference(url: str, crop: str) -> dict:
    """The whole val split in its global order, read with plain webdataset (not the product's record
    layer) and decoded and cropped here."""
    keys, images, labels = [], [], []
    for shard in DatasetIndex.load(url).shards("val"):
        for rec in wds.WebDataset(shard.url, shardshuffle=False, empty_check=False):
            img = decode_image(rec["jpg"])
            images.append((center_crop if crop == "center" else ten_crop)(img, 32).numpy())
            keys.append(rec["__key__"])
            labels.append(int(rec["cls"]))
    return {"images": np.stack(images), "labels": np.asarray(labels), "keys": keys}


@pytest.mark.parametrize(
    "total,bs,replicas,workers", [(30, 4, 2, 2), (30, 4, 3, 2), (30, 7, 2, 5), (5, 4, 2, 3), (0, 4, 2, 2)]
)
def test_plan_gives_every_batch_one_replica_and_one_worker(total, bs, replicas, workers):
    p = ValPlan(total, bs, replicas, workers)
    nb = p.batches
    assert nb == -(-total // bs)
    by_replica = sorted(j for r in range(replicas) for j in p.replica_batches(r))
    assert by_replica == list(range(nb))
    assert all(j % replicas == r for r in range(replicas) for j in p.replica_batches(r))
    runs = [p.worker_batches(w) for w in range(workers)]
    assert [j for run in runs for j in run] == list(range(nb))  # contiguous runs, in worker order
    assert all(p.worker_of(j) == w for w, run in enumerate(runs) for j in run)
    assert [i for j in range(nb) for i in range(*p.samples(j))] == list(range(total))
    with pytest.raises(ValueError, match=f"val batch {nb}: the pass has {nb} batches"):
        p.worker_of(nb)


def test_plan_of_the_index_and_max_samples(syn):
    ix = DatasetIndex.load(syn)
    assert ValPlan.of(ix, 4, 2, 2) == ValPlan(N_VAL, 4, 2, 2)
    assert ValPlan.of(ix, 4, 2, 2, max_samples=10).total == 10
    assert ValPlan.of(ix, 4, 2, 2, max_samples=999).total == N_VAL


@pytest.mark.parametrize("crop", ["center", "ten"])
def test_workers_batches_are_the_global_order_decoded_once(syn, crop):
    ix, ref = DatasetIndex.load(syn), _reference(syn, crop)
    plan, stats = ValPlan(N_VAL, 4, 2, 3), [ReaderStats() for _ in range(3)]
    batches = [b for w in range(3) for b in worker_batches(ix, plan, w, crop, 32, stats[w])]
    assert [b.index for b in batches] == list(range(plan.batches))
    assert [b.n for b in batches] == [4] * 7 + [2]
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), ref["images"])
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), ref["labels"])
    assert [k for b in batches for k in b.keys] == ref["keys"]
    assert sum(s.samples for s in stats) == N_VAL and sum(s.records for s in stats) == N_VAL


def _damage(src: str, dst: str) -> None:
    """Copy the shards; in val-000001 corrupt the first two JPEGs (global positions 12, 13); cut
    val-000000 in half (it loses its tail)."""
    shutil.copytree(src, dst)
    path = f"{dst}/val-000001.tar"
    samples = list(wds.WebDataset(path, shardshuffle=False))
    for s in samples[:2]:
        s["jpg"] = b"\xff\xd8\xff\xe0" + b"\x00" * 200  # a JPEG header and nothing decodable
    with wds.TarWriter(path, encoder=False) as tw:
        for s in samples:
            tw.write({k: v for k, v in s.items() if k in ("__key__", "jpg", "cls")})
    cut = Path(dst, "val-000000.tar")
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 100])  # mid-member: a truncated tar


def test_unusable_samples_shorten_their_batch_and_shift_nothing(syn, tmp_path):
    bad = str(tmp_path / "bad")
    _damage(syn, bad)
    ref_keys = _reference(syn, "center")["keys"]
    ix, plan, stats = DatasetIndex.load(bad), ValPlan(N_VAL, 2, 2, 2), ReaderStats()
    batches = [b for w in range(2) for b in worker_batches(ix, plan, w, "center", 32, stats)]
    assert [b.index for b in batches] == list(range(15))
    for b in batches:  # each batch holds only samples of its own positions
        j = b.index
        assert set(b.keys) <= set(ref_keys[2 * j : 2 * j + 2]) and b.n == len(b.labels)
    assert batches[6].n == 0 and batches[6].images.shape == (0, 3, 32, 32)  # positions 12, 13
    got = [k for b in batches for k in b.keys]
    assert got == ref_keys[: len(got) - 16] + ref_keys[14:]  # shard 0's tail lost, then 12, 13
    assert stats.skipped_corrupt == 2 and stats.skipped_truncated >= 1 and stats.truncated_shards == 1
    assert stats.samples == len(got) == N_VAL - stats.skipped


# -- on Ray: a ValServer in a stand-in for the data worker ----------------------------------------


def _workers(ray, url: str, n: int) -> list:
    @ray.remote(num_cpus=0, max_concurrency=16)
    class _W:
        def __init__(self, url: str) -> None:
            self.val = ValServer(url, 4 << 20)

        def val_start(self, *args, **kwargs):
            return self.val.start(*args, **kwargs)

        def val_get(self, *args, **kwargs):
            return self.val.get(*args, **kwargs)

        def val_stats(self):
            return self.val.stats()

    return [_W.remote(url) for _ in range(n)]


def _read_replica(client, pass_id: int, replica: int, readers: int) -> list[list[dict]]:
    """Reader 0 takes the pixels, the others the labels; in lockstep, as a replica's ranks."""
    streams = [client.batches(pass_id, replica, images=i == 0) for i in range(readers)]
    return [list(step) for step in zip(*streams, strict=True)]


def test_each_image_is_decoded_once_per_pass_and_read_by_every_consumer(ray_local, syn):
    workers = _workers(ray_local, syn, 2)
    plan = ValPlan.of(DatasetIndex.load(syn), 4, replicas=2, workers=2)
    consumers = {0: 3, 1: 3}  # per replica: one stage-0 rank and two others
    for pass_id, crop in ((1, "center"), (2, "ten")):
        client = start_pass(workers, pass_id, crop, plan, 32, 0, consumers, timeout_s=60)
        with ThreadPoolExecutor(2) as ex:  # the replicas read at the same time
            reads = [ex.submit(_read_replica, client, pass_id, r, 3) for r in range(2)]
            per_replica = [f.result() for f in reads]
        steps = sorted((s for rep in per_replica for s in rep), key=lambda s: s[0].index)
        assert [s[0].index for s in steps] == list(range(plan.batches))
        for r, rep in enumerate(per_replica):
            assert [s[0].index for s in rep] == list(plan.replica_batches(r))
        for pixels, *labels_only in steps:
            for other in labels_only:  # the small object: labels and count, no pixels
                assert other.images is None and other.n == pixels.n and other.index == pixels.index
                np.testing.assert_array_equal(other.labels, pixels.labels)
        ref = _reference(syn, crop)
        np.testing.assert_array_equal(np.concatenate([s[0].images for s in steps]), ref["images"])
        np.testing.assert_array_equal(np.concatenate([s[0].labels for s in steps]), ref["labels"])
        stats = ray_local.get([w.val_stats.remote() for w in workers])
        # decoded once per pass: the samples of this pass over both workers are the val split
        assert sum(s[pass_id]["samples"] for s in stats) == N_VAL
        assert [s[pass_id]["crop"] for s in stats] == [crop, crop]
        assert [s[pass_id]["batches"] for s in stats] == [len(plan.worker_batches(w)) for w in range(2)]
    assert sum(s[1]["samples"] for s in stats) == N_VAL  # the center pass decoded nothing more since

    # eval.max_samples: the first 10 images of the global order
    small = ValPlan.of(DatasetIndex.load(syn), 4, replicas=2, workers=2, max_samples=10)
    client = start_pass(workers, 3, "center", small, 32, 10, {0: 1, 1: 1}, timeout_s=60)
    got = [b for r in range(2) for b in client.batches(3, r, images=True)]
    assert sorted(k for b in got for k in b.keys) == _reference(syn, "center")["keys"][:10]
    for w in workers:
        ray_local.kill(w)


def test_buffer_is_bounded_batches_released_and_a_new_pass_replaces_the_old(ray_local, syn):
    ray = ray_local
    (w,) = _workers(ray, syn, 1)
    assert ray.get(w.val_start.remote(1, "center", 2, 32, 0, 0, 1, {0: 2})) == 15

    def made(at_least: int) -> int:
        """Batches made once there are ``at_least`` (waited for: a loaded machine decodes slowly),
        read again a second later: a producer that does not stop there has made more by then."""
        deadline = time.monotonic() + 120
        while ray.get(w.val_stats.remote())[1]["batches"] < at_least and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        return ray.get(w.val_stats.remote())[1]["batches"]

    assert made(BUFFER) == BUFFER  # nothing fetched: it stops BUFFER batches ahead
    first = ray.get(ray.get(w.val_get.remote(1, 0, True))[0])
    assert first.n == 2 and first.index == 0
    assert made(BUFFER) == BUFFER  # batch 0 still has a consumer to come
    labels = ray.get(ray.get(w.val_get.remote(1, 0, False))[0])
    np.testing.assert_array_equal(labels.labels, first.labels)
    assert made(BUFFER + 1) == BUFFER + 1  # both consumers fetched batch 0: it is dropped, one more is made
    with pytest.raises(ray.exceptions.RayTaskError, match="already fetched by all its consumers"):
        ray.get(w.val_get.remote(1, 0, True))
    assert ray.get(w.val_start.remote(2, "center", 2, 32, 0, 1, 2, {0: 1})) == 8  # as worker 1 of 2
    with pytest.raises(ray.exceptions.RayTaskError, match="val batch 0 is decoded by data worker 0, not 1"):
        ray.get(w.val_get.remote(2, 0, True))
    ray.get(w.val_start.remote(3, "ten", 2, 32, 0, 0, 1, {0: 1}))
    with pytest.raises(ray.exceptions.RayTaskError, match="val pass 1 is not running here"):
        ray.get(w.val_get.remote(1, 1, True))
    with pytest.raises(ray.exceptions.RayTaskError, match="pass 3 was already started here"):
        ray.get(w.val_start.remote(3, "ten", 2, 32, 0, 0, 1, {0: 1}))
    with pytest.raises(ray.exceptions.RayTaskError, match="crop='five'"):
        ray.get(w.val_start.remote(4, "five", 2, 32, 0, 0, 1, {0: 1}))
    assert ray.get(ray.get(w.val_get.remote(3, 0, True))[0]).images.shape == (2, 10, 3, 32, 32)
    ray.kill(w)
