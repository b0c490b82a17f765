"""Deterministic, resumable readers over the shards (no Ray: ``cluster/data.py`` wraps these in actors).

Epoch plan (training)
    ``T = floor(N / B)`` batches per epoch (N training samples in ``dataset.json``, B the global batch);
    the last ``N - T*B`` samples of the epoch's order are dropped (they differ every epoch, since the
    order does). The epoch is cut into ``V`` virtual *streams* (``data.streams``: a property of the run,
    like the seed, stored in its checkpoints; not of the worker count). Batch ``t`` comes from stream
    ``t % V``, so stream ``v`` owns ``n_v = len(range(v, T, V))`` batches. The shards are permuted with
    a seed derived from (seed, epoch), laid end to end and rotated by a per-epoch offset (so a plan of
    few shards is not cut at the same samples every epoch; ``ReaderSpec.rotate``, off for runs whose
    checkpoints were written before it); stream ``v`` reads the contiguous run of
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
        decoded    [(pass, Decoded)]  unusable records skipped with a warning, counted once (in pass 0)
        augmented  [Augmented]        the paper's crop, flip and PCA lighting, drawn from (seed, epoch, key)
        collate    batch dict         B samples into preallocated uint8 / int64 / float32 arrays

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

Validation: the same ``records -> decoded`` stages without shuffle or padding, then a center or
10-crop (:func:`val_batches`). Augmentation draws depend only on (seed, epoch, key): see
:mod:`alexnet.data.transforms`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import fsspec
import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_iterator

from alexnet.data.index import DatasetIndex, ShardInfo, check_input_size
from alexnet.data.transforms import (
    Augmentation,
    center_crop,
    decode_image,
    draw_augmentation,
    lighting_matrix,
    lighting_offset,
    ten_crop,
    train_crop,
)

log = logging.getLogger("alexnet.data")

Record = dict  # {"__key__": str, "jpg": bytes, "cls": bytes, "__url__": str, ...} as grouped by webdataset


class Decoded(NamedTuple):
    """A usable record: its image as stored, uint8 (3, H, W), and its label."""

    key: str
    image: torch.Tensor
    label: int


class Augmented(NamedTuple):
    """A training sample ready to collate: crop uint8 (3, S, S) (a view unless flipped), label,
    lighting offset (3,) float32 pixel units; ``padded``: it comes from a padding pass."""

    key: str
    crop: torch.Tensor
    label: int
    lighting: np.ndarray
    padded: bool


@dataclass(frozen=True)
class Segment:
    """Records ``[start, stop)`` of one shard."""

    url: str
    start: int
    stop: int


@dataclass(frozen=True)
class ReaderSpec:
    """What a training data worker needs (JSON-serialisable via ``to_dict``/``from_dict``).

    url: shard directory; batch_size: global batch B; input_size: crop side S; workers: W (the
    actors hosting the streams); seed: augmentation and shuffle seed; shuffle_buffer: records per
    stream (0 = no buffer, shard order only); streams: V (0: as many as ``workers``, the layout of
    checkpoints written before streams existed); encoded: ship JPEG bytes and augmentation
    parameters instead of decoded crops (:mod:`alexnet.data.encoded`; the trainer decodes);
    rotate: cut each epoch's shard sequence at a per-epoch offset (:func:`epoch_segments`);
    crop, flip, lighting: the augmentation switches (:class:`~alexnet.data.transforms.Augmentation`).
    """

    url: str
    batch_size: int
    input_size: int
    workers: int = 1
    seed: int = 0
    shuffle_buffer: int = 1000
    split: str = "train"
    streams: int = 0
    encoded: bool = False
    rotate: bool = True
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
        if self.streams == 0:
            object.__setattr__(self, "streams", self.workers)
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


@dataclass
class ReaderStats:
    """Counters a reader exposes for metrics (``as_dict`` for Prometheus)."""

    records: int = 0  # raw records read (including replayed ones when resuming)
    samples: int = 0  # decoded and used
    skipped_corrupt: int = 0  # image bytes that do not decode (or have the wrong size)
    skipped_missing: int = 0  # records without jpg or cls
    skipped_truncated: int = 0  # records lost because their shard ended early (truncated tar)
    skipped_unreadable: int = 0  # records of shards that could not be opened at all (after retries)
    truncated_shards: int = 0  # shards that ended in a read error (truncated or corrupt tar)
    unreadable_shards: int = 0  # shards that could not be opened or read at all, after retries
    padded: int = 0  # samples reused to fill a worker's last batches after skips
    batches: int = 0
    decode_s: float = 0.0  # time spent reading + decoding + augmenting + collating
    # the skipped samples by (epoch, shard url, reason), for the run's data.max_skipped_fraction;
    # ``epoch`` is the one being read (set by Stream)
    lost: dict[tuple[int, str, str], int] = dataclasses.field(default_factory=dict)
    epoch: int = 0

    def lose(self, reason: str, shard: str, n: int = 1) -> None:
        """Count ``n`` samples of ``shard`` skipped for ``reason`` (corrupt, missing, truncated,
        unreadable) in the epoch being read."""
        setattr(self, f"skipped_{reason}", getattr(self, f"skipped_{reason}") + n)
        key = (self.epoch, shard, reason)
        self.lost[key] = self.lost.get(key, 0) + n

    @property
    def skipped(self) -> int:
        """All skipped records."""
        return self.skipped_corrupt + self.skipped_missing + self.skipped_truncated + self.skipped_unreadable

    def as_dict(self) -> dict[str, float]:
        """Counters plus ``skipped`` and ``decode_images_per_s``."""
        d = dataclasses.asdict(self)
        d["skipped"] = self.skipped
        d["decode_images_per_s"] = self.samples / self.decode_s if self.decode_s > 0 else 0.0
        return d


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
    split: str = "train",
    streams: int | None = None,
) -> int:
    """The one check of a reader's sizes against the dataset; returns the batches per epoch.

    Refuses crops larger than the stored images, a batch larger than the split, more streams than
    batches and more data workers than streams (``streams``: V; None: as many as ``workers``; 0:
    :func:`resolve_streams`). The messages name the job-config keys, since that is where a user
    sets these.
    """
    check_input_size(input_size, index.size)
    n = index.count(split)
    t = steps_per_epoch(n, batch_size)
    if t < 1:
        raise ValueError(f"optim.batch_size={batch_size} exceeds the {n} {split} images: use a smaller batch")
    v = workers if streams is None else resolve_streams(streams, t)
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
    shards: list[ShardInfo], epoch: int, seed: int, streams: int, batch_size: int, rotate: bool = True
) -> list[list[Segment]]:
    """Per stream, the shard segments it reads in ``epoch`` (see module docstring; ``rotate``
    False: the plan of runs started before the rotation, which their checkpoints resume into)."""
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
    o = int(_rng(seed, epoch, 0x0F5E).integers(total)) if total and rotate else 0
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


# -- stages shared by training and validation --------------------------------------------------

OPEN_RETRIES = 2  # further tries of a shard that fails before its first record (e.g. a network blip)
RETRY_WAIT_S = 0.5  # first wait between tries; doubles each time


def read_segment(
    seg: Segment, stats: ReaderStats, retries: int = OPEN_RETRIES, wait_s: float = RETRY_WAIT_S
) -> Iterator[Record]:
    """Records ``[start, stop)`` of a shard; never raises on bad data.

    A shard that fails before its first record (cannot be opened, or not a tar) is tried
    ``retries`` more times, then skipped with an error naming it, its records counted in
    ``skipped_unreadable``. A shard that ends early (truncated, or a read error mid-way) keeps the
    records read so far; the rest of the segment is counted in ``skipped_truncated``. Retrying is
    safe only before the first record: after it, a second try would repeat records.
    """
    for attempt in range(retries + 1):
        i = 0
        try:
            with fsspec.open(seg.url, "rb") as f:
                files = ({**r, "__url__": seg.url} for r in tar_file_iterator(f))
                for rec in group_by_keys(files):
                    if i >= seg.stop:
                        return
                    if i >= seg.start:
                        yield rec
                    i += 1
            error = "the tar ends early"
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        if i >= seg.stop:
            return
        if i == 0 and attempt < retries:
            log.warning(
                "shard %s: cannot read it (%s); try %d of %d", seg.url, error, attempt + 2, retries + 1
            )
            time.sleep(wait_s * 2**attempt)
            continue
        _count_lost(seg, i, retries + 1, error, stats)
        return


def _count_lost(seg: Segment, read: int, tries: int, error: str, stats: ReaderStats) -> None:
    """Count (and log) the records of ``seg`` that a read error after ``read`` records lost."""
    lost = seg.stop - max(read, seg.start)
    if read == 0:
        stats.unreadable_shards += 1
        stats.lose("unreadable", seg.url, lost)
        msg = "shard %s: cannot be opened or read after %d tries (%s); skipping its %d samples"
        log.error(msg, seg.url, tries, error, lost)
    else:
        stats.truncated_shards += 1
        stats.lose("truncated", seg.url, lost)
        msg = "shard %s: read error after %d records (%s); skipping its other %d samples"
        log.warning(msg, seg.url, read, error, lost)


def read_records(segments: Iterable[Segment], stats: ReaderStats) -> Iterator[Record]:
    """Segments -> their records, in order (lost records counted in ``stats``)."""
    for seg in segments:
        yield from read_segment(seg, stats)


def shuffled(records: Iterator[Record], size: int, rng: np.random.Generator) -> Iterator[Record]:
    """Record -> Record through a seeded shuffle buffer of ``size`` (same input and seed, same order)."""
    if size <= 1:
        yield from records
        return
    buf: list[Record] = []
    for rec in records:
        if len(buf) < size:
            buf.append(rec)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = rec
    for j in rng.permutation(len(buf)):
        yield buf[j]


def _label(rec: Record) -> int | None:
    try:
        return int(rec["cls"])
    except (KeyError, ValueError, TypeError):
        return None


def decode_record(rec: Record, input_size: int, stats: ReaderStats) -> Decoded | None:
    """Decode one record, or None with a warning and a count in ``stats`` if it is unusable."""
    label = _label(rec)
    data = rec.get("jpg")
    if label is None or data is None:
        stats.lose("missing", rec.get("__url__", "?"))
        log.warning("sample %s in %s: missing jpg or cls; skipped", rec.get("__key__"), rec.get("__url__"))
        return None
    try:
        img = decode_image(data)
    except Exception as e:  # any decoder error: a corrupt sample, never a crash
        stats.lose("corrupt", rec.get("__url__", "?"))
        log.warning("sample %s in %s: cannot decode (%s); skipped", rec["__key__"], rec.get("__url__"), e)
        return None
    h, w = img.shape[-2:]
    if h != w or h < input_size:
        stats.lose("corrupt", rec.get("__url__", "?"))
        msg = "sample %s: image %dx%d, expected square >= %d px; skipped"
        log.warning(msg, rec["__key__"], h, w, input_size)
        return None
    return Decoded(rec["__key__"], img, label)


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
    Iterate with :meth:`next_batch`. Batch dict (numpy): ``images`` uint8 (B, 3, S, S), ``labels``
    int64 (B,), ``lighting`` float32 (B, 3) pixel units, ``keys`` list[str], ``epoch``, ``index``
    (batch index within the epoch), ``stream``, ``position`` (where this batch started) and
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
            self.index, spec.batch_size, spec.input_size, spec.workers, spec.split, spec.streams
        )
        self.shards = self.index.shards(spec.split)
        self._light = lighting_matrix(self.index.eigenvalues, self.index.eigenvectors)
        self.stats = ReaderStats()
        self._padding_damage = ReaderStats()  # what padding passes meet again: see _damage
        self._cursor = _Cursor(start_epoch, stream)
        if position is not None:
            self._restore(position)
        self._it: Iterator[dict] | None = None

    # -- the resume cursor -------------------------------------------------------------------
    def position(self) -> dict[str, int]:
        """Where the next batch starts (JSON)."""
        c = self._cursor
        if c.index >= self.steps_per_epoch:  # this epoch's batches are done: the next epoch's first
            return self._position(c.epoch + 1, self.stream, 0)
        return self._position(c.epoch, c.index, c.consumed)

    def next_key(self) -> tuple[int, int]:
        """(epoch, index) of the next batch this stream yields."""
        p = self.position()
        return p["epoch"], p["index"]

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
        p = upgrade_position(p)
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
        plan = epoch_segments(self.shards, epoch, s.seed, s.streams, s.batch_size, s.rotate)
        segments = plan[self.stream]
        self.stats.epoch = epoch  # the epochs of a stream are read one after the other
        for p in itertools.count():
            n = 0
            rng = _rng(s.seed, epoch, self.stream, p)
            for rec in shuffled(read_records(segments, self._damage(p)), s.shuffle_buffer, rng):
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

    def _decoded(
        self, records: Iterator[tuple[int, Record]], epoch: int, use: Callable[..., Any] | None = None
    ) -> Iterator[tuple[int, Any]]:
        """(pass, Record) -> (pass, Decoded); unusable records skipped, counted by :meth:`_damage`.
        ``use(record, stats)``: the sample of a record or None (default :func:`decode_record`; the
        encoded path draws the augmentation from the JPEG header instead of decoding).

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
            if use is None:
                sample = decode_record(rec, self.spec.input_size, self._damage(p))
            else:
                sample = use(rec, self._damage(p))
            if sample is not None:
                usable += 1
                yield p, sample

    def _augmented(self, samples: Iterator[tuple[int, Decoded]], epoch: int) -> Iterator[Augmented]:
        """(pass, Decoded) -> Augmented: the paper's crop, flip and lighting, from (seed, epoch, key)."""
        S = self.spec.input_size
        for p, (key, img, label) in samples:
            d = draw_augmentation(self.spec.seed, epoch, key, img.shape[-1], S, self.spec.augmentation)
            self.stats.samples += 1
            self.stats.padded += p > 0
            yield Augmented(key, train_crop(img, d, S), label, lighting_offset(d.alpha, self._light), p > 0)

    def _collate(self, samples: Iterator[Augmented]) -> dict[str, Any]:
        """The next B samples -> ``images`` uint8 (B, 3, S, S), ``labels`` (B,), ``lighting`` (B, 3),
        ``keys``."""
        B, S = self.spec.batch_size, self.spec.input_size
        images = np.empty((B, 3, S, S), np.uint8)
        out = torch.from_numpy(images)  # the crops are copied straight into the batch's memory
        labels, lighting, keys = np.empty(B, np.int64), np.empty((B, 3), np.float32), []
        for i, a in enumerate(itertools.islice(samples, B)):
            out[i].copy_(a.crop)
            labels[i], lighting[i] = a.label, a.lighting
            keys.append(a.key)
        return {"images": images, "labels": labels, "lighting": lighting, "keys": keys}

    def _drawn(self, samples: Iterator[tuple[int, Any]]) -> Iterator[Any]:
        """(pass, Encoded) -> Encoded, counted as :meth:`_augmented` counts (the encoded path)."""
        for p, e in samples:
            self.stats.samples += 1
            self.stats.padded += p > 0
            yield e

    def _collate_encoded(self, samples: Iterator[Any]) -> dict[str, Any]:
        """The next B encoded samples -> :func:`alexnet.data.encoded.collate_encoded`'s batch."""
        from alexnet.data.encoded import collate_encoded

        return collate_encoded(list(itertools.islice(samples, self.spec.batch_size)), self.spec.input_size)

    def _epoch_samples(self, epoch: int) -> Iterator[Any]:
        """The stages of ``epoch`` from the cursor on (its consumed records replayed first)."""
        records = self._records(epoch)
        self._replay(records)
        if not self.spec.encoded:
            return self._augmented(self._decoded(self._counted(records), epoch), epoch)
        from alexnet.data.encoded import draw_encoded

        s, side = self.spec, self.index.size

        def use(rec: Record, stats: ReaderStats) -> Any:
            return draw_encoded(rec, s.seed, epoch, side, s.input_size, self._light, stats, s.augmentation)

        return self._drawn(self._decoded(self._counted(records), epoch, use))

    def _batches(self) -> Iterator[dict]:
        """Batch dicts from the cursor on, epoch after epoch; moves the cursor at batch boundaries."""
        c = self._cursor
        while True:
            if c.index >= self.steps_per_epoch:  # the epoch's batches are done: the next one's first
                c.epoch, c.index, c.consumed = c.epoch + 1, self.stream, 0
            samples = self._epoch_samples(c.epoch)
            while c.index < self.steps_per_epoch:
                start = self.position()
                t0 = time.perf_counter()
                batch = self._collate(samples) if not self.spec.encoded else self._collate_encoded(samples)
                self.stats.decode_s += time.perf_counter() - t0
                self.stats.batches += 1
                c.index += self.spec.streams
                where = {"epoch": c.epoch, "index": start["index"], "stream": self.stream}
                yield {**batch, **where, "position": start, "next_position": self.position()}

    def next_batch(self) -> dict:
        """The next batch of this stream (crossing into the next epoch when one ends)."""
        if self._it is None:
            self._it = self._batches()
        return next(self._it)


def epoch_batches(spec: ReaderSpec, epoch: int, index: DatasetIndex | None = None) -> Iterator[dict]:
    """Every batch of one epoch in order, batch t from stream t % V (the single-process reference:
    it does not depend on ``spec.workers``)."""
    index = index or DatasetIndex.load(spec.url)
    streams = [Stream(spec, v, index=index, start_epoch=epoch) for v in range(spec.streams)]
    for t in range(streams[0].steps_per_epoch):
        yield streams[t % spec.streams].next_batch()


def upgrade_position(p: dict) -> dict:
    """A data position in today's keys: checkpoints written before streams existed say ``worker``
    and ``workers``; their worker ``w`` of ``W`` read exactly what stream ``w`` of ``V = W`` reads
    now (the same segments and shuffle seeds), so the position carries over unchanged."""
    if "stream" in p or "worker" not in p:
        return p
    q = {k: v for k, v in p.items() if k not in ("worker", "workers")}
    return {**q, "stream": p["worker"], "streams": p["workers"]}


# -- validation --------------------------------------------------------------------------------


def decoded(records: Iterable[Record], input_size: int, stats: ReaderStats) -> Iterator[Decoded]:
    """Record -> Decoded; counts ``records`` and ``samples``, skips unusable records (counted)."""
    for rec in records:
        stats.records += 1
        sample = decode_record(rec, input_size, stats)
        if sample is not None:
            stats.samples += 1
            yield sample


def val_batches(
    url: str,
    batch_size: int,
    input_size: int,
    crop: str = "center",
    worker: int = 0,
    workers: int = 1,
    stats: ReaderStats | None = None,
    index: DatasetIndex | None = None,
) -> Iterator[dict]:
    """Validation batches of worker ``worker`` of ``workers``: together every val sample exactly once.

    ``crop="center"``: ``images`` uint8 (b, 3, S, S); ``crop="ten"``: (b, 10, 3, S, S), the paper's
    10 patches (average the softmax over them). The last batch may be smaller; ``lighting`` is zeros.
    Unusable samples are skipped and counted in ``stats``.
    """
    if crop not in ("center", "ten"):
        raise ValueError(f"crop={crop!r}: use 'center' or 'ten'")
    index = index or DatasetIndex.load(url)
    stats = stats if stats is not None else ReaderStats()
    if not 0 <= worker < workers:
        raise ValueError(f"worker={worker}: must be in [0, {workers})")
    check_input_size(input_size, index.size)
    crop_fn = center_crop if crop == "center" else ten_crop
    samples = decoded(
        read_records(val_segments(index.shards("val"), workers)[worker], stats), input_size, stats
    )
    for n in itertools.count():
        t0 = time.perf_counter()
        chunk = list(itertools.islice(samples, batch_size))
        if not chunk:
            return
        images = torch.stack([crop_fn(s.image, input_size) for s in chunk]).numpy()
        stats.decode_s += time.perf_counter() - t0
        stats.batches += 1
        yield {
            "images": images,
            "labels": np.asarray([s.label for s in chunk], np.int64),
            "lighting": np.zeros((len(chunk), 3), np.float32),
            "keys": [s.key for s in chunk],
            "epoch": 0,
            "index": n,
            "worker": worker,
        }
