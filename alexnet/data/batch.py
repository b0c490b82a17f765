"""The batches the data plane makes and a trainer reads, typed: only this module and the codec
(:mod:`alexnet.data.codec`, :mod:`alexnet.data.encoded`) know their layout.

* :class:`Batch`: one training batch of a stream, B rows. Its pixels are either worker-decoded
  crops (``images``, :class:`~alexnet.data.codec.PixelCodec`) or the stream batch's JPEG payload
  (``encoded``, :class:`~alexnet.data.codec.JpegCodec`), which the trainer decodes on its device,
  only the rows it reads. :meth:`Batch.part` gives a replica its rows, :meth:`Batch.labels_only`
  what the last stage reads (no pixels), :meth:`Batch.pixels` the rows' uint8 crops on a device.
* :class:`ValBatch`: one validation batch (center crops or the paper's 10 crops); it may be short
  or empty (unusable samples are skipped); :meth:`ValBatch.model_input` is the network's input.

All arrays are numpy (they travel through Ray's object store as they are, read-only there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alexnet.data.transforms import to_model_input


@dataclass(frozen=True)
class Batch:
    """Rows ``rows`` of one training batch (all B of them unless :meth:`part` cut it).

    ``labels`` int64 (b,), ``keys`` the rows' sample keys, ``lighting`` float32 (b, 3) pixel
    units; ``images`` uint8 (b, 3, S, S) or ``encoded`` (the whole stream batch's JPEG payload,
    :func:`alexnet.data.encoded.collate_encoded`; its rows are cut when decoded), or neither
    (:meth:`labels_only`). ``epoch``, ``index`` (batch index within the epoch, the global step
    within it), ``stream``: where it belongs; ``position``/``next_position``: the stream's resume
    positions before and after it (:meth:`alexnet.data.reader.Stream.position`).
    """

    labels: np.ndarray
    keys: list[str]
    lighting: np.ndarray | None = None
    images: np.ndarray | None = None
    encoded: dict[str, Any] | None = None
    rows: tuple[int, int] | None = None  # None: every row of the stream's batch
    epoch: int = 0
    index: int = 0
    stream: int = 0
    position: dict | None = None
    next_position: dict | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays: what the object store carries for it (keys aside)."""
        arrays = [self.labels, self.lighting, self.images, *(self.encoded or {}).values()]
        unique = {id(a): a for a in arrays if isinstance(a, np.ndarray)}  # the payload shares labels
        return sum(a.nbytes for a in unique.values())

    def part(self, part: int, parts: int) -> Batch:
        """Rows ``[part*b/parts, (part+1)*b/parts)`` (views): replica ``part`` of ``parts``."""
        b = len(self)
        if not 0 <= part < parts or b % parts:
            raise ValueError(f"part={part}, parts={parts}: need 0 <= part < parts and parts dividing {b}")
        r = slice(part * b // parts, (part + 1) * b // parts)
        first = 0 if self.rows is None else self.rows[0]
        return dataclasses.replace(
            self,
            labels=self.labels[r],
            keys=list(self.keys[r]),
            lighting=None if self.lighting is None else self.lighting[r],
            images=None if self.images is None else self.images[r],
            rows=(first + r.start, first + r.stop),
        )

    def labels_only(self) -> Batch:
        """What a consumer that reads no pixels takes (the last stage: its labels): small to ship."""
        return dataclasses.replace(self, lighting=None, images=None, encoded=None)

    def pixels(
        self, input_size: int, device: torch.device, to_device: Callable[[np.ndarray], Tensor]
    ) -> tuple[Tensor, Tensor | None]:
        """The rows' crops, uint8 (b, 3, S, S) on ``device``, and ``bad`` bool (b,) on ``device``:
        rows whose JPEG did not decode there (zero; None for worker-decoded pixels).
        ``to_device`` moves a host array to the device (the feed's pinned copy)."""
        if self.images is not None:
            return to_device(self.images), None
        if self.encoded is None:
            raise ValueError("a labels-only batch has no pixels")
        from alexnet.data.encoded import decode_rows  # the JPEG codec's device half

        rows = self.rows or (0, len(self))
        return decode_rows(self.encoded, slice(*rows), input_size, device)


@dataclass(frozen=True)
class ValBatch:
    """Validation batch ``index`` of a pass: ``labels`` int64 (b,), ``keys``, and ``images`` uint8
    (b, 3, S, S) center crops or (b, 10, 3, S, S) ten crops (None: :meth:`labels_only`)."""

    labels: np.ndarray
    keys: list[str]
    index: int = 0
    images: np.ndarray | None = None

    @property
    def n(self) -> int:
        """Usable samples in it (0: every one was skipped)."""
        return len(self.labels)

    def labels_only(self) -> ValBatch:
        """What the later stages of a replica read: no pixels."""
        return dataclasses.replace(self, images=None)

    def model_input(self, mean: Tensor, scale: float, device: torch.device) -> Tensor:
        """The network's input: (b, 3, S, S) center crops, or (10 b, 3, S, S) crop-major ten crops."""
        if self.images is None:
            raise ValueError("a labels-only val batch has no pixels")
        u8 = torch.from_numpy(self.images).to(device)
        if u8.dim() == 5:  # (b, 10, 3, S, S) -> (10 b, 3, S, S), crop-major
            u8 = u8.transpose(0, 1).flatten(0, 1)
        no_lighting = torch.zeros(u8.shape[0], 3, device=device)  # PCA lighting is a training augmentation
        return to_model_input(u8, no_lighting, mean, scale)
