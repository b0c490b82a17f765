"""The Ray side of a run: placement, the trainer and data actors, calls with timeouts and failure
classification. :class:`RayTrainerGroup` is the :class:`cluster.coordinator.TrainerGroup` the job uses.

It reserves one placement group for the trainers and the data workers (:mod:`cluster.placement`):
a replica's ranks in one bundle, i.e. one node, where a node can hold it, replicas spread; else a
stage's columns per bundle, packed; each data worker's CPU added to a bundle of the stage-0 ranks it
feeds, so workers sit only on nodes holding stage-0 ranks, spread round-robin over them. It starts
one :class:`cluster.rank.TrainerActor` per grid rank and the :class:`cluster.data.DataPool`
(each worker in its bundle), chooses the rendezvous (rank 0's node and a free port there), fans
calls out and reduces the per-rank results (:mod:`cluster.reduce`). A cluster too small for the
grid is a ``ValueError`` after ``grid.placement_timeout_s``, never an endless wait.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Any

import ray
import torch.distributed
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.checkpoint import merge_rank_states
from cluster.config import JobConfig
from cluster.evaluate import crop_kinds
from cluster.faults import FaultPlan, TrainerDied
from cluster.placement import DATA_WORKER, PlacementPlan, plan_placement
from cluster.plan import RunPlan
from cluster.rank import TrainerActor
from cluster.reduce import reduce_eval, reduce_step, state_ranks

# where samples that did not decode on a trainer's device are counted (the shard is not known there)
DEVICE_DECODE = "decoded on the trainers' devices"
FAILURE_GRACE_S = 3.0  # after a rank fails, how long to collect the others' errors before giving up

# A rank whose collective or point-to-point op failed because a peer died is a consequence, not a
# cause. NCCL (and torch's own store and network errors) raise torch.distributed.DistError; gloo
# raises a plain RuntimeError (torch 2.14: "[gloo/transport/tcp/pair.cc] Read error ...: Connection
# reset by peer", "[.../unbound_buffer.cc] Timed out waiting ... for recv"), so for gloo only the
# message tells. (A rank whose own fault surfaces as a DistError, e.g. an NCCL error on its GPU, is
# listed among the consequences, in rank order; a dead actor always comes first.)
_GLOO_PEER_LOST = ("Timed out", "timed out", "Connection closed", "Connection reset", "Read error")


def classify(error: ray.exceptions.RayError) -> str:
    """``"user"`` (a ValueError: a setting or the data), ``"cause"`` (an actor died, or a rank
    raised on its own) or ``"consequence"`` (a rank's collective failed because a peer did)."""
    if isinstance(error, ray.exceptions.RayActorError):
        return "cause"  # the actor's process or node is gone
    cause = getattr(error, "cause", None)  # RayTaskError: what the actor method raised
    if isinstance(cause, ValueError):
        return "user"
    if isinstance(cause, torch.distributed.DistError):
        return "consequence"
    if isinstance(cause, RuntimeError) and any(w in str(cause) for w in _GLOO_PEER_LOST):
        return "consequence"
    return "cause"


def call_ranks(refs: list, timeout_s: float | None, what: str) -> list:
    """``ray.get`` in 1 s slices (the driver's signal handlers keep running), failures -> TrainerDied.

    As soon as one rank fails, the others get ``FAILURE_GRACE_S`` to report, then the call gives up:
    peers of a dead rank may sit in a collective until its timeout, and the caller tears the group
    down anyway. Every rank's error is reported, causes first (a dead or raising rank before the
    peers whose collectives broke because of it); a ``ValueError`` is re-raised as one (restarting
    would fail the same way).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending, done_refs, give_up = list(refs), [], None
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        done_refs += done
        now = time.monotonic()
        if give_up is None and any(_failed(r) for r in done):
            give_up = now + FAILURE_GRACE_S
        if give_up is not None and now > give_up:
            break
        if deadline is not None and pending and now > deadline:
            raise TrainerDied(f"{what}: no answer from {len(pending)} rank(s) within {timeout_s:.0f}s")
    if give_up is None:
        try:
            return ray.get(refs)
        except ray.exceptions.RayError:
            pass
    raise _failure(refs, done_refs, what)


def _failure(refs: list, done_refs: list, what: str) -> Exception:
    """The error of a failed call: a ValueError of a rank, else TrainerDied listing every rank's."""
    errors = []  # (is a consequence, rank, text)
    for i, ref in enumerate(refs):
        if ref not in done_refs:
            errors.append((True, i, f"rank {i}: no answer (blocked on a failed peer)"))
            continue
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            kind = classify(e)
            if kind == "user":
                return ValueError(str(e.cause))
            errors.append((kind == "consequence", i, f"rank {i}: {type(e).__name__}: {_short(e)}"))
    errors.sort()
    return TrainerDied(f"{what}: " + "; ".join(e[2] for e in errors))


def _failed(ref) -> bool:
    try:
        ray.get(ref, timeout=0)
        return False
    except ray.exceptions.GetTimeoutError:
        return False
    except ray.exceptions.RayError:
        return True


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:300] if text else type(e).__name__


def shared_visible_devices(assignments: list[dict[str, Any]]) -> list[str]:
    """Each rank's ``CUDA_VISIBLE_DEVICES``: every GPU Ray assigned to a rank on its node, in
    numeric order (Ray Train's sharing). ``assignments``: per rank ``{"node", "gpus"}``
    (:meth:`cluster.rank.TrainerActor.gpu_assignment`)."""
    per_node: dict[str, set[str]] = collections.defaultdict(set)
    for a in assignments:
        per_node[a["node"]].update(a["gpus"])

    def order(gpu: str) -> tuple[int, str]:
        return (int(gpu), "") if gpu.isdigit() else (1 << 30, gpu)  # "10" after "9"

    return [",".join(sorted(per_node[a["node"]], key=order)) for a in assignments]


def consumer_ids(grid) -> dict[int, int]:
    """Rank -> data consumer id, for the ranks that read batches (stage 0: images, last: labels)."""
    readers = [
        grid.rank_of(r, s, c)
        for r in range(grid.replicas)
        for s in sorted({0, grid.stages - 1})
        for c in range(grid.columns)
    ]
    return {rank: i for i, rank in enumerate(readers)}


class RayTrainerGroup:
    """The trainer ranks and data workers of one run, as Ray actors in placement groups.

    ``actor_cls``: the trainer actor class (a subclass adds methods, e.g. a benchmark's baseline).
    """

    def __init__(self, cfg: JobConfig, plan: RunPlan, data_url: str, actor_cls: type = TrainerActor) -> None:
        self.cfg, self.plan, self.data_url, self.actor_cls = cfg, plan, data_url, actor_cls
        self.grid = cfg.to_grid()
        self.faults = FaultPlan(cfg.faults)
        self.actors: list = []
        self.pg = None
        self.plan_pg: PlacementPlan | None = None
        self.pool = None
        # samples that did not decode on the trainers' devices, per (epoch, where, reason), counted
        # from zero with each start as the data workers' own counters are; once per (epoch, key),
        # as the workers count theirs (a padding pass may feed a sample again)
        self.device_lost: collections.Counter = collections.Counter()
        self._device_bad: set[tuple[int, str]] = set()
        self._val_passes = 0  # val passes started (a pass id is unique per data worker)
        self._index = None

    # -- resources ------------------------------------------------------------------------
    def rank_bundle(self) -> dict[str, float]:
        """What each trainer rank needs."""
        g = self.cfg.grid
        return {"CPU": g.cpus_per_rank, **({"GPU": g.gpus_per_rank} if g.gpus_per_rank > 0 else {})}

    def worker_bundle(self) -> dict[str, float]:
        """What each data worker needs (added to the bundle of the stage-0 ranks it feeds)."""
        return dict(DATA_WORKER)

    def _reserve(self) -> None:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self.plan_pg = plan_placement(
            self.grid, self.rank_bundle(), nodes, self.plan.data_workers, self.worker_bundle()
        )
        self.pg = placement_group(self.plan_pg.bundles, strategy=self.plan_pg.strategy)
        timeout = self.cfg.grid.placement_timeout_s
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout)
        if not ready:
            self._release()
            raise self._too_small(timeout, nodes)

    def _too_small(self, waited_s: float, nodes: list[dict[str, float]]) -> ValueError:
        per_rank, bundles = self.rank_bundle(), self.plan_pg.bundles
        need = collections.Counter()
        for b in bundles:
            need.update(b)

        def cpu_gpu(res: dict) -> dict[str, float]:
            return {k: v for k, v in res.items() if k in ("CPU", "GPU")}

        def size(res: dict) -> tuple[float, float]:
            return res.get("GPU", 0.0), res.get("CPU", 0.0)

        largest = max(bundles, key=size)
        biggest_node = max((cpu_gpu(n) for n in nodes), key=size, default={})
        return ValueError(
            f"the cluster cannot hold grid.shape={self.cfg.grid.shape!r} "
            f"({self.grid.world_size} trainer ranks x {per_rank}) plus data.workers="
            f"{self.plan.data_workers} (x {self.worker_bundle()}, each on a node of the stage-0 ranks it "
            f"feeds): needs {dict(need)} in total, in {len(bundles)} bundle(s) of one node each "
            f"({self.plan_pg.level} layout, the largest {largest}); the cluster has "
            f"{cpu_gpu(ray.cluster_resources())}, its largest node {biggest_node} "
            f"(waited grid.placement_timeout_s={waited_s:g}s). Use a smaller grid.shape or "
            "grid.cpus_per_rank / grid.gpus_per_rank, fewer data.workers, or add nodes."
        )

    def data_options(self) -> list[dict[str, Any]]:
        """Each data worker's ``DataWorker.options``: its CPUs, in the bundle of the stage-0 ranks it
        feeds (:attr:`cluster.placement.PlacementPlan.bundle_of_worker`; call after reserving)."""
        cpus = self.worker_bundle()["CPU"]
        return [
            {"num_cpus": cpus, "scheduling_strategy": self._strategy(self.pg, b)}
            for b in self.plan_pg.bundle_of_worker
        ]

    def _strategy(self, pg, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)

    def _release(self) -> None:
        if self.pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self.pg)
        self.pg = None

    # -- TrainerGroup -----------------------------------------------------------------------
    def start(self, step: int, data_positions: list[dict] | None) -> None:
        """Reserve, start the trainers and the data workers (at ``data_positions``, or the start of
        ``step``'s epoch), then join the process groups."""
        self._reserve()
        self.device_lost, self._device_bad = collections.Counter(), set()
        g = self.cfg.grid
        actor_cls = ray.remote(self.actor_cls)
        self.actors = [
            actor_cls.options(
                num_cpus=g.cpus_per_rank,
                num_gpus=g.gpus_per_rank,
                scheduling_strategy=self._strategy(self.pg, self.plan_pg.bundle_of_rank[rank]),
                max_concurrency=1,
            ).remote(rank, self.cfg.to_dict(), self.plan.__dict__, self.data_url, self.faults.for_rank(rank))
            for rank in range(self.grid.world_size)
        ]
        # the trainers' processes start while the data workers do (DataPool waits for its own)
        self.pool = self._start_data(step, data_positions)
        if g.gpus_per_rank > 0:
            self._share_gpus()
        consumers = consumer_ids(self.grid)
        addr, port = call_ranks([self.actors[0].rendezvous.remote()], 120, "rendezvous")[0]
        client = self.pool.client()
        refs = [a.setup.remote(addr, port, client, consumers.get(i, -1)) for i, a in enumerate(self.actors)]
        call_ranks(refs, g.collective_timeout_s + 60, "setup")

    def _share_gpus(self) -> None:
        """Every rank sees its node's GPUs and takes the one Ray assigned it (before CUDA starts)."""
        where = call_ranks([a.gpu_assignment.remote() for a in self.actors], 120, "gpu assignment")
        visible = shared_visible_devices(where)
        refs = [a.share_visible_devices.remote(v) for a, v in zip(self.actors, visible, strict=True)]
        call_ranks(refs, 120, "gpu visibility")

    def _start_data(self, step: int, positions: list[dict] | None):
        from alexnet.data.reader import ReaderSpec
        from cluster.data import DataPool

        d = self.cfg.data
        spec = ReaderSpec(
            self.data_url,
            self.cfg.optim.batch_size,
            self.cfg.model.input_size,
            workers=d.workers,
            seed=d.seed,
            shuffle_buffer=d.shuffle_buffer,
            streams=self.plan.streams,
            encoded=self.cfg.decode_on_device(),
            rotate=self.plan.data_rotate,
            crop=d.crop,
            flip=d.flip,
            lighting=d.lighting,
        )
        return DataPool(
            spec,
            consumers=len(consumer_ids(self.grid)),
            prefetch=d.prefetch,
            positions=positions,
            start_epoch=step // self.plan.steps_per_epoch,
            end_step=self.plan.total_steps,
            timeout_s=self.cfg.grid.collective_timeout_s,
            options=self.data_options(),
        )

    def load(self, model, optimizer) -> None:
        """Every rank takes its slice of the full canonical state."""
        state = ray.put({"model": model, "optimizer": optimizer})
        call_ranks([a.load.remote(state) for a in self.actors], 600, "load")

    def submit(self, first_step: int, steps: int, lr: float) -> tuple[int, int, list]:
        """Start a chunk of steps on every rank (queued behind the one running, if any)."""
        refs = [a.train.remote(first_step, steps, lr) for a in self.actors]
        worker = self.faults.data_worker_to_kill(first_step, steps)
        if worker is not None:
            # injected: the worker's process dies abruptly while this chunk runs; Ray restarts it
            # and it resumes its stream
            ray.kill(self.pool.workers[worker], no_restart=False)
        return first_step, steps, refs

    def collect(self, handle: tuple[int, int, list]) -> list[dict[str, Any]]:
        """Wait for a submitted chunk; one reduced result per step."""
        first_step, steps, refs = handle
        try:
            per_rank = call_ranks(refs, None, f"train steps {first_step}..{first_step + steps - 1}")
        except TrainerDied:
            self.faults.trainer_failed()
            raise
        B, keys = self.cfg.optim.batch_size, self.cfg.train.record_keys
        out = [
            reduce_step(self.grid, B, first_step + i, [r[i] for r in per_rank], keys) for i in range(steps)
        ]
        for res in out:
            epoch = res["step"] // self.plan.steps_per_epoch
            new = {(epoch, k) for k in res["corrupt_decoded"]} - self._device_bad
            if new:
                self._device_bad |= new
                self.device_lost[(epoch, DEVICE_DECODE, "corrupt")] += len(new)
        return out

    def train(self, first_step: int, steps: int, lr: float) -> list[dict[str, Any]]:
        """``collect(submit(...))``: one chunk, synchronously."""
        return self.collect(self.submit(first_step, steps, lr))

    def evaluate(self, ten_crop: bool, max_samples: int) -> dict[str, float]:
        """Validation, reduced: the center-crop pass, then (``ten_crop``) the 10-crop pass. The
        data workers decode each val image once per pass (:mod:`cluster.val`); every rank of a
        replica reads that replica's batches."""
        per_rank: list[dict] = [{} for _ in self.actors]
        for crop in crop_kinds(ten_crop):
            val, pass_id = self._start_val(crop, max_samples)
            refs = [a.evaluate.remote(val, pass_id, crop) for a in self.actors]
            for mine, res in zip(per_rank, call_ranks(refs, None, f"evaluate ({crop} crop)"), strict=True):
                mine.update(res)
        return reduce_eval(self.grid, per_rank)

    def _start_val(self, crop: str, max_samples: int):
        """Start the next val pass on the data workers; (its client, its id)."""
        from alexnet.data.index import DatasetIndex
        from cluster.val import ValPlan, start_pass

        if self._index is None:
            self._index = DatasetIndex.load(self.data_url)
        g, bs = self.grid, self.cfg.eval.batch_size or self.cfg.optim.batch_size
        plan = ValPlan.of(self._index, bs, g.replicas, len(self.pool.workers), max_samples)
        consumers = {r: g.stages * g.columns for r in range(g.replicas)}  # every rank of a replica
        self._val_passes += 1
        timeout = self.cfg.grid.collective_timeout_s
        args = (self._val_passes, crop, plan, self.cfg.model.input_size, max_samples, consumers, timeout)
        return start_pass(self.pool.workers, *args), self._val_passes

    def snapshot(self, step: int) -> tuple[dict, dict, list[dict]]:
        """Full model and optimizer state (host memory) and the data positions resuming at ``step``."""
        actors = [self.actors[i] for i in state_ranks(self.grid)]
        states = call_ranks([a.state_dict.remote() for a in actors], 600, "state_dict")
        model, optimizer = merge_rank_states(states)
        return model, optimizer, self.pool.state(step)

    def data_stats(self) -> dict[str, Any]:
        """The data pool's counters (empty when unavailable: metrics are best effort)."""
        try:
            stats = self.pool.stats() if self.pool is not None else {}
        except (ray.exceptions.RayError, TimeoutError):
            return {}  # a dead worker is handled by its restart
        if stats and self.device_lost:  # the device decoder's losses count as the workers' do
            stats["skipped"]["corrupt"] += sum(self.device_lost.values())
            stats["lost"] = {**stats["lost"], **self.device_lost}
        return stats

    def trace(self, steps: int) -> dict[str, Any] | None:
        """Chrome trace of every rank's last ``steps`` steps."""
        from pipeline.timeline import chrome_trace

        if steps <= 0 or not self.actors:
            return None
        events = call_ranks([a.trace_events.remote(steps) for a in self.actors], 60, "trace")
        return chrome_trace(dict(enumerate(events)))

    def shutdown(self) -> None:
        """Stop every actor and release the placement groups (idempotent)."""
        for a in self.actors:
            with contextlib.suppress(Exception):  # already dead: nothing to release
                ray.kill(a, no_restart=True)
        if self.pool is not None:
            with contextlib.suppress(Exception):
                self.pool.shutdown()
        self.actors, self.pool = [], None
        self._release()
