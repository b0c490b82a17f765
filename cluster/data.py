"""Ray data workers: decode + augment + collate on ``num_cpus=1`` actors, batches through the object store.

Pieces
    ``DataWorker`` (actor): runs one :class:`alexnet.data.reader.WorkerStream` in a producer thread,
    keeps at most ``prefetch`` batches ahead of its slowest consumer (backpressure), and serves
    ``get_batch(epoch, index, part, parts, consumer)``: rows ``[part*B/parts, (part+1)*B/parts)`` of
    batch ``index`` of ``epoch`` as a dict of numpy arrays (zero-copy through the object store).
    ``DataPositions`` (actor): the last safe restart position of each worker.
    ``DataPool`` (coordinator side): starts W workers and the registry, maps a global step to its worker,
    reports positions for checkpoints and stats for metrics. ``DataClient`` (picklable, trainer side):
    ``get(step, part, parts, consumer)``.

Consumers and release
    Each batch is fetched by ``consumers`` distinct consumers (e.g. both column ranks of stage 0 and the
    last stage, per replica), each passing its id ``consumer`` in [0, consumers) and fetching this
    worker's batches in increasing order. A batch is released once every consumer has asked for a later
    batch of this worker (not merely fetched it), so a consumer whose call was interrupted by a worker
    failure can ask for the same batch again.

Failure
    Workers are started with ``max_restarts=-1, max_task_retries=-1``: Ray restarts a killed worker and
    re-sends the calls in flight. The restarted worker reads the position before its oldest unreleased
    batch from ``DataPositions`` (updated whenever a batch is released) and resumes its stream there, so
    it produces exactly the batches of the uninterrupted stream; callers see only a delay.

Checkpoints
    ``DataPool.state(next_step)``: per worker, the JSON position before its first batch at or after the
    global step ``next_step`` (call it between steps). ``DataPool(..., positions=...)`` resumes from them.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray

from alexnet.data.index import DatasetIndex
from alexnet.data.reader import ReaderSpec, WorkerStream, steps_per_epoch, val_batches
from alexnet.data.writer import BuildSummary, build_shards, build_synthetic
from cluster.metrics import SKIP_REASONS

DEFAULT_TIMEOUT_S = 300.0


def _key(epoch: int, index: int) -> tuple[int, int]:
    return (int(epoch), int(index))


@ray.remote(num_cpus=0)
class DataPositions:
    """Registry of each data worker's last safe restart position (and how often workers restarted)."""

    def __init__(self) -> None:
        self._pos: dict[int, tuple[int, dict]] = {}
        self._restarts: dict[int, int] = {}

    def set(self, worker: int, seq: int, position: dict) -> None:
        """Record ``position`` unless a newer one (higher ``seq``) is already there."""
        if worker not in self._pos or self._pos[worker][0] < seq:
            self._pos[worker] = (seq, position)

    def get(self, worker: int) -> dict | None:
        """The last recorded position of ``worker``; counts the call as a restart when one exists."""
        if worker not in self._pos:
            return None
        self._restarts[worker] = self._restarts.get(worker, 0) + 1
        return self._pos[worker][1]

    def restarts(self) -> int:
        """Total restarts of all workers."""
        return sum(self._restarts.values())


@ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1, max_concurrency=64)
class DataWorker:
    """Data worker ``worker`` of ``spec["workers"]`` (see module docstring)."""

    def __init__(
        self,
        spec: dict,
        worker: int,
        consumers: int = 1,
        prefetch: int = 2,
        position: dict | None = None,
        registry: Any = None,
        start_epoch: int = 0,
        threads: int = 1,
        end: tuple[int, int] | None = None,
    ) -> None:
        import torch

        torch.set_num_threads(threads)  # one core per worker: decode is per-sample, not intra-op parallel
        if consumers < 1 or prefetch < 1:
            raise ValueError(f"consumers={consumers}, prefetch={prefetch}: both must be >= 1")
        self.spec = ReaderSpec.from_dict(spec)
        self.worker, self.consumers, self.capacity = worker, consumers, prefetch + 1
        self.registry = registry
        if registry is not None:
            stored = ray.get(registry.get.remote(worker))
            position = stored if stored is not None else position
        self.stream = WorkerStream(self.spec, worker, position=position, start_epoch=start_epoch)
        self.W = self.spec.workers
        self._buf: dict[tuple[int, int], dict] = {}  # (epoch, index) -> batch, in production order
        self._next_pos = self.stream.position()  # position before the next batch to produce
        # (epoch, index) of the run's end: batches from there on are never produced, so nothing past
        # the last step is decoded and its bad samples are not counted (None: no end)
        self._end = None if end is None else _key(*end)
        self._progress: list[tuple[int, int] | None] = [None] * consumers
        self._seq = 0
        self._error: BaseException | None = None
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._produce, daemon=True, name=f"data-worker-{worker}")
        self._thread.start()

    # producer -------------------------------------------------------------------------------------
    def _produce(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(
                        lambda: self._stop or (len(self._buf) < self.capacity and not self._at_end())
                    )
                    if self._stop:
                        return
                batch = self.stream.next_batch()
                with self._cond:
                    self._buf[_key(batch["epoch"], batch["index"])] = batch
                    self._next_pos = batch["next_position"]
                    self._cond.notify_all()
        except BaseException as e:  # surfaced to the callers of get_batch, never a silent hang
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _at_end(self) -> bool:
        nxt = _key(self._next_pos["epoch"], self._next_pos["index"])
        return self._end is not None and nxt >= self._end

    def _release(self) -> None:
        """Drop batches every consumer has moved past; record the new restart position."""
        if any(p is None for p in self._progress):
            return
        low = min(self._progress)
        gone = [k for k in self._buf if k < low]
        if not gone:
            return
        for k in gone:
            del self._buf[k]
        oldest = min(self._buf) if self._buf else None
        pos = self._buf[oldest]["position"] if oldest is not None else self._next_pos
        self._seq += 1
        if self.registry is not None:
            self.registry.set.remote(self.worker, self._seq, pos)
        self._cond.notify_all()

    # API --------------------------------------------------------------------------------------------
    def get_batch(
        self,
        epoch: int,
        index: int,
        part: int = 0,
        parts: int = 1,
        consumer: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        images: bool = True,
    ) -> dict:
        """Rows ``[part*B/parts, (part+1)*B/parts)`` of batch ``index`` of ``epoch`` (blocks until made)."""
        B = self.spec.batch_size
        if index % self.W != self.worker:
            raise ValueError(f"batch {index} belongs to data worker {index % self.W}, not {self.worker}")
        if not 0 <= part < parts or B % parts:
            raise ValueError(f"part={part}, parts={parts}: need 0 <= part < parts and parts dividing {B}")
        if not 0 <= consumer < self.consumers:
            raise ValueError(f"consumer={consumer}: this worker was started for {self.consumers} consumers")
        k = _key(epoch, index)
        if self._end is not None and k >= self._end:
            raise ValueError(f"data worker {self.worker}: batch {k} is past the run's end {self._end}")
        with self._cond:
            p = self._progress[consumer]
            self._progress[consumer] = k if p is None else max(p, k)
            self._release()
            ok = self._cond.wait_for(
                lambda: k in self._buf or self._error is not None or self._passed(k), timeout=timeout_s
            )
            if self._error is not None:
                raise RuntimeError(f"data worker {self.worker} failed: {self._error!r}") from self._error
            if not ok:
                raise TimeoutError(
                    f"data worker {self.worker}: batch {k} not ready after {timeout_s}s "
                    f"(buffer {sorted(self._buf)}, consumers at {self._progress})"
                )
            if k not in self._buf:
                raise ValueError(
                    f"data worker {self.worker}: batch {k} was already released (consumers past it)"
                )
            b = self._buf[k]
        r = slice(part * B // parts, (part + 1) * B // parts)
        out = {k: b[k][r] for k in ("labels", "keys")}
        out.update(epoch=b["epoch"], index=b["index"], worker=self.worker, position=b["position"])
        if images:  # label-only consumers (the last stage) need not carry the pixels
            out["images"], out["lighting"] = b["images"][r], b["lighting"][r]
        return out

    def _passed(self, k: tuple[int, int]) -> bool:
        nxt = _key(self._next_pos["epoch"], self._next_pos["index"])
        return k < nxt and (not self._buf or k < min(self._buf))

    def position_for(self, epoch: int, index: int) -> dict:
        """Position before batch ``(epoch, index)``: must be buffered or the next one to produce."""
        k = _key(epoch, index)
        with self._cond:
            if k in self._buf:
                return dict(self._buf[k]["position"])
            if _key(self._next_pos["epoch"], self._next_pos["index"]) == k:
                return dict(self._next_pos)
            raise ValueError(
                f"data worker {self.worker}: position of batch {k} unknown (buffer {sorted(self._buf)}, "
                f"next {self._next_pos}); take checkpoints between steps"
            )

    def stats(self) -> dict:
        """Reader counters plus ``queue_depth`` (batches ready) and ``worker``."""
        with self._cond:
            d = self.stream.stats.as_dict()
            d["queue_depth"] = len(self._buf)
        d["worker"] = self.worker
        return d

    def ping(self) -> int:
        """Liveness check; returns the worker id."""
        return self.worker

    def stop(self) -> None:
        """Stop producing (the actor can then be killed)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()


def locate(step: int, steps_per_epoch: int, workers: int) -> tuple[int, int, int]:
    """Global step -> (worker, epoch, index): batch ``index`` of ``epoch`` comes from worker index % W."""
    epoch, index = divmod(step, steps_per_epoch)
    return index % workers, epoch, index


class DataClient:
    """Trainer-side handle (picklable): fetch a global step's batch rows from the right worker."""

    def __init__(self, workers: list, steps_per_epoch: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.workers, self.steps_per_epoch, self.timeout_s = list(workers), steps_per_epoch, timeout_s

    def get_ref(
        self, step: int, part: int = 0, parts: int = 1, consumer: int = 0, images: bool = True
    ) -> ray.ObjectRef:
        """ObjectRef of the batch dict of ``step``, rows ``part`` of ``parts`` (``DataWorker.get_batch``);
        ``images=False`` leaves out ``images`` and ``lighting``."""
        w, epoch, index = locate(step, self.steps_per_epoch, len(self.workers))
        return self.workers[w].get_batch.remote(epoch, index, part, parts, consumer, self.timeout_s, images)

    def get(self, step: int, part: int = 0, parts: int = 1, consumer: int = 0) -> dict:
        """The batch dict (numpy arrays, read-only views into the object store)."""
        ref = self.get_ref(step, part, parts, consumer)
        try:
            return ray.get(ref, timeout=self.timeout_s + 30)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"data batch for step {step} not received in {self.timeout_s + 30}s") from None


class DataPool:
    """The job's data workers (coordinator side); see module docstring.

    spec: the reader spec (``spec.workers`` actors are started); consumers: fetches per batch;
    prefetch: batches a worker keeps ready ahead of its slowest consumer; positions: from a checkpoint's
    :meth:`state` (None: start of ``start_epoch``); options: extra ``DataWorker.options`` (e.g. a
    placement-group scheduling strategy); end_step: the run's total steps (no batch at or after that
    global step is produced; None: endless).
    """

    def __init__(
        self,
        spec: ReaderSpec,
        consumers: int = 1,
        prefetch: int = 2,
        positions: list[dict] | None = None,
        start_epoch: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        options: dict | None = None,
        end_step: int | None = None,
    ) -> None:
        index = DatasetIndex.load(spec.url)
        self.spec = spec
        # the sizes (e.g. no more workers than batches) were checked by the run's plan before Ray
        # started (cluster.plan)
        self.steps_per_epoch = steps_per_epoch(index.count(spec.split), spec.batch_size)
        if positions is not None and len(positions) != spec.workers:
            raise ValueError(
                f"{len(positions)} saved data positions for data.workers={spec.workers}: resume with the "
                "worker count the checkpoint was written with"
            )
        self.registry = DataPositions.remote()
        self.workers = [
            DataWorker.options(**(options or {})).remote(
                spec.to_dict(),
                w,
                consumers,
                prefetch,
                positions[w] if positions else None,
                self.registry,
                start_epoch,
                end=None if end_step is None else divmod(end_step, self.steps_per_epoch),
            )
            for w in range(spec.workers)
        ]
        self.timeout_s = timeout_s
        ray.get([w.ping.remote() for w in self.workers], timeout=timeout_s)  # constructor errors surface here

    def client(self) -> DataClient:
        """A picklable client for trainer actors."""
        return DataClient(self.workers, self.steps_per_epoch, self.timeout_s)

    def get(self, step: int, part: int = 0, parts: int = 1, consumer: int = 0) -> dict:
        """Convenience: ``self.client().get(...)``."""
        return self.client().get(step, part, parts, consumer)

    def state(self, next_step: int) -> list[dict]:
        """JSON positions (one per worker) from which the pool resumes at global step ``next_step``."""
        T, W = self.steps_per_epoch, self.spec.workers
        refs = []
        for w, actor in enumerate(self.workers):
            epoch, index = divmod(next_step, T)
            index += (w - index) % W  # this worker's first batch at or after next_step
            if index >= T:
                epoch, index = epoch + 1, w
            refs.append(actor.position_for.remote(epoch, index))
        return ray.get(refs, timeout=self.timeout_s)

    def stats(self) -> dict:
        """Per-worker counters summed, plus the shapes the coordinator's metrics read.

        Keys: every :class:`ReaderStats` counter (summed; ``lost`` summed per key), ``queue_depth``
        (list per worker), ``decode_images_per_second`` (sum of the workers' rates), ``skipped``
        (samples per reason in :data:`SKIP_REASONS`), ``restarts``, ``per_worker`` (list of dicts).
        """
        per = ray.get([w.stats.remote() for w in self.workers], timeout=self.timeout_s)
        total: dict[str, Any] = {
            k: sum(p[k] for p in per) for k in per[0] if k not in ("worker", "queue_depth", "epoch", "lost")
        }
        total["lost"] = dict(sum((collections.Counter(p["lost"]) for p in per), collections.Counter()))
        total["queue_depth"] = [p["queue_depth"] for p in per]
        total["decode_images_per_second"] = total.pop("decode_images_per_s")
        total["skipped"] = {reason: total[f"skipped_{reason}"] for reason in SKIP_REASONS}
        total["restarts"] = ray.get(self.registry.restarts.remote(), timeout=self.timeout_s)
        total["per_worker"] = per
        return total

    def shutdown(self) -> None:
        """Kill the workers and the registry."""
        for w in self.workers:
            ray.kill(w, no_restart=True)
        ray.kill(self.registry, no_restart=True)


@ray.remote(num_cpus=1)
def _val_stream(
    url: str, batch_size: int, input_size: int, crop: str, worker: int, workers: int
) -> Iterator[dict]:
    yield from val_batches(url, batch_size, input_size, crop, worker, workers)


def val_batches_ray(
    url: str, batch_size: int, input_size: int, crop: str = "center", workers: int = 1
) -> Iterator[dict]:
    """Validation batches decoded by ``workers`` Ray tasks (streaming): every val sample exactly once."""
    gens = [
        _val_stream.options(num_returns="streaming").remote(url, batch_size, input_size, crop, w, workers)
        for w in range(workers)
    ]
    for g in gens:
        for ref in g:
            yield ray.get(ref)


def ray_map(fn: Callable[[Any], Any], tasks: list) -> Iterable:
    """``map_fn`` for :func:`alexnet.data.writer.build_shards`: a Ray task per shard, results as they end."""
    remote = ray.remote(num_cpus=1)(fn)
    pending = [remote.remote(t) for t in tasks]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def build_shards_on_ray(src: str, out: str, **kwargs: Any) -> BuildSummary:
    """``build_shards`` (or ``build_synthetic`` when ``src`` is an int) with shard tasks on the Ray cluster.

    ``out`` (and ``src``) must be reachable from every node (shared filesystem or object storage).
    """
    if isinstance(src, int):
        return build_synthetic(src, out, map_fn=ray_map, **kwargs)
    return build_shards(src, out, map_fn=ray_map, **kwargs)
