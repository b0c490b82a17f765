"""Encoded training batches: the workers ship JPEG bytes, the trainer decodes them on its device.

Why
    A stored 256 px image is 196,608 bytes of pixels; as the shards' quality-90 JPEG a photo takes
    1.5-3 bits per pixel, 12-25 KB, so a batch of bytes is ~0.1x the pixels it stands for (an
    estimate: :attr:`alexnet.data.batch.Batch.nbytes` measures a real batch): a tenth through the
    object store and the network, and the decode (the workers' main cost) moves to the trainer's device, where
    ``torchvision.io.decode_jpeg`` decodes a whole list in one call (nvJPEG on CUDA).

Worker side (:func:`draw_encoded`, no pixel decode)
    The record's label and ``jpg`` are checked and the image header is read (PIL, no ``load()``) by
    :func:`alexnet.data.records.check_record`, as the worker path checks them: not an image, or
    another size than the dataset's, is refused before any decode. The augmentation is
    drawn from ``(seed, epoch, key)`` and the image's real side, exactly as ``decode_record`` +
    ``train_crop`` draw it. A record that is not a JPEG (a PNG under ``.jpg``: ImageNet has one) cannot
    go to the device decoder, so the worker decodes and crops it itself and ships the crop ("raw").

Batch format (:func:`collate_encoded`; numpy arrays only, so the object store passes them zero-copy)
    ``jpeg``      uint8 (N,)       every JPEG row's bytes, end to end
    ``offsets``   int64 (B+1,)     row i's bytes are ``jpeg[offsets[i]:offsets[i+1]]`` (empty for raw rows)
    ``crop``      int32 (B, 3)     (y, x, flip) of the crop in the decoded image
    ``sides``     int32 (B,)       side of the stored image, what a decode must give (else: bad row)
    ``labels``    int64 (B,)
    ``lighting``  float32 (B, 3)   PCA lighting offset, pixel units (as the worker path ships it)
    ``keys``      list[str] (B)
    ``raw_rows``  int64 (k,)       rows shipped as pixels, ascending
    ``raw``       uint8 (k, 3, S, S)  their crops, already flipped

Trainer side (:func:`decode_rows`)
    A consumer takes a slice of rows (a pipeline's stage-0 ranks each take their share of a batch),
    decodes its JPEG rows in one batched call on its device, crops and flips there into one
    preallocated uint8 (b, 3, S, S), copies the raw rows in, and flags the rows that do not decode
    (or decode to another size than the header said) as ``bad``: left zero, never an exception; the
    caller substitutes the mean image and counts them as corrupt.

Same pixels
    On CPU both paths decode with the same libjpeg-turbo call (``decode_jpeg``, RGB) and cut the same
    crop, so a row of :func:`decode_rows` is bit-identical to ``train_crop(decode_image(jpg), draw, S)``
    (tests/alexnet/test_encoded.py). On CUDA nvJPEG's IDCT and chroma upsampling are not libjpeg's:
    pixels may differ by a few levels, as between any two JPEG decoders.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from alexnet.data.records import ReaderStats, Record, check_record, corrupt
from alexnet.data.transforms import (
    PAPER_AUGMENTATION,
    Augmentation,
    decode_image,
    draw_augmentation,
    lighting_offset,
    train_crop,
)

log = logging.getLogger("alexnet.data")


class Encoded(NamedTuple):
    """A training sample as a worker ships it: its JPEG bytes and drawn augmentation, or its crop.

    ``data``: the JPEG bytes (empty for a raw sample); ``y``, ``x``, ``flip``: the crop in the decoded
    image; ``lighting`` (3,) float32 pixel units; ``raw``: uint8 (3, S, S) crop, already flipped, for a
    non-JPEG image (else None); ``side``: the image's side, which its decode must give.
    """

    key: str
    data: bytes
    label: int
    y: int
    x: int
    flip: bool
    lighting: np.ndarray
    raw: np.ndarray | None
    side: int


def draw_encoded(
    rec: Record,
    seed: int,
    epoch: int,
    stored: int,
    input_size: int,
    light: np.ndarray,
    stats: ReaderStats,
    aug: Augmentation = PAPER_AUGMENTATION,
) -> Encoded | None:
    """One record -> its :class:`Encoded` sample, or None (warned, counted in ``stats``) if unusable.

    No pixel decode for a JPEG: only its header is read (:func:`~alexnet.data.records.check_record`,
    the same check as the worker path's, so both refuse the same records). ``stored``: the
    dataset's image side (``DatasetIndex.size``). ``light``:
    :func:`~alexnet.data.transforms.lighting_matrix`. ``samples`` is the caller's to count.
    """
    c = check_record(rec, stored, stats)
    if c is None:
        return None
    d = draw_augmentation(seed, epoch, c.key, stored, input_size, aug)  # aug: data.crop/flip/lighting
    lighting = lighting_offset(d.alpha, light)
    if c.jpeg:
        return Encoded(c.key, c.data, c.label, d.y, d.x, d.flip, lighting, None, stored)
    # not a JPEG: the device decoder cannot take it, so decode and crop it here (rare)
    try:
        img = decode_image(c.data)
    except Exception as e:
        corrupt(rec, stats, f"cannot decode ({type(e).__name__}: {e})")
        return None
    if tuple(img.shape) != (3, stored, stored):
        corrupt(rec, stats, f"decodes to {tuple(img.shape)}, its header says {stored}x{stored}")
        return None
    crop = train_crop(img, d, input_size).contiguous().numpy()
    return Encoded(c.key, b"", c.label, d.y, d.x, d.flip, lighting, crop, stored)


def collate_encoded(samples: list[Encoded], input_size: int) -> dict[str, Any]:
    """B samples -> one encoded batch of numpy arrays (format in the module docstring)."""
    B, S = len(samples), input_size
    sizes = np.array([0 if s.raw is not None else len(s.data) for s in samples], np.int64)
    offsets = np.zeros(B + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    jpeg = np.empty(int(offsets[-1]), np.uint8)
    raw_rows = np.array([i for i, s in enumerate(samples) if s.raw is not None], np.int64)
    raw = np.empty((len(raw_rows), 3, S, S), np.uint8)
    for i, s in enumerate(samples):
        if s.raw is None:
            jpeg[offsets[i] : offsets[i + 1]] = np.frombuffer(s.data, np.uint8)
    for j, i in enumerate(raw_rows):
        if samples[i].raw.shape != (3, S, S):
            raise ValueError(
                f"sample {samples[i].key}: raw crop {samples[i].raw.shape}, expected (3, {S}, {S}): "
                "draw_encoded and collate_encoded were given different input sizes"
            )
        raw[j] = samples[i].raw
    return {
        "jpeg": jpeg,
        "offsets": offsets,
        "crop": np.array([(s.y, s.x, s.flip) for s in samples], np.int32).reshape(B, 3),
        "sides": np.array([s.side for s in samples], np.int32),
        "labels": np.array([s.label for s in samples], np.int64),
        "lighting": np.array([s.lighting for s in samples], np.float32).reshape(B, 3),
        "keys": [s.key for s in samples],
        "raw_rows": raw_rows,
        "raw": raw,
    }


def _tensor(a: np.ndarray) -> Tensor:
    """A CPU tensor viewing ``a``'s memory. Object-store arrays are read-only; nothing here writes to
    them, so torch's warning about non-writable arrays does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(a))


def _decode(data: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """JPEG byte tensors (CPU) -> RGB uint8 (3, H, W) on ``device``, None for those that do not decode.

    One batched call; if it fails (it gives no partial results), each image again on its own.
    """
    if not data:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg  # imported where used: see transforms

    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except torch.OutOfMemoryError:
        raise  # a resource problem, not bad data
    except RuntimeError:
        pass
    out: list[Tensor | None] = []
    for t in data:
        try:
            out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            out.append(None)
    return out


def decode_rows(
    batch: dict[str, Any], rows: slice, input_size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Rows ``rows`` of an encoded batch -> their crops uint8 (b, 3, S, S) on ``device`` and ``bad``
    bool (b,) on ``device``: rows whose JPEG does not decode, or decodes to another size than its
    header said (left zero; substitute the mean image and count them as corrupt). Never raises for
    bad data. ``rows``: a contiguous slice (step 1) of the batch's B rows.
    """
    B, S = len(batch["labels"]), input_size
    start, stop, step = rows.indices(B)
    if step != 1:
        raise ValueError(f"rows={rows}: decode_rows takes a contiguous slice (step 1)")
    b = max(stop - start, 0)
    out = torch.zeros((b, 3, S, S), dtype=torch.uint8, device=device)  # (b, 3, S, S)
    bad = torch.zeros(b, dtype=torch.bool)
    offsets, crop, sides = batch["offsets"], batch["crop"], batch["sides"]
    raw_rows = np.asarray(batch["raw_rows"])
    mine = (raw_rows >= start) & (raw_rows < stop)
    is_raw = np.zeros(b, bool)
    is_raw[raw_rows[mine] - start] = True
    jpeg_rows = np.flatnonzero(~is_raw)
    data = _tensor(batch["jpeg"])
    images = _decode([data[offsets[start + i] : offsets[start + i + 1]] for i in jpeg_rows], device)
    for i, img in zip(jpeg_rows, images, strict=True):
        side = int(sides[start + i])
        if img is None or tuple(img.shape) != (3, side, side):
            bad[i] = True
            continue
        y, x, flip = (int(v) for v in crop[start + i])
        c = img[:, y : y + S, x : x + S]
        out[i].copy_(c.flip(-1) if flip else c)
    if mine.any():
        raw = _tensor(batch["raw"])[torch.from_numpy(np.flatnonzero(mine))]  # (k', 3, S, S), copied
        out[torch.from_numpy(raw_rows[mine] - start).to(device)] = raw.to(device)
    return out, bad.to(device)
