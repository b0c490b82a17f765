"""The ILSVRC-2012 distribution as downloaded: val labels, class names, tars read in place.

The files, with the names ImageNet ships them under:

* ``ILSVRC2012_img_train.tar``: a tar of 1000 per-class tars ``n01440764.tar`` ..., each holding
  that class's JPEGs (``n01440764_10026.JPEG``);
* ``ILSVRC2012_img_val.tar``: a flat tar of ``ILSVRC2012_val_00000001.JPEG`` ... ``_00050000.JPEG``;
* ``ILSVRC2012_devkit_t12.tar.gz``: ``ILSVRC2012_devkit_t12/data/meta.mat`` (MATLAB v5; ``synsets``:
  one struct per WordNet synset with fields ``ILSVRC2012_ID, WNID, words, gloss, num_children,
  children, wordnet_height, num_train_images``; the 1000 classes are the leaves, ``num_children ==
  0``, IDs 1..1000) and ``data/ILSVRC2012_validation_ground_truth.txt`` (line i: the ILSVRC ID of
  val image i, i.e. of ``ILSVRC2012_val_%08d.JPEG % i``);
* Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the string starts with the
  WNID) and ``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca``).

**Tars are read in place, not unpacked.** One pass over the tar headers (``tarfile`` seeks past
each member's data) gives every image's byte offset and size in the outer file; a shard task then
reads its images with seek + read. Why: no scratch copy (the train tar is 138 GB), and the shard
build keeps its work unit, one shard per task, run in parallel and resumable, which a single
sequential stream through the tar would serialise. The price is reading 1.3 M tar headers at the
start of every run (minutes on a local disk); the tar must be uncompressed (as shipped) and on a
filesystem with cheap seeks (local disk, NFS/EFS).
"""

from __future__ import annotations

import csv
import io
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from fsspec.core import url_to_fs

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12"
META_MAT = "meta.mat"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
LOC_SOLUTION = "LOC_val_solution.csv"
LOC_MAPPING = "LOC_synset_mapping.txt"
# Where labels for a flat val folder are looked for in SRC when --val-labels is not given, in order.
LABEL_FILES = (f"{DEVKIT}.tar.gz", DEVKIT, GROUND_TRUTH, LOC_SOLUTION)
LABEL_KINDS = (
    f"the devkit {DEVKIT}.tar.gz (or its unpacked folder), its data/{GROUND_TRUTH} "
    f"(with {META_MAT} beside it), or Kaggle's {LOC_SOLUTION}"
)
LABELS_HELP = f"--val-labels FILE ({LABEL_KINDS}), or put one of those in SRC"


def val_file_stem(i: int) -> str:
    """The name (without extension) of ILSVRC-2012 val image ``i`` (1-based)."""
    return f"ILSVRC2012_val_{i:08d}"


@dataclass(frozen=True)
class TarMember:
    """A regular file inside a tar: its name there and where its bytes are in the outer file."""

    name: str
    offset: int
    size: int


def tar_members(f: BinaryIO, where: str, start: int = 0, end: int | None = None) -> list[TarMember]:
    """The regular files of the uncompressed tar occupying bytes ``[start, end)`` of ``f``.

    Offsets are absolute in ``f`` (``tarfile`` counts from the position it was opened at), so a
    tar nested in a tar is indexed without being copied out. ``where`` names it in errors.
    """
    file_end = f.seek(0, io.SEEK_END)
    end = file_end if end is None else min(end, file_end)
    f.seek(start)
    try:
        with tarfile.open(fileobj=f, mode="r:") as tf:
            members = [TarMember(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(
            f"{where}: not a readable uncompressed tar ({e}); download it again (ImageNet ships "
            f"plain tars) or unpack it into class folders"
        ) from None
    if any(m.offset + m.size > end for m in members):
        raise ValueError(f"{where}: its members run past its end (a truncated copy); download it again")
    return members


@dataclass
class ValLabels:
    """Labels of a flat val folder: file name stem -> WNID, plus class names where the file has them."""

    source: str  # the file they came from, for messages and dataset.json
    labels: dict[str, str]  # "ILSVRC2012_val_00000001" -> "n01751748"
    names: dict[str, str] = field(default_factory=dict)  # "n01751748" -> "sea snake"


def leaf_synsets(meta_mat: bytes, where: str) -> dict[int, tuple[str, str]]:
    """ILSVRC ID -> (WNID, words) of the leaf synsets (the classes) of a devkit's ``meta.mat``."""
    from scipy.io import loadmat

    try:
        synsets = np.atleast_1d(loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"])
        leaves = {
            int(s["ILSVRC2012_ID"]): (str(s["WNID"]), str(s["words"]))
            for s in synsets
            if int(s["num_children"]) == 0
        }
    except Exception as e:  # scipy's MatReadError, a missing struct or field, a wrong type: all one cause
        raise ValueError(
            f"{where}: not a devkit meta.mat (MATLAB v5 with a `synsets` struct array of ILSVRC2012_ID, "
            f"WNID, words, num_children; {type(e).__name__}: {e}); use the {DEVKIT}.tar.gz of the download"
        ) from None
    if not leaves:
        raise ValueError(f"{where}: no leaf synsets (num_children == 0): not the classification devkit")
    return leaves


def ground_truth_labels(text: str, synsets: dict[int, tuple[str, str]], where: str) -> dict[str, str]:
    """Line i of the ground-truth file (an ILSVRC ID) -> ``{val_file_stem(i): WNID}``."""
    out = {}
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out[val_file_stem(i)] = synsets[int(line)][0]
        except (ValueError, KeyError):
            raise ValueError(
                f"{where}: line {i} is {line.strip()!r}, not the ILSVRC ID (1..{max(synsets)}) of one of "
                f"meta.mat's {len(synsets)} classes; use the ground truth and meta.mat of one devkit"
            ) from None
    return out


def loc_solution_labels(text: str, where: str) -> dict[str, str]:
    """Kaggle's ``LOC_val_solution.csv``: ``ImageId`` -> the first WNID of its ``PredictionString``."""
    rows = csv.DictReader(io.StringIO(text))
    if not {"ImageId", "PredictionString"} <= set(rows.fieldnames or ()):
        raise ValueError(f"{where}: expected the header `ImageId,PredictionString` (Kaggle's {LOC_SOLUTION})")
    out = {}
    for n, row in enumerate(rows, start=2):
        words = (row["PredictionString"] or "").split()
        if not row["ImageId"] or not words:
            raise ValueError(f"{where}: line {n} has no ImageId or no WNID: {row}")
        out[row["ImageId"]] = words[0]
    return out


def synset_mapping(text: str) -> dict[str, str]:
    """``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca``) -> WNID -> words."""
    pairs = (line.split(maxsplit=1) for line in text.splitlines() if line.strip())
    return {p[0]: (p[1] if len(p) > 1 else p[0]) for p in pairs}


def _read(fs: Any, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def _devkit_labels(meta: bytes, truth: bytes, source: str, meta_where: str, truth_where: str) -> ValLabels:
    synsets = leaf_synsets(meta, meta_where)
    labels = ground_truth_labels(truth.decode(), synsets, truth_where)
    return ValLabels(source, labels, {w: words for w, words in synsets.values()})


def _from_archive(fs: Any, path: str, url: str) -> ValLabels:
    """The devkit tar.gz: its ``.../data/meta.mat`` and ``.../data/<ground truth>``, read in memory."""
    found: dict[str, bytes] = {}
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tf:
            for m in tf:
                base = posixpath.basename(m.name)
                if m.isfile() and base in (META_MAT, GROUND_TRUTH) and m.name.endswith(f"data/{base}"):
                    found[base] = tf.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{url}: not a readable tar.gz ({e}); download {DEVKIT}.tar.gz again") from None
    missing = [f"data/{n}" for n in (META_MAT, GROUND_TRUTH) if n not in found]
    if missing:
        raise ValueError(f"{url}: no {' or '.join(missing)} in it: not the {DEVKIT} devkit")
    return _devkit_labels(
        found[META_MAT], found[GROUND_TRUTH], url, f"{url}:data/{META_MAT}", f"{url}:data/{GROUND_TRUTH}"
    )


def _from_folder(fs: Any, path: str, url: str) -> ValLabels:
    """An unpacked devkit: ``DEVKIT/``, the folder that holds it, or its ``data/`` folder."""
    for sub in ("data/", f"{DEVKIT}/data/", ""):
        if fs.isfile(f"{path}/{sub}{GROUND_TRUTH}"):
            truth_url = f"{url.rstrip('/')}/{sub}{GROUND_TRUTH}"
            return _from_ground_truth(fs, f"{path}/{sub}{GROUND_TRUTH}", truth_url)
    raise ValueError(f"{url}: a folder without data/{GROUND_TRUTH}: not an unpacked {DEVKIT}")


def _from_ground_truth(fs: Any, path: str, url: str) -> ValLabels:
    meta = posixpath.join(posixpath.dirname(path), META_MAT)
    meta_url = posixpath.join(posixpath.dirname(url), META_MAT)
    if not fs.isfile(meta):
        raise ValueError(
            f"{url}: the ground truth holds ILSVRC IDs, which the devkit's {META_MAT} maps "
            f"to WNIDs, and there is no {meta_url}: put {META_MAT} beside it (both are in {DEVKIT}/data/), "
            f"or pass the devkit archive {DEVKIT}.tar.gz"
        )
    return _devkit_labels(_read(fs, meta), _read(fs, path), url, meta_url, url)


def _from_loc_csv(fs: Any, path: str, url: str) -> ValLabels:
    labels = loc_solution_labels(_read(fs, path).decode(), url)
    mapping = posixpath.join(posixpath.dirname(path), LOC_MAPPING)
    names = synset_mapping(_read(fs, mapping).decode()) if fs.isfile(mapping) else {}
    return ValLabels(url, labels, names)


def load_val_labels(url: str) -> ValLabels:
    """Read val labels from ``url``: a devkit archive or folder, its ground-truth txt, or a LOC csv."""
    fs, path = url_to_fs(url)
    path = path.rstrip("/")
    if fs.isdir(path):
        return _from_folder(fs, path, url)
    if not fs.isfile(path):
        raise ValueError(f"--val-labels {url}: no such file; give {LABEL_KINDS}")
    name = posixpath.basename(path).lower()
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return _from_archive(fs, path, url)
    if name.endswith(".txt"):
        return _from_ground_truth(fs, path, url)
    if name.endswith(".csv"):
        return _from_loc_csv(fs, path, url)
    raise ValueError(f"--val-labels {url}: not a kind of label file this reads; give {LABEL_KINDS}")


def find_val_labels(src: str) -> str | None:
    """The first of :data:`LABEL_FILES` that sits in the directory ``src``, as a URL; None if none."""
    fs, root = url_to_fs(src)
    root = root.rstrip("/")
    for name in LABEL_FILES:
        if fs.exists(f"{root}/{name}"):
            return src.rstrip("/") + "/" + name
    return None
