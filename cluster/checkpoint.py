"""Checkpoints: one directory per step, tensors in safetensors, a manifest written last.

Layout (``RUN_DIR`` is a local path or any fsspec URL, e.g. ``s3://bucket/run``)::

    RUN_DIR/checkpoints/step-00001200/
        model.safetensors       # exactly TwoColumnAlexNet's state-dict keys ({block}.{column}.weight|bias)
        optimizer.safetensors   # SGD momentum buffers, keyed like the parameter they belong to
        manifest.json           # written LAST, by atomic rename: only a directory with it is a checkpoint

The manifest holds the format version, the step, the sizes and sha256 of the tensor files and
the time of the write, plus the run's entries (:class:`cluster.manifest.Manifest`: epoch, data
positions, learning-rate rule state, config, grid).
Loading verifies sizes and hashes and never unpickles anything (safetensors + JSON only).
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


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (those with a manifest) under ``run_dir``, oldest first, as (step, url)."""
    root = join_url(run_dir, "checkpoints")
    fs, path = _fs(root)
    if not fs.exists(path):
        return []
    out = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith(_PREFIX) or not name[len(_PREFIX) :].isdigit():
            continue
        if fs.exists(join_url(entry, MANIFEST)):
            out.append((int(name[len(_PREFIX) :]), join_url(root, name)))
    return sorted(out)


def latest_checkpoint(run_dir: str) -> str | None:
    """URL of the newest complete checkpoint under ``run_dir``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str) -> str:
    """``path`` if it is a checkpoint directory, else the newest complete checkpoint of the run dir."""
    fs, p = _fs(path)
    if fs.exists(join_url(p, MANIFEST)):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(
            f"{path}: neither a checkpoint (no {MANIFEST}) nor a run directory with a complete "
            "checkpoint under checkpoints/; point --checkpoint at RUN_DIR or RUN_DIR/checkpoints/step-N"
        )
    return latest


def read_manifest(url: str) -> dict[str, Any]:
    """The manifest of checkpoint ``url`` (JSON only), its format version checked."""
    fs, p = _fs(url)
    with fs.open(join_url(p, MANIFEST), "rb") as f:
        manifest = json.loads(f.read())
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{url}: checkpoint format_version {version}, this code reads {FORMAT_VERSION}; "
            "use the matching version of alexnet-pipeline"
        )
    return manifest


def load_checkpoint(url: str) -> Checkpoint:
    """Load a complete checkpoint (``url`` may be a run dir: its newest). Verifies sizes and sha256."""
    url = resolve_checkpoint(url)
    manifest = read_manifest(url)
    fs, p = _fs(url)
    tensors = {}
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        with fs.open(join_url(p, name), "rb") as f:
            data = f.read()
        want = manifest["files"][name]
        if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
            raise ValueError(
                f"{url}/{name}: size or sha256 differs from the manifest (corrupt or partly overwritten); "
                "resume from an older checkpoint by pointing at its directory"
            )
        tensors[name] = safetensors.torch.load(data)
    return Checkpoint(url, tensors[MODEL_FILE], tensors[OPTIMIZER_FILE], manifest)


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
    """Delete all but the newest ``keep`` complete checkpoints, and incomplete dirs older than the newest.

    Never deletes the newest complete checkpoint (``keep`` >= 1), nor an incomplete directory
    newer than it (a write may be in progress). Returns the deleted URLs.
    """
    if keep < 1:
        raise ValueError(f"checkpoint.keep={keep}: use >= 1")
    complete = list_checkpoints(run_dir)
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = [url for _, url in complete[:-keep]]
    root = join_url(run_dir, "checkpoints")
    fs, path = _fs(root)
    have = {s for s, _ in complete}
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        digits = name[len(_PREFIX) :]
        if name.startswith(_PREFIX) and digits.isdigit() and int(digits) < newest and int(digits) not in have:
            doomed.append(join_url(root, name))
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
    """

    def __init__(self, run_dir: str, keep: int = 3, background: bool = True) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep}: use >= 1")
        self.run_dir, self.keep, self.background = run_dir, keep, background
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None
        self._lock = threading.Lock()
        self.last: CheckpointRecord | None = None

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
        it will not touch again (no second host copy)."""
        self.wait()  # one write in flight at a time (bounded host memory; errors surface here)
        model, optimizer = _to_host(model, copy), _to_host(optimizer, copy)
        fut = self._pool.submit(self._write, step, model, optimizer, dict(meta or {}))
        with self._lock:
            self._pending = fut
        if not self.background:
            fut.result()
        return fut

    def _write(self, step, model, optimizer, meta) -> CheckpointRecord:
        rec = write_checkpoint(self.run_dir, step, model, optimizer, meta)
        prune_checkpoints(self.run_dir, self.keep)
        self.last = rec
        return rec

    def wait(self, timeout: float | None = None) -> CheckpointRecord | None:
        """Block until the pending write (if any) is done; returns the newest record."""
        with self._lock:
            fut, self._pending = self._pending, None
        if fut is not None:
            fut.result(timeout=timeout)
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
