"""A trainer rank's input feed: the next steps' batches fetched, pinned, copied (and decoded) ahead.

:class:`Feed` runs one thread per rank that walks the run's steps in order. For each step it asks
the step's data worker for the batch (:class:`cluster.data.DataClient`), waits for the object,
takes this rank's rows and turns them into device tensors: stage-0 ranks the model input (float32
``(x - mean + lighting) * scale``, :func:`alexnet.data.transforms.to_model_input`; JPEG bytes
decoded first when the workers ship them, :func:`alexnet.data.encoded.decode_rows`), last-stage
ranks the labels. At most ``depth`` steps wait ready, so the fetch, the host-to-device copy and the
decode of step t+1 overlap step t's compute.

On CUDA the host arrays are copied into pinned buffers (a small ring, reused once their copy has
finished) and from there to the device with ``non_blocking`` copies on a side stream, and the
conversion runs on that stream too; :meth:`Feed.get` makes the compute stream wait for the step's
event, so nothing here blocks the host thread that launches the step. On CPU the same code runs
without pinning or streams (the fetch is still ahead).

The thread asks for step t+1 only once it holds step t's data: a data worker releases a batch when
every consumer asked for a later one, and the object dies with its worker (see
:mod:`cluster.data`).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alexnet.data.batch import Batch
from alexnet.data.transforms import to_model_input

log = logging.getLogger("alexnet.feed")


@dataclass
class Fed:
    """One step's inputs for this rank: ``images`` (stage 0) and ``labels`` (last stage) on the
    device, ``keys`` of its rows, ``corrupt_keys``: the keys of the rows whose JPEG did not decode
    on the device (fed as the mean image, i.e. zeros, and counted like a corrupt sample of the
    worker path: once per epoch and key, though a padding pass may feed the sample again)."""

    step: int
    images: torch.Tensor | None
    labels: torch.Tensor | None
    keys: list[str]
    corrupt_keys: tuple[str, ...] = ()
    event: Any = None  # CUDA: recorded on the side stream after the step's copies


@dataclass(frozen=True)
class FeedSpec:
    """What a rank's feed reads: ``consumer`` id at the data workers, rows ``part`` of ``parts``
    (its replica), whether it needs the images (stage 0) and the labels (last stage), the model
    input's ``input_size``, ``mean`` (3, S, S) and ``scale``."""

    consumer: int
    part: int
    parts: int
    images: bool
    labels: bool
    input_size: int
    scale: float = 1.0


class _Pinned:
    """A ring of pinned host buffers per (shape, dtype); a slot is reused once the copy out of it
    has finished (its event)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._ring: dict[tuple, list[list]] = {}
        self._next: dict[tuple, int] = {}

    def stage(self, array: np.ndarray, device: torch.device, stream: Any) -> torch.Tensor:
        """``array`` on ``device`` via a pinned buffer, copied ``non_blocking`` on ``stream``."""
        key = (array.shape, array.dtype.str)
        ring = self._ring.setdefault(key, [])
        i = self._next.get(key, 0)
        self._next[key] = (i + 1) % self.slots
        if len(ring) <= i:
            buf = torch.empty(array.shape, dtype=torch.from_numpy(array[:0]).dtype, pin_memory=True)
            ring.append([buf, None])
        buf, done = ring[i]
        if done is not None:
            done.synchronize()  # this thread waits, never the step's
        buf.copy_(_tensor(array))
        out = buf.to(device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(stream)
        ring[i][1] = ev
        return out


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor view of a (read-only, object-store) numpy array; it is only read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class Feed:
    """See the module docstring. ``client``: the :class:`cluster.data.DataClient`; ``spec``: the
    rank's :class:`FeedSpec`; ``mean``: (3, S, S) on ``device``; ``end``: the run's total steps (no
    batch at or past it exists); ``depth``: steps made ready ahead."""

    def __init__(
        self,
        client: Any,
        spec: FeedSpec,
        device: torch.device,
        mean: torch.Tensor,
        end: int,
        depth: int = 2,
    ) -> None:
        self.client, self.spec, self.device, self.mean, self.end = client, spec, device, mean, end
        self.depth = max(1, depth)
        self.cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self.cuda else None
        self._pinned = _Pinned(self.depth + 2) if self.cuda else None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._next = -1  # the step the running thread will deliver next

    # -- consumer side --------------------------------------------------------------------
    def get(self, step: int) -> Fed:
        """Step ``step``'s inputs (waits for them). Steps are asked for in order; another step
        than the next one (a recovery, a resume) restarts the thread there."""
        if self._thread is None or step != self._next:
            self._start(step)
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        self._next = step + 1
        return self.ready(item)

    def ready(self, item: Fed) -> Fed:
        """``item`` usable by the compute stream: it waits for the side stream's copies on the
        device, not the host."""
        if item.event is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(item.event)
            for t in (item.images, item.labels):
                if t is not None:
                    t.record_stream(cur)  # the allocator must not reuse it before the step is done
        return item

    def close(self) -> None:
        """Stop the thread (it exits at its next step boundary)."""
        self._stop.set()
        if self._queue is not None:  # unblock a put() waiting for room
            while not self._queue.empty():
                self._queue.get_nowait()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread = None

    def _start(self, step: int) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._next = step
        self._thread = threading.Thread(
            target=self._run, args=(step, self._queue, self._stop), daemon=True, name="feed"
        )
        self._thread.start()

    # -- the thread ----------------------------------------------------------------------
    def _run(self, first: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for t in range(first, self.end):
                if stop.is_set():
                    return
                item = self._make(t)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the step that needed it
            out.put(e)

    def _make(self, t: int) -> Fed:
        sp = self.spec
        batch = self.client.resolve(self.client.request(t, sp.consumer, sp.images), t, sp.consumer, sp.images)
        return self.place(t, batch.part(sp.part, sp.parts))

    def place(self, t: int, mine: Batch) -> Fed:
        """Step ``t``'s rows of this rank (``mine``: its replica's part of the batch) on the
        device: on CUDA through pinned buffers on the side stream, decoded there, an event recorded
        after them (what :meth:`get` makes the compute stream wait on). No Ray here:
        ``bench/gpu_check.py`` runs the feed's device side on a bare GPU machine with this."""
        if self.cuda:
            with torch.cuda.stream(self._side):
                fed = self._tensors(t, mine)
                fed.event = torch.cuda.Event()
                fed.event.record(self._side)
            return fed
        return self._tensors(t, mine)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        if self._pinned is not None:
            return self._pinned.stage(np.ascontiguousarray(array), self.device, self._side)
        return _tensor(array)

    def _tensors(self, t: int, mine: Batch) -> Fed:
        sp = self.spec
        images = labels = None
        corrupt: tuple[str, ...] = ()
        if sp.images:
            # worker pixels copied over, or this rank's rows of the JPEG bytes decoded here
            u8, bad = mine.pixels(sp.input_size, self.device, self._to_device)
            images = to_model_input(u8, self._to_device(mine.lighting), self.mean, sp.scale)
            # a host read, but in this thread: the step's thread never waits for it
            if bad is not None and bool(bad.any()):
                corrupt = tuple(mine.keys[i] for i in bad.nonzero().flatten().tolist())
                images[bad] = 0  # the mean image: no signal; counted as corrupt by the coordinator
                msg = "step %d: %d image(s) did not decode on %s (%s); fed as the mean image"
                log.warning(msg, t, len(corrupt), self.device, ", ".join(corrupt))
        if sp.labels:
            labels = self._to_device(mine.labels)
        return Fed(t, images, labels, mine.keys, corrupt)


class NoFeed:
    """The inputs of a rank that reads no batch (a middle stage): none, every step."""

    def get(self, step: int) -> Fed:
        """An empty :class:`Fed` for ``step``."""
        return Fed(step, None, None, [])

    def close(self) -> None:
        """Nothing to stop."""


# where samples that did not decode on a trainer's device are counted (the shard is not known there)
DEVICE_DECODE = "decoded on the trainers' devices"


class DeviceDecodeLosses:
    """The driver's count of samples that did not decode on the trainers' devices (:attr:`Fed.corrupt_keys`,
    reported per step): per ``(epoch, DEVICE_DECODE, "corrupt")``, once per (epoch, key) as the data
    workers count theirs (a padding pass may feed a sample again), from zero with each start of the
    trainer group as the workers' own counters are."""

    def __init__(self, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.lost: collections.Counter = collections.Counter()
        self._seen: set[tuple[int, str]] = set()

    def add(self, steps: list[dict[str, Any]]) -> None:
        """Take in reduced step results (``step``, ``corrupt_decoded``: keys)."""
        for res in steps:
            epoch = res["step"] // self.steps_per_epoch
            new = {(epoch, k) for k in res["corrupt_decoded"]} - self._seen
            if new:
                self._seen |= new
                self.lost[(epoch, DEVICE_DECODE, "corrupt")] += len(new)

    def merged(self, stats: dict[str, Any]) -> dict[str, Any]:
        """The data pool's ``stats`` with these losses counted as the workers' are."""
        if stats and self.lost:
            stats["skipped"]["corrupt"] += sum(self.lost.values())
            stats["lost"] = {**stats["lost"], **self.lost}
        return stats
