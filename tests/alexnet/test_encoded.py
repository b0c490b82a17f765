"""Encoded batches: the bytes-and-draws path gives the worker path's pixels bit for bit (on CPU), and
refuses or flags bad data without raising."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.data.batch import Batch
from alexnet.data.codec import decode_record
from alexnet.data.encoded import collate_encoded, decode_rows, draw_encoded
from alexnet.data.index import DatasetIndex
from alexnet.data.records import ReaderStats, Segment, read_records
from alexnet.data.transforms import draw_augmentation, lighting_matrix, lighting_offset, train_crop
from alexnet.data.writer import build_synthetic

SIZE, S, SEED = 40, 32, 7
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[list[dict], np.ndarray]:
    """The training records of a small synthetic dataset, and its lighting matrix."""
    url = str(tmp_path_factory.mktemp("encoded") / "shards")
    build_synthetic(40, url, size=SIZE, classes=4, shard_size=12, workers=1, progress=False)
    index = DatasetIndex.load(url)
    stats = ReaderStats()
    records = list(read_records([Segment(s.url, 0, s.count) for s in index.shards("train")], stats))
    assert len(records) == 36 and stats.skipped == 0
    return records, lighting_matrix(index.eigenvalues, index.eigenvectors)


def _worker_path(rec: dict, epoch: int, light: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """What a data worker ships for ``rec`` today: decode_record, then train_crop and the lighting."""
    dec = decode_record(rec, SIZE, ReaderStats())
    assert dec is not None
    d = draw_augmentation(SEED, epoch, dec.key, dec.image.shape[-1], S)
    return train_crop(dec.image, d, S), lighting_offset(d.alpha, light)


def _draw(rec: dict, light: np.ndarray, epoch: int = 0, stats: ReaderStats | None = None):
    return draw_encoded(rec, SEED, epoch, SIZE, S, light, stats if stats is not None else ReaderStats())


def _jpeg(h: int, w: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_of(jpg: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpg)).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def _read_only(batch: dict) -> dict:
    """As the object store hands a batch to its consumers: every array read-only."""
    for v in batch.values():
        if isinstance(v, np.ndarray):
            v.flags.writeable = False
    return batch


@pytest.mark.parametrize("epoch", [0, 3])
def test_every_record_is_bit_identical_to_the_worker_path(data, epoch):
    records, light = data
    flips = set()
    for rec in records:
        enc = _draw(rec, light, epoch)
        assert enc is not None and enc.raw is None and enc.data == rec["jpg"]
        batch = _read_only(collate_encoded([enc], S))
        img, bad = decode_rows(batch, slice(0, 1), S, CPU)
        want, lighting = _worker_path(rec, epoch, light)
        assert img.shape == (1, 3, S, S) and img.dtype == torch.uint8 and bad.tolist() == [False]
        assert torch.equal(img[0], want), rec["__key__"]
        assert np.array_equal(batch["lighting"][0], lighting)
        assert batch["labels"][0] == int(rec["cls"]) and batch["keys"] == [rec["__key__"]]
        flips.add(bool(batch["crop"][0, 2]))
    assert flips == {False, True}  # both branches of the flip were compared


def test_a_batch_of_16_split_between_two_consumers(data):
    records, light = data
    recs = records[:16]
    batch = _read_only(collate_encoded([_draw(r, light) for r in recs], S))
    assert batch["offsets"].shape == (17,) and batch["offsets"][-1] == sum(len(r["jpg"]) for r in recs)
    assert batch["crop"].dtype == np.int32 and batch["crop"].shape == (16, 3)
    assert batch["raw_rows"].shape == (0,) and batch["raw"].shape == (0, 3, S, S)
    jpeg_before = batch["jpeg"].copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        halves = [decode_rows(batch, rows, S, CPU) for rows in (slice(0, 8), slice(8, 16))]
    assert not [w for w in caught if "not writable" in str(w.message)]
    assert [tuple(img.shape) for img, _ in halves] == [(8, 3, S, S)] * 2
    assert not any(bad.any() for _, bad in halves)
    want = [_worker_path(r, 0, light) for r in recs]
    assert torch.equal(torch.cat([img for img, _ in halves]), torch.stack([w[0] for w in want]))
    assert np.array_equal(batch["lighting"], np.stack([w[1] for w in want]))
    assert np.array_equal(batch["jpeg"], jpeg_before)
    fixed = 17 * 8 + 16 * 3 * 4 + 16 * 4 + 16 * 8 + 16 * 3 * 4  # offsets, crop, sides, labels, lighting
    assert (
        Batch(batch["labels"], batch["keys"], batch["lighting"], encoded=batch).nbytes
        == batch["jpeg"].nbytes + fixed
    )


def test_an_image_of_another_side_than_the_datasets_is_corrupt_on_both_paths(data):
    """dataset.json's ``size`` is the only side a shard may hold: any other (a larger square too) is
    refused from its header, never decoded."""
    records, light = data
    for side in (48, 2000):
        rec = {**records[0], "jpg": _jpeg(side, side)}
        stats = ReaderStats()
        assert _draw(rec, light, 0, stats) is None and stats.skipped_corrupt == 1
        assert decode_record(rec, SIZE, stats) is None and stats.skipped_corrupt == 2


def _drop(rec: dict, field: str) -> dict:
    return {k: v for k, v in rec.items() if k != field}


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda r: _drop(r, "cls"), "missing"),
        (lambda r: _drop(r, "jpg"), "missing"),
        (lambda r: {**r, "cls": b"ant"}, "missing"),
        (lambda r: {**r, "jpg": b"these bytes are no image at all"}, "corrupt"),
        (lambda r: {**r, "jpg": r["jpg"][:20]}, "corrupt"),  # cut inside the header, before its size
        (lambda r: {**r, "jpg": _jpeg(40, 32)}, "corrupt"),  # not square
        (lambda r: {**r, "jpg": _jpeg(24, 24)}, "corrupt"),  # smaller than the crop
        (lambda r: {**r, "jpg": _jpeg(48, 48)}, "corrupt"),  # square, larger than the dataset's side
        (lambda r: {**r, "jpg": _png_of(_jpeg(40, 36))}, "corrupt"),  # a non-square PNG
    ],
)
def test_unusable_records_are_refused_at_draw_time_and_counted(data, damage, reason, caplog):
    records, light = data
    rec = damage(records[0])
    stats = ReaderStats(epoch=2)
    with caplog.at_level(logging.WARNING, logger="alexnet.data"):
        assert _draw(rec, light, 2, stats) is None
    assert stats.skipped == 1 and getattr(stats, f"skipped_{reason}") == 1
    assert stats.lost == {(2, rec["__url__"], reason): 1}
    assert rec["__key__"] in caplog.text and "skipped" in caplog.text
    assert decode_record(rec, SIZE, ReaderStats()) is None  # the worker path refuses it too


def _damage_scan(jpg: bytes) -> bytes:
    """Marker bytes written into the middle of the scan data: the header still reads fine."""
    out = bytearray(jpg)
    sos = jpg.index(b"\xff\xda")
    mid = (sos + len(jpg)) // 2
    out[mid : mid + 30] = b"\xff\xc4" * 15
    return bytes(out)


def test_damaged_jpeg_bodies_are_flagged_bad_and_the_rest_decodes(data):
    records, light = data
    recs = [records[0], records[1], records[2], records[3], records[4]]
    recs[1] = {**recs[1], "jpg": recs[1]["jpg"][: len(recs[1]["jpg"]) // 2]}  # truncated after the header
    recs[3] = {**recs[3], "jpg": _damage_scan(recs[3]["jpg"])}
    encs = [_draw(r, light) for r in recs]
    assert all(e is not None for e in encs)  # the header alone cannot tell
    batch = _read_only(collate_encoded(encs, S))
    for rows in (slice(0, 5), slice(1, 4)):
        img, bad = decode_rows(batch, rows, S, CPU)
        idx = range(5)[rows]
        assert bad.tolist() == [i in (1, 3) for i in idx]
        for j, i in enumerate(idx):
            zero = torch.zeros(3, S, S, dtype=torch.uint8)
            assert torch.equal(img[j], zero if i in (1, 3) else _worker_path(recs[i], 0, light)[0]), i
    assert decode_record(recs[1], SIZE, ReaderStats()) is None  # the worker path would have skipped them too
    assert decode_record(recs[3], SIZE, ReaderStats()) is None


def test_a_decode_of_another_size_than_the_header_is_flagged_bad(data):
    records, light = data
    batch = collate_encoded([_draw(r, light) for r in records[:3]], S)
    batch["sides"][1] = 48  # what a header that lies about the size would have said
    img, bad = decode_rows(batch, slice(None), S, CPU)
    assert bad.tolist() == [False, True, False] and not img[1].any()
    assert torch.equal(img[2], _worker_path(records[2], 0, light)[0])


def test_non_jpeg_records_ship_their_crops_with_the_same_pixels(data):
    records, light = data
    recs = [dict(r) for r in records[:4]]
    recs[1]["jpg"] = _png_of(recs[1]["jpg"])
    recs[2]["jpg"] = _png_of(_jpeg(SIZE, SIZE, seed=3))
    encs = [_draw(r, light) for r in recs]
    assert [e.raw is not None for e in encs] == [False, True, True, False]
    assert encs[1].data == b"" and encs[2].side == SIZE
    batch = _read_only(collate_encoded(encs, S))
    assert batch["raw_rows"].tolist() == [1, 2] and batch["raw"].shape == (2, 3, S, S)
    assert batch["offsets"][2] == batch["offsets"][1] == batch["offsets"][3]  # no bytes for raw rows
    want = torch.stack([_worker_path(r, 0, light)[0] for r in recs])
    for rows in (slice(0, 2), slice(2, 4), slice(1, 3), slice(0, 4)):  # slice(1, 3): raw rows only
        img, bad = decode_rows(batch, rows, S, CPU)
        assert not bad.any() and torch.equal(img, want[rows]), rows


def test_decode_rows_refuses_a_strided_slice(data):
    records, light = data
    batch = collate_encoded([_draw(r, light) for r in records[:4]], S)
    with pytest.raises(ValueError, match="contiguous slice"):
        decode_rows(batch, slice(0, 4, 2), S, CPU)
