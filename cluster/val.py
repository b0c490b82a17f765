"""Validation decoded once per pass by the data workers, read by the trainer ranks.

A *pass* is one walk over the val split with one crop kind (``center``, or the paper's ``ten``
crops); an evaluation is the center pass, then the 10-crop pass when it is due.

Plan and batches (:class:`alexnet.data.val.ValPlan`, :func:`alexnet.data.val.worker_batches`:
    pure, shared with ``alexnet eval``): which samples form val batch ``j``, which replica scores it
    and which worker decodes it.

Serving (:class:`ValServer`, held by each :class:`cluster.data.DataWorker`)
    ``val_start`` starts a producer thread (:class:`cluster.producer.Producer`) over this
    worker's batches of the pass, at most
    ``buffer`` batches ahead of their consumers. Each batch is decoded once and ``ray.put`` once
    (pixels + labels), with a small labels-only object beside it; ``val_get`` hands every
    consumer a reference to the same object (zero-copy numpy on the node) and drops the batch
    once all its consumers (every rank of its replica) have fetched it. Unusable samples are
    skipped and counted (:func:`alexnet.data.codec.val_sample`), so a batch may be short, or
    empty: its ``n`` says so, and every rank of the replica reads it (stage 0 the pixels, the
    others the labels object) so that all of them skip an empty batch together.

Reading (:class:`ValClient`, picklable, given to the trainer ranks)
    ``batches(pass_id, replica, images)`` yields the replica's batches in order, the request for
    the next one in flight while the caller scores the current one.

Failure: a data worker that dies mid-pass is restarted by Ray without its pass; the call that
asked it for a batch raises a ``RuntimeError`` naming the pass, the trainer group's call fails
and the coordinator restarts the group from its last checkpoint.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import ray

from alexnet.data.batch import ValBatch
from alexnet.data.codec import VAL_CROPS as CROPS
from alexnet.data.index import DatasetIndex, check_input_size
from alexnet.data.records import ReaderStats
from alexnet.data.val import ValPlan, worker_batches
from cluster.producer import Producer, ProducerFailed
from cluster.run import Run

BUFFER = 3  # decoded batches a worker keeps ahead of its consumers (a 10-crop batch is 10x a center one)
KEEP_STATS = 16  # passes whose counters val_stats() still reports
DEFAULT_TIMEOUT_S = 300.0


class _Pass:
    """One val pass on one worker: a :class:`cluster.producer.Producer` over this worker's batches
    and its bounded buffer of batch objects."""

    def __init__(
        self,
        pass_id: int,
        crop: str,
        plan: ValPlan,
        worker: int,
        consumers: dict[int, int],
        buffer: int,
        batches: Iterator[ValBatch],
    ) -> None:
        self.pass_id, self.crop, self.plan, self.worker = pass_id, crop, plan, worker
        self.consumers = consumers
        self.capacity = buffer
        self._batches = batches
        self._buf: dict[int, list] = {}  # j -> [pixels ref, labels ref, fetches still to come]
        self._made = -1  # the last batch produced
        room = lambda: len(self._buf) < self.capacity  # noqa: E731
        self.producer = Producer(f"val-pass-{pass_id}", self._make, room)

    def _make(self) -> bool:
        batch = next(self._batches, None)
        if batch is None:
            return False
        j = batch.index
        entry = [ray.put(batch), ray.put(batch.labels_only()), self.consumers[j % self.plan.replicas]]
        with self.producer.cond:
            if self.producer.stopped:  # replaced while decoding: keep nothing of it
                return False
            self._buf[j], self._made = entry, j
            self.producer.changed()
        return True

    def get(self, j: int, images: bool, timeout_s: float) -> ray.ObjectRef:
        """The ref of batch ``j`` (pixels, or labels only); counts the fetch, drops the batch after
        its last consumer's."""
        if self.plan.worker_of(j) != self.worker:
            raise ValueError(
                f"val batch {j} is decoded by data worker {self.plan.worker_of(j)}, not {self.worker}"
            )
        worker = self.worker
        with self.producer.cond:
            try:
                ok = self.producer.wait(lambda: j in self._buf or j <= self._made, timeout_s)
            except ProducerFailed as e:
                msg = f"data worker {worker}: val pass {self.pass_id} failed: {e.__cause__!r}"
                raise RuntimeError(msg) from e.__cause__
            if not ok:
                raise TimeoutError(
                    f"data worker {worker}: val batch {j} of pass {self.pass_id} not ready after "
                    f"{timeout_s}s (buffer {sorted(self._buf)})"
                )
            if self.producer.stopped:
                raise RuntimeError(
                    f"data worker {worker}: val pass {self.pass_id} was replaced by a newer one"
                )
            if j not in self._buf:
                raise ValueError(
                    f"data worker {worker}: val batch {j} of pass {self.pass_id} was already fetched by "
                    "all its consumers (each rank of a replica reads each batch once)"
                )
            entry = self._buf[j]
            entry[2] -= 1
            if entry[2] == 0:
                del self._buf[j]
                self.producer.changed()
            return entry[0] if images else entry[1]

    def stop(self) -> None:
        self.producer.stop()
        with self.producer.cond:
            self._buf.clear()


class ValServer:
    """A data worker's val passes (see module docstring): at most one running, the counters of the
    last ``KEEP_STATS`` kept. ``url``: the shard directory; ``max_sample_bytes``: the record layer's
    member cap (``data.max_sample_bytes``)."""

    def __init__(self, url: str, max_sample_bytes: int) -> None:
        self.url, self.max_sample_bytes = url, max_sample_bytes
        self._lock = threading.Lock()
        self._index: DatasetIndex | None = None
        self._pass: _Pass | None = None
        self._stats: dict[int, tuple[str, int, ReaderStats]] = {}

    def start(
        self,
        pass_id: int,
        crop: str,
        batch_size: int,
        input_size: int,
        max_samples: int,
        worker: int,
        workers: int,
        consumers: dict[int, int],
        buffer: int = BUFFER,
    ) -> int:
        """Start pass ``pass_id`` (dropping the one running, if any); returns how many batches this
        worker decodes in it. ``consumers``: replica -> fetches of each of its batches (0..R-1)."""
        if crop not in CROPS:
            raise ValueError(f"crop={crop!r}: use 'center' or 'ten'")
        if sorted(consumers) != list(range(len(consumers))) or min(consumers.values(), default=0) < 1:
            raise ValueError(f"consumers={consumers}: need replicas 0..R-1, each with >= 1 consumer")
        if buffer < 1:
            raise ValueError(f"buffer={buffer}: must be >= 1")
        with self._lock:
            if self._index is None:
                self._index = DatasetIndex.load(self.url)
            index = self._index
            check_input_size(input_size, index.size)
            plan = ValPlan.of(index, batch_size, len(consumers), workers, max_samples)
            if self._pass is not None:
                if pass_id <= self._pass.pass_id:
                    raise ValueError(
                        f"val pass {pass_id}: pass {self._pass.pass_id} was already started here"
                    )
                self._pass.stop()
            stats = ReaderStats()
            batches = worker_batches(index, plan, worker, crop, input_size, stats, self.max_sample_bytes)
            p = _Pass(pass_id, crop, plan, worker, dict(consumers), buffer, batches)
            self._pass = p
            self._stats[pass_id] = (crop, worker, stats)  # only the counters outlive the pass
            self._stats = dict(list(self._stats.items())[-KEEP_STATS:])
            p.producer.start()
        return len(plan.worker_batches(worker))

    def get(
        self, pass_id: int, j: int, images: bool, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> list[ray.ObjectRef]:
        """``[ref]`` of batch ``j`` of pass ``pass_id`` (blocks until decoded): its pixels and
        labels, or (``images=False``) its labels only. Wrapped in a list so the caller gets the
        reference, not a copy of the batch."""
        p = self._pass
        if p is None or p.pass_id != pass_id:
            running = None if p is None else p.pass_id
            raise RuntimeError(
                f"data worker: val pass {pass_id} is not running here (running: {running}); a data "
                "worker restarted mid-validation has lost its pass"
            )
        return [p.get(j, images, timeout_s)]

    def stats(self) -> dict[int, dict[str, Any]]:
        """Per val pass run here (the last ``KEEP_STATS``): its reader counters (``samples``: images
        decoded and used; ``skipped_*``, ``records``, ``batches``, ``decode_s``), ``crop`` and
        ``worker``."""
        with self._lock:
            passes = dict(self._stats)
        # scalar counters only: the producer may be adding to ``lost`` meanwhile
        return {i: {**st.counters(), "crop": crop, "worker": w} for i, (crop, w, st) in passes.items()}


class ValClient:
    """Trainer-side reader of val passes (picklable): ``workers`` are the data workers' handles."""

    def __init__(self, workers: list, plan: ValPlan, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if len(workers) != plan.workers:
            raise ValueError(f"{len(workers)} data workers for a val plan of {plan.workers}")
        self.workers, self.plan, self.timeout_s = list(workers), plan, timeout_s

    def _request(self, pass_id: int, j: int, images: bool) -> ray.ObjectRef:
        return self.workers[self.plan.worker_of(j)].val_get.remote(pass_id, j, images, self.timeout_s)

    def batches(self, pass_id: int, replica: int, images: bool) -> Iterator[ValBatch]:
        """Replica ``replica``'s batches of the pass, in order (``images``: with their pixels, else
        labels only); the next batch's request is in flight while one is used."""
        js = self.plan.replica_batches(replica)
        ahead = self._request(pass_id, js[0], images) if js else None
        for i in range(len(js)):
            ref = self._get(ahead, js[i])[0]
            ahead = self._request(pass_id, js[i + 1], images) if i + 1 < len(js) else None
            yield self._get(ref, js[i])

    def _get(self, ref: ray.ObjectRef, j: int) -> Any:
        try:
            return ray.get(ref, timeout=self.timeout_s + 30)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"val batch {j}: not received in {self.timeout_s + 30:.0f}s") from None


def start_pass(
    workers: list,
    pass_id: int,
    crop: str,
    plan: ValPlan,
    input_size: int,
    max_samples: int,
    consumers: dict[int, int],
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ValClient:
    """Start pass ``pass_id`` on every data worker (coordinator side); the client to read it."""
    refs = [
        w.val_start.remote(
            pass_id, crop, plan.batch_size, input_size, max_samples, i, len(workers), consumers
        )
        for i, w in enumerate(workers)
    ]
    made = ray.get(refs, timeout=timeout_s)
    assert sum(made) == plan.batches, (made, plan)  # the workers planned the pass as this driver did
    return ValClient(workers, plan, timeout_s)


class ValPasses:
    """The driver's side of validation: numbers the passes (an id is unique per data worker) and
    starts each one on the data workers (``run``: the :class:`cluster.run.Run`)."""

    def __init__(self, run: Run) -> None:
        self.cfg, self.data_url, self.grid = run.cfg, run.data_url, run.grid
        self.input_size = run.model.input_size
        self.started = 0
        self._index: DatasetIndex | None = None

    def start(self, workers: list, crop: str, max_samples: int) -> tuple[ValClient, int]:
        """Start the next pass; (its client, its id). Every rank of a replica reads its batches."""
        if self._index is None:
            self._index = DatasetIndex.load(self.data_url)
        g, cfg = self.grid, self.cfg
        plan = ValPlan.of(
            self._index, cfg.eval.batch_size or cfg.global_batch, g.replicas, len(workers), max_samples
        )
        consumers = {r: g.stages * g.columns for r in range(g.replicas)}
        self.started += 1
        timeout = cfg.grid.collective_timeout_s
        args = (self.started, crop, plan, self.input_size, max_samples, consumers, timeout)
        return start_pass(workers, *args), self.started
