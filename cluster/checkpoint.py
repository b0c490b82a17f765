"""Checkpoints: one directory per step, tensors in safetensors, a manifest written last.

Layout (``RUN_DIR`` is a local path or any fsspec URL, e.g. ``s3://bucket/run``)::

    RUN_DIR/checkpoints/step-00001200/
        model.safetensors       # exactly TwoColumnAlexNet's state-dict keys ({block}.{column}.weight|bias)
        optimizer.safetensors   # SGD momentum buffers, keyed like the parameter they belong to
        manifest.json           # written LAST, by atomic rename: only a directory with it is a checkpoint

The manifest holds the format version, the step, the sizes and sha256 of the tensor files and
the time of the write, plus the run's entries (:class:`cluster.manifest.Manifest`: epoch, data
positions, learning-rate rule state, config, grid).
A checkpoint is *complete* when its manifest parses and every file it lists is there with the
recorded size (:func:`scan_checkpoints`: one listing and one manifest read per checkpoint, cheap
on any filesystem); loading also verifies each file's sha256, since it reads the bytes anyway
(hashing them in the scan would read every checkpoint whole). :func:`load_newest` takes the newest
checkpoint that passes both and says why each newer one was skipped. Loading never unpickles
anything (safetensors + JSON only).
Because the keys are the canonical per-column names, a checkpoint written on one grid loads on
any other grid, and into the local and fused executions.

:class:`CheckpointManager` writes in a background thread: the caller's only stall is getting the
tensors into host memory. After a successful write it keeps the newest ``keep`` complete
checkpoints; deletion never touches the newest complete one, and incomplete directories older
than it (left by a crash mid-write) are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any

import fsspec
import safetensors.torch
from torch import Tensor

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
_PREFIX = "step-"


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
    """A loaded checkpoint: full model and optimizer dicts (CPU tensors) and the manifest."""

    url: str
    model: dict[str, Tensor]
    optimizer: dict[str, Tensor]
    manifest: dict[str, Any]

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
    """Every ``step-N`` directory under ``run_dir/checkpoints`` (manifest or not), oldest first."""
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


def scan_checkpoints(run_dir: str, files: tuple[str, ...] | None = None) -> list[CheckpointDir]:
    """Every checkpoint directory with a manifest under ``run_dir``, oldest first, each checked for
    completeness: the files its manifest lists (or only ``files``) present with their sizes."""
    out = []
    for step, url in _step_dirs(run_dir):
        fs, p = _fs(url)
        try:
            sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"] for e in fs.ls(p, detail=True)}
            if MANIFEST in sizes:
                out.append(CheckpointDir(step, url, _problem(url, sizes, files)))
        except FileNotFoundError:  # deleted since the listing (pruned by another run's writer)
            continue
    return out


def _problem(url: str, sizes: dict[str, int], files: tuple[str, ...] | None) -> str | None:
    """Why checkpoint ``url`` (its files' ``sizes``) is incomplete, or None."""
    try:
        listed = read_manifest(url)["files"]
        for name in files or tuple(listed):
            if name not in listed:
                return f"{MANIFEST} does not list {name}"
            if name not in sizes:
                return f"{name} is missing"
            if sizes[name] != listed[name]["bytes"]:
                return f"{name} has {sizes[name]} bytes, {MANIFEST} says {listed[name]['bytes']}"
    except CorruptCheckpoint as e:
        return e.reason
    except (KeyError, TypeError):  # a manifest edited by hand: no "files", or entries without "bytes"
        return f"{MANIFEST} does not record its files' sizes"
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
    fs, p = _fs(url)
    return fs.exists(join_url(p, MANIFEST))


def resolve_checkpoint(path: str) -> str:
    """``path`` if it is a checkpoint directory, else the newest complete checkpoint of the run dir."""
    if is_checkpoint(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise _no_checkpoint(path, [])
    return latest


def _no_checkpoint(path: str, skipped: list[str]) -> ValueError:
    why = f" (skipped: {'; '.join(skipped)})" if skipped else ""
    return ValueError(
        f"{path}: neither a checkpoint (no {MANIFEST}) nor a run directory with a complete "
        f"checkpoint under checkpoints/{why}; point --checkpoint at RUN_DIR or RUN_DIR/checkpoints/step-N"
    )


def read_manifest(url: str) -> dict[str, Any]:
    """The manifest of checkpoint ``url`` (JSON only), its format version checked.

    Invalid JSON is a :class:`CorruptCheckpoint` naming the file; another format version a
    ``ValueError`` (a checkpoint of other code, not a damaged one)."""
    fs, p = _fs(url)
    with fs.open(join_url(p, MANIFEST), "rb") as f:
        raw = f.read()
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(url, f"{MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CorruptCheckpoint(url, f"{MANIFEST} holds a JSON {type(manifest).__name__}, not a manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{join_url(url, MANIFEST)}: checkpoint format_version {version}, this code reads "
            f"{FORMAT_VERSION}; use the matching version of alexnet-pipeline"
        )
    return manifest


def _read_verified(url: str, manifest: dict[str, Any], name: str) -> bytes:
    """The bytes of file ``name`` of checkpoint ``url``, checked against the manifest's size and sha256."""
    files = manifest.get("files")
    want = files.get(name) if isinstance(files, dict) else None
    if not isinstance(want, dict) or not {"bytes", "sha256"} <= set(want):
        raise CorruptCheckpoint(url, f"{MANIFEST} does not list {name} with its size and sha256")
    fs, p = _fs(url)
    try:
        with fs.open(join_url(p, name), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CorruptCheckpoint(url, f"{name} is missing") from None
    if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
        raise CorruptCheckpoint(
            url, f"{name}: size or sha256 differs from {MANIFEST} (corrupt or partly overwritten)"
        )
    return data


def load_checkpoint(url: str, optimizer: bool = True) -> Checkpoint:
    """Load a checkpoint directory, verifying sizes and sha256 (:class:`CorruptCheckpoint` if it
    fails); ``url`` may be a run dir: its newest complete checkpoint (:func:`load_newest`).

    ``optimizer=False`` reads only the model file (``Checkpoint.optimizer`` is empty): what
    ``alexnet eval`` needs."""
    if not is_checkpoint(url):
        ck, skipped = load_newest(url, optimizer)
        if ck is None:
            raise _no_checkpoint(url, skipped)
        return ck
    manifest = read_manifest(url)
    names = (MODEL_FILE, OPTIMIZER_FILE) if optimizer else (MODEL_FILE,)
    tensors = {name: safetensors.torch.load(_read_verified(url, manifest, name)) for name in names}
    return Checkpoint(url, tensors[MODEL_FILE], tensors.get(OPTIMIZER_FILE, {}), manifest)


def load_newest(run_dir: str, optimizer: bool = True) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint of ``run_dir`` that is complete and verifies (None: there is none),
    and one line per newer checkpoint skipped (``step-00000012: optimizer.safetensors is missing``).

    ``optimizer=False``: only the model file must be complete (see :func:`load_checkpoint`)."""
    skipped = []
    files = None if optimizer else (MODEL_FILE,)
    for d in reversed(scan_checkpoints(run_dir, files)):
        problem = d.problem
        if problem is None:
            try:
                return load_checkpoint(d.url, optimizer), skipped
            except CorruptCheckpoint as e:
                problem = e.reason
        skipped.append(f"{d.name}: {problem}")
    return None, skipped


def _to_host(tensors: dict[str, Tensor], copy: bool = True) -> dict[str, Tensor]:
    """Contiguous CPU tensors; ``copy=False`` skips the copy of tensors already on the host
    (for tensors the caller owns exclusively, e.g. fresh from ``ray.get``)."""
    return {k: v.detach().to("cpu", copy=copy).contiguous() for k, v in tensors.items()}


def write_checkpoint(
    run_dir: str,
    step: int,
    model: dict[str, Tensor],
    optimizer: dict[str, Tensor],
    meta: dict[str, Any] | None = None,
) -> CheckpointRecord:
    """Write one checkpoint synchronously: the tensor files first, then the manifest by rename."""
    t0 = time.perf_counter()
    url = join_url(run_dir, "checkpoints", checkpoint_name(step))
    fs, p = _fs(url)
    fs.makedirs(p, exist_ok=True)
    if fs.exists(join_url(p, MANIFEST)):  # a checkpoint of this step from before a resume from an
        fs.rm(join_url(p, MANIFEST))  # older one: not a checkpoint while its files are rewritten
    files, total = {}, 0
    for name, tensors in ((MODEL_FILE, model), (OPTIMIZER_FILE, optimizer)):
        data = safetensors.torch.save(
            _to_host(tensors, copy=False), metadata={"format_version": str(FORMAT_VERSION)}
        )
        with fs.open(join_url(p, name), "wb") as f:
            f.write(data)
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        total += len(data)
    _crash_hook(step)
    manifest = {**(meta or {}), "format_version": FORMAT_VERSION, "step": step, "files": files}
    manifest["written_unix_s"] = time.time()
    tmp = join_url(p, MANIFEST + ".tmp")
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    fs.mv(tmp, join_url(p, MANIFEST))  # a rename on local disk: the manifest appears whole or not at all
    return CheckpointRecord(url, step, total, time.perf_counter() - t0)


# Test hook (off unless the variable is set): SIGKILL this process after the tensor files of the
# checkpoint of this step are written, before its manifest exists, as a crash mid-write would.
KILL_ENV = "ALEXNET_TEST_KILL_IN_CHECKPOINT"


def _crash_hook(step: int) -> None:
    want = os.environ.get(KILL_ENV)
    if want is not None and want.strip() == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def prune_checkpoints(run_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints, and what is older than those kept:
    damaged checkpoints (a manifest, but a file missing or of the wrong size) older than the oldest
    kept one, and directories without a manifest (crash leftovers) older than the newest.

    Never deletes the newest complete checkpoint (``keep`` >= 1), nor an incomplete directory
    newer than it (a write may be in progress); a damaged checkpoint is never counted as one of the
    ``keep``. Returns the deleted URLs.
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
    for url in doomed:
        fs_, p = _fs(url)
        # the manifest goes first, so a half-deleted directory is never mistaken for a checkpoint
        if fs_.exists(join_url(p, MANIFEST)):
            fs_.rm(join_url(p, MANIFEST))
        fs_.rm(p, recursive=True)
    return doomed


class CheckpointManager:
    """Background checkpoint writer for one run directory (one write at a time, in order).

    ``save`` returns once the tensors are host copies; the write and the pruning run in a
    worker thread. ``wait()`` blocks until every submitted write finished (re-raising a
    failure). A thread pool of one keeps writes ordered; a new save waits for the previous
    write to finish, so at most one checkpoint's tensors are held in host memory twice.
    ``failures`` lists the writes that failed since the last one that succeeded, as (step,
    error): what the run's policy (``checkpoint.max_failed_writes``) judges.
    """

    def __init__(self, run_dir: str, keep: int = 3, background: bool = True) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep}: use >= 1")
        self.run_dir, self.keep, self.background = run_dir, keep, background
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
    ) -> Future:
        """Submit a checkpoint of ``step``; returns a Future of its :class:`CheckpointRecord`.

        The tensors are copied to host memory before this returns (the only stall), so the
        caller may keep training on them; ``copy=False`` when the caller hands over tensors
        it will not touch again (no second host copy). A failed write does not raise here: it
        is in the Future and in :attr:`failures`."""
        self.wait(raise_errors=False)  # one write in flight at a time (bounded host memory)
        model, optimizer = _to_host(model, copy), _to_host(optimizer, copy)
        fut = self._pool.submit(self._write, step, model, optimizer, dict(meta or {}))
        with self._lock:
            self._pending = fut
        if not self.background:
            futures_wait([fut])
        return fut

    def _write(self, step, model, optimizer, meta) -> CheckpointRecord:
        try:
            rec = write_checkpoint(self.run_dir, step, model, optimizer, meta)
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
