"""Checkpoints: one directory per step, tensors in safetensors, a manifest written last.

Layout (``RUN_DIR`` is a local path or any fsspec URL, e.g. ``s3://bucket/run``)::

    RUN_DIR/checkpoints/step-00001200/
        model.safetensors       # exactly TwoColumnAlexNet's state-dict keys ({block}.{column}.weight|bias)
        optimizer.safetensors   # SGD momentum buffers, keyed like the parameter they belong to
        mean.safetensors        # the mean the model's input subtracts ("mean": (3, S, S) or (3, 1, 1))
        manifest.json           # written LAST, by atomic rename: only a directory with it is a checkpoint

The manifest holds the format version, the step, the sizes and sha256 of the files, the time of
the write and the sha256 of its own other entries (``manifest_sha256``), plus the run's entries
(:class:`cluster.manifest.Manifest`: epoch, data positions, learning-rate rule state, config,
grid, and the ``inference`` record: class names, input size, ``input_scale``, mean kind).

A checkpoint is untrusted input (users copy, link and edit them), so nothing in it is trusted:
every file it lists must be a regular file inside its directory (``lstat``/``O_NOFOLLOW``: no
symlink, FIFO or device), of the manifest's size before a byte is read, hashed while it streams;
the manifest is capped at :data:`MAX_MANIFEST_BYTES`; each safetensors header is read and checked
(its tensors' names and shapes against what the caller expects from the manifest's config) before
the tensors are allocated. Every failure is a :class:`CorruptCheckpoint`: :func:`load_newest`
takes the newest checkpoint that passes and names each newer one skipped and why.
A checkpoint is *complete* when its manifest parses and every file it lists is there with the
recorded size (:func:`scan_checkpoints`: one listing and one manifest read per checkpoint, cheap
on any filesystem); loading also verifies each file's sha256, since it reads the bytes anyway.
Loading never unpickles anything (safetensors + JSON only). A checkpoint of an earlier format is
refused (``ValueError``), not skipped: it is another release's, not a damaged one.
Because the keys are the canonical per-column names, a checkpoint written on one grid loads on
any other grid, and into the local and fused executions.

:class:`CheckpointManager` writes in a background thread: the caller's only stall is getting the
tensors into host memory. After a successful write it keeps the newest ``keep`` complete
checkpoints; deletion never touches the newest complete one, and incomplete directories older
than it (left by a crash mid-write) are removed. Pruning never leaves ``RUN/checkpoints``: a
``step-N`` entry that is a symlink (or whose real path is elsewhere) is never entered; at most the
link itself is removed, and that is said.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any

import fsspec
import safetensors.torch
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor

# 2: the inference record and mean.safetensors, the manifest's own sha256; 1 is refused
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
MEAN_FILE = "mean.safetensors"
FILES = (MODEL_FILE, OPTIMIZER_FILE, MEAN_FILE)  # every file a manifest may list
# A manifest is a few kB (its largest entries: the config and one data position per stream, at
# most a few hundred); the cap only stops a huge one from being read whole.
MAX_MANIFEST_BYTES = 4 << 20
# a safetensors header lists names, dtypes, shapes and offsets: ~100 B per tensor
MAX_HEADER_BYTES = 1 << 20
_CHUNK = 8 << 20  # bytes hashed per read while a file streams in
_PREFIX = "step-"
# safetensors dtype names -> bytes per element (what a header may declare)
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}

# The tensors a file must hold: ``{name: shape}`` and whether it must hold all of them (``True``)
# or may hold a subset (the optimizer's buffers). Given by the caller from the manifest's config
# (:func:`cluster.manifest.expected_tensors`), checked against each safetensors header before the
# file is read; an exception raised there means a damaged manifest.
Expected = dict[str, tuple[dict[str, list[int]], bool]]
Expect = Callable[[dict[str, Any]], Expected]


def checkpoint_name(step: int) -> str:
    """``step-00001200``: zero-padded so names sort by step."""
    return f"{_PREFIX}{step:08d}"


def join_url(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or an fsspec URL (``s3://bucket/run``)."""
    return "/".join([base.rstrip("/"), *parts])


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


@dataclass(frozen=True)
class CheckpointRecord:
    """What one completed write produced."""

    url: str
    step: int
    bytes: int
    duration_s: float


@dataclass
class Checkpoint:
    """A loaded checkpoint: full model and optimizer dicts (CPU tensors), the manifest, and the
    other tensor files read (``extra``: ``{MEAN_FILE: {"mean": ...}}`` when asked for)."""

    url: str
    model: dict[str, Tensor]
    optimizer: dict[str, Tensor]
    manifest: dict[str, Any]
    extra: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    @property
    def step(self) -> int:
        """The step the checkpoint was written at (the next step to run)."""
        return int(self.manifest["step"])


CORRUPT_ADVICE = (
    "`alexnet train --resume` takes the newest complete checkpoint by itself; to continue from a "
    "chosen one: `alexnet train --resume --from-checkpoint RUN_DIR/checkpoints/step-N`; "
    "`alexnet eval --checkpoint RUN_DIR/checkpoints/step-N` scores one"
)


class CorruptCheckpoint(ValueError):
    """A checkpoint directory whose manifest or files cannot be used; ``reason`` says why, briefly."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}; {CORRUPT_ADVICE}")
        self.url, self.reason = url, reason


@dataclass(frozen=True)
class CheckpointDir:
    """One ``step-N`` directory with a manifest; ``problem`` is None when it is complete."""

    step: int
    url: str
    problem: str | None

    @property
    def name(self) -> str:
        """``step-00001200``."""
        return checkpoint_name(self.step)


def _step_dirs(run_dir: str) -> list[tuple[int, str]]:
    """Every ``step-N`` entry under ``run_dir/checkpoints`` (manifest or not), oldest first."""
    root = join_url(run_dir, "checkpoints")
    fs, path = _fs(root)
    if not fs.isdir(path):
        return []
    out = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(_PREFIX) and name[len(_PREFIX) :].isdigit():
            out.append((int(name[len(_PREFIX) :]), join_url(root, name)))
    return sorted(out)


def _local(fs: fsspec.AbstractFileSystem) -> bool:
    """Local disk: the only filesystem here with symlinks, FIFOs and devices."""
    return isinstance(fs, LocalFileSystem)


def _has_manifest(url: str) -> bool:
    fs, p = _fs(url)
    path = join_url(p, MANIFEST)
    return os.path.lexists(path) if _local(fs) else fs.exists(path)


def scan_checkpoints(run_dir: str, files: tuple[str, ...] | None = None) -> list[CheckpointDir]:
    """Every checkpoint directory with a manifest under ``run_dir``, oldest first, each checked for
    completeness: the files its manifest lists (or only ``files``) regular files with their sizes.

    A checkpoint of another format version is a ``ValueError`` (see :func:`read_manifest`)."""
    out = []
    for step, url in _step_dirs(run_dir):
        try:
            if _has_manifest(url):
                out.append(CheckpointDir(step, url, _problem(url, files)))
        except FileNotFoundError:  # deleted since the listing (pruned by another run's writer)
            continue
    return out


def _problem(url: str, files: tuple[str, ...] | None) -> str | None:
    """Why checkpoint ``url`` is incomplete (of its files, or only ``files``), or None."""
    try:
        listed = read_manifest(url)["files"]
        for name in files or tuple(listed):
            if name not in listed:
                return f"{MANIFEST} does not list {name}"
            size = _file_size(url, name)
            if size != listed[name]["bytes"]:
                return f"{name} has {size} bytes, {MANIFEST} says {listed[name]['bytes']}"
    except CorruptCheckpoint as e:
        return e.reason
    return None


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (:func:`scan_checkpoints`) under ``run_dir``, oldest first, as (step, url)."""
    return [(d.step, d.url) for d in scan_checkpoints(run_dir) if d.problem is None]


def latest_checkpoint(run_dir: str) -> str | None:
    """URL of the newest complete checkpoint under ``run_dir``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def is_checkpoint(url: str) -> bool:
    """``url`` is a checkpoint directory (it holds a manifest), complete or not."""
    return _has_manifest(url)


def _no_checkpoint(path: str, skipped: list[str]) -> ValueError:
    why = f" (skipped: {'; '.join(skipped)})" if skipped else ""
    return ValueError(
        f"{path}: neither a checkpoint (no {MANIFEST}) nor a run directory with a complete "
        f"checkpoint under checkpoints/{why}; point --checkpoint at RUN_DIR or RUN_DIR/checkpoints/step-N"
    )


# -- reading untrusted files ------------------------------------------------------------------------


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "a device or socket"


def _not_regular(url: str, name: str, kind: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(
        url, f"{name} is {kind}, not a regular file (a checkpoint's files are never followed elsewhere)"
    )


def _file_size(url: str, name: str) -> int:
    """Size of file ``name`` of checkpoint ``url``, which must be a regular file in it (a symlink
    is not followed: ``lstat``)."""
    fs, p = _fs(url)
    path = join_url(p, name)
    try:
        if _local(fs):
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                raise _not_regular(url, name, _kind(st.st_mode))
            return st.st_size
        info = fs.info(path)
    except FileNotFoundError:
        raise CorruptCheckpoint(url, f"{name} is missing") from None
    if info.get("type") != "file":
        raise _not_regular(url, name, f"a {info.get('type')}")
    return int(info["size"])


def _open(url: str, name: str, size: int | None = None, cap: int | None = None):
    """File ``name`` of checkpoint ``url`` opened for reading, and its size, checked before a byte
    is read: a regular file inside the directory (``O_NOFOLLOW``: a symlink is refused; a FIFO is
    opened non-blocking, so it cannot hang, and then refused), of ``size`` bytes or at most ``cap``."""
    fs, p = _fs(url)
    path = join_url(p, name)
    if _local(fs):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CorruptCheckpoint(url, f"{name} is missing") from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO):  # the last component is a symlink; a socket
                raise _not_regular(url, name, _kind(os.lstat(path).st_mode)) from None
            raise CorruptCheckpoint(url, f"{name} cannot be read ({e.strerror})") from None
        f = os.fdopen(fd, "rb", buffering=0)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            f.close()
            raise _not_regular(url, name, _kind(st.st_mode))
        got = st.st_size
    else:
        got = _file_size(url, name)
        f = fs.open(path, "rb")
    if (size is not None and got != size) or (cap is not None and got > cap):
        f.close()
        want = f"{MANIFEST} says {size}" if size is not None else f"a manifest is at most {cap}"
        raise CorruptCheckpoint(url, f"{name} has {got} bytes, {want}")
    return f, got


def _read_exact(url: str, name: str, f, n: int, digest=None) -> bytes:
    """``n`` bytes of ``f``, read in chunks (each fed to ``digest``); a shorter file is damaged."""
    chunks, left = [], n
    while left:
        chunk = f.read(min(left, _CHUNK))
        if not chunk:
            raise CorruptCheckpoint(url, f"{name} ended {left} bytes early (changed while read)")
        if digest is not None:
            digest.update(chunk)
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's entries but its own (canonical JSON: sorted keys, no spaces)."""
    rest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(url: str) -> dict[str, Any]:
    """The manifest of checkpoint ``url`` (JSON only), checked: its size (at most
    :data:`MAX_MANIFEST_BYTES`), its format version, its ``files`` (names this format writes, each
    with ``bytes`` and ``sha256``), its ``step`` and its own sha256 (``manifest_sha256``).

    A damaged one is a :class:`CorruptCheckpoint` naming the file; another format version a
    ``ValueError`` of one line (a checkpoint of another release, not a damaged one)."""
    f, size = _open(url, MANIFEST, cap=MAX_MANIFEST_BYTES)
    with f:
        raw = _read_exact(url, MANIFEST, f, size)
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(url, f"{MANIFEST} is not valid JSON ({e})") from None
    except RecursionError:  # nesting deeper than the interpreter's stack: no manifest is like that
        raise CorruptCheckpoint(url, f"{MANIFEST} is not valid JSON (nested too deep to read)") from None
    if not isinstance(manifest, dict):
        raise CorruptCheckpoint(url, f"{MANIFEST} holds a JSON {type(manifest).__name__}, not a manifest")
    _check_version(url, manifest.get("format_version"))
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not set(files) <= set(FILES):
        raise CorruptCheckpoint(url, f"{MANIFEST} does not list its files (some of {', '.join(FILES)})")
    for name, entry in files.items():
        if not (
            isinstance(entry, dict) and _count(entry.get("bytes")) and isinstance(entry.get("sha256"), str)
        ):
            raise CorruptCheckpoint(url, f"{MANIFEST} does not list {name} with its size and sha256")
    if not _count(manifest.get("step")):
        raise CorruptCheckpoint(url, f"{MANIFEST} has no step")
    if manifest.get("manifest_sha256") != _digest(manifest):
        raise CorruptCheckpoint(url, f"{MANIFEST}: its entries differ from its sha256 (edited or damaged)")
    return manifest


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_version(url: str, version: Any) -> None:
    if version == FORMAT_VERSION:
        return
    if not _count(version):
        raise CorruptCheckpoint(url, f"{MANIFEST} has no valid format_version")
    by = "an earlier" if version < FORMAT_VERSION else "a later"
    raise ValueError(
        f"{join_url(url, MANIFEST)}: checkpoint format {version}, written by {by} release; this one "
        f"reads format {FORMAT_VERSION} only: resume or evaluate it with the release that wrote it"
    )


def _header(url: str, name: str, f, size: int, digest) -> tuple[bytes, dict[str, list[int]]]:
    """The safetensors header of ``f`` (``size`` bytes; the bytes read fed to ``digest``) and its
    tensors' shapes, checked before the tensors are read: a declared length within the file and
    :data:`MAX_HEADER_BYTES`, known dtypes, offsets that hold exactly each tensor's bytes."""
    if size < 8:
        raise CorruptCheckpoint(url, f"{name}: {size} bytes, too short for a safetensors file")
    head = _read_exact(url, name, f, 8, digest)
    n = struct.unpack("<Q", head)[0]
    if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
        raise CorruptCheckpoint(url, f"{name}: its safetensors header declares {n} bytes in a file of {size}")
    raw = _read_exact(url, name, f, n, digest)
    try:
        header = json.loads(raw)
        shapes = {}
        for key, t in header.items():
            if key == "__metadata__":
                continue
            shape, (begin, end) = t["shape"], t["data_offsets"]
            if not all(_count(d) for d in shape) or not (_count(begin) and _count(end)):
                raise ValueError(f"tensor {key}: shape or offsets are not counts")
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * _DTYPE_BYTES[t["dtype"]] or end > size - 8 - n:
                raise ValueError(f"tensor {key}: its offsets do not hold its shape, or lie past the file")
            shapes[key] = list(shape)
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpoint(url, f"{name}: not a safetensors header ({type(e).__name__}: {e})") from None
    return head + raw, shapes


def _check_tensors(
    url: str, name: str, shapes: dict[str, list[int]], want: dict[str, list[int]], exact: bool
):
    """The tensors of file ``name`` (``shapes``, from its header) are those the manifest's config
    gives (``want``; all of them when ``exact``, else a subset)."""
    unknown = sorted(set(shapes) - set(want))
    missing = sorted(set(want) - set(shapes)) if exact else []
    if unknown or missing:
        what = f"tensors the model does not have ({', '.join(unknown[:3])})" if unknown else ""
        what += (" and " if what else "") + (f"no {', '.join(missing[:3])}" if missing else "")
        raise CorruptCheckpoint(url, f"{name} holds {what}, unlike the model of its manifest's config")
    for key, shape in shapes.items():
        if shape != want[key]:
            raise CorruptCheckpoint(
                url, f"{name}: tensor {key} has shape {shape}, the model of its manifest's config {want[key]}"
            )


def _read_tensors(
    url: str, manifest: dict[str, Any], name: str, want: tuple[dict[str, list[int]], bool] | None
) -> dict[str, Tensor]:
    """File ``name`` of checkpoint ``url`` as tensors: its size checked before it is opened, its
    header (and the tensors' shapes against ``want``) before the tensors are read, its sha256 while
    it streams, and only then the tensors made (safetensors: no pickle)."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise CorruptCheckpoint(url, f"{MANIFEST} does not list {name}")
    digest = hashlib.sha256()
    f, size = _open(url, name, size=entry["bytes"])
    with f:
        head, shapes = _header(url, name, f, size, digest)
        if want is not None:
            _check_tensors(url, name, shapes, *want)
        data = head + _read_exact(url, name, f, size - len(head), digest)
    if digest.hexdigest() != entry["sha256"]:
        raise CorruptCheckpoint(
            url, f"{name}: size or sha256 differs from {MANIFEST} (corrupt or partly overwritten)"
        )
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # SafetensorError and whatever a crafted file may raise beyond the header
        raise CorruptCheckpoint(url, f"{name}: not a safetensors file ({type(e).__name__}: {e})") from None


TRAIN_FILES = (MODEL_FILE, OPTIMIZER_FILE)  # what --resume and in-run recovery read
INFERENCE_FILES = (MODEL_FILE, MEAN_FILE)  # what alexnet eval (and predict) read


def load_checkpoint(
    url: str, files: tuple[str, ...] = TRAIN_FILES, expect: Expect | None = None
) -> Checkpoint:
    """Load the tensor ``files`` of a checkpoint directory, each verified (size before it is
    opened, header and shapes before its tensors are made, sha256): :class:`CorruptCheckpoint` if
    one fails; ``url`` may be a run dir: its newest complete checkpoint (:func:`load_newest`).

    ``expect(manifest)`` gives the tensors each file must hold (from the manifest's config); an
    error raised there is a damaged manifest."""
    if not is_checkpoint(url):
        ck, skipped = load_newest(url, files, expect)
        if ck is None:
            raise _no_checkpoint(url, skipped)
        return ck
    manifest = read_manifest(url)
    wants: Expected = {}
    if expect is not None:
        try:
            wants = expect(manifest)
        except Exception as e:  # whatever parsing an edited config or sizing its model raises
            raise CorruptCheckpoint(url, f"{MANIFEST}: {type(e).__name__}: {e}") from None
    tensors = {name: _read_tensors(url, manifest, name, wants.get(name)) for name in files}
    extra = {k: v for k, v in tensors.items() if k not in TRAIN_FILES}
    return Checkpoint(url, tensors[MODEL_FILE], tensors.get(OPTIMIZER_FILE, {}), manifest, extra)


def load_newest(
    run_dir: str, files: tuple[str, ...] = TRAIN_FILES, expect: Expect | None = None
) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint of ``run_dir`` whose ``files`` are complete and verify (None: there is
    none), and one line per newer checkpoint skipped (``step-00000012: optimizer.safetensors is
    missing``). See :func:`load_checkpoint`."""
    skipped = []
    for d in reversed(scan_checkpoints(run_dir, files)):
        problem = d.problem
        if problem is None:
            try:
                return load_checkpoint(d.url, files, expect), skipped
            except CorruptCheckpoint as e:
                problem = e.reason
        skipped.append(f"{d.name}: {problem}")
    return None, skipped


def _to_host(tensors: dict[str, Tensor], copy: bool = True) -> dict[str, Tensor]:
    """Contiguous CPU tensors; ``copy=False`` skips the copy of tensors already on the host
    (for tensors the caller owns exclusively, e.g. fresh from ``ray.get``)."""
    return {k: v.detach().to("cpu", copy=copy).contiguous() for k, v in tensors.items()}


def _say(line: str) -> None:
    print(f"[checkpoint] {line}", flush=True)


def _make_way(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove ``path`` if it is a symlink, a FIFO or a device: a write must never go through a link
    into another run, nor block on a FIFO, nor write to a device."""
    if not _local(fs):
        return
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        target = f" (to {os.readlink(path)})" if stat.S_ISLNK(mode) else ""
        _say(f"removed {_kind(mode)} {path}{target} to write this run's own file there")
        os.unlink(path)


def write_checkpoint(
    run_dir: str,
    step: int,
    model: dict[str, Tensor],
    optimizer: dict[str, Tensor],
    meta: dict[str, Any] | None = None,
    extra: dict[str, dict[str, Tensor]] | None = None,
    before_manifest: Callable[[int], None] | None = None,
) -> CheckpointRecord:
    """Write one checkpoint synchronously: the tensor files (model, optimizer, then ``extra``:
    ``{MEAN_FILE: {"mean": ...}}``) first, then the manifest by rename. ``before_manifest(step)``
    runs between the two (an injected crash: ``faults.kill_in_checkpoint_step``)."""
    t0 = time.perf_counter()
    url = join_url(run_dir, "checkpoints", checkpoint_name(step))
    fs, p = _fs(url)
    _make_way(fs, p)
    fs.makedirs(p, exist_ok=True)
    if is_checkpoint(url):  # a checkpoint of this step from before a resume from an older one:
        fs.rm(join_url(p, MANIFEST))  # not a checkpoint while its files are rewritten
    files, total = {}, 0
    for name, tensors in ((MODEL_FILE, model), (OPTIMIZER_FILE, optimizer), *(extra or {}).items()):
        data = safetensors.torch.save(
            _to_host(tensors, copy=False), metadata={"format_version": str(FORMAT_VERSION)}
        )
        _make_way(fs, join_url(p, name))
        with fs.open(join_url(p, name), "wb") as f:
            f.write(data)
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        total += len(data)
    if before_manifest is not None:
        before_manifest(step)
    manifest = {**(meta or {}), "format_version": FORMAT_VERSION, "step": step, "files": files}
    manifest["written_unix_s"] = time.time()
    manifest["manifest_sha256"] = _digest(manifest)
    tmp = join_url(p, MANIFEST + ".tmp")
    _make_way(fs, tmp)
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    fs.mv(tmp, join_url(p, MANIFEST))  # a rename on local disk: the manifest appears whole or not at all
    return CheckpointRecord(url, step, total, time.perf_counter() - t0)


def prune_checkpoints(run_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints, and what is older than those kept:
    damaged checkpoints (a manifest, but a file missing or of the wrong size) older than the oldest
    kept one, and directories without a manifest (crash leftovers) older than the newest.

    Never deletes the newest complete checkpoint (``keep`` >= 1), nor an incomplete directory
    newer than it (a write may be in progress); a damaged checkpoint is never counted as one of the
    ``keep``. Never deletes outside ``run_dir/checkpoints``: a ``step-N`` entry that is a symlink
    is never entered (only the link is removed, and that is said), one whose real path is
    elsewhere is left. Returns the deleted URLs.
    """
    if keep < 1:
        raise ValueError(f"checkpoint.keep={keep}: use >= 1")
    scanned = scan_checkpoints(run_dir)
    complete = [d.step for d in scanned if d.problem is None]
    if not complete:
        return []
    oldest_kept, newest = complete[-keep:][0], complete[-1]
    with_manifest = {d.step for d in scanned}
    doomed = [
        url for step, url in _step_dirs(run_dir) if step < (oldest_kept if step in with_manifest else newest)
    ]
    return [url for url in doomed if _delete_step_dir(run_dir, url)]


def _delete_step_dir(run_dir: str, url: str) -> bool:
    """Delete the ``step-N`` entry ``url`` of ``run_dir/checkpoints``, never what is outside that
    folder; whether anything was deleted."""
    fs, p = _fs(url)
    if _local(fs):
        if os.path.islink(p):  # another run's checkpoint, linked here to resume from it: not ours
            _say(f"pruning removed the link {url} only, not the checkpoint it points to ({os.readlink(p)})")
            os.unlink(p)
            return True
        root = os.path.realpath(_fs(join_url(run_dir, "checkpoints"))[1])
        if os.path.dirname(os.path.realpath(p)) != root:  # e.g. a bind mount: never ours to delete
            _say(f"pruning left {url}: its real path {os.path.realpath(p)} is outside {root}")
            return False
    # the manifest goes first, so a half-deleted directory is never mistaken for a checkpoint
    if is_checkpoint(url):
        fs.rm(join_url(p, MANIFEST))
    fs.rm(p, recursive=True)  # local: shutil.rmtree, which removes links inside, never their targets
    return True


class CheckpointManager:
    """Background checkpoint writer for one run directory (one write at a time, in order).

    ``save`` returns once the tensors are host copies; the write and the pruning run in a
    worker thread. ``wait()`` blocks until every submitted write finished (re-raising a
    failure). A thread pool of one keeps writes ordered; a new save waits for the previous
    write to finish, so at most one checkpoint's tensors are held in host memory twice.
    ``failures`` lists the writes that failed since the last one that succeeded, as (step,
    error): what the run's policy (``checkpoint.max_failed_writes``) judges.
    """

    def __init__(
        self,
        run_dir: str,
        keep: int = 3,
        background: bool = True,
        before_manifest: Callable[[int], None] | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep}: use >= 1")
        self.run_dir, self.keep, self.background = run_dir, keep, background
        self.before_manifest = before_manifest
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None
        self._lock = threading.Lock()
        self.last: CheckpointRecord | None = None
        self.failures: list[tuple[int, BaseException]] = []

    def save(
        self,
        step: int,
        model: dict[str, Tensor],
        optimizer: dict[str, Tensor],
        meta: dict[str, Any] | None = None,
        copy: bool = True,
        extra: dict[str, dict[str, Tensor]] | None = None,
    ) -> Future:
        """Submit a checkpoint of ``step``; returns a Future of its :class:`CheckpointRecord`.

        The tensors are copied to host memory before this returns (the only stall), so the
        caller may keep training on them; ``copy=False`` when the caller hands over tensors
        it will not touch again (no second host copy). A failed write does not raise here: it
        is in the Future and in :attr:`failures`."""
        self.wait(raise_errors=False)  # one write in flight at a time (bounded host memory)
        model, optimizer = _to_host(model, copy), _to_host(optimizer, copy)
        extra = {name: _to_host(t, copy) for name, t in (extra or {}).items()}
        fut = self._pool.submit(self._write, step, model, optimizer, dict(meta or {}), extra)
        with self._lock:
            self._pending = fut
        if not self.background:
            futures_wait([fut])
        return fut

    def _write(self, step, model, optimizer, meta, extra) -> CheckpointRecord:
        try:
            rec = write_checkpoint(self.run_dir, step, model, optimizer, meta, extra, self.before_manifest)
            prune_checkpoints(self.run_dir, self.keep)
        except BaseException as e:
            with self._lock:
                self.failures.append((step, e))
            raise
        with self._lock:
            self.failures = []
        self.last = rec
        return rec

    def wait(self, timeout: float | None = None, raise_errors: bool = True) -> CheckpointRecord | None:
        """Block until the pending write (if any) is done; returns the newest record. A failure of
        that write is re-raised unless ``raise_errors=False`` (a timeout always is)."""
        with self._lock:
            fut, self._pending = self._pending, None
        if fut is not None:
            done, _ = futures_wait([fut], timeout)
            if not done:
                raise TimeoutError(f"checkpoint write still running after {timeout}s")
            if raise_errors and fut.exception() is not None:
                raise fut.exception()
        return self.last

    def close(self, timeout: float | None = None) -> None:
        """Finish the pending write and stop the thread."""
        try:
            self.wait(timeout)
        finally:
            self._pool.shutdown(wait=timeout is None)


def merge_rank_states(states: list[dict[str, dict[str, Tensor]]]) -> tuple[dict, dict]:
    """Union of ranks' ``{"model": ..., "optimizer": ...}`` slices (first occurrence of a key wins).

    With several replicas every key appears once per replica (identical after the gradient
    all-reduce); taking the first keeps replica 0's copy.
    """
    model: dict[str, Tensor] = {}
    optimizer: dict[str, Tensor] = {}
    for st in states:
        for k, v in st["model"].items():
            model.setdefault(k, v)
        for k, v in st.get("optimizer", {}).items():
            optimizer.setdefault(k, v)
    return model, optimizer
