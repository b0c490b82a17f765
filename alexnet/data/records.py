"""The record layer: a shard's records, read as untrusted input (no Ray, no decode).

A shard is a plain (uncompressed) tar written by ``alexnet shards``; a *record* is the group of its
consecutive members that share a key (``train_00000042.jpg``, ``.cls``, ``.json``), as webdataset
groups them. Nothing here trusts the file:

* a compressed shard (gzip, bzip2, xz, zstd magic) is refused by name before a member is read: the
  writer never compresses, and a decompressor would inflate a small file into gigabytes;
* a member larger than ``max_member_bytes`` (``data.max_sample_bytes``) is never read: its record
  is marked bad and later counted as a corrupt sample;
* :func:`check_record` reads the label and the image's *header* only, and refuses an image whose
  side is not the one ``dataset.json`` records before anything decodes it.

Why not webdataset's ``tar_file_iterator``: it opens the tar with ``r|*`` (any compression) and
reads every member whole, with no size limit, so a hostile shard could exhaust memory before a
single check ran. The grouping rule (key = path up to the first dot of the file name) is
webdataset's, so the same shards give the same records.

Stages (element types in brackets)::

    read_segment    [Record]   records [start, stop) of one shard; lost records counted
    read_records    [Record]   the segments of a plan, in order
    shuffled        [Record]   a seeded shuffle buffer
    check_record    Record -> Checked | None   label + header, or counted as unusable
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import fsspec
import numpy as np
from PIL import Image

log = logging.getLogger("alexnet.data")

Record = dict  # {"__key__": str, "__url__": str, "jpg": bytes, "cls": bytes, "json": bytes, ...}

MAX_MEMBER_BYTES = 4 << 20  # data.max_sample_bytes' default: a 256 px JPEG is ~20-100 KB
BAD = "__bad__"  # set on a record with a member that was not read (its reason)
JPEG_MAGIC = b"\xff\xd8"
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/suffix rule (group_by_keys)


@dataclass(frozen=True)
class Segment:
    """Records ``[start, stop)`` of one shard."""

    url: str
    start: int
    stop: int


@dataclass
class ReaderStats:
    """Counters a reader exposes for metrics (``as_dict`` for Prometheus)."""

    records: int = 0  # raw records read (including replayed ones when resuming)
    samples: int = 0  # decoded and used
    skipped_corrupt: int = 0  # image bytes that do not decode, of the wrong size, or over the size cap
    skipped_missing: int = 0  # records without jpg or cls
    skipped_truncated: int = 0  # records lost because their shard ended early (truncated tar)
    skipped_unreadable: int = 0  # records of shards that could not be opened at all (after retries)
    truncated_shards: int = 0  # shards that ended in a read error (truncated or corrupt tar)
    unreadable_shards: int = 0  # shards that could not be opened or read at all, after retries
    padded: int = 0  # samples reused to fill a worker's last batches after skips
    batches: int = 0
    decode_s: float = 0.0  # time spent reading + decoding + augmenting + collating
    # the skipped samples by (epoch, shard url, reason), for the run's data.max_skipped_fraction;
    # ``epoch`` is the one being read (set by the training stream)
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

    def counters(self) -> dict[str, Any]:
        """The scalar counters and ``skipped`` (safe to read while a producer adds to ``lost``)."""
        d = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("lost", "epoch")
        }
        d["skipped"] = self.skipped
        return d

    def as_dict(self) -> dict[str, float]:
        """Counters plus ``skipped`` and ``decode_images_per_s``."""
        d = dataclasses.asdict(self)
        d["skipped"] = self.skipped
        d["decode_images_per_s"] = self.samples / self.decode_s if self.decode_s > 0 else 0.0
        return d


def summed(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Counter dicts (:meth:`ReaderStats.as_dict`, or sums of them) added up: every number summed,
    ``lost`` summed per key; rates (``decode_images_per_s``), ``epoch`` and ids left out."""
    skip = ("epoch", "lost", "decode_images_per_s", "worker", "queue_depth")
    total: dict[str, Any] = {
        k: sum(p[k] for p in parts) for k in (parts[0] if parts else {}) if k not in skip
    }
    lost: dict = {}
    for p in parts:
        for k, n in p.get("lost", {}).items():
            lost[k] = lost.get(k, 0) + n
    total["lost"] = lost
    return total


class ShardFormatError(ValueError):
    """A shard that is not a plain tar (never retried: reading it again gives the same bytes)."""


def _check_plain(f: Any, url: str) -> None:
    head = f.read(6)
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise ShardFormatError(
                f"{url} is {kind}-compressed, not a plain tar: shards are written uncompressed; "
                "rebuild it with `alexnet shards`"
            )
    f.seek(0)


def _members(f: Any, url: str) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
    """(name, size, read) of each regular member, in tar order; ``read()`` returns its data and must
    be called before the next member, or not at all.

    Stream mode (``r|``, no compression): a member's data is read only when ``read`` is called; one
    not read is read past in blocks, so memory stays at one member's data.
    """
    _check_plain(f, url)
    with tarfile.open(fileobj=f, mode="r|") as tf:
        for m in tf:
            tf.members = []  # stream mode keeps every header read; a shard has thousands (webdataset too)
            if not m.isreg():
                continue

            def read(m: tarfile.TarInfo = m) -> bytes:
                member = tf.extractfile(m)
                return member.read() if member is not None else b""

            yield m.name, m.size, read


def _grouped(
    members: Iterable[tuple[str, int, Callable[[], bytes]]], url: str, cap: int, skip: int = 0
) -> Iterator[Record]:
    """Members -> records: consecutive members with the same key (webdataset's rule). The first
    ``skip`` records come without their data (only the headers were read: a segment that starts
    inside a shard counts its way there); a member over ``cap`` bytes is never read, its record
    marked bad."""
    rec: Record | None = None
    records = 0
    for name, size, read in members:
        m = _NAME.match(name)
        if m is None:
            continue  # no suffix: not a sample's member (webdataset skips these too)
        key, suffix = m.group(1), m.group(2).lower()
        if rec is None or rec["__key__"] != key:
            if rec is not None:
                yield rec
            rec, records = {"__key__": key, "__url__": url}, records + 1
        if records <= skip:
            continue
        if size > cap:
            rec[BAD] = f"member {name!r} is {size} bytes, over data.max_sample_bytes={cap}"
        elif suffix in rec:
            rec[BAD] = f"member {name!r} appears twice"
        else:
            rec[suffix] = read()
    if rec is not None:
        yield rec


def count_records(f: Any, url: str) -> int:
    """Records in a plain tar (``f`` a seekable binary file): member headers only, data seeked over."""
    _check_plain(f, url)
    keys, last = 0, None
    with tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            match = _NAME.match(m.name) if m.isreg() else None
            if match is not None and match.group(1) != last:
                keys, last = keys + 1, match.group(1)
    return keys


OPEN_RETRIES = 2  # further tries of a shard that fails before its first record (e.g. a network blip)
RETRY_WAIT_S = 0.5  # first wait between tries; doubles each time


def read_segment(
    seg: Segment,
    stats: ReaderStats,
    retries: int = OPEN_RETRIES,
    wait_s: float = RETRY_WAIT_S,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Iterator[Record]:
    """Records ``[start, stop)`` of a shard; never raises on bad data.

    A shard that cannot be opened or read before its first record (an ``OSError``: a missing file,
    a network blip) is tried ``retries`` more times, then skipped with an error naming it, its
    records counted in ``skipped_unreadable``; one whose bytes are not a plain tar (compressed, or
    no tar at all) is skipped at once: reading the same bytes again gives the same answer. A
    shard that ends early (truncated, or a read error mid-way) keeps the records read so far; the
    rest of the segment is counted in ``skipped_truncated``. Retrying is safe only before the first
    record: after it, a second try would repeat records.
    """
    for attempt in range(retries + 1):
        i = 0
        try:
            with fsspec.open(seg.url, "rb") as f:
                # the records before the segment's start come without their data: headers only
                for rec in _grouped(_members(f, seg.url), seg.url, max_member_bytes, skip=seg.start):
                    if i >= seg.stop:
                        return
                    if i >= seg.start:
                        yield rec
                    i += 1
                    if i >= seg.stop:  # before the next record's data is read
                        return
            error = "the tar ends early"
        except ShardFormatError as e:
            _count_lost(seg, 0, attempt + 1, str(e), stats)
            return
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            error, transient = f"{type(e).__name__}: {e}", isinstance(e, OSError)
        else:
            transient = False
        if i >= seg.stop:
            return
        if i == 0 and transient and attempt < retries:
            log.warning(
                "shard %s: cannot read it (%s); try %d of %d", seg.url, error, attempt + 2, retries + 1
            )
            time.sleep(wait_s * 2**attempt)
            continue
        _count_lost(seg, i, attempt + 1, error, stats)
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


def read_records(
    segments: Iterable[Segment], stats: ReaderStats, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[Record]:
    """Segments -> their records, in order (lost records counted in ``stats``)."""
    for seg in segments:
        yield from read_segment(seg, stats, max_member_bytes=max_member_bytes)


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


class Checked(NamedTuple):
    """A record whose label parses and whose image header says the dataset's side: ``data`` the
    image bytes, ``jpeg`` whether they are a JPEG (else another format Pillow reads)."""

    key: str
    data: bytes
    label: int
    side: int
    jpeg: bool


def label(rec: Record) -> int | None:
    """The record's class index, or None when its ``cls`` is missing or not an integer."""
    try:
        return int(rec["cls"])
    except (KeyError, ValueError, TypeError):
        return None


def corrupt(rec: Record, stats: ReaderStats, why: str) -> None:
    """Count ``rec`` as a corrupt sample and say why (one warning line, names escaped)."""
    stats.lose("corrupt", rec.get("__url__", "?"))
    log.warning("sample %r in %s: %s; skipped", rec.get("__key__"), rec.get("__url__"), why)


def check_record(rec: Record, side: int, stats: ReaderStats) -> Checked | None:
    """``rec`` -> :class:`Checked`, or None (warned, counted in ``stats``) if it is unusable.

    No pixel is decoded: the image's header gives its size, and a size other than ``side`` x
    ``side`` (``dataset.json``'s ``size``) is a corrupt sample, so a huge image in a shard is never
    decoded. Counts: ``missing`` (no jpg or cls), ``corrupt`` (a member over the size cap, a
    header that does not parse, the wrong size).
    """
    if BAD in rec:
        corrupt(rec, stats, rec[BAD])
        return None
    lab, data = label(rec), rec.get("jpg")
    if lab is None or data is None:
        stats.lose("missing", rec.get("__url__", "?"))
        log.warning("sample %r in %s: missing jpg or cls; skipped", rec.get("__key__"), rec.get("__url__"))
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            w, h = im.size
    except Exception as e:  # any parser error (and Pillow's decompression-bomb refusal): corrupt
        corrupt(rec, stats, f"cannot read the image header ({type(e).__name__}: {e})")
        return None
    if (w, h) != (side, side):
        corrupt(rec, stats, f"image {w}x{h}, the dataset's images are {side}x{side}")
        return None
    return Checked(rec["__key__"], bytes(data), lab, side, data[:2] == JPEG_MAGIC)
