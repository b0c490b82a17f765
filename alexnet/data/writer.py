"""``alexnet shards``: an ImageFolder tree (or generated images) -> WebDataset shards + ``dataset.json``.

Work unit: one shard. The files of a split are sorted (class folder, then file name) and cut into
consecutive runs of ``shard_size``; shard i always holds the same source files, which is what
makes a build resumable: a shard is complete when its tar and its ``_parts/<shard>.json`` (count,
skipped files) and ``.npz`` (pixel sums for the statistics) exist. A shard is written to
``<name>.tmp`` and renamed only after its part files are written, so a crash never leaves a
complete-looking partial shard. ``dataset.json`` is written last.

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
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import webdataset as wds
from fsspec.core import url_to_fs
from PIL import Image

from alexnet.data.index import (
    FORMAT_VERSION,
    INDEX_NAME,
    MEAN_IMAGE_NAME,
    SPLITS,
    PixelStats,
    join,
    shard_name,
)
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
    items: tuple  # folder: ((relpath, label), ...); synthetic: ((i, label), ...)
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


def _load(task: ShardTask, item: tuple) -> Image.Image:
    src = task.source
    if src["kind"] == "synthetic":
        return Image.fromarray(synthetic_image(src["seed"], task.split, item[0], task.size, src["classes"]))
    with fsspec.open(join(src["root"], item[0]), "rb") as f:
        data = f.read()
    im = Image.open(io.BytesIO(data))
    im.load()
    return resize_center_crop(im, task.size)


def write_shard(task: ShardTask) -> ShardResult:
    """Write one shard (tmp name, part files, rename). Unreadable images are skipped and reported."""
    fs, root = url_to_fs(task.out)
    final, tmp = f"{root}/{task.name}", f"{root}/{task.name}.tmp"
    stats = PixelStats(task.size) if task.split == "train" else None
    skipped, count = [], 0
    with fs.open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0.0) as tw:
        for j, item in enumerate(task.items):
            try:
                im = _load(task, item)
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=task.quality)
                data = buf.getvalue()
            except Exception as e:  # any unreadable source image: skip it, name it in the summary
                skipped.append((str(item[0]), f"{type(e).__name__}: {e}"))
                continue
            if stats is not None:
                # statistics over exactly what the readers will decode
                stats.add(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1))
            key = f"{task.split}_{task.first + j:08d}"
            tw.write({"__key__": key, "jpg": data, "cls": str(item[1]).encode()})
            count += 1
    part = {"name": task.name, "split": task.split, "count": count, "skipped": skipped}
    if stats is not None:
        _atomic_write(fs, f"{root}/{PARTS}/{task.name}.npz", stats.to_bytes())
    _atomic_write(fs, f"{root}/{PARTS}/{task.name}.json", json.dumps(part).encode())
    fs.mv(tmp, final)
    return ShardResult(task.name, task.split, count, skipped)


def _atomic_write(fs: Any, path: str, data: bytes) -> None:
    with fs.open(path + ".tmp", "wb") as f:
        f.write(data)
    fs.mv(path + ".tmp", path)


def _read_part(fs: Any, root: str, name: str) -> dict | None:
    if not (fs.exists(f"{root}/{name}") and fs.exists(f"{root}/{PARTS}/{name}.json")):
        return None
    with fs.open(f"{root}/{PARTS}/{name}.json", "rb") as f:
        return json.loads(f.read())


def scan_imagefolder(src: str) -> tuple[list[str], dict[str, list[tuple[str, int, int]]]]:
    """Classes (sorted train folder names) and, per split, sorted (relpath, label, bytes) lists."""
    fs, root = url_to_fs(src)
    root = root.rstrip("/")
    if not fs.isdir(f"{root}/train"):
        raise ValueError(
            f"SRC={src}: expected an ImageFolder tree SRC/train/<class>/<image> (and SRC/val/...)"
        )
    classes = sorted(
        e["name"].rstrip("/").rsplit("/", 1)[-1]
        for e in fs.ls(f"{root}/train", detail=True)
        if e["type"] == "directory" and not e["name"].rstrip("/").rsplit("/", 1)[-1].startswith(".")
    )
    if not classes:
        raise ValueError(f"SRC={src}: no class folders under SRC/train")
    label = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in SPLITS:
        if not fs.isdir(f"{root}/{split}"):
            continue
        items = []
        for path, info in fs.find(f"{root}/{split}", detail=True).items():
            rel = path[len(root) + 1 :]
            parts = rel.split("/")
            if len(parts) != 3 or parts[2].startswith(".") or info["type"] != "file":
                continue
            if parts[1] not in label:
                raise ValueError(
                    f"SRC={src}: class folder {split}/{parts[1]} has no counterpart in SRC/train"
                )
            items.append((rel, label[parts[1]], int(info.get("size") or 0)))
        splits[split] = sorted(items, key=lambda t: (t[1], t[0]))
    return classes, splits


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _prepare_out(out: str, fingerprint: str, plan: dict) -> None:
    """Refuse a directory that holds something else; record the plan."""
    fs, root = url_to_fs(out)
    plan_path = f"{root}/{PARTS}/plan.json"
    if fs.exists(plan_path):
        with fs.open(plan_path, "rb") as f:
            old = json.loads(f.read())
        if old.get("fingerprint") != fingerprint:
            raise ValueError(
                f"OUT={out} holds shards of a different dataset or built with other settings "
                f"(size, quality, shard size, source files); use an empty OUT or delete it"
            )
        return
    if fs.exists(root) and fs.ls(root, detail=False):
        raise ValueError(f"OUT={out} is not empty and holds no shard build; use an empty or new directory")
    fs.makedirs(f"{root}/{PARTS}", exist_ok=True)
    _atomic_write(fs, plan_path, json.dumps(dict(plan, fingerprint=fingerprint)).encode())


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
    progress: bool,
) -> BuildSummary:
    """Write the shards ``tasks`` lists that an earlier run has not, then the index beside them."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    fs, root = url_to_fs(out)
    results, todo = {}, []
    for t in tasks:
        part = _read_part(fs, root, t.name)
        if part is None:
            todo.append(t)
        else:
            results[t.name] = ShardResult(
                t.name, t.split, part["count"], [tuple(s) for s in part["skipped"]], True
            )
    if map_fn is None and fs.protocol not in ("memory", ("memory",)):
        map_fn = _pool_map(workers)
    mapped = map_fn(write_shard, todo) if (map_fn is not None and todo) else map(write_shard, todo)
    written = 0
    with tqdm(total=sum(len(t.items) for t in todo), unit="img", disable=not progress, desc="shards") as bar:
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
        s["shards"].append({"name": t.name, "count": results[t.name].count})
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
    progress: bool = True,
) -> BuildSummary:
    """Turn the ImageFolder tree ``src`` into shards in ``out`` (both local paths or fsspec URLs).

    Resumable and idempotent: shards completed by an earlier run with the same source and settings
    are kept. ``map_fn(fn, tasks)`` replaces the local process pool (e.g. Ray tasks on a cluster;
    then ``out`` must be reachable from every node).
    """
    _check(size, quality, shard_size)
    classes, splits = scan_imagefolder(src)
    if not splits.get("train"):
        raise ValueError(f"SRC={src}: no training images under SRC/train/<class>/")
    plan = {"kind": "folder", "size": size, "quality": quality, "shard_size": shard_size, "classes": classes}
    fp = _fingerprint(dict(plan, files={k: [list(x) for x in v] for k, v in splits.items()}))
    _prepare_out(out, fp, plan)
    source = {"kind": "folder", "root": src}
    tasks = [
        t
        for split, items in splits.items()
        for t in _tasks(out, split, [(p, lab) for p, lab, _ in items], source, size, quality, shard_size)
    ]
    meta = {"size": size, "quality": quality, "classes": classes, "fingerprint": fp, "source": src}
    return _run(out, tasks, meta, workers or os.cpu_count() or 1, map_fn, progress)


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
    progress: bool = True,
) -> BuildSummary:
    """A generated dataset of ``n`` images (``round(n * val_fraction)`` of them validation), same format.

    Defaults suit ``ModelConfig.small()``: 40 px stored images for 32 px crops, 10 classes.
    """
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
        "fingerprint": fp,
        "source": f"synthetic:{seed}",
    }
    return _run(out, tasks, meta, workers or os.cpu_count() or 1, map_fn, progress)
