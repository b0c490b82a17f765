"""``alexnet shards``: an ImageFolder tree, ImageNet as downloaded, or generated images -> WebDataset shards.

What SRC may look like (ImageFolder, the ILSVRC-2012 tars, a flat val folder with the devkit's
labels) is :mod:`alexnet.data.sources`; here: writing the shards and ``dataset.json``.

Work unit: one shard. The files of a split are sorted (class folder, then file name), put in a
fixed pseudo-random order (:func:`shard_order`) and cut into consecutive runs of ``shard_size``;
shard i always holds the same source files, which is what makes a build resumable: a shard is
complete when its tar and its ``_parts/<shard>.json`` (count, skipped files) and ``.npz`` (pixel
sums for the statistics) exist. A shard is written to ``<name>.tmp`` and renamed only after its
part files are written, so a crash never leaves a complete-looking partial shard.
``dataset.json`` is written last.

``_parts/plan.json`` records a fingerprint of the source (paths, sizes, classes) and the build
settings; a directory holding a different fingerprint is refused.

Parallelism: shard tasks run in a process pool (``workers``), or through any ``map_fn`` (the Ray
cluster runtime passes one that runs them as Ray tasks). ``memory://`` directories are written in
this process, since a memory filesystem is private to a process.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import posixpath
import re
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, TextIO

import fsspec
import numpy as np
import webdataset as wds
from fsspec.core import url_to_fs
from PIL import Image, UnidentifiedImageError

from alexnet.data.index import (
    FORMAT_VERSION,
    INDEX_NAME,
    MEAN_IMAGE_NAME,
    PixelStats,
    join,
    shard_name,
)
from alexnet.data.records import count_records
from alexnet.data.sources import SourceFile, hold_out_val, scan_source
from alexnet.data.synthetic import synthetic_image, synthetic_label

PARTS = "_parts"
MapFn = Callable[[Callable[[Any], Any], list], Iterable]


@dataclass(frozen=True)
class ShardTask:
    """Everything one process needs to write one shard (picklable)."""

    out: str
    split: str
    index: int
    first: int  # index of the shard's first item within the split (sample keys are split_<index>)
    items: tuple  # folder: (SourceFile, ...); synthetic: ((i, label), ...)
    source: dict  # {"kind": "folder", "root": url} or {"kind": "synthetic", "seed", "classes"}
    size: int
    quality: int

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


@dataclass
class ShardResult:
    """What writing a shard produced."""

    name: str
    split: str
    count: int
    skipped: list = field(default_factory=list)  # [(relpath, reason)]
    reused: bool = False


@dataclass
class BuildSummary:
    """Summary of an ``alexnet shards`` run."""

    out: str
    counts: dict[str, int]
    shards_written: int
    shards_reused: int
    skipped: list
    seconds: float
    warnings: list[str] = field(default_factory=list)  # for the end of the build's output

    @property
    def images_per_s(self) -> float:
        """Images written per second (shards reused are not counted)."""
        return self.written_images / max(self.seconds, 1e-9)

    written_images: int = 0


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Short side to ``size`` (antialiased bilinear), then the center size x size; any mode -> RGB."""
    if im.format == "JPEG":
        im.draft("RGB", (size, size))  # let libjpeg decode at 1/2, 1/4, 1/8 scale when that is still >= size
    im = im.convert("RGB")  # grey, CMYK, palette, RGBA -> RGB
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    x, y = (nw - size) // 2, (nh - size) // 2
    return im.crop((x, y, x + size, y + size))


class _SourceBytes:
    """Reads source images: plain files, or byte ranges of a tar kept open for the whole shard."""

    def __init__(self, root: str, stack: ExitStack) -> None:
        self.root, self.stack, self.archives = root, stack, {}

    def __call__(self, item: SourceFile) -> bytes:
        if not item.archive:
            with fsspec.open(join(self.root, item.path), "rb") as f:
                return f.read()
        f = self.archives.get(item.archive)
        if f is None:
            f = self.archives[item.archive] = self.stack.enter_context(
                fsspec.open(join(self.root, item.archive), "rb")
            )
        f.seek(item.offset)
        data = f.read(item.size)
        if len(data) != item.size:
            raise EOFError(f"{item.archive} ends {item.size - len(data)} bytes into it: a truncated tar")
        return data


def _load(task: ShardTask, item: tuple, read: _SourceBytes) -> Image.Image:
    src = task.source
    if src["kind"] == "synthetic":
        return Image.fromarray(synthetic_image(src["seed"], task.split, item[0], task.size, src["classes"]))
    data = read(item)
    im = None
    try:
        # PIL reads the format from the bytes, not the name: ImageNet's PNG named .JPEG is read as PNG
        im = Image.open(io.BytesIO(data))
        im.load()
    except UnidentifiedImageError:
        raise ValueError(
            "empty file" if not data else f"not an image: no format PIL reads matches its {len(data)} bytes"
        ) from None
    except (OSError, SyntaxError) as e:  # what PIL's parsers and decoders raise on damaged data
        raise ValueError(f"damaged {im.format if im else 'image'} data ({e})") from None
    return resize_center_crop(im, task.size)


_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def skip_reason(e: Exception) -> str:
    """Why a source image was skipped, as text (no ``<_io.BytesIO object at 0x...>`` in it)."""
    text = _OBJECT_REPR.sub("the file", str(e))
    return text if isinstance(e, ValueError) else f"{type(e).__name__}: {text}"


def write_shard(task: ShardTask) -> ShardResult:
    """Write one shard (tmp name, part files, rename). Unreadable images are skipped and reported."""
    fs, root = url_to_fs(task.out)
    final, tmp = f"{root}/{task.name}", f"{root}/{task.name}.tmp"
    stats = PixelStats(task.size) if task.split == "train" else None
    skipped, count = [], 0
    with ExitStack() as stack:
        f = stack.enter_context(fs.open(tmp, "wb"))
        tw = stack.enter_context(wds.TarWriter(f, encoder=False, mtime=0))
        read = _SourceBytes(task.source.get("root", ""), stack)
        for j, item in enumerate(task.items):
            try:
                im = _load(task, item, read)
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=task.quality)  # im is RGB: a 3-channel (YCbCr) baseline JPEG
                data = buf.getvalue()
            except Exception as e:  # any unreadable source image: skip it, name it in the summary
                skipped.append((str(item[0]), skip_reason(e)))
                continue
            if stats is not None:
                # statistics over exactly what the readers will decode
                stats.add(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1))
            key = f"{task.split}_{task.first + j:08d}"
            meta = json.dumps({"src": _source_name(task, item)}).encode()
            tw.write({"__key__": key, "jpg": data, "cls": str(item[1]).encode(), "json": meta})
            count += 1
    part = {"name": task.name, "split": task.split, "count": count, "skipped": skipped}
    if stats is not None:
        _atomic_write(fs, f"{root}/{PARTS}/{task.name}.npz", stats.to_bytes())
    part["bytes"] = fs.size(tmp)  # what a later build checks before it reuses the shard
    _atomic_write(fs, f"{root}/{PARTS}/{task.name}.json", json.dumps(part).encode())
    fs.mv(tmp, final)
    return ShardResult(task.name, task.split, count, skipped)


def _source_name(task: ShardTask, item: tuple) -> str:
    """Where a sample came from, kept in its ``json`` member as ``src``: the path inside SRC (or the
    archive member's), or ``synthetic:<split>/<i>``. The key (``train_00000042``) stays the writer's,
    so every augmentation draw keyed on it is unchanged."""
    if task.source["kind"] == "synthetic":
        return f"synthetic:{task.split}/{item[0]}"
    return item.path


def _atomic_write(fs: Any, path: str, data: bytes) -> None:
    with fs.open(path + ".tmp", "wb") as f:
        f.write(data)
    fs.mv(path + ".tmp", path)


def _read_part(fs: Any, root: str, name: str) -> dict | None:
    """The part file of a shard an earlier build completed (None: no shard or no part file)."""
    if not (fs.exists(f"{root}/{name}") and fs.exists(f"{root}/{PARTS}/{name}.json")):
        return None
    try:
        with fs.open(f"{root}/{PARTS}/{name}.json", "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def _mismatch(fs: Any, root: str, name: str, part: dict) -> str | None:
    """Why the shard ``name`` is not what its part file records (its size, its sample count), or
    None. Reused as it is, a shard cut short would be indexed with its short size, which every
    later size check then accepts."""
    try:
        size = fs.size(f"{root}/{name}")
        if size != part["bytes"]:
            return f"{size} bytes, its build wrote {part['bytes']}"
        with fs.open(f"{root}/{name}", "rb") as f:
            n = count_records(f, name)
        return None if n == part["count"] else f"{n} samples, its build wrote {part['count']}"
    except (OSError, ValueError, KeyError, TypeError, tarfile.TarError) as e:
        return f"unreadable ({type(e).__name__}: {e})"


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _unwritable(out: str, fs: Any, root: str, e: OSError) -> ValueError:
    parent = root
    while posixpath.dirname(parent) not in (parent, ""):
        parent = posixpath.dirname(parent)
        if fs.isfile(parent):
            return ValueError(
                f"OUT={out}: cannot create it: {parent} is a file, not a folder; choose another OUT"
            )
    return ValueError(
        f"OUT={out}: cannot create or write it ({e.strerror or e}); choose a folder you may write, or "
        f"change its permissions"
    )


def _check_out(out: str) -> None:
    """Before any source is read: OUT is a folder that is new, empty or an earlier build, and writable."""
    fs, root = url_to_fs(out)
    if fs.isfile(root):
        raise ValueError(f"OUT={out} is a file; give a folder (new, empty, or an earlier build to resume)")
    if fs.isdir(root) and not fs.exists(f"{root}/{PARTS}/plan.json"):
        # an empty _parts/ is what this check leaves behind when the source scan then failed
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        if names and not (names == [PARTS] and not fs.ls(f"{root}/{PARTS}", detail=False)):
            raise ValueError(
                f"OUT={out} is not empty and holds no shard build; use an empty or new directory"
            )
    try:
        fs.makedirs(f"{root}/{PARTS}", exist_ok=True)
        probe = f"{root}/{PARTS}/.write-test"
        with fs.open(probe, "wb") as f:
            f.write(b"")
        fs.rm(probe)
    except OSError as e:  # NotADirectoryError (a parent is a file), PermissionError, a read-only mount
        raise _unwritable(out, fs, root, e) from None


def _prepare_out(out: str, fingerprint: str, plan: dict) -> None:
    """Refuse an earlier build of something else; record the plan (OUT was checked by _check_out)."""
    fs, root = url_to_fs(out)
    plan_path = f"{root}/{PARTS}/plan.json"
    if fs.exists(plan_path):
        with fs.open(plan_path, "rb") as f:
            old = json.loads(f.read())
        if old.get("fingerprint") != fingerprint:
            raise ValueError(
                f"OUT={out} holds shards of a different dataset or built with other settings "
                f"(size, quality, shard size, source files, or a build from before shards were mixed); "
                "use an empty OUT or delete it"
            )
        return
    _atomic_write(fs, plan_path, json.dumps(dict(plan, fingerprint=fingerprint)).encode())


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines (pipes, log files)."""

    def __init__(self, file: TextIO) -> None:
        self.file = file

    def write(self, s: str) -> None:
        s = s.replace("\r", "").rstrip()  # tqdm pads a redraw with spaces to cover the previous one
        if s:
            self.file.write(s + "\n")

    def flush(self) -> None:
        self.file.flush()


def _isatty(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


@dataclass(frozen=True)
class Progress:
    """Where the build's progress goes: a tqdm bar on a terminal; elsewhere (``ray job logs``, a pipe,
    a file) one plain line at the start, then at most one every ``interval`` seconds, and at the end."""

    enabled: bool = True
    file: TextIO | None = None  # default: sys.stderr at the time of the build
    interval: float = 30.0

    def say(self, line: str) -> None:
        """A line of its own in the progress output."""
        if self.enabled:
            print(line, file=self.file or sys.stderr, flush=True)

    def bar(self, total: int) -> Any:
        """A tqdm bar over ``total`` images."""
        from tqdm import tqdm

        file = self.file or sys.stderr
        quiet = not self.enabled or total == 0  # nothing to write: every shard is from an earlier run
        if quiet or _isatty(file):
            return tqdm(total=total, unit="img", desc="shards", file=file, disable=quiet)
        fmt = "{desc}: {n_fmt}/{total_fmt} images ({percentage:.0f}%), {elapsed} elapsed, {remaining} left"
        fmt += ", {rate_fmt}"
        # miniters=1: no dynamic miniters, so only mininterval decides when a line is written
        return tqdm(
            total=total,
            unit="img",
            desc="shards",
            file=_Lines(file),
            mininterval=self.interval,
            miniters=1,
            ascii=True,
            bar_format=fmt,
        )


def _pool_map(workers: int) -> MapFn | None:
    if workers <= 1:
        return None

    def run(fn: Callable, tasks: list) -> Iterator:
        # fork: the shard writer needs no torch threads, and it avoids re-importing torch per child
        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        with ctx.Pool(min(workers, len(tasks))) as pool:
            yield from pool.imap_unordered(fn, tasks)

    return run


def _run(
    out: str,
    tasks: list[ShardTask],
    meta: dict,
    workers: int,
    map_fn: MapFn | None,
    progress: Progress,
    warnings: list[str],
) -> BuildSummary:
    """Write the shards ``tasks`` lists that an earlier run has not, then the index beside them."""
    t0 = time.perf_counter()
    fs, root = url_to_fs(out)
    results, todo = {}, []
    for t in tasks:
        part = _read_part(fs, root, t.name)
        why = None if part is None else _mismatch(fs, root, t.name, part)
        if why is not None:
            warnings.append(f"shard {t.name!r} of an earlier build is {why}: written again")
        if part is None or why is not None:
            todo.append(t)
        else:
            results[t.name] = ShardResult(
                t.name, t.split, part["count"], [tuple(s) for s in part["skipped"]], True
            )
    if map_fn is None and fs.protocol not in ("memory", ("memory",)):
        map_fn = _pool_map(workers)
    mapped = map_fn(write_shard, todo) if (map_fn is not None and todo) else map(write_shard, todo)
    written = 0
    with progress.bar(sum(len(t.items) for t in todo)) as bar:
        for r in mapped:
            results[r.name] = r
            written += r.count
            bar.update(r.count + len(r.skipped))
    splits, skipped = _write_index(fs, root, tasks, results, meta)
    return BuildSummary(
        out=out,
        counts={k: v["count"] for k, v in splits.items()},
        shards_written=len(todo),
        shards_reused=len(tasks) - len(todo),
        skipped=skipped,
        seconds=time.perf_counter() - t0,
        warnings=warnings + _split_warnings(out, splits),
        written_images=written,
    )


def _write_index(
    fs: Any, root: str, tasks: list[ShardTask], results: dict[str, ShardResult], meta: dict
) -> tuple[dict[str, Any], list]:
    """The mean image and ``dataset.json`` (written last: its presence means "complete");
    returns the index's ``splits`` and the skipped source files."""
    # statistics from the per-shard partial sums (also those of shards written by an earlier run)
    stats = PixelStats(tasks[0].size)
    for t in tasks:
        if t.split == "train":
            with fs.open(f"{root}/{PARTS}/{t.name}.npz", "rb") as f:
                stats.merge(PixelStats.from_bytes(f.read()))
    final = stats.finalize()
    buf = io.BytesIO()
    np.save(buf, final.pop("mean_image"))
    _atomic_write(fs, f"{root}/{MEAN_IMAGE_NAME}", buf.getvalue())
    splits: dict[str, Any] = {}
    for t in tasks:
        s = splits.setdefault(t.split, {"count": 0, "shards": []})
        size = fs.size(f"{root}/{t.name}")  # what `alexnet train` checks each shard against
        s["shards"].append({"name": t.name, "count": results[t.name].count, "bytes": size})
        s["count"] += results[t.name].count
    skipped = [s for t in tasks for s in results[t.name].skipped]
    index = dict(
        meta,
        format_version=FORMAT_VERSION,
        splits=splits,
        mean_image_file=MEAN_IMAGE_NAME,
        skipped=[{"path": p, "reason": r} for p, r in skipped],
        **final,
    )
    _atomic_write(fs, f"{root}/{INDEX_NAME}", json.dumps(index, indent=1).encode())
    return splits, skipped


def _split_warnings(out: str, splits: dict[str, Any]) -> list[str]:
    """A dataset without val images builds fine, but `alexnet train` validates every epoch by default."""
    if "val" not in splits:
        what = f"{out} has no val split"
    elif splits["val"]["count"] == 0:
        what = f"the val split of {out} holds no images (none of its images was readable: see skipped above)"
    else:
        return []
    return [
        f"{what}: `alexnet train` validates after every epoch, so train on it with "
        f"`--set eval.every_epochs=0`, or add validation images (SRC/val/, or `--val-fraction 0.1` where SRC "
        f"has none) and build into a new OUT"
    ]


SHARD_ORDER_SEED = 0  # part of every folder build's plan: a build's shards never change order


def shard_order(items: list, split: str) -> list:
    """The split's files (sorted) in the order they are written: a seeded permutation.

    Why: the reader shuffles each worker's run of records through a buffer of
    ``data.shuffle_buffer`` (1000) records. Shards written class by class (the sorted order) hold one
    or two classes each (ImageNet's ~1,300 images per class, 6,000 per class in an MNIST-sized set),
    so every batch held one or two classes and SGD barely moved (train top-1 error 0.79 after an
    epoch where a two-layer CNN reaches 0.10). Mixed at write time, every shard is a sample of all
    the classes, whatever the buffer.
    """
    split_seed = int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")
    perm = np.random.default_rng([SHARD_ORDER_SEED, split_seed]).permutation(len(items))
    return [items[i] for i in perm]


def _tasks(out: str, split: str, items: list, source: dict, size: int, quality: int, shard_size: int) -> list:
    return [
        ShardTask(out, split, k, i, tuple(items[i : i + shard_size]), source, size, quality)
        for k, i in enumerate(range(0, len(items), shard_size))
    ]


def _check(size: int, quality: int, shard_size: int) -> None:
    if size < 8:
        raise ValueError(f"--size={size}: too small; the paper uses 256, the small model 36-64")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality={quality}: JPEG quality is 1..100")
    if shard_size < 1:
        raise ValueError(f"--shard-size={shard_size}: must be positive")


def build_shards(
    src: str,
    out: str,
    *,
    size: int = 256,
    quality: int = 90,
    shard_size: int = 1000,
    workers: int | None = None,
    map_fn: MapFn | None = None,
    progress: bool | Progress = True,
    val_labels: str | None = None,
    allow_empty_classes: bool = False,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> BuildSummary:
    """Turn the image tree ``src`` into shards in ``out`` (both local paths or fsspec URLs).

    ``src``: an ImageFolder tree or ImageNet as downloaded (layouts, ``val_labels`` and
    ``allow_empty_classes``: :mod:`alexnet.data.sources`); where SRC has no val split, ``val_fraction``
    of each class is held out of train as one (``seed``: :func:`alexnet.data.sources.hold_out_val`).
    Everything a user can get wrong in SRC or OUT is a ``ValueError`` before any shard is written.
    Resumable and idempotent: shards completed by an earlier run with the same source and settings
    are kept. ``map_fn(fn, tasks)`` replaces the local process pool (e.g. Ray tasks on a cluster;
    then ``out`` must be reachable from every node).
    """
    progress = progress if isinstance(progress, Progress) else Progress(enabled=progress)
    _check(size, quality, shard_size)
    _check_out(out)
    source = scan_source(src, val_labels=val_labels, allow_empty_classes=allow_empty_classes)
    source = hold_out_val(source, val_fraction, seed)
    progress.say(f"{src}: {source.describe()}")
    plan = dict(kind="folder", size=size, quality=quality, shard_size=shard_size, classes=source.classes)
    plan["order"] = f"shuffled:{SHARD_ORDER_SEED}"  # a build of another order is refused, not completed
    files = {k: [[f.path, f.label, f.size] for f in v] for k, v in source.splits.items()}
    fp = _fingerprint(dict(plan, files=files))
    _prepare_out(out, fp, plan)
    folder = {"kind": "folder", "root": src}
    tasks = [
        t
        for split, items in source.splits.items()
        for t in _tasks(out, split, shard_order(items, split), folder, size, quality, shard_size)
    ]
    meta = {
        "size": size,
        "quality": quality,
        "classes": source.classes,
        "class_names": source.class_names,
        "layout": source.layout,
        "val_split": source.val_split,
        "fingerprint": fp,
        "source": src,
    }
    return _run(out, tasks, meta, workers or os.cpu_count() or 1, map_fn, progress, source.warnings)


def build_synthetic(
    n: int,
    out: str,
    *,
    size: int = 40,
    classes: int = 10,
    val_fraction: float = 0.1,
    seed: int = 0,
    quality: int = 90,
    shard_size: int = 1000,
    workers: int | None = None,
    map_fn: MapFn | None = None,
    progress: bool | Progress = True,
) -> BuildSummary:
    """A generated dataset of ``n`` images (``round(n * val_fraction)`` of them validation), same format.

    Defaults suit ``ModelConfig.small()``: 40 px stored images for 32 px crops, 10 classes.
    """
    progress = progress if isinstance(progress, Progress) else Progress(enabled=progress)
    _check(size, quality, shard_size)
    n_val = round(n * val_fraction)
    if classes < 2 or n - n_val < classes:
        raise ValueError(
            f"--synthetic {n} --classes {classes}: need >= 2 classes and >= 1 training image per class"
        )
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction={val_fraction}: must be in [0, 1)")
    names = [f"class_{c:03d}" for c in range(classes)]
    plan = {
        "kind": "synthetic",
        "n": n,
        "size": size,
        "quality": quality,
        "shard_size": shard_size,
        "classes": names,
        "seed": seed,
        "val_fraction": val_fraction,
    }
    _check_out(out)
    fp = _fingerprint(plan)
    _prepare_out(out, fp, plan)
    source = {"kind": "synthetic", "seed": seed, "classes": classes}
    tasks = []
    for split, count in (("train", n - n_val), ("val", n_val)):
        items = [(i, synthetic_label(i, classes)) for i in range(count)]
        tasks += _tasks(out, split, items, source, size, quality, shard_size)
    meta = {
        "size": size,
        "quality": quality,
        "classes": names,
        "class_names": names,
        "fingerprint": fp,
        "source": f"synthetic:{seed}",
    }
    return _run(out, tasks, meta, workers or os.cpu_count() or 1, map_fn, progress, [])
