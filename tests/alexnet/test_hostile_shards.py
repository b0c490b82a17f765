"""A shard is untrusted input: shards built by hand to hurt the reader, each refused or skipped and
counted with the process's memory bounded, so a regression fails instead of exhausting the machine."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import alexnet.data.codec as codec
from alexnet.data.index import DatasetIndex
from alexnet.data.reader import ReaderSpec, Stream
from alexnet.data.records import ReaderStats, Segment, read_segment
from alexnet.data.val import ValPlan, worker_batches
from alexnet.data.writer import build_synthetic

SIZE = 40
BIG = 768 << 20  # a member this large read whole breaks the memory bound below


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("hostile") / "shards")
    build_synthetic(60, url, size=SIZE, classes=4, val_fraction=0.2, shard_size=12, workers=1, progress=False)
    return url


def _members(path: str) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]


def _write_tar(path: Path, members: list[tuple[str, bytes | int]]) -> None:
    """A plain tar written by hand; a member given as an int is that many bytes of a sparse hole
    (declared in its header, never written), so a huge member costs no disk or time here."""
    with open(path, "wb") as f:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            if isinstance(data, int):
                f.seek(-(-data // 512) * 512, os.SEEK_CUR)
            else:
                f.write(data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)


def _bounded(code: str, extra_mb: int = 400) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose address space is capped at what its imports took
    plus ``extra_mb``: reading a ``BIG`` member whole raises MemoryError there."""
    prelude = (
        "import resource, re\n"
        "import alexnet.data.reader, alexnet.data.val\n"
        "peak = int(re.search(r'VmPeak:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
        f"resource.setrlimit(resource.RLIMIT_AS, (peak + {extra_mb << 20}, resource.RLIM_INFINITY))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_a_compressed_shard_is_refused_by_name_never_inflated(syn, tmp_path):
    """A "tar" that is gzip around a member of BIG bytes: refused from its magic, nothing inflated."""
    raw = io.BytesIO()
    info = tarfile.TarInfo("train_00000000.jpg")
    info.size = BIG
    raw.write(info.tobuf(format=tarfile.USTAR_FORMAT))
    path = tmp_path / "train-000000.tar"
    with gzip.open(path, "wb", compresslevel=1) as gz:
        gz.write(raw.getvalue())
        zeros = bytes(16 << 20)
        for _ in range(BIG // len(zeros)):
            gz.write(zeros)
    assert path.stat().st_size < 4 << 20
    code = (
        "from alexnet.data.records import ReaderStats, Segment, read_segment\n"
        "import logging; logging.basicConfig(level=logging.ERROR)\n"
        "st = ReaderStats()\n"
        f"recs = list(read_segment(Segment({str(path)!r}, 0, 12), st, retries=2, wait_s=0))\n"
        "print(len(recs), st.unreadable_shards, st.skipped_unreadable)\n"
    )
    r = _bounded(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0", "1", "12"]
    assert f"{path} is gzip-compressed, not a plain tar" in r.stderr and "rebuild it" in r.stderr
    assert "try 2 of 3" not in r.stderr  # the same bytes again would give the same answer


def test_a_member_over_the_cap_is_a_corrupt_sample_never_read(syn, tmp_path):
    """A record whose jpg member is BIG bytes: counted corrupt, skipped without being read; the
    records around it are read as usual."""
    shard = DatasetIndex.load(syn).shards("train")[0]
    good = _members(shard.url)
    path = tmp_path / "train-000000.tar"
    _write_tar(path, good[:6] + [("train_99999999.cls", b"1"), ("train_99999999.jpg", BIG)] + good[6:])
    code = (
        "from alexnet.data.codec import decode_record\n"
        "from alexnet.data.records import ReaderStats, Segment, read_segment\n"
        "st = ReaderStats()\n"
        f"recs = list(read_segment(Segment({str(path)!r}, 0, {shard.count + 1}), st))\n"
        f"ok = [decode_record(r, {SIZE}, st) is not None for r in recs]\n"
        "print(len(recs), sum(ok), st.skipped_corrupt, st.skipped_truncated)\n"
    )
    r = _bounded(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [str(shard.count + 1), str(shard.count), "1", "0"]
    assert "over data.max_sample_bytes=4194304" in r.stderr


def _jpeg_claiming(side: int, real: bytes) -> bytes:
    """``real`` (a JPEG) with its SOF header rewritten to say ``side`` x ``side`` pixels: what a
    30000 x 30000 photo's header says, in a few KB."""
    out = bytearray(real)
    sof = next(i for i in range(len(out) - 1) if out[i] == 0xFF and out[i + 1] in (0xC0, 0xC1, 0xC2))
    out[sof + 5 : sof + 9] = side.to_bytes(2, "big") * 2
    return bytes(out)


def test_an_image_whose_header_is_not_the_datasets_side_is_never_decoded(syn, monkeypatch):
    """A 30000 x 30000 header (and a square of another side) is a corrupt sample, counted, and no
    decoder is ever called on it, on either decode path."""
    shard = DatasetIndex.load(syn).shards("train")[0]
    rec = dict(next(read_segment(Segment(shard.url, 0, 1), ReaderStats())))
    calls = []
    real = codec.decode_image
    monkeypatch.setattr(codec, "decode_image", lambda data: calls.append(len(data)) or real(data))
    buf = io.BytesIO()
    Image.new("RGB", (SIZE + 8, SIZE + 8)).save(buf, "JPEG")
    light = np.eye(3, dtype=np.float32)
    for jpg in (_jpeg_claiming(30000, rec["jpg"]), buf.getvalue()):
        bad = {**rec, "jpg": jpg}
        for kind in (codec.PixelCodec, codec.JpegCodec):
            stats = ReaderStats()
            assert kind(0, SIZE, 32, light).sample(bad, 0, stats) is None
            assert stats.skipped_corrupt == 1
        stats = ReaderStats()
        assert codec.val_sample(bad, SIZE, 32, "ten", stats) is None and stats.skipped_corrupt == 1
    assert calls == []
    assert codec.PixelCodec(0, SIZE, 32, light).sample(rec, 0, ReaderStats()) is not None and calls


def test_no_full_decoded_image_waits_for_collation(syn, monkeypatch):
    """Each image is cropped as soon as it is decoded: when the next one decodes, the previous full
    image is gone (training batches and val batches alike)."""
    alive: list[weakref.ref] = []
    most = [0]
    real = codec.decode_image

    def tracked(data: bytes):
        most[0] = max(most[0], sum(r() is not None for r in alive))
        img = real(data)
        alive.append(weakref.ref(img))
        return img

    monkeypatch.setattr(codec, "decode_image", tracked)
    Stream(ReaderSpec(syn, 12, 32, seed=1, shuffle_buffer=0, streams=1), 0).next_batch()
    ix = DatasetIndex.load(syn)
    for crop in ("center", "ten"):
        next(worker_batches(ix, ValPlan.of(ix, 12, 1, 1), 0, crop, 32, ReaderStats()))
    assert len(alive) >= 36 and most[0] == 0


def test_dataset_json_shard_names_cannot_leave_the_folder(syn, tmp_path):
    """Another dataset's training shard named as ``../other/train-000000.tar`` is refused before a
    byte of it is read."""
    mine = tmp_path / "mine"
    mine.mkdir()
    meta = json.loads(Path(syn, "dataset.json").read_text())
    meta["splits"]["val"]["shards"][0]["name"] = f"../{Path(syn).name}/train-000000.tar"
    (mine / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"splits.val.shards\[0\].name = '\.\./"):
        DatasetIndex.load(str(mine))
