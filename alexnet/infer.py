"""A trained network applied to image files: the model side of ``alexnet predict`` and ``export``.

Pure (no checkpoints, no run directories: reading those is :mod:`cluster.predict`'s job, since
``alexnet/`` never reads what ``cluster/`` writes). Images go through the same steps as the
shards and the validation pass, so a file written from a val shard scores as it did in the run:

    file --(Pillow: short side to ``resize``, center square; :func:`load_image`)--> uint8 (3, R, R)
         --(center crop, or the paper's 10 crops; :func:`crops`)--> uint8 (k, 3, S, S)
         --(:class:`InferenceNet`: (x - mean) * input_scale, the fused network)--> logits / features

:class:`InferenceNet` holds the preprocessing that is arithmetic (mean, scale), so its input is
uint8 crops and it exports whole (:mod:`cluster.export`); resizing and cropping stay outside, in
Pillow, and are documented with the exported program.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from alexnet.data.transforms import center_crop, ten_crop
from alexnet.data.writer import resize_center_crop
from alexnet.model import BLOCK_NAMES, FusedAlexNet
from alexnet.scoring import average_crops

CROPS = ("center", "ten")  # one center crop, or the paper's 10 (corners and center, and flips)
TEN = 10


class InferenceNet(nn.Module):
    """uint8 crops (B, 3, S, S) -> float32 ``layer`` outputs: logits for ``fc8`` (the default),
    features for another block (``fc7``: (B, 2 * fc_units)). The input is normalised as in training
    and validation, ``(pixels - mean) * input_scale``, with the mean a buffer of the module."""

    def __init__(self, net: FusedAlexNet, mean: Tensor, input_scale: float, layer: str = "fc8") -> None:
        super().__init__()
        if layer not in BLOCK_NAMES:
            raise ValueError(f"--features {layer}: use one of {', '.join(BLOCK_NAMES)}")
        self.net, self.input_scale, self.layer = net, float(input_scale), layer
        self.register_buffer("mean", mean.to(torch.float32).clone())  # (3, S, S) or (3, 1, 1), 0-255

    def forward(self, images: Tensor) -> Tensor:
        # out of place, the same float32 arithmetic as alexnet.data.transforms.to_model_input
        x = (images.to(torch.float32) - self.mean) * self.input_scale
        return self.net.forward_to(x, self.layer)


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """The image files ``paths`` name: a file as given, a folder's files (recursively, sorted) whose
    suffix Pillow knows. A path that does not exist, or none found, is a ``ValueError``."""
    known = set(Image.registered_extensions())
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in known)
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder: give image files or folders of them")
    if not out:
        raise ValueError(
            f"no image files in {', '.join(map(str, paths))}: give files or folders of images Pillow reads"
        )
    return out


def load_image(path: str | Path, resize: int) -> Tensor:
    """uint8 (3, resize, resize): the file's short side scaled to ``resize`` px and its center
    square, as ``alexnet shards`` stores images. A file Pillow cannot read is a ``ValueError``."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(resize_center_crop(im, resize))
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: not an image Pillow can read ({e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def crops(image: Tensor, size: int, crop: str) -> Tensor:
    """uint8 (3, R, R) -> (1, 3, S, S) center crop, or (10, 3, S, S) for ``crop="ten"``."""
    if crop not in CROPS:
        raise ValueError(f"crop={crop!r}: use one of {CROPS}")
    return center_crop(image, size)[None] if crop == "center" else ten_crop(image, size)


def run_batches(
    net: InferenceNet, images: Sequence[Tensor], size: int, crop: str, batch_size: int
) -> Iterator[Tensor]:
    """``net`` on the crops of ``images`` (uint8 (3, R, R) each), ``batch_size`` images at a time:
    per batch (b, n) float32 on the host: log mean softmax over the 10 crops for logits (fc8), the
    mean over the crops for features; the center crop's outputs as they are."""
    device = net.mean.device
    for i in range(0, len(images), batch_size):
        chunk = torch.stack([crops(im, size, crop) for im in images[i : i + batch_size]])  # (b, k, 3, S, S)
        k = chunk.shape[1]
        x = chunk.transpose(0, 1).flatten(0, 1).to(device)  # (k b, 3, S, S), crop-major
        with torch.no_grad():
            out = net(x).float()
        if net.layer == "fc8":
            out = average_crops(out, k) if k > 1 else torch.log_softmax(out, dim=1)
        elif k > 1:
            out = out.view(k, -1, out.shape[1]).mean(0)
        yield out.cpu()
