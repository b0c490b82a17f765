"""What ``alexnet shards SRC OUT`` reads: the layouts of SRC, its classes and every image's label.

SRC holds a training set and, optionally, a validation set, in any of these layouts:

* train: ``SRC/train/<class>/<image>`` (an ImageFolder; ILSVRC's ``n01440764/`` folders);
  ``SRC/train/<class>.tar`` (per-class tars: the train tar unpacked one level); or
  ``SRC/ILSVRC2012_img_train.tar`` or ``SRC/train/ILSVRC2012_img_train.tar`` (the download itself,
  read in place, see :mod:`alexnet.data.imagenet`);
* val: ``SRC/val/<class>/<image>``; or flat, ``SRC/val/<image>`` (the ``ILSVRC2012_val_*.JPEG`` of
  the download) or ``SRC/ILSVRC2012_img_val.tar`` / ``SRC/val/ILSVRC2012_img_val.tar``, with labels
  from ``--val-labels FILE`` or, without the flag, the first of ``ILSVRC2012_devkit_t12.tar.gz``,
  ``ILSVRC2012_devkit_t12/``, ``ILSVRC2012_validation_ground_truth.txt``, ``LOC_val_solution.csv``
  found in SRC; or absent (no val split).

Classes are the train class names (WNIDs for ImageNet), indexed in sorted order, as torchvision's
ImageFolder and ImageNet do. Class names (``tench, Tinca tinca``) come from the devkit's meta.mat
(or Kaggle's ``LOC_synset_mapping.txt``) when one is found; otherwise a class's name is its folder
name. Every inconsistency (ambiguous layouts, empty classes, labels that do not match the val
images, val classes missing from train) is a ``ValueError`` raised here, before any shard is
written.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from fsspec.core import url_to_fs

from alexnet.data.imagenet import (
    LABELS_HELP,
    TRAIN_TAR,
    VAL_TAR,
    ValLabels,
    find_val_labels,
    load_val_labels,
    tar_members,
)

# What counts as an image where a folder may also hold other files (scripts, csv files): the
# extensions torchvision's ImageFolder accepts. Inside a class folder every file is tried.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SHOWN = 3  # examples named in an error message


class SourceFile(NamedTuple):
    """One source image: where its bytes are, and its label."""

    path: str  # relative to SRC: what messages and dataset.json's ``skipped`` name
    label: int
    size: int  # bytes
    archive: str = ""  # relative to SRC: the tar holding the bytes ("": ``path`` is a plain file)
    offset: int = 0  # where the bytes start in ``archive``


class _Found(NamedTuple):
    """An image before it has a label (same fields as :class:`SourceFile` less the label)."""

    path: str
    size: int
    archive: str = ""
    offset: int = 0

    def labelled(self, label: int) -> SourceFile:
        return SourceFile(self.path, label, self.size, self.archive, self.offset)


@dataclass
class Source:
    """A scanned SRC: classes, and per split its images sorted by (label, path)."""

    classes: list[str]  # sorted; index = label
    class_names: list[str]  # same order; the folder name where no names file says otherwise
    splits: dict[str, list[SourceFile]]
    # "train", "val": what was read; "val_labels", "class_names": the label file used, or None
    layout: dict[str, str | None]
    warnings: list[str] = field(default_factory=list)
    # how val was held out of train (``--val-fraction``; dataset.json's ``val_split``), or None
    val_split: dict[str, Any] | None = None

    def describe(self) -> str:
        """One line saying what was found, for the start of the build's output."""
        n = {k: len(v) for k, v in self.splits.items()}
        val = "no val split"
        if "val" in n:
            val = f"val: {n['val']} images ({self.layout['val']}"
            val += f", labels from {self.layout['val_labels']})" if self.layout["val_labels"] else ")"
        return f"train: {n['train']} images in {len(self.classes)} classes ({self.layout['train']}); {val}"


def _short(items: Iterable[str]) -> str:
    items = sorted(items)
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _entries(fs: Any, path: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Sub-folder names and (file name, size) pairs directly in ``path``; hidden ones left out."""
    dirs, files = [], []
    if not fs.isdir(path):
        return dirs, files
    for e in fs.ls(path, detail=True):
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        if e["type"] == "directory":
            dirs.append(name)
        elif e["type"] == "file":
            files.append((name, int(e.get("size") or 0)))
    return sorted(dirs), sorted(files)


def _folder_classes(fs: Any, root: str, split: str, dirs: list[str]) -> dict[str, list[_Found]]:
    """``SRC/<split>/<class>/<file>`` -> {class: files}; deeper files are not images of the class."""
    out: dict[str, list[_Found]] = {d: [] for d in dirs}
    for path, info in fs.find(f"{root}/{split}", detail=True).items():
        parts = path[len(root) + 1 :].split("/")
        if len(parts) == 3 and info["type"] == "file" and not parts[2].startswith(".") and parts[1] in out:
            out[parts[1]].append(_Found("/".join(parts), int(info.get("size") or 0)))
    return out


def _tar_files(fs: Any, root: str, rel: str) -> list[_Found]:
    """The files of the tar ``SRC/<rel>`` (flat), hidden ones (``._x`` of macOS) left out."""
    with fs.open(f"{root}/{rel}", "rb") as f:
        members = tar_members(f, rel)
    return [
        _Found(f"{rel}/{m.name}", m.size, rel, m.offset)
        for m in members
        if not posixpath.basename(m.name).startswith(".")
    ]


def _tar_of_tars(fs: Any, root: str, rel: str) -> dict[str, list[_Found]]:
    """``ILSVRC2012_img_train.tar``: {class: files} from its per-class tars, offsets in the outer file."""
    out: dict[str, list[_Found]] = {}
    with fs.open(f"{root}/{rel}", "rb") as f:
        for inner in tar_members(f, rel):
            base = posixpath.basename(inner.name)
            if base.startswith("."):
                continue
            if not base.endswith(".tar"):
                raise ValueError(
                    f"SRC/{rel}: holds {inner.name}, not a per-class tar (<wnid>.tar): not the ILSVRC "
                    f"train tar; give its classes as SRC/train/<class>/ folders instead"
                )
            where = f"{rel}/{inner.name}"
            members = tar_members(f, f"SRC/{where}", inner.offset, inner.offset + inner.size)
            out[base[: -len(".tar")]] = [
                _Found(f"{where}/{posixpath.basename(m.name)}", m.size, rel, m.offset)
                for m in members
                if not posixpath.basename(m.name).startswith(".")
            ]
    return out


def _layout(
    fs: Any,
    root: str,
    src: str,
    split: str,
    tar: str,
    entries: tuple[list[str], list[tuple[str, int]]],
    loose: tuple[str, bool],
) -> tuple[str | None, str | None]:
    """The one layout SRC holds ``split`` in: its description (None: none), and the path in SRC of
    the download's ``tar`` when it is that. Two at once (a half-done unpacking) are refused."""
    dirs, files = entries
    tars = {f"SRC/{tar}": tar, f"SRC/{split}/{tar}": f"{split}/{tar}"}
    present = {
        f"SRC/{tar}": fs.isfile(f"{root}/{tar}"),
        f"SRC/{split}/{tar}": any(name == tar for name, _ in files),
        f"class folders SRC/{split}/<class>/": bool(dirs),
        loose[0]: loose[1],
    }
    found = [k for k, v in present.items() if v]
    if len(found) > 1:
        raise ValueError(
            f"SRC={src}: {split} is there twice, as {' and as '.join(found)}; keep one in SRC (an "
            f"unpacking, or a sorting into class folders, stopped half-way leaves both: finish or undo it)"
        )
    return (found[0], tars.get(found[0])) if found else (None, None)


def scan_train(fs: Any, root: str, src: str) -> tuple[dict[str, list[_Found]], dict[str, str], str]:
    """{class: files}, {class: where it is, for messages}, and the layout's description."""
    dirs, files = _entries(fs, f"{root}/train")
    tars = [name for name, _ in files if name.endswith(".tar") and name != TRAIN_TAR]
    class_tars = "class tars SRC/train/<class>.tar"
    layout, rel = _layout(fs, root, src, "train", TRAIN_TAR, (dirs, files), (class_tars, bool(tars)))
    if layout is None:
        raise ValueError(
            f"SRC={src}: no training set; expected SRC/train/<class>/<image> (an ImageFolder tree, "
            f"with SRC/val/...), SRC/train/<class>.tar, or ImageNet's SRC/{TRAIN_TAR}"
        )
    if rel is not None:
        classes = _tar_of_tars(fs, root, rel)
        return classes, {c: f"{rel}/{c}.tar" for c in classes}, f"{layout}, read in place"
    if layout == class_tars:
        classes = {t[: -len(".tar")]: _tar_files(fs, root, f"train/{t}") for t in tars}
        return classes, {t[: -len(".tar")]: f"train/{t}" for t in tars}, layout
    return _folder_classes(fs, root, "train", dirs), {d: f"train/{d}" for d in dirs}, layout


def scan_val(fs: Any, root: str, src: str) -> tuple[dict[str, list[_Found]] | list[_Found] | None, str]:
    """Class folders ({class: files}), a flat set (files) or None (no val/), and the layout's description."""
    dirs, files = _entries(fs, f"{root}/val")
    images = [(name, size) for name, size in files if _is_image(name)]
    flat = "flat SRC/val/<image>"
    layout, rel = _layout(fs, root, src, "val", VAL_TAR, (dirs, files), (flat, bool(images)))
    if layout is None:  # an empty val/ is a val split without images (as before); no val/ is no val split
        return ({}, "empty SRC/val/") if fs.isdir(f"{root}/val") else (None, "none")
    if rel is not None:
        return _tar_files(fs, root, rel), f"{layout}, read in place"
    if layout == flat:
        return [_Found(f"val/{name}", size) for name, size in images], layout
    return _folder_classes(fs, root, "val", dirs), layout


def _train_classes(
    train: dict[str, list[_Found]], where: dict[str, str], src: str, allow_empty: bool
) -> tuple[list[str], list[str]]:
    """Sorted classes (empty ones refused, or dropped when allowed) and the warnings to print."""
    empty = sorted(c for c, files in train.items() if not files)
    if empty and not allow_empty:
        raise ValueError(
            f"SRC={src}: {len(empty)} training class(es) hold no images: "
            f"{_short(f'SRC/{where[c]}' for c in empty)}; put their images there, remove them, or pass "
            f"--allow-empty-classes to leave them out of the classes (labels stay 0..K-1 over the rest)"
        )
    classes = sorted(c for c in train if train[c])
    if not classes:
        raise ValueError(f"SRC={src}: no training images under SRC/train/<class>/")
    warnings = []
    if empty:
        warnings.append(
            f"left out {len(empty)} empty training class(es) (--allow-empty-classes): "
            f"{_short(f'SRC/{where[c]}' for c in empty)}; the dataset has {len(classes)} classes"
        )
    return classes, warnings


def _label_flat(files: list[_Found], vl: ValLabels, known: set[str]) -> dict[str, list[_Found]]:
    """Flat val files -> {WNID: files} by ``vl``; refuses labels and files that do not match."""
    by_stem = {posixpath.splitext(posixpath.basename(f.path))[0]: f for f in files}
    if len(by_stem) < len(files):
        seen: dict[str, str] = {}
        twice = [
            f.path
            for f in files
            if seen.setdefault(posixpath.splitext(posixpath.basename(f.path))[0], f.path) != f.path
        ]
        raise ValueError(
            f"SRC: {len(files) - len(by_stem)} val image(s) share a name with another but for the extension "
            f"({_short(twice)}): the labels are by name; keep one of each"
        )
    unlabelled = sorted(set(by_stem) - set(vl.labels))
    if unlabelled:
        raise ValueError(
            f"{vl.source} has no label for {len(unlabelled)} of the {len(files)} val images in SRC "
            f"({_short(by_stem[s].path for s in unlabelled)}): these labels are not this val set's; "
            f"use the labels that came with it, or remove the extra images"
        )
    absent = sorted(set(vl.labels) - set(by_stem))
    if absent:
        raise ValueError(
            f"{vl.source} labels {len(vl.labels)} val images, {len(absent)} of which are not in SRC "
            f"({_short(absent)}): SRC holds {len(files)}; copy the complete val set (ILSVRC-2012: 50,000 "
            f"images) or use the labels of the val set you have"
        )
    unknown = sorted({vl.labels[s] for s in by_stem} - known)
    if unknown:
        example = next(s for s in sorted(by_stem) if vl.labels[s] in unknown)
        raise ValueError(
            f"{vl.source} labels val images with {len(unknown)} class(es) that have no training images "
            f"in SRC: {_short(unknown)} (e.g. {by_stem[example].path} is {vl.labels[example]}); train and "
            f"val must be of the same ILSVRC year: use the train set and labels of one release"
        )
    out: dict[str, list[_Found]] = {}
    for stem, f in by_stem.items():
        out.setdefault(vl.labels[stem], []).append(f)
    return out


def _val_by_class(
    val: dict[str, list[_Found]] | list[_Found],
    vl: ValLabels | None,
    src: str,
    classes: list[str],
    train_where: dict[str, str],
) -> dict[str, list[_Found]]:
    """{class: files} of the val set; every class must be a training class."""
    known = set(classes)
    if isinstance(val, list):
        if vl is None:
            raise ValueError(
                f"SRC={src}: the val images are flat ({len(val)} files, no class folders), so their labels "
                f"must come from a file and none was found in SRC; pass {LABELS_HELP}"
            )
        return _label_flat(val, vl, known)
    extra = sorted(c for c, files in val.items() if files and c not in known)
    if extra:
        empty = [c for c in extra if c in train_where]
        why = f" (empty in train: {_short(f'SRC/{train_where[c]}' for c in empty)})" if empty else ""
        raise ValueError(
            f"SRC={src}: val class folder(s) {_short(f'val/{c}' for c in extra)} have no counterpart with "
            f"images in SRC/train{why}; every val class must be a training class"
        )
    return val


def scan_source(src: str, *, val_labels: str | None = None, allow_empty_classes: bool = False) -> Source:
    """Scan SRC (see the module docstring); raise ``ValueError`` naming the file and the fix."""
    fs, root = url_to_fs(src)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise ValueError(f"SRC={src}: no such directory; give the folder that holds train/ (and val/)")
    train, train_where, train_layout = scan_train(fs, root, src)
    classes, warnings = _train_classes(train, train_where, src, allow_empty_classes)
    val, val_layout = scan_val(fs, root, src)
    if val_labels is not None and not isinstance(val, list):
        what = "SRC has no val set" if val is None else f"the val set is in {val_layout}, labelled by them"
        raise ValueError(f"--val-labels {val_labels}: {what}; drop --val-labels (it labels a flat val set)")
    # labels for a flat val set; class names from the same files when there is one (also for folders)
    labels_url = val_labels or find_val_labels(src)
    vl = load_val_labels(labels_url) if labels_url else None
    splits = {"train": _sorted({c: train[c] for c in classes}, classes)}
    if val is not None:
        splits["val"] = _sorted(_val_by_class(val, vl, src, classes, train_where), classes)
    names = vl.names if vl else {}
    return Source(
        classes=classes,
        class_names=[names.get(c, c) for c in classes],
        splits=splits,
        layout={
            "train": train_layout,
            "val": val_layout,
            "val_labels": labels_url if isinstance(val, list) else None,
            "class_names": labels_url if names else None,
        },
        warnings=warnings,
    )


def _sorted(by_class: dict[str, list[_Found]], classes: list[str]) -> list[SourceFile]:
    label = {c: i for i, c in enumerate(classes)}
    return sorted(
        (f.labelled(label[c]) for c, files in by_class.items() for f in files),
        key=lambda s: (s.label, s.path),
    )


def hold_out_val(source: Source, fraction: float, seed: int = 0) -> Source:
    """``source`` with a val split held out of its train split (``alexnet shards --val-fraction``),
    for a SRC that has none: of each class, ``round(n * fraction)`` of its ``n`` images (at most
    ``n - 1``, so every class keeps a training image), drawn by a permutation seeded by (``seed``,
    label), so the split depends only on SRC, the fraction and the seed. ``fraction`` 0 returns
    ``source`` unchanged. Recorded in ``val_split`` and ``layout["val"]`` (dataset.json)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--val-fraction {fraction}: use a fraction in [0, 1), e.g. 0.1 (0: no val split)")
    if fraction == 0:
        return source
    if "val" in source.splits:
        raise ValueError(
            f"--val-fraction {fraction}: SRC already has a val split ({source.layout['val']}); drop "
            "--val-fraction to use it (the fraction holds images out of train only where SRC has no val)"
        )
    by_label: dict[int, list[SourceFile]] = {}
    for f in source.splits["train"]:  # sorted by (label, path): the draw does not depend on listing order
        by_label.setdefault(f.label, []).append(f)
    train, val = [], []
    for label, files in by_label.items():
        k = min(round(len(files) * fraction), len(files) - 1)
        held = set(np.random.default_rng([seed, label]).permutation(len(files))[:k].tolist())
        for i, f in enumerate(files):
            (val if i in held else train).append(f)
    if not val:
        raise ValueError(
            f"--val-fraction {fraction}: holds no image out of SRC's {len(source.splits['train'])} "
            f"training images in {len(source.classes)} classes (round(n x fraction) is 0 in every class): "
            "raise it, e.g. --val-fraction 0.1"
        )
    split = {"from": "train", "fraction": fraction, "seed": seed, "per_class": "round(n * fraction)"}
    return dataclasses.replace(
        source,
        splits={"train": train, "val": val},
        layout={**source.layout, "val": f"held out of train: {fraction:g} of each class, seed {seed}"},
        val_split=split,
    )
