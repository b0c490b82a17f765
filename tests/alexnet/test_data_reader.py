"""Deterministic epoch plan, exact resume, validation coverage, corrupt and truncated shards."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from alexnet.data.index import DatasetIndex
from alexnet.data.reader import ReaderSpec, WorkerStream, epoch_batches, epoch_segments, val_batches
from alexnet.data.writer import build_synthetic

pytestmark = pytest.mark.timeout(120)
B = 20


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> str:
    """360 train samples in shards of 50, 50, ..., 10 (uneven); 40 val samples."""
    url = str(tmp_path_factory.mktemp("syn") / "shards")
    build_synthetic(400, url, size=40, classes=4, shard_size=50, workers=1, progress=False)
    return url


def _spec(url: str, workers: int, **kw) -> ReaderSpec:
    return ReaderSpec(url, batch_size=B, input_size=32, workers=workers, seed=3, shuffle_buffer=40, **kw)


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_epoch_covers_every_sample_once(syn, workers):
    ix = DatasetIndex.load(syn)
    assert [s.count for s in ix.shards("train")] == [50] * 7 + [10]
    run1 = list(epoch_batches(_spec(syn, workers), epoch=0))
    keys = _keys(run1)
    assert len(run1) == 360 // B and all(len(b["keys"]) == B for b in run1)
    assert len(set(keys)) == len(keys) == 360  # no remainder at B=20: every sample exactly once
    assert [b["index"] for b in run1] == list(range(18))
    assert [b["worker"] for b in run1] == [t % workers for t in range(18)]
    run2 = list(epoch_batches(_spec(syn, workers), epoch=0))
    assert _keys(run2) == keys and all(
        np.array_equal(a["images"], b["images"]) for a, b in zip(run1, run2, strict=True)
    )
    assert _keys(epoch_batches(_spec(syn, workers), epoch=1)) != keys  # a new epoch, a new order


def test_remainder_dropped_and_segments_balanced(syn):
    ix = DatasetIndex.load(syn)
    plan = epoch_segments(ix.shards("train"), epoch=0, seed=3, workers=3, batch_size=32)
    # T = 360 // 32 = 11 batches: workers own 4, 4, 3 -> 128, 128, 96 samples, split mid-shard as needed
    assert [sum(g.stop - g.start for g in segs) for segs in plan] == [128, 128, 96]
    keys = _keys(epoch_batches(ReaderSpec(syn, 32, 32, workers=3, seed=3), epoch=0))
    assert len(keys) == len(set(keys)) == 352
    with pytest.raises(ValueError, match="at most 3 workers"):
        WorkerStream(ReaderSpec(syn, 100, 32, workers=4), 0)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_resume_from_position_is_exact(syn, k):
    """k batches, save the position, a new stream from it: the rest equals the uninterrupted stream."""
    spec = _spec(syn, 2)
    n = 14  # worker 1 owns 9 batches per epoch: this crosses into epoch 1
    straight = WorkerStream(spec, 1)
    ref = [straight.next_batch() for _ in range(n)]
    first = WorkerStream(spec, 1)
    head = [first.next_batch() for _ in range(k)]
    pos = head[-1]["next_position"]
    assert pos == ref[k]["position"] and set(pos) == {"epoch", "index", "consumed", "worker", "workers",
                                                      "batch_size", "seed"}  # fmt: skip
    rest = WorkerStream(spec, 1, position=pos)
    tail = [rest.next_batch() for _ in range(n - k)]
    for a, b in zip(head + tail, ref, strict=True):
        assert a["keys"] == b["keys"] and (a["epoch"], a["index"]) == (b["epoch"], b["index"])
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["lighting"], b["lighting"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    assert ref[9]["epoch"] == 1 and ref[9]["index"] == 1
    with pytest.raises(ValueError, match="same worker count"):
        WorkerStream(_spec(syn, 3), 1, position=pos)


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("crop", ["center", "ten"])
def test_val_every_sample_once(syn, workers, crop):
    batches = [
        b for w in range(workers) for b in val_batches(syn, 16, 32, crop=crop, worker=w, workers=workers)
    ]
    keys = _keys(batches)
    assert sorted(keys) == [f"val_{i:08d}" for i in range(40)]
    shape = (3, 32, 32) if crop == "center" else (10, 3, 32, 32)
    assert all(b["images"].shape[1:] == shape and b["images"].dtype == np.uint8 for b in batches)


def _damage(src: str, dst: str) -> None:
    """Copy the shards; in train-000001 corrupt a JPEG and drop a cls; cut train-000003 in half."""
    shutil.copytree(src, dst)
    path = f"{dst}/train-000001.tar"
    samples = list(wds.WebDataset(path, shardshuffle=False))
    samples[3]["jpg"] = b"\xff\xd8\xff\xe0" + b"\x00" * 200  # a JPEG header and nothing decodable
    del samples[7]["cls"]
    with wds.TarWriter(path, encoder=False) as tw:
        for s in samples:
            tw.write({k: v for k, v in s.items() if k in ("__key__", "jpg", "cls")})
    with tarfile.open(path) as tf:
        assert len(tf.getmembers()) == 99
    cut = f"{dst}/train-000003.tar"
    data = Path(cut).read_bytes()
    Path(cut).write_bytes(data[: len(data) // 2 + 100])  # mid-member: a truncated tar


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_and_truncated_shards_counted_never_hang(syn, tmp_path, workers):
    bad = str(tmp_path / "bad")
    _damage(syn, bad)
    spec = _spec(bad, workers)
    streams = [WorkerStream(spec, w) for w in range(workers)]
    batches = [streams[t % workers].next_batch() for t in range(18)]  # the full epoch, as planned
    assert all(len(b["keys"]) == B and b["images"].shape == (B, 3, 32, 32) for b in batches)
    stats = [s.stats for s in streams]
    assert sum(s.skipped_corrupt for s in stats) == 1
    assert sum(s.skipped_missing for s in stats) == 1
    assert sum(s.truncated_shards for s in stats) >= 1
    lost = (
        sum(s.skipped for s in stats)
        + 360
        - sum(s.records for s in stats if True)
        + sum(s.padded for s in stats)
    )
    assert sum(s.padded for s in stats) >= 2 + 20  # two skips and at least the lost half of a 50-sample shard
    assert lost >= 0
    keys = _keys(batches)
    assert "train_00000053" not in keys and "train_00000057" not in keys  # the damaged samples
    # duplicates only from padding, and only within one worker's stream
    per_worker = [set(_keys(batches[w::workers])) for w in range(workers)]
    assert sum(len(p) for p in per_worker) == len(set(keys))
    # the next epoch also runs (the damage is met again, counted again)
    nxt = [streams[t % workers].next_batch() for t in range(18)]
    assert all(b["epoch"] == 1 for b in nxt) and sum(s.stats.skipped_corrupt for s in streams) == 2


def test_check_plan_names_the_config_key(syn):
    from alexnet.data.reader import check_plan

    ix = DatasetIndex.load(syn)
    assert check_plan(ix, B, 32, workers=3) == 18
    with pytest.raises(ValueError, match=r"model.input_size=41 .*larger than the stored images \(40 px\)"):
        check_plan(ix, B, 41, workers=1)
    with pytest.raises(ValueError, match="optim.batch_size=400 exceeds the 360 train images"):
        check_plan(ix, 400, 32, workers=1)
    with pytest.raises(ValueError, match="data.workers=19 exceeds the 18 batches"):
        check_plan(ix, B, 32, workers=19)
