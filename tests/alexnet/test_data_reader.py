"""Deterministic epoch plan, exact resume, validation coverage, corrupt and truncated shards."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from alexnet.data.index import DatasetIndex
from alexnet.data.reader import (
    ReaderSpec,
    Stream,
    epoch_batches,
    epoch_segments,
    steps_per_epoch,
)
from alexnet.data.records import ReaderStats
from alexnet.data.val import ValPlan, worker_batches
from alexnet.data.writer import build_synthetic

B = 20


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> str:
    """360 train samples in shards of 50, 50, ..., 10 (uneven); 40 val samples."""
    url = str(tmp_path_factory.mktemp("syn") / "shards")
    build_synthetic(400, url, size=40, classes=4, shard_size=50, workers=1, progress=False)
    return url


def _spec(url: str, workers: int, **kw) -> ReaderSpec:
    kw = {"streams": workers, **kw}  # V = W unless a test says otherwise
    return ReaderSpec(url, batch_size=B, input_size=32, workers=workers, seed=3, shuffle_buffer=40, **kw)


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_epoch_covers_every_sample_once(syn, workers):
    ix = DatasetIndex.load(syn)
    assert [s.count for s in ix.shards("train")] == [50] * 7 + [10]
    run1 = list(epoch_batches(_spec(syn, workers), epoch=0))
    keys = _keys(run1)
    assert len(run1) == 360 // B and all(len(b.keys) == B for b in run1)
    assert len(set(keys)) == len(keys) == 360  # no remainder at B=20: every sample exactly once
    assert [b.index for b in run1] == list(range(18))
    assert [b.stream for b in run1] == [t % workers for t in range(18)]
    run2 = list(epoch_batches(_spec(syn, workers), epoch=0))
    assert _keys(run2) == keys and all(
        np.array_equal(a.images, b.images) for a, b in zip(run1, run2, strict=True)
    )
    assert _keys(epoch_batches(_spec(syn, workers), epoch=1)) != keys  # a new epoch, a new order


def test_remainder_dropped_and_segments_balanced(syn):
    ix = DatasetIndex.load(syn)
    plan = epoch_segments(ix.shards("train"), epoch=0, seed=3, streams=3, batch_size=32)
    # T = 360 // 32 = 11 batches: streams own 4, 4, 3 -> 128, 128, 96 samples, split mid-shard as needed
    assert [sum(g.stop - g.start for g in segs) for segs in plan] == [128, 128, 96]
    keys = _keys(epoch_batches(ReaderSpec(syn, 32, 32, workers=3, seed=3, streams=3), epoch=0))
    assert len(keys) == len(set(keys)) == 352
    with pytest.raises(ValueError, match="at most 3 workers"):
        Stream(ReaderSpec(syn, 100, 32, workers=4, streams=4), 0)


def test_few_shards_are_cut_at_new_samples_each_epoch():
    """1,500 samples in 2 shards, 16 streams of 64-128: without the per-epoch rotation every epoch
    would cut the same runs (2 shard orders), so a batch would hold the same samples epoch after
    epoch. Each epoch still reads every sample at most once and exactly T * B of them."""
    from alexnet.data.index import ShardInfo

    shards = [ShardInfo("a.tar", 1000), ShardInfo("b.tar", 500)]
    for epoch in range(4):
        plan = epoch_segments(shards, epoch, seed=0, streams=16, batch_size=64)
        owner = {(g.url, i): v for v, segs in enumerate(plan) for g in segs for i in range(g.start, g.stop)}
        assert sum(g.stop - g.start for segs in plan for g in segs) == len(owner) == 23 * 64
    starts = {tuple((g.url, g.start) for g in epoch_segments(shards, e, 0, 16, 64)[0]) for e in range(8)}
    assert len(starts) == 8  # stream 0 starts at a new sample in every one of 8 epochs
    # (a plan cut only at shard starts would give 2 shards only 2 plans, each starting at sample 0)
    assert sum(s[0][1] == 0 for s in starts) <= 1


@pytest.mark.parametrize("k", [1, 4, 8])
def test_resume_from_position_is_exact(syn, k):
    """k batches, save the position, a new stream from it: the rest equals the uninterrupted stream."""
    spec = _spec(syn, 2)
    n = 14  # worker 1 owns 9 batches per epoch: this crosses into epoch 1
    straight = Stream(spec, 1)
    ref = [straight.next_batch() for _ in range(n)]
    first = Stream(spec, 1)
    head = [first.next_batch() for _ in range(k)]
    pos = head[-1].next_position
    assert pos == ref[k].position
    assert set(pos) == {"epoch", "index", "consumed", "stream", "streams", "batch_size", "seed"}
    rest = Stream(spec, 1, position=pos)
    tail = [rest.next_batch() for _ in range(n - k)]
    for a, b in zip(head + tail, ref, strict=True):
        assert a.keys == b.keys and (a.epoch, a.index) == (b.epoch, b.index)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.lighting, b.lighting)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert ref[9].epoch == 1 and ref[9].index == 1
    with pytest.raises(ValueError, match="same data.streams"):
        Stream(_spec(syn, 3), 1, position=pos)


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("crop", ["center", "ten"])
def test_val_every_sample_once(syn, workers, crop):
    ix = DatasetIndex.load(syn)
    plan = ValPlan.of(ix, 16, replicas=1, workers=workers)
    batches = [b for w in range(workers) for b in worker_batches(ix, plan, w, crop, 32, ReaderStats())]
    keys = _keys(batches)
    assert sorted(keys) == [f"val_{i:08d}" for i in range(40)]
    shape = (3, 32, 32) if crop == "center" else (10, 3, 32, 32)
    assert all(b.images.shape[1:] == shape and b.images.dtype == np.uint8 for b in batches)


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
    streams = [Stream(spec, w) for w in range(workers)]
    batches = [streams[t % workers].next_batch() for t in range(18)]  # the full epoch, as planned
    assert all(len(b.keys) == B and b.images.shape == (B, 3, 32, 32) for b in batches)
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
    assert all(b.epoch == 1 for b in nxt) and sum(s.stats.skipped_corrupt for s in streams) == 2


def test_check_plan_names_the_config_key(syn):
    from alexnet.data.reader import check_plan

    ix = DatasetIndex.load(syn)
    assert check_plan(ix, B, 32, workers=3, streams=3) == 18
    with pytest.raises(ValueError, match=r"model.input_size=41 .*larger than the stored images \(40 px\)"):
        check_plan(ix, B, 41, workers=1, streams=1)
    with pytest.raises(ValueError, match="optim.batch_size=400 exceeds the 360 train images"):
        check_plan(ix, 400, 32, workers=1, streams=1)
    with pytest.raises(ValueError, match="data.workers=19 exceeds the 18 batches"):
        check_plan(ix, B, 32, workers=19, streams=19)


def test_epoch_segments_refuse_idle_streams_with_the_plan_message(syn):
    ix = DatasetIndex.load(syn)
    with pytest.raises(ValueError, match="data.streams=4 exceeds the 3 batches of 100 per epoch"):
        epoch_segments(ix.shards("train"), epoch=0, seed=3, streams=4, batch_size=100)


def test_check_plan_streams_and_workers(syn):
    """V streams bound the workers; 0 streams is min(T, AUTO_STREAMS)."""
    from alexnet.data.reader import AUTO_STREAMS, check_plan, resolve_streams

    ix = DatasetIndex.load(syn)
    assert check_plan(ix, B, 32, workers=3, streams=0) == 18
    assert resolve_streams(0, 18) == min(18, AUTO_STREAMS) and resolve_streams(5, 18) == 5
    assert resolve_streams(0, 3) == 3
    with pytest.raises(ValueError, match="data.workers=4 exceeds data.streams=3"):
        check_plan(ix, B, 32, workers=4, streams=3)
    with pytest.raises(ValueError, match="data.streams=19 exceeds the 18 batches"):
        check_plan(ix, B, 32, workers=1, streams=19)
    with pytest.raises(ValueError, match="data.workers=4 exceeds data.streams=3"):
        ReaderSpec(syn, B, 32, workers=4, streams=3)


def test_batches_do_not_depend_on_the_worker_count(syn):
    """The epoch's batches are a function of (seed, epoch, shards, V): workers only host streams."""
    ref = list(epoch_batches(ReaderSpec(syn, B, 32, workers=1, seed=3, shuffle_buffer=40, streams=4), 0))
    for w in (2, 3, 4):
        got = list(epoch_batches(ReaderSpec(syn, B, 32, workers=w, seed=3, shuffle_buffer=40, streams=4), 0))
        assert _keys(got) == _keys(ref)
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_array_equal(a.images, b.images)
            np.testing.assert_array_equal(a.lighting, b.lighting)
    # and they do depend on V (another sample order)
    other = list(epoch_batches(ReaderSpec(syn, B, 32, workers=1, seed=3, shuffle_buffer=40, streams=3), 0))
    assert _keys(other) != _keys(ref) and sorted(_keys(other)) != []


def test_a_position_of_the_worker_layout_is_refused(syn):
    """Positions keyed by worker (the layout before streams) have no compatibility path: checkpoints
    of that format are refused before a reader sees them, and a reader refuses such a position."""
    spec = _spec(syn, 2)
    old = dict(Stream(spec, 1).next_batch().position)
    old["worker"], old["workers"] = old.pop("stream"), old.pop("streams")
    with pytest.raises(ValueError, match="same data.streams, batch size and seed"):
        Stream(spec, 1, position=old)


def test_val_refuses_crops_larger_than_the_stored_images(syn):
    with pytest.raises(ValueError, match=r"model.input_size=41 is larger than the stored images \(40 px\)"):
        ix = DatasetIndex.load(syn)
        next(worker_batches(ix, ValPlan.of(ix, 16, 1, 1), 0, "center", 41, ReaderStats()))


def test_resume_inside_a_padding_pass_is_exact(syn, tmp_path):
    """A position taken while a damaged worker pads (its stream past pass 0) resumes bit for bit."""
    bad = str(tmp_path / "bad")
    _damage(syn, bad)
    spec = _spec(bad, 2)
    for w in range(2):
        straight = Stream(spec, w)
        ref, padded_before = [], []
        for _ in range(12):  # 9 batches per epoch: into epoch 1
            padded_before.append(straight.stats.padded)
            ref.append(straight.next_batch())
        padding = [k for k in range(9) if padded_before[k] > 0]  # batches that start inside a padding pass
        if not padding:
            continue  # this worker lost nothing
        k = padding[0]
        rest = Stream(spec, w, position=ref[k].position)
        for a in ref[k:]:
            b = rest.next_batch()
            assert a.keys == b.keys and (a.epoch, a.index) == (b.epoch, b.index)
            np.testing.assert_array_equal(a.images, b.images)
            np.testing.assert_array_equal(a.lighting, b.lighting)
        break
    else:
        raise AssertionError("no worker padded: the damage should make one")


def test_a_padding_pass_without_a_usable_sample_is_an_error(tmp_path):
    """Every record corrupt: the stream stops after one whole padding pass, not after a guessed count."""
    url = str(tmp_path / "rotten")
    build_synthetic(110, url, size=40, classes=4, shard_size=20, workers=1, progress=False)
    for shard in DatasetIndex.load(url).shards("train"):
        samples = list(wds.WebDataset(shard.url, shardshuffle=False))
        with wds.TarWriter(shard.url, encoder=False) as tw:
            for s in samples:
                tw.write({"__key__": s["__key__"], "jpg": b"\xff\xd8 not a jpeg", "cls": s["cls"]})
    stream = Stream(ReaderSpec(url, batch_size=10, input_size=32, seed=0, shuffle_buffer=7), 0)
    with pytest.raises(RuntimeError, match="data stream 0: no usable sample in epoch 0"):
        stream.next_batch()
    run = 10 * steps_per_epoch(DatasetIndex.load(url).count("train"), 10)  # the one worker's share
    # pass 0 and padding pass 1 read whole, then the first record of pass 2 shows pass 1 ended empty
    assert stream.stats.records == 2 * run + 1
    assert stream.stats.skipped_corrupt == run  # counted once, in pass 0


def test_encoded_stream_decodes_to_the_worker_streams_batches(syn):
    """data.decode=device: the stream ships JPEG bytes and drawn crops; decoding them on the trainer
    (here the CPU) gives the worker path's batches bit for bit, across an epoch boundary."""
    import torch

    spec = _spec(syn, 2)
    enc = ReaderSpec(**{**spec.to_dict(), "encoded": True})
    plain, coded = Stream(spec, 1), Stream(enc, 1)
    for _ in range(11):  # stream 1 owns 9 batches of epoch 0
        a, b = plain.next_batch(), coded.next_batch()
        assert b.images is None and b.encoded["jpeg"].dtype == np.uint8
        assert a.keys == b.keys and a.position == b.position
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.lighting, b.lighting)
        images, bad = b.pixels(32, torch.device("cpu"), torch.from_numpy)
        assert not bool(bad.any())
        np.testing.assert_array_equal(images.numpy(), a.images)
    assert b.nbytes < a.nbytes  # 40 px noise images: bench/data.py measures 256 px


def test_a_stream_whose_whole_share_is_unreadable_pads_from_the_other_shares(syn, tmp_path):
    """Many streams on a small set: one stream's whole share lies in a shard that is not a tar. It
    still yields full batches, padded from the other streams' shares, counted, and resumes exactly."""
    bad = str(tmp_path / "bad")
    shutil.copytree(syn, bad)
    spec = _spec(bad, 1, streams=18)  # 18 steps per epoch: one batch of 20 per stream
    plan = epoch_segments(DatasetIndex.load(bad).shards("train"), 0, spec.seed, 18, B)
    v = next(v for v in range(18) if len({seg.url for seg in plan[v]}) == 1)  # a share in one shard
    url = plan[v][0].url
    Path(url).write_bytes(b"this is not a tar archive\n" * 40)
    stream = Stream(spec, v)
    a, b = stream.next_batch(), stream.next_batch()  # epoch 0, then epoch 1 (the damage met again)
    assert (a.epoch, a.index, b.epoch) == (0, v, 1)
    assert len(a.keys) == B and stream.stats.padded >= B  # every sample of epoch 0 is padding
    assert stream.stats.skipped_unreadable > 0
    assert len(set(a.keys)) == B  # padded from other shares' records, not one record repeated
    again = Stream(spec, v)
    np.testing.assert_array_equal(again.next_batch().images, a.images)  # a function of the seed
    rest = Stream(spec, v, position=a.next_position)
    assert rest.next_batch().keys == b.keys


def test_shard_members_carry_no_pax_header(syn):
    """The writer's members are plain ustar (an integer mtime: a float one adds a pax header to each
    member, which doubles the headers every reader parses; bench/streams.py)."""
    shard = DatasetIndex.load(syn).shards("train")[0].url
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    assert len(members) == 3 * 50  # cls, jpg, json per sample
    assert all(m.pax_headers == {} and m.mtime == 0 for m in members), members[0].pax_headers


def test_a_segment_inside_a_shard_reads_no_data_before_its_start(syn, monkeypatch):
    """Records before a segment's start are counted from their headers: only the segment's own
    members are extracted, and they are the records a whole read finds at those positions."""
    from alexnet.data.records import Segment, read_segment

    shard = DatasetIndex.load(syn).shards("train")[0].url
    whole = [r["__key__"] for r in read_segment(Segment(shard, 0, 50), ReaderStats())]
    extracted: list[str] = []
    real = tarfile.TarFile.extractfile

    def counting(self, member):
        extracted.append(member.name)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", counting)
    stats = ReaderStats()
    got = list(read_segment(Segment(shard, 30, 33), stats))
    assert [r["__key__"] for r in got] == whole[30:33]
    assert all({"jpg", "cls", "json"} <= set(r) for r in got)
    assert sorted({name.rsplit(".", 1)[0] for name in extracted}) == whole[30:33], extracted
    assert len(extracted) == 3 * 3
    assert stats.skipped == 0
