"""The shard index: ``OUT/dataset.json`` and the training-set statistics beside it.

Layout of a shard directory (local path or any fsspec URL)::

    OUT/train-000000.tar ...   WebDataset shards; each sample has __key__, jpg, cls
    OUT/val-000000.tar ...
    OUT/dataset.json           this index (written last: its presence means "complete")
    OUT/mean_image.npy         training-set mean image, float32 (3, size, size), pixel units 0-255
    OUT/_parts/...             per-shard statistics used to resume an interrupted build

Each sample of a shard: ``__key__`` (``train_00000042``: the writer's numbering, what every
augmentation draw is keyed on), ``jpg``, ``cls`` (the label as text) and ``json`` (``{"src": NAME}``:
the source image's path inside SRC, or the archive member's name; readable with plain webdataset).

``dataset.json`` fields (format version 2; an index of another version is refused with one line):

* ``format_version``, ``size`` (stored images are size x size), ``quality`` (JPEG), ``fingerprint``
  (identifies the source: a different one makes ``alexnet shards`` refuse the directory),
  ``source`` (SRC, or ``synthetic:<seed>``);
* ``classes``: class names, index = label (sorted folder names, as torchvision's ImageFolder; for
  ImageNet the WNIDs, ``n01440764`` ...);
* ``class_names`` (since the ImageNet layouts; optional, same order as ``classes``): readable names,
  from the devkit's meta.mat ``words`` (``tench, Tinca tinca``) where one was found, else the class;
* ``layout`` (optional, folder builds): what SRC held: ``train``, ``val`` (e.g. ``flat SRC/val/<image>``),
  ``val_labels`` and ``class_names`` (the label file used, or null);
* ``splits``: ``{"train": {"count": N, "shards": [{"name": "train-000000.tar", "count": n, "bytes": b},
  ...]}, ...}``: ``name`` a plain file name in the dataset folder, ``count`` and ``bytes`` (the shard's
  file size) non-negative integers, the split's ``count`` their sum;
* ``mean_rgb`` (3,), ``mean_image_file`` ("mean_image.npy"), ``rgb_cov`` (3, 3), ``eigenvalues`` (3,,
  descending) and ``eigenvectors`` (3, 3, one eigenvector per COLUMN): all in pixel units (0-255) over
  every pixel of the stored (resized, cropped, JPEG-decoded) training images;
* ``skipped``: source files that could not be read (relative path and reason).

The mean image is a separate ``.npy`` (about 0.8 MB at 256 px) rather than JSON so the index stays
small and human-readable.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch

FORMAT_VERSION = 2  # 2: each sample's ``json`` member names its source (``src``); names and counts checked
INDEX_NAME = "dataset.json"
# keys a reader needs; the others (quality, fingerprint, skipped, class_names, ...) are informative
REQUIRED_KEYS = ("size", "classes", "splits", "mean_rgb", "mean_image_file", "eigenvalues", "eigenvectors")
MEAN_IMAGE_NAME = "mean_image.npy"
SPLITS = ("train", "val")


def shard_name(split: str, i: int) -> str:
    """``train-000000.tar`` style shard file name."""
    return f"{split}-{i:06d}.tar"


def check_input_size(input_size: int, stored: int) -> None:
    """The one check that crops fit the stored images: ``input_size`` <= ``stored`` (their side, px).

    Named after the job-config key, since that is where a user sets the crop size.
    """
    if input_size > stored:
        raise ValueError(
            f"model.input_size={input_size} is larger than the stored images ({stored} px): "
            f"use --set model.input_size=<= {stored}, or rebuild the shards with a larger --size"
        )


def join(url: str, name: str) -> str:
    """Join a directory URL (local path or fsspec URL) and a file name."""
    return url.rstrip("/") + "/" + name


@dataclass
class PixelStats:
    """Running sums over images (uint8 (3, S, S)) from which mean image and RGB PCA are derived.

    Sums are float64 so that merging per-shard partials is exact enough for any dataset size.
    """

    size: int
    count: int = 0  # images
    image_sum: np.ndarray = field(default=None)  # (3, S, S) float64
    rgb_outer: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))  # sum of x x^T over pixels

    def __post_init__(self) -> None:
        if self.image_sum is None:
            self.image_sum = np.zeros((3, self.size, self.size))

    def add(self, chw: np.ndarray) -> None:
        """Add one uint8 image (3, S, S)."""
        x = chw.astype(np.float64)
        self.image_sum += x
        flat = x.reshape(3, -1)
        self.rgb_outer += flat @ flat.T
        self.count += 1

    def merge(self, other: PixelStats) -> None:
        """Add another partial's sums into this one."""
        self.image_sum += other.image_sum
        self.rgb_outer += other.rgb_outer
        self.count += other.count

    def to_bytes(self) -> bytes:
        """Serialise (npz) for the per-shard resume files."""
        buf = io.BytesIO()
        np.savez(buf, count=self.count, image_sum=self.image_sum, rgb_outer=self.rgb_outer)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PixelStats:
        """Inverse of :meth:`to_bytes`."""
        z = np.load(io.BytesIO(data))
        s = cls(size=z["image_sum"].shape[-1], count=int(z["count"]))
        s.image_sum, s.rgb_outer = z["image_sum"], z["rgb_outer"]
        return s

    def finalize(self) -> dict[str, Any]:
        """Mean image (3, S, S) float32, mean RGB, RGB covariance and its eigen-decomposition."""
        if self.count == 0:
            raise ValueError("no training images were readable: cannot compute the dataset statistics")
        n_pix = self.count * self.size * self.size
        mean_image = (self.image_sum / self.count).astype(np.float32)
        mean_rgb = self.image_sum.reshape(3, -1).sum(1) / n_pix
        cov = self.rgb_outer / n_pix - np.outer(mean_rgb, mean_rgb)
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1]
        evals, evecs = evals[order], evecs[:, order]
        # Fix the sign of each eigenvector (first nonzero component positive) so the index is reproducible.
        signs = np.sign(evecs[np.argmax(np.abs(evecs) > 1e-12, axis=0), range(3)])
        evecs = evecs * np.where(signs == 0, 1.0, signs)
        return {
            "mean_image": mean_image,
            "mean_rgb": mean_rgb.tolist(),
            "rgb_cov": cov.tolist(),
            "eigenvalues": evals.tolist(),
            "eigenvectors": evecs.tolist(),
        }


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_meta(meta: dict[str, Any], path: str, fix: str) -> None:
    """The keys and the ``splits`` structure readers rely on are there, and every name a reader will
    open is a plain file name inside the dataset folder (a shard named ``../other/train-000000.tar``
    would read another dataset's files); counts are non-negative and add up. Each refusal names the
    field."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} (an incomplete or edited index); {fix}")

    def bad(field: str, value: Any, want: str) -> ValueError:
        return ValueError(f"{path}: {field} = {value!r}: {want} (an edited or damaged index); {fix}")

    if not isinstance(meta["classes"], list) or not all(isinstance(c, str) for c in meta["classes"]):
        raise bad("classes", meta["classes"], "must be a list of class names")
    if not isinstance(meta["mean_image_file"], str) or not _PLAIN_NAME.match(meta["mean_image_file"]):
        raise bad("mean_image_file", meta["mean_image_file"], "must be a plain file name in the folder")
    if not isinstance(meta["splits"], dict):
        raise bad("splits", meta["splits"], 'must map each split to {"count", "shards": [...]}')
    for split, s in meta["splits"].items():
        where = f"splits.{split}"
        if not isinstance(s, dict) or not isinstance(s.get("shards"), list):
            raise bad(where, s, 'must be {"count": N, "shards": [{"name", "count", "bytes"}, ...]}')
        for i, sh in enumerate(s["shards"]):
            at = f"{where}.shards[{i}]"
            if not isinstance(sh, dict) or not {"name", "count", "bytes"} <= set(sh):
                raise bad(at, sh, 'must be {"name": ..., "count": N, "bytes": B}')
            if not isinstance(sh["name"], str) or not _PLAIN_NAME.match(sh["name"]):
                raise bad(f"{at}.name", sh["name"], "must be a plain file name inside the dataset folder")
            for k in ("count", "bytes"):
                if not _count(sh[k]):
                    raise bad(f"{at}.{k}", sh[k], "must be an integer >= 0")
        total = sum(sh["count"] for sh in s["shards"])
        if s.get("count") != total:
            raise bad(f"{where}.count", s.get("count"), f"must be the sum of its shards' counts, {total}")


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its URL and its sample count as written."""

    url: str
    count: int


@dataclass
class DatasetIndex:
    """The parsed ``dataset.json`` of a shard directory (see module docstring for the fields)."""

    url: str
    meta: dict[str, Any]
    _mean_image: np.ndarray | None = None

    @classmethod
    def load(cls, url: str) -> DatasetIndex:
        """Read ``URL/dataset.json`` (URL: the shard directory, local path or fsspec URL).

        A missing, unparsable or incomplete file is a ``ValueError`` naming it and the fix.
        """
        path = join(url, INDEX_NAME)
        try:
            with fsspec.open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise ValueError(
                f"{url}: no {INDEX_NAME} here; build shards first with `alexnet shards SRC {url}` "
                f"or `alexnet shards --synthetic N {url}`"
            ) from None
        rebuild = (
            f"run the `alexnet shards ... {url}` command that built it again (it keeps the complete "
            f"shards and writes {INDEX_NAME} anew)"
        )
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}): a damaged copy; {rebuild}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: a JSON {type(meta).__name__}, not a shard index; {rebuild}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: format_version {meta.get('format_version')}, this code reads "
                f"{FORMAT_VERSION}; rebuild the shards with this version of `alexnet shards`"
            )
        _check_meta(meta, path, rebuild)
        return cls(url=url, meta=meta)

    @property
    def classes(self) -> list[str]:
        """Class names; the label of a sample is its index here."""
        return list(self.meta["classes"])

    @property
    def class_names(self) -> list[str]:
        """Readable class names, same order as :attr:`classes` (the classes themselves in an index
        written before names were recorded)."""
        return list(self.meta.get("class_names") or self.meta["classes"])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.meta["classes"])

    @property
    def size(self) -> int:
        """Side of the stored (square) images."""
        return int(self.meta["size"])

    def shards(self, split: str) -> list[ShardInfo]:
        """Shards of a split, in name order, with their sample counts."""
        if split not in self.meta["splits"]:
            raise ValueError(f"split={split!r}: this dataset has {sorted(self.meta['splits'])}")
        return [
            ShardInfo(join(self.url, s["name"]), int(s["count"]))
            for s in self.meta["splits"][split]["shards"]
        ]

    def count(self, split: str) -> int:
        """Number of samples in a split."""
        return sum(s.count for s in self.shards(split))

    @property
    def eigenvalues(self) -> np.ndarray:
        """RGB covariance eigenvalues (3,), descending, pixel units squared."""
        return np.asarray(self.meta["eigenvalues"], dtype=np.float64)

    @property
    def eigenvectors(self) -> np.ndarray:
        """RGB covariance eigenvectors (3, 3), one per column."""
        return np.asarray(self.meta["eigenvectors"], dtype=np.float64)

    @property
    def mean_rgb(self) -> np.ndarray:
        """Mean pixel (3,) over the training set, pixel units."""
        return np.asarray(self.meta["mean_rgb"], dtype=np.float64)

    def mean_image(self) -> np.ndarray:
        """The training-set mean image, float32 (3, size, size), pixel units (read once, cached)."""
        if self._mean_image is None:
            with fsspec.open(join(self.url, self.meta["mean_image_file"]), "rb") as f:
                self._mean_image = np.load(io.BytesIO(f.read()))
        return self._mean_image

    def mean_tensor(self, input_size: int, kind: str = "image") -> torch.Tensor:
        """The mean to pass to :func:`alexnet.data.transforms.to_model_input`.

        ``kind="image"``: the paper's per-pixel mean image, center-cropped to ``input_size``
        ((3, S, S) float32; we subtract the same center crop whatever the random crop offset, as
        cuda-convnet did); ``kind="rgb"``: the mean pixel (3, 1, 1).
        """
        if kind == "rgb":
            return torch.tensor(self.mean_rgb, dtype=torch.float32).view(3, 1, 1)
        if kind != "image":
            raise ValueError(f"kind={kind!r}: use 'image' or 'rgb'")
        m = self.mean_image()
        check_input_size(input_size, m.shape[-1])
        o = (m.shape[-1] - input_size) // 2
        return torch.from_numpy(np.ascontiguousarray(m[:, o : o + input_size, o : o + input_size]))
