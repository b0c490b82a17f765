"""The typed batches (alexnet/data/batch.py): a replica's rows, labels only, pixels on a device, and
no product module but the codec's reading a batch's layout by key."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet.data.batch import Batch, ValBatch

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[2]


def _batch(b: int = 8, s: int = 4) -> Batch:
    images = np.arange(b * 3 * s * s, dtype=np.uint8).reshape(b, 3, s, s)
    lighting = np.arange(b * 3, dtype=np.float32).reshape(b, 3)
    return Batch(np.arange(b, dtype=np.int64), [f"k{i}" for i in range(b)], lighting, images=images, index=5)


def test_part_gives_a_replica_its_rows_as_views_and_records_where_they_sit():
    b = _batch()
    p = b.part(1, 2)
    assert p.labels.tolist() == [4, 5, 6, 7] and p.keys == ["k4", "k5", "k6", "k7"]
    assert np.shares_memory(p.images, b.images) and p.rows == (4, 8) and p.index == 5
    np.testing.assert_array_equal(p.lighting, b.lighting[4:])
    assert p.part(1, 2).rows == (6, 8)  # rows of the stream's batch, not of the part
    with pytest.raises(ValueError, match="parts dividing 8"):
        b.part(0, 3)


def test_labels_only_ships_no_pixels_and_its_pixels_are_refused():
    small = _batch().labels_only()
    assert small.images is None and small.lighting is None and small.encoded is None
    assert small.part(0, 2).labels.tolist() == [0, 1, 2, 3]
    assert small.nbytes == 8 * 8
    with pytest.raises(ValueError, match="labels-only"):
        small.pixels(4, CPU, torch.from_numpy)


def test_pixels_of_worker_decoded_rows_are_the_rows_moved_by_the_given_copy():
    moved = []
    u8, bad = _batch().part(0, 2).pixels(4, CPU, lambda a: moved.append(a.shape) or torch.from_numpy(a))
    assert bad is None and moved == [(4, 3, 4, 4)] and u8.shape == (4, 3, 4, 4)


def test_val_batch_counts_its_samples_and_drops_pixels_for_later_stages():
    v = ValBatch(np.array([3, 1], np.int64), ["a", "b"], 7, np.zeros((2, 3, 4, 4), np.uint8))
    assert v.n == 2 and v.labels_only().images is None and v.labels_only().index == 7
    assert ValBatch(np.zeros(0, np.int64), [], 0, np.zeros((0, 3, 4, 4), np.uint8)).n == 0


def test_no_product_module_outside_the_codec_reads_a_batch_by_key():
    """The layout lives in batch.py, codec.py and encoded.py; every other module uses the types."""
    owners = {"alexnet/data/batch.py", "alexnet/data/codec.py", "alexnet/data/encoded.py"}
    keys = "images|labels|lighting|keys|jpeg|offsets|raw_rows|rows|n"
    pattern = re.compile(r'(batch|mine|b)\[["\'](' + keys + r')["\']\]')
    found = []
    for pkg in ("alexnet", "pipeline", "cluster"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in owners:
                found += [f"{rel}: {m.group(0)}" for m in pattern.finditer(path.read_text())]
    assert found == []
