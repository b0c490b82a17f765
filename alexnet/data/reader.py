"""Deterministic, resumable readers over the shards (no Ray: ``cluster/data.py`` wraps these in actors).

Epoch plan (training)
    ``T = floor(N / B)`` batches per epoch (N training samples in ``dataset.json``, B the global batch);
    the last ``N - T*B`` samples of the epoch's order are dropped (they differ every epoch, since the
    order does). The epoch is cut into ``V`` virtual *streams* (``data.streams``: a property of the run,
    like the seed, stored in its checkpoints; not of the worker count). Batch ``t`` comes from stream
    ``t % V``, so stream ``v`` owns ``n_v = len(range(v, T, V))`` batches. The shards are permuted with
    a seed derived from (seed, epoch), laid end to end and rotated by a per-epoch offset (so a plan of
    few shards is not cut at the same samples every epoch); stream ``v`` reads the contiguous run of
    ``n_v * B`` samples after those of streams ``< v``. The split is at sample granularity (a run may
    start or end inside a shard), so every stream has exactly the samples its batches need whatever the
    shard sizes, no stream is ever empty, and every sample of the epoch is read exactly once. ``V > T``
    is refused (:func:`check_plan`).

    Which samples form batch t, in which order, is thus a function of (seed, epoch, shard plan, V)
    alone. The data workers only host streams (worker ``w`` of ``W`` hosts the streams ``v`` with
    ``v % W == w``, ``W <= V``), so runs with any worker count read the same batches, and a mid-epoch
    checkpoint resumes onto another worker count exactly. Each stream keeps its own shuffle buffer, so
    a worker holds ``V / W`` of them (memory: ``data.shuffle_buffer`` records each).

Stream
    A chain of small generator stages, as webdataset's own pipelines are (element types in brackets)::

        records    [(pass, Record)]   the worker's run, through a shuffle buffer seeded by (seed, epoch,
                                      worker, pass); pass 0 first, then padding passes as long as pulled
        counted    [(pass, Record)]   each record read moves the resume cursor (``consumed``)
        samples    [sample]           the codec's (alexnet.data.codec): a checked record decoded and
                                      cropped at once, or its JPEG bytes with the same draws; unusable
                                      records skipped with a warning, counted once (in pass 0)
        collate    Batch              B samples -> one batch (the codec's; alexnet.data.batch)

    Records that cannot be used (corrupt JPEG, missing ``cls``, the rest of a truncated tar) are skipped
    and counted once (a padding pass re-reads them without counting them again); a shard that cannot be
    opened at all is retried, then skipped with an error naming it and its samples counted. If that
    leaves the stream short of samples, it goes on into a padding pass (the same run again,
    reshuffled) to fill its last batches, counted as ``padded``, so every stream still yields exactly
    ``n_v`` batches and no trainer ever waits for a batch that will not come. A padding pass read whole
    without a usable sample means none will ever come: that is an error, not an endless loop.

Position (JSON)
    ``{"epoch": e, "index": t, "consumed": c, "stream": v, "streams": V, "batch_size": B, "seed": s}``:
    the stream's next batch is batch ``t`` of epoch ``e`` and its epoch-``e`` run has consumed ``c``
    raw records (records of its run after the shuffle buffer, usable or not). Restarting from it replays
    the stream's first ``c`` records without decoding them and continues with exactly the batches the
    uninterrupted stream would have produced. Only :meth:`Stream._batches` (batch boundaries) and
    the ``counted`` stage (records) move the cursor.

Validation reads the same record stages without shuffle or padding (:mod:`alexnet.data.val`).
Augmentation draws depend only on (seed, epoch, key): see :mod:`alexnet.data.transforms`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from alexnet.data.batch import Batch
from alexnet.data.codec import Codec, training_codec
from alexnet.data.index import DatasetIndex, ShardInfo, check_input_size
from alexnet.data.records import MAX_MEMBER_BYTES, ReaderStats, Record, Segment, read_records, shuffled
from alexnet.data.transforms import Augmentation, lighting_matrix

log = logging.getLogger("alexnet.data")


@dataclass(frozen=True)
class ReaderSpec:
    """What a training data worker needs (JSON-serialisable via ``to_dict``/``from_dict``).

    url: shard directory; batch_size: global batch B; input_size: crop side S; workers: W (the
    actors hosting the streams); seed: augmentation and shuffle seed; shuffle_buffer: records per
    stream (0 = no buffer, shard order only); streams: V, the epoch's virtual streams (a property of
    the run: :func:`resolve_streams`); encoded: ship JPEG bytes and augmentation parameters instead
    of decoded crops (:mod:`alexnet.data.encoded`; the trainer decodes); max_sample_bytes: a shard
    member larger than this is a corrupt sample, never read; crop, flip, lighting: the augmentation
    switches (:class:`~alexnet.data.transforms.Augmentation`).
    """

    url: str
    batch_size: int
    input_size: int
    workers: int = 1
    seed: int = 0
    shuffle_buffer: int = 1000
    split: str = "train"
    streams: int = 1
    encoded: bool = False
    max_sample_bytes: int = MAX_MEMBER_BYTES
    crop: str = "random"
    flip: bool = True
    lighting: bool = True

    @property
    def augmentation(self) -> Augmentation:
        """The training augmentation switched on (the one place both decode paths draw with)."""
        return Augmentation(self.crop, self.flip, self.lighting)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be positive")
        if self.workers < 1:
            raise ValueError(f"data workers={self.workers}: need at least 1")
        if self.streams < 1:
            raise ValueError(f"streams={self.streams}: need at least 1 (resolve data.streams=0 first)")
        if self.workers > self.streams:
            raise ValueError(streams_message(self.workers, self.streams))
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer}: must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReaderSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


# -- the epoch plan ----------------------------------------------------------------------------


def steps_per_epoch(total: int, batch_size: int) -> int:
    """Batches per training epoch: the remainder ``total % batch_size`` is dropped."""
    return total // batch_size


AUTO_STREAMS = 16  # data.streams = 0: min(T, this); the most data workers such a run can use


def resolve_streams(streams: int, batches: int) -> int:
    """``data.streams`` as a run uses it: ``streams``, or ``min(batches, AUTO_STREAMS)`` for 0."""
    return streams if streams > 0 else min(batches, AUTO_STREAMS)


def streams_message(workers: int, streams: int) -> str:
    """The one message for "more data workers than streams" (a worker would host none)."""
    return (
        f"data.workers={workers} exceeds data.streams={streams} (the epoch is read as {streams} "
        f"streams, each hosted by one worker): use at most {streams} workers, or start a new run with "
        f"--set data.streams={workers} or more"
    )


def _check_streams(streams: int, batches: int, batch_size: int, samples: int) -> None:
    """The one check of "more streams than batches" (a stream with no batch would leave its
    consumers waiting forever)."""
    if streams > batches:
        raise ValueError(
            f"data.streams={streams} exceeds the {batches} batches of {batch_size} per epoch ({samples} "
            f"samples): use at most {batches} streams (and workers), a smaller batch, or more data"
        )


def check_plan(
    index: DatasetIndex,
    batch_size: int,
    input_size: int,
    workers: int,
    streams: int,
    split: str = "train",
) -> int:
    """The one check of a reader's sizes against the dataset; returns the batches per epoch.

    Refuses crops larger than the stored images, a batch larger than the split, more streams than
    batches and more data workers than streams (``streams``: V, ``data.streams``; 0:
    :func:`resolve_streams`). The messages name the job-config keys, since that is where a user
    sets these.
    """
    check_input_size(input_size, index.size)
    n = index.count(split)
    t = steps_per_epoch(n, batch_size)
    if t < 1:
        raise ValueError(f"optim.batch_size={batch_size} exceeds the {n} {split} images: use a smaller batch")
    v = resolve_streams(streams, t)
    if workers > t:
        raise ValueError(
            f"data.workers={workers} exceeds the {t} batches of {batch_size} per epoch ({n} "
            f"samples): use at most {t} workers, a smaller batch, or more data"
        )
    _check_streams(v, t, batch_size, n)
    if workers > v:
        raise ValueError(streams_message(workers, v))
    return t


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) for w in words])


def epoch_segments(
    shards: list[ShardInfo], epoch: int, seed: int, streams: int, batch_size: int
) -> list[list[Segment]]:
    """Per stream, the shard segments it reads in ``epoch`` (see module docstring)."""
    total = sum(s.count for s in shards)
    t = steps_per_epoch(total, batch_size)
    _check_streams(streams, t, batch_size, total)
    order = _rng(seed, epoch, 0x5A4D).permutation(len(shards))
    # The permuted shards laid end to end, then rotated by a per-epoch offset: without it, a shard
    # plan with few shards (a small set: 1,500 images in 2 shards) would cut the same runs every
    # epoch, so each batch would hold nearly the same samples epoch after epoch (a stream's shuffle
    # buffer only mixes within its run). With it the cut points move by a random amount each epoch,
    # at the cost of one shard read in two pieces.
    pieces = [(shards[k].url, 0, shards[k].count) for k in order if shards[k].count > 0]
    o = int(_rng(seed, epoch, 0x0F5E).integers(total)) if total else 0
    for i, (url, _, n) in enumerate(pieces):
        if o < n:
            head = [(url, o, n)] + pieces[i + 1 :] + pieces[:i]
            pieces = head + ([(url, 0, o)] if o else [])
            break
        o -= n
    bounds = [0]
    for v in range(streams):
        bounds.append(bounds[-1] + len(range(v, t, streams)) * batch_size)
    plan: list[list[Segment]] = [[] for _ in range(streams)]
    pos, v = 0, 0
    for url, a, b in pieces:
        while a < b and v < streams:
            take = min(b - a, bounds[v + 1] - pos)
            if take > 0:
                plan[v].append(Segment(url, a, a + take))
                a, pos = a + take, pos + take
            if pos == bounds[v + 1]:
                v += 1
        if v == streams:
            break
    return plan


def val_segments(shards: list[ShardInfo], workers: int) -> list[list[Segment]]:
    """Validation: shards in name order, cut into ``workers`` contiguous runs of near-equal sample counts."""
    total = sum(s.count for s in shards)
    bounds = [total * w // workers for w in range(workers + 1)]
    plan: list[list[Segment]] = [[] for _ in range(workers)]
    pos = 0
    for s in shards:
        for w in range(workers):
            a, b = max(bounds[w], pos), min(bounds[w + 1], pos + s.count)
            if a < b:
                plan[w].append(Segment(s.url, a - pos, b - pos))
        pos += s.count
    return plan


# -- training ----------------------------------------------------------------------------------


@dataclass
class _Cursor:
    """Where a stream stands: its next batch is ``index`` of ``epoch``, and its run of that epoch has
    consumed ``consumed`` raw records (after the shuffle buffer, usable or not)."""

    epoch: int
    index: int
    consumed: int = 0


class Stream:
    """Training batches of stream ``stream`` of ``spec.streams``, epoch after epoch, resumable.

    ``position``: a dict from :meth:`position` (or None: epoch ``start_epoch``, first batch).
    Iterate with :meth:`next_batch`: :class:`alexnet.data.batch.Batch` es, each with its ``epoch``,
    ``index`` (batch index within the epoch), ``stream``, ``position`` (where it started) and
    ``next_position`` (where the next one starts).
    """

    def __init__(
        self,
        spec: ReaderSpec,
        stream: int,
        position: dict | None = None,
        index: DatasetIndex | None = None,
        start_epoch: int = 0,
    ) -> None:
        if not 0 <= stream < spec.streams:
            raise ValueError(f"stream={stream}: must be in [0, {spec.streams})")
        self.spec, self.stream = spec, stream
        self.index = index or DatasetIndex.load(spec.url)
        self.steps_per_epoch = check_plan(
            self.index, spec.batch_size, spec.input_size, spec.workers, spec.streams, spec.split
        )
        self.shards = self.index.shards(spec.split)
        light = lighting_matrix(self.index.eigenvalues, self.index.eigenvectors)
        size, aug = self.index.size, spec.augmentation
        self.codec: Codec = training_codec(spec.encoded, spec.seed, size, spec.input_size, light, aug)
        self.stats = ReaderStats()
        self._padding_damage = ReaderStats()  # what padding passes meet again: see _damage
        self._cursor = _Cursor(start_epoch, stream)
        if position is not None:
            self._restore(position)
        self._it: Iterator[Batch] | None = None

    # -- the resume cursor -------------------------------------------------------------------
    def position(self) -> dict[str, int]:
        """Where the next batch starts (JSON)."""
        c = self._cursor
        if c.index >= self.steps_per_epoch:  # this epoch's batches are done: the next epoch's first
            return self._position(c.epoch + 1, self.stream, 0)
        return self._position(c.epoch, c.index, c.consumed)

    def _position(self, epoch: int, index: int, consumed: int) -> dict[str, int]:
        s = self.spec
        return {
            "epoch": epoch,
            "index": index,
            "consumed": consumed,
            "stream": self.stream,
            "streams": s.streams,
            "batch_size": s.batch_size,
            "seed": s.seed,
        }

    def _restore(self, p: dict) -> None:
        s = self.spec
        want = {"stream": self.stream, "streams": s.streams, "batch_size": s.batch_size, "seed": s.seed}
        got = {k: p.get(k) for k in want}
        if got != want:
            raise ValueError(
                f"data position {got} does not match this reader {want}: a position resumes only with the "
                "same data.streams, batch size and seed"
            )
        if (p["index"] - self.stream) % s.streams:
            raise ValueError(f"data position index={p['index']} is not a batch of stream {self.stream}")
        self._cursor = _Cursor(int(p["epoch"]), int(p["index"]), int(p["consumed"]))

    def _replay(self, records: Iterator[tuple[int, Record]]) -> None:
        """Read, without decoding, the records the cursor says this epoch's stream already consumed."""
        for _ in itertools.islice(records, self._cursor.consumed):
            self.stats.records += 1

    def _counted(self, records: Iterator[tuple[int, Record]]) -> Iterator[tuple[int, Record]]:
        """(pass, Record) -> the same; each record read moves the cursor."""
        for item in records:
            self._cursor.consumed += 1
            self.stats.records += 1
            yield item

    # -- the stages --------------------------------------------------------------------------
    def _damage(self, p: int) -> ReaderStats:
        """Where pass ``p`` counts skipped records: pass 0 in :attr:`stats`. A padding pass re-reads
        pass 0's records, so its skips are not counted again (they go to a scratch object)."""
        return self.stats if p == 0 else self._padding_damage

    def _records(self, epoch: int) -> Iterator[tuple[int, Record]]:
        """(pass, Record): this stream's run of ``epoch``, then padding passes for as long as pulled."""
        s = self.spec
        plan = epoch_segments(self.shards, epoch, s.seed, s.streams, s.batch_size)
        segments = plan[self.stream]
        self.stats.epoch = epoch  # the epochs of a stream are read one after the other
        for p in itertools.count():
            n = 0
            rng = _rng(s.seed, epoch, self.stream, p)
            records = read_records(segments, self._damage(p), s.max_sample_bytes)
            for rec in shuffled(records, s.shuffle_buffer, rng):
                n += 1
                yield p, rec
            if n == 0 and p == 0 and s.streams > 1:
                # The whole share lies in damaged shards (likely when a small dataset is cut into
                # many streams). The damage is counted, and data.max_skipped_fraction judges it;
                # the stream pads from the other streams' shares, in stream order after its own,
                # so the batches stay a function of (seed, epoch, stream) and resume exactly.
                log.warning(
                    "data stream %d: no readable record in its share of epoch %d; padding it from "
                    "the other streams' shares",
                    self.stream,
                    epoch,
                )
                others = [plan[(self.stream + k) % s.streams] for k in range(1, s.streams)]
                segments = [seg for share in others for seg in share]
            elif n == 0:
                raise RuntimeError(f"data stream {self.stream}: no readable record in epoch {epoch}")

    def _samples(self, records: Iterator[tuple[int, Record]], epoch: int) -> Iterator[Any]:
        """(pass, Record) -> sample (the codec's: an augmented crop, or JPEG bytes and their draws);
        unusable records skipped, counted by :meth:`_damage`; ``samples`` and ``padded`` counted.

        Every pass reads the same records, so a padding pass read whole without one usable sample
        means none will ever come: an error. The first pass this stage sees is never judged, since
        after a resume's replay it may start part-way.
        """
        first = current = None
        usable = 0
        for p, rec in records:
            if p != current:
                if current is not None and current != first and usable == 0:
                    raise RuntimeError(f"data stream {self.stream}: no usable sample in epoch {epoch}")
                first = p if first is None else first
                current, usable = p, 0
            sample = self.codec.sample(rec, epoch, self._damage(p))
            if sample is not None:
                usable += 1
                self.stats.samples += 1
                self.stats.padded += p > 0
                yield sample

    def _epoch_samples(self, epoch: int) -> Iterator[Any]:
        """The stages of ``epoch`` from the cursor on (its consumed records replayed first)."""
        records = self._records(epoch)
        self._replay(records)
        return self._samples(self._counted(records), epoch)

    def _batches(self) -> Iterator[Batch]:
        """Batches from the cursor on, epoch after epoch; moves the cursor at batch boundaries."""
        c = self._cursor
        while True:
            if c.index >= self.steps_per_epoch:  # the epoch's batches are done: the next one's first
                c.epoch, c.index, c.consumed = c.epoch + 1, self.stream, 0
            samples = self._epoch_samples(c.epoch)
            while c.index < self.steps_per_epoch:
                start = self.position()
                t0 = time.perf_counter()
                batch = self.codec.collate(list(itertools.islice(samples, self.spec.batch_size)))
                self.stats.decode_s += time.perf_counter() - t0
                self.stats.batches += 1
                c.index += self.spec.streams
                yield dataclasses.replace(
                    batch,
                    epoch=c.epoch,
                    index=start["index"],
                    stream=self.stream,
                    position=start,
                    next_position=self.position(),
                )

    def next_batch(self) -> Batch:
        """The next batch of this stream (crossing into the next epoch when one ends)."""
        if self._it is None:
            self._it = self._batches()
        return next(self._it)


def epoch_batches(spec: ReaderSpec, epoch: int, index: DatasetIndex | None = None) -> Iterator[Batch]:
    """Every batch of one epoch in order, batch t from stream t % V (the single-process reference:
    it does not depend on ``spec.workers``)."""
    index = index or DatasetIndex.load(spec.url)
    streams = [Stream(spec, v, index=index, start_epoch=epoch) for v in range(spec.streams)]
    for t in range(streams[0].steps_per_epoch):
        yield streams[t % spec.streams].next_batch()
