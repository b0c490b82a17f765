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

import contextlib
import time
from typing import Any

import ray

from cluster.checkpoint import merge_rank_states
from cluster.data import consumer_ids, start_pool
from cluster.evaluate import crop_kinds
from cluster.faults import FaultPlan, TrainerDied, failure
from cluster.feed import DeviceDecodeLosses
from cluster.placement import Reservation, shared_visible_devices
from cluster.rank import TrainerActor
from cluster.reduce import reduce_eval, reduce_step, state_ranks
from cluster.run import Run
from cluster.val import ValPasses

FAILURE_GRACE_S = 3.0  # after a rank fails, how long to collect the others' errors before giving up


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
    raise failure(refs, done_refs, what)


def _failed(ref) -> bool:
    try:
        ray.get(ref, timeout=0)
        return False
    except ray.exceptions.GetTimeoutError:
        return False
    except ray.exceptions.RayError:
        return True


class RayTrainerGroup:
    """The trainer ranks and data workers of one run, as Ray actors in placement groups.

    ``actor_cls``: the trainer actor class (a subclass adds methods, e.g. a benchmark's baseline).
    """

    def __init__(self, run: Run, actor_cls: type = TrainerActor) -> None:
        self.run, self.actor_cls = run, actor_cls
        self.cfg, self.plan, self.grid = run.cfg, run.plan, run.grid
        self.faults = FaultPlan(run.cfg.faults)
        self.actors: list = []
        self.reservation = Reservation(self.grid, run.cfg.grid, run.plan.data_workers)
        self.pool = None
        self.device_lost = DeviceDecodeLosses(run.plan.steps_per_epoch)
        self.val = ValPasses(run)

    # -- TrainerGroup -----------------------------------------------------------------------
    def start(self, step: int, data_positions: list[dict] | None) -> None:
        """Reserve, start the trainers and the data workers (at ``data_positions``, or the start of
        ``step``'s epoch), then join the process groups."""
        self.reservation.reserve()
        self.device_lost = DeviceDecodeLosses(self.plan.steps_per_epoch)  # from zero, as the workers'
        g = self.cfg.grid
        actor_cls = ray.remote(self.actor_cls)
        self.actors = [
            actor_cls.options(
                num_cpus=g.cpus_per_rank,
                num_gpus=g.gpus_per_rank,
                scheduling_strategy=self.reservation.rank_strategy(rank),
                max_concurrency=1,
            ).remote(rank, self.run, self.faults.for_rank(rank))
            for rank in range(self.grid.world_size)
        ]
        # the trainers' processes start while the data workers do (DataPool waits for its own)
        options = self.reservation.worker_options()
        self.pool = start_pool(self.run, step, data_positions, options)
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
        B = self.cfg.global_batch
        out = [reduce_step(self.grid, B, first_step + i, [r[i] for r in per_rank]) for i in range(steps)]
        self.device_lost.add(out)
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
            val, pass_id = self.val.start(self.pool.workers, crop, max_samples)
            refs = [a.evaluate.remote(val, pass_id, crop) for a in self.actors]
            for mine, res in zip(per_rank, call_ranks(refs, None, f"evaluate ({crop} crop)"), strict=True):
                mine.update(res)
        return reduce_eval(self.grid, per_rank)

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
        return self.device_lost.merged(stats)

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
        self.reservation.release()
