"""Validation passes, planned and read (pure: no Ray). ``alexnet eval`` reads through these in one
process; a run's data workers serve the same batches to the trainer ranks (:mod:`cluster.val`).

A *pass* is one walk over the val split with one crop kind (``center``, or the paper's ``ten``
crops). The global val order is the val shards in name order, laid end to end, cut to
``eval.max_samples`` when that is set. Batch ``j`` is samples ``[j*bs, (j+1)*bs)`` of it; it
belongs to replica ``j % R`` and is produced by the worker whose contiguous run of batches holds
it (worker ``w`` of ``W``: batches ``[w*nb//W, (w+1)*nb//W)``), so each worker reads its shards
once, sequentially. Every rank knows its replica's batches from the index alone, with no call.

Stages (element types in brackets)::

    _records        [(position, Record)]   samples [start, stop) of the val order
    worker_batches  [ValBatch]             each record checked, decoded and cropped at once
                                           (alexnet.data.codec.val_sample), B of them collated
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from dataclasses import dataclass

from alexnet.data.batch import ValBatch
from alexnet.data.codec import VAL_CROPS, collate_val, val_sample
from alexnet.data.index import DatasetIndex, ShardInfo, check_input_size
from alexnet.data.records import MAX_MEMBER_BYTES, ReaderStats, Record, Segment, read_segment


@dataclass(frozen=True)
class ValPlan:
    """Which samples form val batch ``j``, which replica scores it and which worker decodes it."""

    total: int  # samples in the pass: the val split, or its first eval.max_samples
    batch_size: int
    replicas: int
    workers: int

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.replicas < 1 or self.workers < 1 or self.total < 0:
            raise ValueError(f"{self}: need batch_size, replicas, workers >= 1 and total >= 0")

    @classmethod
    def of(
        cls, index: DatasetIndex, batch_size: int, replicas: int, workers: int, max_samples: int = 0
    ) -> ValPlan:
        """The plan over ``index``'s val split (its first ``max_samples`` samples when > 0)."""
        n = index.count("val")
        return cls(min(n, max_samples) if max_samples > 0 else n, batch_size, replicas, workers)

    @property
    def batches(self) -> int:
        """Batches in the pass (the last one may be short)."""
        return -(-self.total // self.batch_size)

    def samples(self, j: int) -> tuple[int, int]:
        """Global sample range ``[start, stop)`` of batch ``j``."""
        return j * self.batch_size, min((j + 1) * self.batch_size, self.total)

    def replica_batches(self, replica: int) -> range:
        """The batches replica ``replica`` scores, in the order its ranks read them."""
        return range(replica, self.batches, self.replicas)

    def worker_batches(self, worker: int) -> range:
        """The contiguous run of batches worker ``worker`` decodes (empty when W > batches)."""
        nb, W = self.batches, self.workers
        return range(worker * nb // W, (worker + 1) * nb // W)

    def worker_of(self, j: int) -> int:
        """The worker that decodes batch ``j``."""
        if not 0 <= j < self.batches:
            raise ValueError(f"val batch {j}: the pass has {self.batches} batches")
        starts = [w * self.batches // self.workers for w in range(self.workers)]
        return bisect.bisect_right(starts, j) - 1  # the last worker starting at or before j: non-empty


def _records(
    shards: list[ShardInfo], start: int, stop: int, stats: ReaderStats, max_member_bytes: int
) -> Iterator[tuple[int, Record]]:
    """(global position, Record) for samples ``[start, stop)`` of the val order. Positions come
    from the shard offsets, so records a truncated shard lost shift nothing after them."""
    pos = 0
    for s in shards:
        a, b = max(start, pos), min(stop, pos + s.count)
        if a < b:
            seg = Segment(s.url, a - pos, b - pos)
            for i, rec in enumerate(read_segment(seg, stats, max_member_bytes=max_member_bytes)):
                yield a + i, rec
        pos += s.count
        if pos >= stop:
            return


def worker_batches(
    index: DatasetIndex,
    plan: ValPlan,
    worker: int,
    crop: str,
    input_size: int,
    stats: ReaderStats,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Iterator[ValBatch]:
    """The val batches of worker ``worker``'s run, in order;
    unusable samples skipped and counted in ``stats`` (``samples``: images decoded and used), so a
    batch may be short or empty."""
    if crop not in VAL_CROPS:
        raise ValueError(f"crop={crop!r}: use 'center' or 'ten'")
    check_input_size(input_size, index.size)
    run = plan.worker_batches(worker)
    if not run:
        return
    start, stop = plan.samples(run.start)[0], plan.samples(run[-1])[1]
    records = _records(index.shards("val"), start, stop, stats, max_member_bytes)
    nxt = next(records, None)
    for j in run:
        t0, end, chunk = time.perf_counter(), plan.samples(j)[1], []
        while nxt is not None and nxt[0] < end:
            stats.records += 1
            sample = val_sample(nxt[1], index.size, input_size, crop, stats)
            if sample is not None:
                stats.samples += 1
                chunk.append(sample)
            nxt = next(records, None)
        batch = collate_val(chunk, crop, input_size, j)
        stats.decode_s += time.perf_counter() - t0
        stats.batches += 1
        yield batch


def short_read(stats: ReaderStats) -> str | None:
    """What a pass lost to shards that are shorter than ``dataset.json`` says or unreadable (one
    line naming them), or None when every promised record was read."""
    lost: dict[str, int] = {}
    for (_, url, reason), n in stats.lost.items():
        if reason in ("truncated", "unreadable"):
            lost[url] = lost.get(url, 0) + n
    if not lost:
        return None
    named = ", ".join(f"{url!r} ({n} samples)" for url, n in sorted(lost.items()))
    return f"{sum(lost.values())} val samples that dataset.json promises could not be read: {named}"
