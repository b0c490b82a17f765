"""Ray data workers: read + augment (+ decode) + collate on ``num_cpus=1`` actors, one object per batch.

Pieces
    ``DataWorker`` (actor): hosts the virtual streams ``v`` with ``v % W == worker`` (one
    :class:`alexnet.data.reader.Stream` each; batch ``t`` of an epoch is stream ``t % V``'s, see
    :mod:`alexnet.data.reader`) in a producer thread that makes their batches in step order, keeps at
    most ``prefetch`` batches ahead of its slowest consumer (backpressure) and puts each batch into
    the object store ONCE (``ray.put``; plus a small labels-only object for consumers that need no
    pixels). ``get_batch(epoch, index, consumer, images)`` answers ``[ref]``: every consumer of a
    batch reads the same object (zero-copy numpy where it is on the same node) and takes its rows
    itself (:meth:`alexnet.data.batch.Batch.part`). ``DataPositions`` (actor): the last safe
    restart position of each stream.
    ``DataPool`` (coordinator side): starts W workers and the registry, reports positions for
    checkpoints and stats for metrics. ``DataClient`` (picklable, trainer side): ``request`` and
    ``resolve`` a global step's batch.

Consumers and release
    Each batch is fetched by ``consumers`` distinct consumers (e.g. both column ranks of stage 0 and the
    last stage, per replica), each passing its id ``consumer`` in [0, consumers) and fetching this
    worker's batches in increasing order. A batch is released once every consumer has asked for a later
    batch of this worker (not merely fetched it), so a consumer whose fetch was interrupted by a worker
    failure can ask for the same batch again. Consumers ask for the next batch only once they hold the
    current one's data (:class:`cluster.feed.Feed`), since the object is owned by the worker.

Failure
    Workers are started with ``max_restarts=-1, max_task_retries=-1``: Ray restarts a killed worker and
    re-sends the calls in flight. The restarted worker reads, for each of its streams, the position
    before its oldest unreleased batch from ``DataPositions`` (updated whenever a batch is released) and
    resumes there, so it produces exactly the batches of the uninterrupted streams. A consumer that
    had the ref of a batch whose worker died before the data arrived (the object died with its owner)
    asks again (:meth:`DataClient.resolve`); callers see only a delay.

Checkpoints
    ``DataPool.state(next_step)``: per stream, the JSON position before its first batch at or after the
    global step ``next_step`` (call it between steps). ``DataPool(..., positions=...)`` resumes from
    them, with any worker count (the streams, not the workers, define the batches).
"""

from __future__ import annotations

import collections
from typing import Any

import ray

from alexnet.data.batch import Batch
from alexnet.data.index import DatasetIndex
from alexnet.data.reader import ReaderSpec, Stream, steps_per_epoch
from alexnet.data.records import summed
from cluster.metrics import SKIP_REASONS
from cluster.producer import Producer
from cluster.run import Run
from cluster.val import ValServer

DEFAULT_TIMEOUT_S = 300.0
# how often a consumer asks again for a batch whose object died with its worker
OWNER_DIED_RETRIES = 5
# start positions a worker remembers of batches it made, released ones included: the trainers' feeds
# run a few steps ahead of the coordinator, whose checkpoint asks for the positions at its own step
POSITION_HISTORY = 64


def _key(epoch: int, index: int) -> tuple[int, int]:
    return (int(epoch), int(index))


def hosted_streams(worker: int, workers: int, streams: int) -> list[int]:
    """The streams data worker ``worker`` of ``workers`` hosts: ``v % workers == worker``."""
    return list(range(worker, streams, workers))


@ray.remote(num_cpus=0)
class DataPositions:
    """Registry of each data worker's last safe restart positions (and how often workers restarted)."""

    def __init__(self) -> None:
        self._pos: dict[int, tuple[int, dict[int, dict]]] = {}
        self._restarts: dict[int, int] = {}

    def set(self, worker: int, seq: int, positions: dict[int, dict]) -> None:
        """Record ``positions`` (per hosted stream) unless newer ones (higher ``seq``) are there."""
        if worker not in self._pos or self._pos[worker][0] < seq:
            self._pos[worker] = (seq, positions)

    def get(self, worker: int) -> dict[int, dict] | None:
        """The last recorded positions of ``worker``; counts the call as a restart when they exist."""
        if worker not in self._pos:
            return None
        self._restarts[worker] = self._restarts.get(worker, 0) + 1
        return self._pos[worker][1]

    def restarts(self) -> int:
        """Total restarts of all workers."""
        return sum(self._restarts.values())


@ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1, max_concurrency=64)
class DataWorker:
    """Data worker ``worker`` of ``spec["workers"]`` (see module docstring); it also decodes the
    val passes (a :class:`cluster.val.ValServer`).

    positions: per hosted stream, where it resumes (``{stream: position}``; None: the start of
    ``start_epoch``); end: (epoch, index) of the run's end.
    """

    def __init__(
        self,
        spec: dict,
        worker: int,
        consumers: int = 1,
        prefetch: int = 2,
        positions: dict[int, dict] | None = None,
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
        self.W, self.V = self.spec.workers, self.spec.streams
        self.registry = registry
        if registry is not None:
            stored = ray.get(registry.get.remote(worker))
            positions = stored if stored is not None else positions
        positions = positions or {}
        index = DatasetIndex.load(self.spec.url)
        self.streams = {
            v: Stream(self.spec, v, position=positions.get(v), index=index, start_epoch=start_epoch)
            for v in hosted_streams(worker, self.W, self.V)
        }
        # (epoch, index) -> {"ref", "labels_ref", "position", "stream"}, in production order
        self._buf: dict[tuple[int, int], dict] = {}
        self._history: collections.OrderedDict = collections.OrderedDict()  # key -> start position
        self._next_pos = {v: st.position() for v, st in self.streams.items()}  # before each next batch
        # (epoch, index) of the run's end: batches from there on are never produced, so nothing past
        # the last step is decoded and its bad samples are not counted (None: no end)
        self._end = None if end is None else _key(*end)
        self._progress: list[tuple[int, int] | None] = [None] * consumers
        self._seq = 0
        self.val = ValServer(self.spec.url, self.spec.max_sample_bytes)
        room = lambda: len(self._buf) < self.capacity and not self._at_end()  # noqa: E731
        self.producer = Producer(f"data worker {worker}", self._make, room)
        self._cond = self.producer.cond
        self.producer.start()

    # producer -------------------------------------------------------------------------------------
    def _next_stream(self) -> int:
        """The hosted stream whose next batch comes first in step order."""
        return min(self.streams, key=lambda v: _key(self._next_pos[v]["epoch"], self._next_pos[v]["index"]))

    def _make(self) -> bool:
        """Make the next batch in step order and put it into the object store once."""
        with self._cond:
            v = self._next_stream()
        batch = self.streams[v].next_batch()
        entry = {
            "position": batch.position,
            "stream": v,
            "labels_ref": ray.put(batch.labels_only()),
            "ref": ray.put(batch),  # the one copy every consumer reads
        }
        nxt = batch.next_position
        with self._cond:
            k = _key(batch.epoch, batch.index)
            self._buf[k] = entry
            self._history[k] = entry["position"]
            while len(self._history) > POSITION_HISTORY + self.capacity:
                self._history.popitem(last=False)
            self._next_pos[v] = nxt
            self.producer.changed()
        return True

    def _first_next(self) -> tuple[int, int]:
        p = self._next_pos[self._next_stream()]
        return _key(p["epoch"], p["index"])

    def _at_end(self) -> bool:
        return self._end is not None and self._first_next() >= self._end

    def _restart_positions(self) -> dict[int, dict]:
        """Per hosted stream, the position before its oldest unreleased batch (else its next one)."""
        out = dict(self._next_pos)
        for k in sorted(self._buf, reverse=True):  # the oldest buffered batch of a stream wins
            out[self._buf[k]["stream"]] = self._buf[k]["position"]
        return out

    def _release(self) -> None:
        """Drop batches every consumer has moved past; record the new restart positions."""
        if any(p is None for p in self._progress):
            return
        low = min(self._progress)
        gone = [k for k in self._buf if k < low]
        if not gone:
            return
        for k in gone:
            del self._buf[k]  # the worker's refs go; consumers still holding theirs keep the object
        self._seq += 1
        if self.registry is not None:
            self.registry.set.remote(self.worker, self._seq, self._restart_positions())
        self._cond.notify_all()

    # API --------------------------------------------------------------------------------------------
    def get_batch(
        self,
        epoch: int,
        index: int,
        consumer: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        images: bool = True,
    ) -> list:
        """``[ref]`` of batch ``index`` of ``epoch`` (blocks until made): the whole
        :class:`~alexnet.data.batch.Batch`, or with ``images=False`` its labels only (label-only
        consumers need no pixels). The ref is inside a list so that Ray hands it over rather than
        the object."""
        v = index % self.V
        if v % self.W != self.worker:
            raise ValueError(
                f"batch {index} (stream {v}) belongs to data worker {v % self.W}, not {self.worker}"
            )
        if not 0 <= consumer < self.consumers:
            raise ValueError(f"consumer={consumer}: this worker was started for {self.consumers} consumers")
        k = _key(epoch, index)
        if self._end is not None and k >= self._end:
            raise ValueError(f"data worker {self.worker}: batch {k} is past the run's end {self._end}")
        with self._cond:
            p = self._progress[consumer]
            self._progress[consumer] = k if p is None else max(p, k)
            self._release()
            ok = self.producer.wait(lambda: k in self._buf or self._passed(k), timeout_s)
            if not ok:
                raise TimeoutError(
                    f"data worker {self.worker}: batch {k} not ready after {timeout_s}s "
                    f"(buffer {sorted(self._buf)}, consumers at {self._progress})"
                )
            if k not in self._buf:
                raise ValueError(
                    f"data worker {self.worker}: batch {k} was already released (consumers past it)"
                )
            e = self._buf[k]
        return [e["ref"] if images else e["labels_ref"]]

    def _passed(self, k: tuple[int, int]) -> bool:
        p = self._next_pos[k[1] % self.V]
        return k < _key(p["epoch"], p["index"]) and k not in self._buf

    def position_for(self, epoch: int, index: int) -> dict:
        """Position before batch ``(epoch, index)``: one of the last batches made (released or not)
        or its stream's next one."""
        k = _key(epoch, index)
        with self._cond:
            if k in self._history:
                return dict(self._history[k])
            p = self._next_pos[index % self.V]
            if _key(p["epoch"], p["index"]) == k:
                return dict(p)
            raise ValueError(
                f"data worker {self.worker}: position of batch {k} unknown (last made "
                f"{list(self._history)[-3:]}, next {p}); take checkpoints between steps"
            )

    def stats(self) -> dict:
        """Reader counters of the hosted streams (summed) plus ``queue_depth`` and ``worker``."""
        with self._cond:
            per = [st.stats.as_dict() for st in self.streams.values()]
            depth = len(self._buf)
        d = summed(per)
        d["decode_images_per_s"] = d["samples"] / d["decode_s"] if d["decode_s"] > 0 else 0.0
        d["queue_depth"] = depth
        d["worker"] = self.worker
        return d

    def ping(self) -> int:
        """Liveness check; returns the worker id."""
        return self.worker

    def stop(self) -> None:
        """Stop producing (the actor can then be killed)."""
        self.producer.stop()

    # validation (cluster.val) ---------------------------------------------------------------------
    def val_start(self, *args: Any, **kwargs: Any) -> int:
        """:meth:`cluster.val.ValServer.start`."""
        return self.val.start(*args, **kwargs)

    def val_get(self, *args: Any, **kwargs: Any) -> list:
        """:meth:`cluster.val.ValServer.get`."""
        return self.val.get(*args, **kwargs)

    def val_stats(self) -> dict[int, dict[str, Any]]:
        """:meth:`cluster.val.ValServer.stats`."""
        return self.val.stats()


def locate(step: int, steps_per_epoch: int, workers: int, streams: int) -> tuple[int, int, int]:
    """Global step -> (worker, epoch, index): batch ``index`` of ``epoch`` is stream ``index % V``'s,
    hosted by worker ``(index % V) % W``."""
    epoch, index = divmod(step, steps_per_epoch)
    return (index % streams) % workers, epoch, index


def _owner_died(e: BaseException) -> bool:
    """An object lost with the worker that put it (the consumer asks the restarted worker again)."""
    return isinstance(e, ray.exceptions.ObjectLostError)  # OwnerDiedError is one


class DataClient:
    """Trainer-side handle (picklable): request and fetch a global step's batch from its worker."""

    def __init__(
        self, workers: list, steps_per_epoch: int, streams: int, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.workers, self.steps_per_epoch, self.timeout_s = list(workers), steps_per_epoch, timeout_s
        self.streams = streams

    def request(self, step: int, consumer: int = 0, images: bool = True) -> ray.ObjectRef:
        """Ask for ``step``'s batch: a ref to ``[ref]`` (:meth:`DataWorker.get_batch`); moves this
        consumer's progress, so ask for step t+1 only once step t's data is held."""
        w, epoch, index = locate(step, self.steps_per_epoch, len(self.workers), self.streams)
        return self.workers[w].get_batch.remote(epoch, index, consumer, self.timeout_s, images)

    def resolve(self, request: ray.ObjectRef, step: int, consumer: int = 0, images: bool = True) -> Batch:
        """The batch of a :meth:`request` (numpy, read-only views into the object store); asks
        again when the object died with its worker before it arrived."""
        wait = self.timeout_s + 30
        for attempt in range(OWNER_DIED_RETRIES + 1):
            try:
                inner = ray.get(request, timeout=wait)[0]
                return ray.get(inner, timeout=wait)
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(f"data batch for step {step} not received in {wait:.0f}s") from None
            except ray.exceptions.RayError as e:
                if not _owner_died(e) or attempt == OWNER_DIED_RETRIES:
                    raise
                request = self.request(step, consumer, images)
        raise AssertionError("unreachable")


class DataPool:
    """The job's data workers (coordinator side); see module docstring.

    spec: the reader spec (``spec.workers`` actors host ``spec.streams`` streams); consumers: fetches
    per batch; prefetch: batches a worker keeps ready ahead of its slowest consumer; positions: from
    a checkpoint's :meth:`state`, one per stream (None: start of ``start_epoch``); options: extra
    ``DataWorker.options`` (one dict for all, or one per worker, e.g. placement-group scheduling
    strategies); end_step: the run's total steps (no batch at or after that global step is
    produced; None: endless).
    """

    def __init__(
        self,
        spec: ReaderSpec,
        consumers: int = 1,
        prefetch: int = 2,
        positions: list[dict] | None = None,
        start_epoch: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        options: dict | list[dict] | None = None,
        end_step: int | None = None,
    ) -> None:
        index = DatasetIndex.load(spec.url)
        self.spec = spec
        # the sizes (e.g. no more workers than streams) were checked by the run's plan before Ray
        # started (cluster.plan)
        self.steps_per_epoch = steps_per_epoch(index.count(spec.split), spec.batch_size)
        by_stream: dict[int, dict] = {}
        if positions is not None:
            if len(positions) != spec.streams or any(p["streams"] != spec.streams for p in positions):
                raise ValueError(
                    f"{len(positions)} saved data positions for data.streams={spec.streams}: resume with "
                    "the data.streams the checkpoint was written with"
                )
            by_stream = {int(p["stream"]): p for p in positions}
        W = spec.workers
        per = options if isinstance(options, list) else [options or {}] * W
        if len(per) != W:
            raise ValueError(f"{len(per)} option dicts for {W} data workers")
        self.registry = DataPositions.remote()
        self.workers = [
            DataWorker.options(**per[w]).remote(
                spec.to_dict(),
                w,
                consumers,
                prefetch,
                {v: by_stream[v] for v in hosted_streams(w, W, spec.streams)} if by_stream else None,
                self.registry,
                start_epoch,
                end=None if end_step is None else divmod(end_step, self.steps_per_epoch),
            )
            for w in range(W)
        ]
        self.timeout_s = timeout_s
        ray.get([w.ping.remote() for w in self.workers], timeout=timeout_s)  # constructor errors surface here

    def client(self) -> DataClient:
        """A picklable client for trainer actors."""
        return DataClient(self.workers, self.steps_per_epoch, self.spec.streams, self.timeout_s)

    def state(self, next_step: int) -> list[dict]:
        """JSON positions (one per stream) from which the pool resumes at global step ``next_step``."""
        T, V, W = self.steps_per_epoch, self.spec.streams, self.spec.workers
        refs = []
        for v in range(V):
            epoch, index = divmod(next_step, T)
            index += (v - index) % V  # this stream's first batch at or after next_step
            if index >= T:
                epoch, index = epoch + 1, v
            refs.append(self.workers[v % W].position_for.remote(epoch, index))
        return ray.get(refs, timeout=self.timeout_s)

    def stats(self) -> dict:
        """Per-worker counters summed, plus the shapes the coordinator's metrics read.

        Keys: every :class:`ReaderStats` counter (summed; ``lost`` summed per key), ``queue_depth``
        (list per worker), ``decode_images_per_second`` (sum of the workers' rates), ``skipped``
        (samples per reason in :data:`SKIP_REASONS`), ``restarts``, ``per_worker`` (list of dicts).
        """
        per = ray.get([w.stats.remote() for w in self.workers], timeout=self.timeout_s)
        total = summed(per)
        total["queue_depth"] = [p["queue_depth"] for p in per]
        total["decode_images_per_second"] = sum(p["decode_images_per_s"] for p in per)
        total["skipped"] = {reason: total[f"skipped_{reason}"] for reason in SKIP_REASONS}
        total["restarts"] = ray.get(self.registry.restarts.remote(), timeout=self.timeout_s)
        total["per_worker"] = per
        return total

    def shutdown(self) -> None:
        """Kill the workers and the registry."""
        for w in self.workers:
            ray.kill(w, no_restart=True)
        ray.kill(self.registry, no_restart=True)


def consumer_ids(grid: Any) -> dict[int, int]:
    """Rank -> data consumer id, for the ranks that read batches (stage 0: images, last: labels)."""
    readers = [
        grid.rank_of(r, s, c)
        for r in range(grid.replicas)
        for s in sorted({0, grid.stages - 1})
        for c in range(grid.columns)
    ]
    return {rank: i for i, rank in enumerate(readers)}


def start_pool(
    run: Run, step: int, positions: list[dict] | None, options: list[dict] | None = None
) -> DataPool:
    """The data workers of ``run`` (a :class:`cluster.run.Run`), at ``positions`` (a checkpoint's)
    or the start of ``step``'s epoch; ``options``: each worker's ``DataWorker.options`` (its
    placement)."""
    cfg, plan, d = run.cfg, run.plan, run.cfg.data
    spec = ReaderSpec(
        run.data_url,
        cfg.global_batch,
        run.model.input_size,
        workers=d.workers,
        seed=cfg.data_seed,
        shuffle_buffer=d.shuffle_buffer,
        streams=plan.streams,
        encoded=run.decode_on_device,
        crop=d.crop,
        flip=d.flip,
        lighting=d.lighting,
        max_sample_bytes=d.max_sample_bytes,
    )
    return DataPool(
        spec,
        consumers=len(consumer_ids(run.grid)),
        prefetch=d.prefetch,
        positions=positions,
        start_epoch=step // plan.steps_per_epoch,
        end_step=plan.total_steps,
        timeout_s=cfg.grid.collective_timeout_s,
        options=options,
    )
