"""The codec: a checked record -> a sample, and samples -> a batch (one interface, two kinds).

* :class:`PixelCodec` (``data.decode = "worker"``): decode, then at once the paper's crop, flip and
  PCA lighting draw, so no full decoded image outlives its sample; batches of uint8 crops.
* :class:`JpegCodec` (``data.decode = "device"``): the same draws from the JPEG header alone, the
  bytes kept; the trainer decodes them on its device (:mod:`alexnet.data.encoded`).

Both draw every random choice from ``(seed, epoch, key)`` (:mod:`alexnet.data.transforms`), so the
two give the same pixels. :func:`val_sample` is the validation codec: a center crop or the paper's
10 crops, cut as soon as the image is decoded.

Element types::

    PixelCodec.sample   Record -> Augmented | None        collate  [Augmented] -> Batch (images)
    JpegCodec.sample    Record -> Encoded | None          collate  [Encoded]   -> Batch (encoded)
    val_sample          Record -> ValSample | None        collate_val  [ValSample] -> ValBatch
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from alexnet.data.batch import Batch, ValBatch
from alexnet.data.encoded import collate_encoded, draw_encoded
from alexnet.data.records import ReaderStats, Record, check_record, corrupt
from alexnet.data.transforms import (
    PAPER_AUGMENTATION,
    Augmentation,
    center_crop,
    decode_image,
    draw_augmentation,
    lighting_offset,
    ten_crop,
    train_crop,
)

log = logging.getLogger("alexnet.data")


class Decoded(NamedTuple):
    """A usable record: its image as stored, uint8 (3, H, W), and its label."""

    key: str
    image: torch.Tensor
    label: int


class Augmented(NamedTuple):
    """A training sample ready to collate: crop uint8 (3, S, S) (its own memory), label, lighting
    offset (3,) float32 pixel units."""

    key: str
    crop: torch.Tensor
    label: int
    lighting: np.ndarray


class ValSample(NamedTuple):
    """A val sample: ``crop`` uint8 (3, S, S) (center) or (10, 3, S, S) (ten), its own memory."""

    key: str
    crop: torch.Tensor
    label: int


def decode_record(rec: Record, side: int, stats: ReaderStats) -> Decoded | None:
    """Check (:func:`~alexnet.data.records.check_record`) and decode one record, or None (warned,
    counted in ``stats``) if it is unusable: an image that does not decode to the size its header
    said is corrupt too."""
    c = check_record(rec, side, stats)
    if c is None:
        return None
    try:
        img = decode_image(c.data)
    except Exception as e:  # any decoder error: a corrupt sample, never a crash
        corrupt(rec, stats, f"cannot decode ({type(e).__name__}: {e})")
        return None
    if tuple(img.shape) != (3, side, side):
        corrupt(rec, stats, f"decodes to {tuple(img.shape)}, its header says {side}x{side}")
        return None
    return Decoded(c.key, img, c.label)


class Codec(Protocol):
    """What a training stream needs of its codec."""

    def sample(self, rec: Record, epoch: int, stats: ReaderStats) -> Any | None:
        """One record of ``epoch`` -> its sample, or None (counted in ``stats``)."""
        ...

    def collate(self, samples: list[Any]) -> Batch:
        """B samples -> one batch."""
        ...


class PixelCodec:
    """Worker-side decode: the paper's augmentation applied as soon as an image is decoded
    (``aug``: which parts are on, ``data.crop``/``flip``/``lighting``)."""

    def __init__(
        self, seed: int, side: int, input_size: int, light: np.ndarray, aug: Augmentation = PAPER_AUGMENTATION
    ) -> None:
        self.seed, self.side, self.size, self.light, self.aug = seed, side, input_size, light, aug

    def sample(self, rec: Record, epoch: int, stats: ReaderStats) -> Augmented | None:
        """Record -> :class:`Augmented` (crop, flip and lighting drawn from (seed, epoch, key))."""
        d = decode_record(rec, self.side, stats)
        if d is None:
            return None
        a = draw_augmentation(self.seed, epoch, d.key, self.side, self.size, self.aug)
        crop = train_crop(d.image, a, self.size).contiguous()  # (3, S, S): the full image is freed now
        return Augmented(d.key, crop, d.label, lighting_offset(a.alpha, self.light))

    def collate(self, samples: list[Augmented]) -> Batch:
        """-> ``images`` uint8 (B, 3, S, S), ``labels`` int64 (B,), ``lighting`` float32 (B, 3), ``keys``."""
        B, S = len(samples), self.size
        images = np.empty((B, 3, S, S), np.uint8)
        out = torch.from_numpy(images)
        labels, lighting = np.empty(B, np.int64), np.empty((B, 3), np.float32)
        for i, a in enumerate(samples):
            out[i].copy_(a.crop)
            labels[i], lighting[i] = a.label, a.lighting
        return Batch(labels, [a.key for a in samples], lighting, images=images)


class JpegCodec:
    """Device-side decode: the same draws from the JPEG header, the bytes shipped (encoded.py)."""

    def __init__(
        self, seed: int, side: int, input_size: int, light: np.ndarray, aug: Augmentation = PAPER_AUGMENTATION
    ) -> None:
        self.seed, self.side, self.size, self.light, self.aug = seed, side, input_size, light, aug

    def sample(self, rec: Record, epoch: int, stats: ReaderStats) -> Any | None:
        """Record -> :class:`alexnet.data.encoded.Encoded` (no pixel decode for a JPEG)."""
        return draw_encoded(rec, self.seed, epoch, self.side, self.size, self.light, stats, self.aug)

    def collate(self, samples: list[Any]) -> Batch:
        """-> a batch carrying :func:`alexnet.data.encoded.collate_encoded`'s payload."""
        enc = collate_encoded(samples, self.size)
        return Batch(enc["labels"], enc["keys"], enc["lighting"], encoded=enc)


def training_codec(
    encoded: bool, seed: int, side: int, input_size: int, light: np.ndarray, aug: Augmentation
) -> Codec:
    """The codec of a training stream: JPEG bytes for the device (``encoded``) or worker pixels."""
    return (JpegCodec if encoded else PixelCodec)(seed, side, input_size, light, aug)


VAL_CROPS = ("center", "ten")


def val_sample(rec: Record, side: int, input_size: int, crop: str, stats: ReaderStats) -> ValSample | None:
    """Record -> its val crop(s), cut as soon as it is decoded, or None (counted in ``stats``)."""
    d = decode_record(rec, side, stats)
    if d is None:
        return None
    c = center_crop(d.image, input_size) if crop == "center" else ten_crop(d.image, input_size)
    return ValSample(d.key, c.contiguous(), d.label)


def collate_val(samples: list[ValSample], crop: str, input_size: int, index: int) -> ValBatch:
    """-> val batch ``index``: ``images`` uint8 (b, 3, S, S) or (b, 10, 3, S, S), ``labels`` int64 (b,)."""
    shape = (3, input_size, input_size) if crop == "center" else (10, 3, input_size, input_size)
    images = np.empty((len(samples), *shape), np.uint8)
    out = torch.from_numpy(images)
    for i, s in enumerate(samples):
        out[i].copy_(s.crop)
    labels = np.asarray([s.label for s in samples], np.int64)
    return ValBatch(labels, [s.key for s in samples], index, images)
