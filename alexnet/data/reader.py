"""Deterministic, resumable readers over the shards (no Ray: ``cluster/data.py`` wraps these in actors).

Epoch plan (training)
    ``T = floor(N / B)`` batches per epoch (N training samples in ``dataset.json``, B the global batch);
    the last ``N - T*B`` samples of the epoch's order are dropped (they differ every epoch, since the
    order does). Batch ``t`` comes from worker ``t % W``, so worker ``w`` owns ``n_w = len(range(w, T, W))``
    batches. The shards are permuted with a seed derived from (seed, epoch) and laid end to end; worker
    ``w`` reads the contiguous run of ``n_w * B`` samples after those of workers ``< w``. The split is at
    sample granularity (a run may start or end inside a shard), so every worker has exactly the samples
    its batches need whatever the shard sizes, no worker is ever empty, and every sample of the epoch is
    read exactly once. ``W > T`` (more workers than batches) is refused.

Worker stream
    The worker's records pass through a shuffle buffer seeded by (seed, epoch, worker). Records that
    cannot be used (corrupt JPEG, missing ``cls``, the rest of a truncated tar) are skipped with a
    warning and counted, once (a padding pass does not count them again); a shard that cannot be
    opened at all is retried, then skipped with an error naming it and its samples counted. If that
    leaves the worker short of samples, its stream wraps around to the start of its run (a second
    pass, same order) to fill its last batches, counted as ``padded``, so
    every worker still yields exactly ``n_w`` batches and no trainer ever waits for a batch that will
    not come.

Position (JSON)
    ``{"epoch": e, "index": t, "consumed": c, "worker": w, "workers": W, "batch_size": B, "seed": s}``:
    the worker's next batch is batch ``t`` of epoch ``e`` and its epoch-``e`` stream has consumed ``c``
    raw records (records of its run after the shuffle buffer, usable or not). Restarting from it replays
    the stream's first ``c`` records without decoding them and continues with exactly the batches the
    uninterrupted stream would have produced.

Augmentation draws depend only on (seed, epoch, key): see :mod:`alexnet.data.transforms`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_iterator

from alexnet.data.index import DatasetIndex, ShardInfo
from alexnet.data.transforms import center_crop, decode_image, draw_augmentation, ten_crop, train_crop

log = logging.getLogger("alexnet.data")

Record = dict  # {"__key__": str, "jpg": bytes, "cls": bytes, ...} as grouped by webdataset


@dataclass(frozen=True)
class Segment:
    """Records ``[start, stop)`` of one shard."""

    url: str
    start: int
    stop: int


@dataclass(frozen=True)
class ReaderSpec:
    """What a training data worker needs (JSON-serialisable via ``to_dict``/``from_dict``).

    url: shard directory; batch_size: global batch B; input_size: crop side S; workers: W;
    seed: augmentation and shuffle seed; shuffle_buffer: records (0 = no buffer, shard order only).
    """

    url: str
    batch_size: int
    input_size: int
    workers: int = 1
    seed: int = 0
    shuffle_buffer: int = 1000
    split: str = "train"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be positive")
        if self.workers < 1:
            raise ValueError(f"data workers={self.workers}: need at least 1")
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
    decode_s: float = 0.0  # time spent decoding + augmenting + collating

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


def steps_per_epoch(total: int, batch_size: int) -> int:
    """Batches per training epoch: the remainder ``total % batch_size`` is dropped."""
    return total // batch_size


def check_plan(
    index: DatasetIndex, batch_size: int, input_size: int, workers: int, split: str = "train"
) -> int:
    """The one check of a reader's sizes against the dataset; returns the batches per epoch.

    Refuses crops larger than the stored images, a batch larger than the split and more data
    workers than batches (a worker with no batch would leave its consumers waiting forever).
    The messages name the job-config keys, since that is where a user sets these.
    """
    if input_size > index.size:
        raise ValueError(
            f"model.input_size={input_size} is larger than the stored images ({index.size} px): "
            f"use --set model.input_size=<= {index.size}, or rebuild the shards with a larger --size"
        )
    n = index.count(split)
    t = steps_per_epoch(n, batch_size)
    if t < 1:
        raise ValueError(f"optim.batch_size={batch_size} exceeds the {n} {split} images: use a smaller batch")
    if workers > t:
        raise ValueError(
            f"data.workers={workers} exceeds the {t} batches of {batch_size} per epoch ({n} samples): "
            f"use at most {t} workers, a smaller batch, or more data"
        )
    return t


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) for w in words])


def epoch_segments(
    shards: list[ShardInfo], epoch: int, seed: int, workers: int, batch_size: int
) -> list[list[Segment]]:
    """Per worker, the shard segments it reads in ``epoch`` (see module docstring)."""
    total = sum(s.count for s in shards)
    t = steps_per_epoch(total, batch_size)
    if workers > t:
        raise ValueError(
            f"data workers={workers} but an epoch has only {t} batches of {batch_size} "
            f"({total} samples): use at most {t} workers, a smaller batch, or more data"
        )
    order = _rng(seed, epoch, 0x5A4D).permutation(len(shards))
    bounds = [0]
    for w in range(workers):
        bounds.append(bounds[-1] + len(range(w, t, workers)) * batch_size)
    plan: list[list[Segment]] = [[] for _ in range(workers)]
    pos, w = 0, 0
    for k in order:
        s = shards[k]
        a = 0
        while a < s.count and w < workers:
            take = min(s.count - a, bounds[w + 1] - pos)
            if take > 0:
                plan[w].append(Segment(s.url, a, a + take))
                a, pos = a + take, pos + take
            if pos == bounds[w + 1]:
                w += 1
        if w == workers:
            break
    return plan


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
        lost = seg.stop - max(i, seg.start)
        if i == 0:
            stats.unreadable_shards += 1
            stats.skipped_unreadable += lost
            log.error(
                "shard %s: cannot be opened or read after %d tries (%s); skipping its %d samples",
                seg.url, retries + 1, error, lost,
            )  # fmt: skip
        else:
            stats.truncated_shards += 1
            stats.skipped_truncated += lost
            log.warning(
                "shard %s: read error after %d records (%s); skipping its other %d samples",
                seg.url, i, error, lost,
            )  # fmt: skip
        return


def shuffled(records: Iterator[Record], size: int, rng: np.random.Generator) -> Iterator[Record]:
    """A seeded shuffle buffer of ``size`` records (the same input and seed give the same order)."""
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


def decode_record(rec: Record, input_size: int, stats: ReaderStats) -> tuple[torch.Tensor | None, int]:
    """Decode one record to (uint8 (3, H, W), label), or (None, 0) with a warning and a count if unusable."""
    label = _label(rec)
    data = rec.get("jpg")
    if label is None or data is None:
        stats.skipped_missing += 1
        log.warning("sample %s in %s: missing jpg or cls; skipped", rec.get("__key__"), rec.get("__url__"))
        return None, 0
    try:
        img = decode_image(data)
    except Exception as e:  # any decoder error: a corrupt sample, never a crash
        stats.skipped_corrupt += 1
        log.warning("sample %s in %s: cannot decode (%s); skipped", rec["__key__"], rec.get("__url__"), e)
        return None, 0
    h, w = img.shape[-2:]
    if h != w or h < input_size:
        stats.skipped_corrupt += 1
        log.warning(
            "sample %s: image %dx%d, expected square >= %d px; skipped", rec["__key__"], h, w, input_size
        )
        return None, 0
    return img, label


class WorkerStream:
    """Training batches of data worker ``worker`` of ``spec.workers``, epoch after epoch, resumable.

    ``position``: a dict from :meth:`position` (or None: epoch ``start_epoch``, first batch).
    Iterate with :meth:`next_batch`. Batch dict (numpy): ``images`` uint8 (B, 3, S, S), ``labels``
    int64 (B,), ``lighting`` float32 (B, 3) pixel units, ``keys`` list[str], ``epoch``, ``index``
    (batch index within the epoch), ``worker``, ``position`` (where this batch started) and
    ``next_position`` (where the next one starts).
    """

    def __init__(
        self, spec: ReaderSpec, worker: int, position: dict | None = None, index: DatasetIndex | None = None,
        start_epoch: int = 0,
    ) -> None:  # fmt: skip
        if not 0 <= worker < spec.workers:
            raise ValueError(f"worker={worker}: must be in [0, {spec.workers})")
        self.spec, self.worker = spec, worker
        self.index = index or DatasetIndex.load(spec.url)
        if spec.input_size > self.index.size:
            raise ValueError(
                f"input_size={spec.input_size} is larger than the stored images ({self.index.size} px); "
                "rebuild the shards with a larger --size"
            )
        self.shards = self.index.shards(spec.split)
        self.steps_per_epoch = steps_per_epoch(sum(s.count for s in self.shards), spec.batch_size)
        if spec.workers > self.steps_per_epoch:
            raise ValueError(
                f"data workers={spec.workers} but an epoch has only {self.steps_per_epoch} batches of "
                f"{spec.batch_size}: use at most {self.steps_per_epoch} workers, a smaller batch or more data"
            )
        # lighting offset = M @ alpha with M = V diag(l) / 255 (see transforms module docstring)
        self._light = (self.index.eigenvectors * self.index.eigenvalues[None, :] / 255.0).astype(np.float32)
        self.stats = ReaderStats()
        self._epoch, self._index, self._consumed = start_epoch, worker, 0
        if position is not None:
            self._restore(position)
        self._it: Iterator | None = None

    def position(self) -> dict[str, int]:
        """Where the next batch starts (JSON)."""
        s = self.spec
        if self._index >= self.steps_per_epoch:  # this epoch's batches are done: the next epoch's first
            return {"epoch": self._epoch + 1, "index": self.worker, "consumed": 0, "worker": self.worker,
                    "workers": s.workers, "batch_size": s.batch_size, "seed": s.seed}  # fmt: skip
        return {"epoch": self._epoch, "index": self._index, "consumed": self._consumed, "worker": self.worker,
                "workers": s.workers, "batch_size": s.batch_size, "seed": s.seed}  # fmt: skip

    def _restore(self, p: dict) -> None:
        s = self.spec
        want = {"worker": self.worker, "workers": s.workers, "batch_size": s.batch_size, "seed": s.seed}
        got = {k: p.get(k) for k in want}
        if got != want:
            raise ValueError(
                f"data position {got} does not match this reader {want}: a position resumes only with the "
                "same worker count, batch size and seed"
            )
        if (p["index"] - self.worker) % s.workers:
            raise ValueError(f"data position index={p['index']} is not a batch of worker {self.worker}")
        self._epoch, self._index, self._consumed = int(p["epoch"]), int(p["index"]), int(p["consumed"])

    def _records(self, epoch: int) -> Iterator[tuple[int, Record]]:
        """(pass, record) of this worker's epoch stream; passes > 0 only pad after skips."""
        segs = epoch_segments(self.shards, epoch, self.spec.seed, self.spec.workers, self.spec.batch_size)[
            self.worker
        ]
        for p in itertools.count():
            n = 0
            # padding passes (p > 0) re-read the same records: count their damage once, in pass 0
            st = self.stats if p == 0 else ReaderStats()
            recs = itertools.chain.from_iterable(read_segment(g, st) for g in segs)
            for rec in shuffled(recs, self.spec.shuffle_buffer, _rng(self.spec.seed, epoch, self.worker, p)):
                n += 1
                yield p, rec
            if n == 0:
                raise RuntimeError(
                    f"data worker {self.worker}: no readable record in its share of epoch {epoch}"
                )

    def _batches(self) -> Iterator[dict]:
        s, W, B, S = self.spec, self.spec.workers, self.spec.batch_size, self.spec.input_size
        while True:
            if self._index >= self.steps_per_epoch:
                self._epoch, self._index, self._consumed = self._epoch + 1, self.worker, 0
            epoch = self._epoch
            recs = self._records(epoch)
            for _ in itertools.islice(recs, self._consumed):  # replay to the saved position, no decode
                self.stats.records += 1
            while self._index < self.steps_per_epoch:
                start = self.position()
                images = np.empty((B, 3, S, S), np.uint8)
                out = torch.from_numpy(images)
                labels, lighting, keys = np.empty(B, np.int64), np.empty((B, 3), np.float32), []
                bad_run = 0
                t0 = time.perf_counter()
                while len(keys) < B:
                    p, rec = next(recs)
                    self._consumed += 1
                    self.stats.records += 1
                    img, label = decode_record(rec, S, self.stats if p == 0 else ReaderStats())
                    if img is None:
                        bad_run += 1
                        if bad_run > 4 * (B + s.shuffle_buffer) + 1000 and p > 0:
                            raise RuntimeError(
                                f"data worker {self.worker}: no usable sample in epoch {epoch}"
                            )
                        continue
                    bad_run = 0
                    i = len(keys)
                    d = draw_augmentation(s.seed, epoch, rec["__key__"], img.shape[-1], S)
                    out[i].copy_(train_crop(img, d, S))
                    labels[i] = label
                    lighting[i] = self._light @ np.asarray(d.alpha, np.float32)
                    keys.append(rec["__key__"])
                    self.stats.samples += 1
                    self.stats.padded += p > 0
                self.stats.decode_s += time.perf_counter() - t0
                self.stats.batches += 1
                self._index += W
                yield {"images": images, "labels": labels, "lighting": lighting, "keys": keys, "epoch": epoch,
                       "index": start["index"], "worker": self.worker, "position": start,
                       "next_position": self.position()}  # fmt: skip
            self._consumed = 0

    def next_batch(self) -> dict:
        """The next batch of this worker's stream (crossing into the next epoch when one ends)."""
        if self._it is None:
            self._it = self._batches()
        return next(self._it)


def epoch_batches(spec: ReaderSpec, epoch: int, index: DatasetIndex | None = None) -> Iterator[dict]:
    """Every batch of one epoch in order, batch t from worker t % W (the single-process reference)."""
    index = index or DatasetIndex.load(spec.url)
    streams = [WorkerStream(spec, w, index=index, start_epoch=epoch) for w in range(spec.workers)]
    for t in range(streams[0].steps_per_epoch):
        yield streams[t % spec.workers].next_batch()


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


def val_batches(
    url: str, batch_size: int, input_size: int, crop: str = "center", worker: int = 0, workers: int = 1,
    stats: ReaderStats | None = None, index: DatasetIndex | None = None,
) -> Iterator[dict]:  # fmt: skip
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
    fn = center_crop if crop == "center" else ten_crop
    segs = val_segments(index.shards("val"), workers)[worker]
    recs = itertools.chain.from_iterable(read_segment(g, stats) for g in segs)
    n = 0
    while True:
        imgs, labels, keys = [], [], []
        t0 = time.perf_counter()
        for rec in recs:
            stats.records += 1
            img, label = decode_record(rec, input_size, stats)
            if img is None:
                continue
            imgs.append(fn(img, input_size))
            labels.append(label)
            keys.append(rec["__key__"])
            stats.samples += 1
            if len(keys) == batch_size:
                break
        if not keys:
            return
        stats.decode_s += time.perf_counter() - t0
        stats.batches += 1
        yield {"images": torch.stack(imgs).numpy(), "labels": np.asarray(labels, np.int64),
               "lighting": np.zeros((len(keys), 3), np.float32), "keys": keys, "epoch": 0, "index": n,
               "worker": worker}  # fmt: skip
        n += 1
