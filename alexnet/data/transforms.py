"""The paper's augmentation and evaluation crops, and the trainer-side normalisation (pure torch/PIL).

Worker side (CPU, uint8): decode, crop, flip -> uint8 (3, S, S), plus a per-image RGB lighting
offset (3,). Trainer side (its device): :func:`to_model_input` converts to float, subtracts the
mean and adds the lighting offset, so the heavy float work never crosses the object store.

Every random draw is a pure function of ``(seed, epoch, sample key)``: a BLAKE2b hash of the three
is cut into the crop offsets, the flip bit and three Gaussian alphas (Box-Muller). No RNG state is
shared, so the same sample gets the same augmentation in whichever worker, process or order it is
decoded, and a resumed run draws exactly what the uninterrupted run drew.

PCA lighting: the paper adds ``[p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T`` with ``a_i ~ N(0, 0.1)`` and
(p_i, l_i) the eigenvectors/eigenvalues of the RGB covariance, without saying the pixel scale. We
apply that formula to pixels scaled to [0, 1] (as the common reimplementations do) and return the
offset in pixel units: ``offset = V (a * l) / 255`` with ``l`` the eigenvalues in pixel units^2
(``dataset.json``): :func:`lighting_matrix` and :func:`lighting_offset`. Using raw 0-255 eigenvalues
would shift pixels by hundreds of levels.

Each part is a switch (:class:`Augmentation`, the job's ``data.crop``, ``data.flip``,
``data.lighting``), applied where the draw is made (:func:`draw_augmentation`), so every decode
path (the workers' and the device's) follows it: a center crop, no flip, zero lighting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from alexnet.data.index import check_input_size

LIGHTING_STD = 0.1
CROPS = ("random", "center")

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (not a dependency here); decode_jpeg
# still works and is the fast path, so silence just that notice (it is raised on every call).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")


@dataclass(frozen=True)
class AugDraw:
    """One sample's augmentation: crop corner (x, y), horizontal flip, lighting alphas (3,)."""

    x: int
    y: int
    flip: bool
    alpha: tuple[float, float, float]


@dataclass(frozen=True)
class Augmentation:
    """Which parts of the paper's training augmentation (its section 4.1) are on: ``crop``
    ``"random"`` (uniform over the positions) or ``"center"``; ``flip`` (horizontal, p = 0.5);
    ``lighting`` (the PCA colour shift). The defaults are the paper's."""

    crop: str = "random"
    flip: bool = True
    lighting: bool = True

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"data.crop={self.crop!r}: use one of {CROPS}")


PAPER_AUGMENTATION = Augmentation()


def _hash_words(seed: int, epoch: int, key: str) -> tuple[int, ...]:
    digest = hashlib.blake2b(f"{seed}\x1f{epoch}\x1f{key}".encode(), digest_size=32).digest()
    return struct.unpack("<8I", digest)


def draw_augmentation(
    seed: int, epoch: int, key: str, stored: int, crop: int, aug: Augmentation = PAPER_AUGMENTATION
) -> AugDraw:
    """The training augmentation of sample ``key`` in ``epoch``: a function of its arguments only.

    ``stored``: side of the stored image; ``crop``: side of the model input (crop <= stored).
    Crop corners are uniform over the ``stored - crop + 1`` positions; flip with p = 0.5;
    alphas ~ N(0, 0.1) via Box-Muller on 32-bit uniforms. ``aug`` switches parts off: the center
    corner (as :func:`center_crop`), no flip, zero alphas; the parts left on draw what they draw
    with everything on (the hash is cut the same way).
    """
    d = _draw(seed, epoch, key, stored, crop)
    if aug.crop == "center":
        d = dataclasses.replace(d, x=(stored - crop) // 2, y=(stored - crop) // 2)
    if not aug.flip:
        d = dataclasses.replace(d, flip=False)
    if not aug.lighting:
        d = dataclasses.replace(d, alpha=(0.0, 0.0, 0.0))
    return d


def _draw(seed: int, epoch: int, key: str, stored: int, crop: int) -> AugDraw:
    check_input_size(crop, stored)
    w = _hash_words(seed, epoch, key)
    span = stored - crop + 1
    # uniforms in (0, 1]: (u + 1) / 2^32 avoids log(0)
    u = [(v + 1) / 4294967296.0 for v in w[3:7]]
    r1, r2 = math.sqrt(-2.0 * math.log(u[0])), math.sqrt(-2.0 * math.log(u[2]))
    n = (
        r1 * math.cos(2 * math.pi * u[1]),
        r1 * math.sin(2 * math.pi * u[1]),
        r2 * math.cos(2 * math.pi * u[3]),
    )
    return AugDraw(
        x=w[0] % span, y=w[1] % span, flip=bool(w[2] & 1), alpha=tuple(LIGHTING_STD * a for a in n)
    )


def lighting_matrix(eigenvalues: np.ndarray, eigenvectors: np.ndarray) -> np.ndarray:
    """``M = V diag(l) / 255``, float32 (3, 3): the paper's PCA colour shift of alphas ``a`` is ``M @ a``.

    ``eigenvalues`` (3,) in pixel units^2 and ``eigenvectors`` (3, 3, one per column), as in
    ``dataset.json``; see the module docstring for the scale. Computed once per dataset.
    """
    return (eigenvectors * eigenvalues[None, :] / 255.0).astype(np.float32)


def lighting_offset(alpha: tuple[float, float, float], matrix: np.ndarray) -> np.ndarray:
    """One sample's PCA colour shift (3,), float32 pixel units: ``matrix @ alpha``.

    ``alpha``: its :attr:`AugDraw.alpha`; ``matrix``: :func:`lighting_matrix` of the dataset.
    """
    return matrix @ np.asarray(alpha, np.float32)


def decode_image(data: bytes) -> Tensor:
    """Decode image bytes to uint8 RGB (3, H, W).

    JPEG goes through ``torchvision.io.decode_jpeg`` (libjpeg-turbo straight into a tensor, ~1.5x
    PIL's decode + conversion); anything else through PIL. Raises on corrupt data.
    """
    if data[:2] == b"\xff\xd8":
        # imported here: torchvision costs as much CPU to import as torch itself (its ops import
        # Dynamo), paid by every process that imports this module, and only a decoding one needs it
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def train_crop(img: Tensor, draw: AugDraw, size: int) -> Tensor:
    """The paper's random crop and flip: uint8 (3, H, W) -> (3, size, size) (a view unless flipped)."""
    out = img[:, draw.y : draw.y + size, draw.x : draw.x + size]
    return out.flip(-1) if draw.flip else out


def center_crop(img: Tensor, size: int) -> Tensor:
    """Center ``size`` x ``size`` crop of (..., H, W)."""
    h, w = img.shape[-2:]
    check_input_size(size, min(h, w))
    y, x = (h - size) // 2, (w - size) // 2
    return img[..., y : y + size, x : x + size]


def ten_crop(img: Tensor, size: int) -> Tensor:
    """The paper's 10 test patches (3, H, W) -> (10, 3, size, size).

    Order: top-left, top-right, bottom-left, bottom-right, center, then the same five flipped.
    """
    h, w = img.shape[-2:]
    check_input_size(size, min(h, w))
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), ((h - size) // 2, (w - size) // 2)]
    crops = torch.stack([img[:, y : y + size, x : x + size] for y, x in corners])  # (5, 3, S, S)
    return torch.cat([crops, crops.flip(-1)])


def to_model_input(images_uint8: Tensor, lighting: Tensor, mean: Tensor, scale: float = 1.0) -> Tensor:
    """Trainer-side normalisation on the trainer's device: float32 ``(x - mean + lighting) * scale``.

    images_uint8: (B, 3, S, S) uint8; lighting: (B, 3) pixel units (zeros for evaluation); mean:
    broadcastable to (3, S, S), e.g. ``DatasetIndex.mean_tensor(S)``. ``scale`` 1.0 is the paper
    (mean-subtracted raw pixel values); narrow He-initialised models may prefer e.g. 1/64.
    """
    x = images_uint8.to(torch.float32)  # a fresh tensor: the rest works in place on it
    x.sub_(mean.to(device=x.device, dtype=torch.float32))
    x.add_(lighting.to(x.device, torch.float32)[:, :, None, None])
    return x.mul_(scale) if scale != 1.0 else x
