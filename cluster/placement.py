"""Where the trainer ranks and data workers go: the placement-group layout for a grid (a pure
function, :func:`plan_placement`) and its :class:`Reservation` on the Ray cluster.

Wanted: the columns of one stage on one node (they all-gather at every exchange point), a whole
replica on one node where it fits (its stages pass activations point to point), and replicas
spread over nodes (they only all-reduce gradients once per step). Ray's placement
groups have no affinity between bundles of one group beyond PACK/SPREAD, but a bundle always lands
on a single node, so the layout is expressed by what one bundle holds:

* ``replica``: one bundle per replica (all its ranks), ``SPREAD`` across nodes;
* ``stage``: one bundle per (replica, stage) (its columns), ``PACK`` so a replica's stages stay close;
* ``rank``: one bundle per rank, ``PACK`` (a stage does not fit one node: its columns are split).

Data workers go into the same group: each worker's resources are added to a bundle holding stage-0
ranks (the readers of the images, every batch's largest fetch), the workers dealt round-robin over
those bundles, replicas first. So a worker always shares a node with stage-0 ranks, never sits on a
node holding only later stages or no trainer at all, and trainers and workers are reserved at once.

The first level whose every bundle (with its data workers) fits on some alive node is taken. An actor
is then scheduled into its bundle with its own (smaller) resource request, so several ranks and
workers share one bundle.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.grid import Grid

DATA_WORKER: dict[str, float] = {"CPU": 1.0}  # what one data worker needs (cluster.data.DataWorker)


@dataclass(frozen=True)
class PlacementPlan:
    """Bundles of one placement group, its strategy, and the bundle index of each rank and data worker."""

    level: str  # "replica", "stage" or "rank"
    strategy: str
    bundles: list[dict[str, float]]
    bundle_of_rank: list[int]
    bundle_of_worker: list[int] = field(default_factory=list)  # each one holds stage-0 ranks


def _fits(need: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> bool:
    return any(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in nodes)


def feeding_bundles(grid: Grid, bundle_of_rank: Sequence[int]) -> list[int]:
    """The bundles holding stage-0 ranks, each once, in the order data workers are dealt to them:
    column 0 of every replica, then column 1, ... (replicas first: they are the likeliest to sit on
    different nodes, so consecutive workers spread over nodes)."""
    out: list[int] = []
    for c in range(grid.columns):
        for r in range(grid.replicas):
            b = bundle_of_rank[grid.rank_of(r, 0, c)]
            if b not in out:
                out.append(b)
    return out


def _layout(
    grid: Grid,
    level: str,
    per_rank: Mapping[str, float],
    data_workers: int,
    per_worker: Mapping[str, float],
) -> PlacementPlan:
    s, c, ranks = grid.stages, grid.columns, range(grid.world_size)
    ranks_per_bundle = {"replica": s * c, "stage": c, "rank": 1}[level]
    of_rank = [r // ranks_per_bundle for r in ranks]
    feeders = feeding_bundles(grid, of_rank)
    of_worker = [feeders[w % len(feeders)] for w in range(data_workers)]
    need = [collections.Counter() for _ in range(grid.world_size // ranks_per_bundle)]
    for b in of_rank:
        need[b].update(per_rank)
    for b in of_worker:
        need[b].update(per_worker)
    bundles = [{k: float(v) for k, v in b.items() if v > 0} for b in need]
    strategy = "SPREAD" if level == "replica" else "PACK"
    return PlacementPlan(level, strategy, bundles, of_rank, of_worker)


def plan_placement(
    grid: Grid,
    per_rank: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]],
    data_workers: int = 0,
    per_worker: Mapping[str, float] = DATA_WORKER,
) -> PlacementPlan:
    """Choose the layout for ``grid`` given each rank's resources, ``data_workers`` workers of
    ``per_worker`` each (added to the bundles of the stage-0 ranks) and the alive nodes' totals.

    A level is taken when every one of its bundles fits on some node. ``nodes`` empty (e.g. an
    autoscaling cluster with no workers yet) picks the ``stage`` level: its bundles are the smallest
    that keep a stage's columns together.
    """
    if data_workers < 0:
        raise ValueError(f"data_workers={data_workers}: use >= 0")

    def plan(level: str) -> PlacementPlan:
        return _layout(grid, level, per_rank, data_workers, per_worker)

    replica = plan("replica")
    if nodes and all(_fits(b, nodes) for b in replica.bundles):
        return replica
    stage = plan("stage")
    if not nodes or all(_fits(b, nodes) for b in stage.bundles):
        return stage
    return plan("rank")


# -- the reservation on a Ray cluster -------------------------------------------------------------


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


class Reservation:
    """The run's one placement group on the Ray cluster (:func:`plan_placement`'s layout): reserved,
    or a ``ValueError`` naming what the grid needs and what the cluster has after
    ``grid.placement_timeout_s``, never an endless wait."""

    def __init__(self, grid: Grid, section: Any, data_workers: int) -> None:
        self.grid, self.section, self.data_workers = grid, section, data_workers
        self.pg: Any = None
        self.plan: PlacementPlan | None = None

    def rank_bundle(self) -> dict[str, float]:
        """What each trainer rank needs (``section``: the config's ``[grid]``)."""
        g = self.section
        return {"CPU": g.cpus_per_rank, **({"GPU": g.gpus_per_rank} if g.gpus_per_rank > 0 else {})}

    def reserve(self) -> None:
        """Reserve the placement group for the alive nodes (blocks until it is ready)."""
        import ray
        from ray.util.placement_group import placement_group

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self.plan = plan_placement(self.grid, self.rank_bundle(), nodes, self.data_workers, dict(DATA_WORKER))
        self.pg = placement_group(self.plan.bundles, strategy=self.plan.strategy)
        timeout = self.section.placement_timeout_s
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout)
        if not ready:
            self.release()
            raise self._too_small(timeout, nodes, ray.cluster_resources())

    def rank_strategy(self, rank: int) -> Any:
        """The scheduling strategy that puts trainer rank ``rank`` into its bundle."""
        return self._strategy(self.plan.bundle_of_rank[rank])

    def worker_options(self) -> list[dict[str, Any]]:
        """Each data worker's ``DataWorker.options``: its CPUs, in the bundle of the stage-0 ranks it
        feeds (:attr:`PlacementPlan.bundle_of_worker`)."""
        return [
            {"num_cpus": DATA_WORKER["CPU"], "scheduling_strategy": self._strategy(b)}
            for b in self.plan.bundle_of_worker
        ]

    def _strategy(self, bundle: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle)

    def release(self) -> None:
        """Remove the placement group (idempotent)."""
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(self.pg)
        self.pg = None

    def _too_small(self, waited_s: float, nodes: list[dict[str, float]], total: dict) -> ValueError:
        per_rank, bundles = self.rank_bundle(), self.plan.bundles
        need: collections.Counter = collections.Counter()
        for b in bundles:
            need.update(b)

        def cpu_gpu(res: dict) -> dict[str, float]:
            return {k: v for k, v in res.items() if k in ("CPU", "GPU")}

        def size(res: dict) -> tuple[float, float]:
            return res.get("GPU", 0.0), res.get("CPU", 0.0)

        largest = max(bundles, key=size)
        biggest_node = max((cpu_gpu(n) for n in nodes), key=size, default={})
        return ValueError(
            f"the cluster cannot hold grid.shape={self.section.shape!r} "
            f"({self.grid.world_size} trainer ranks x {per_rank}) plus data.workers="
            f"{self.data_workers} (x {dict(DATA_WORKER)}, each on a node of the stage-0 ranks it "
            f"feeds): needs {dict(need)} in total, in {len(bundles)} bundle(s) of one node each "
            f"({self.plan.level} layout, the largest {largest}); the cluster has "
            f"{cpu_gpu(total)}, its largest node {biggest_node} "
            f"(waited grid.placement_timeout_s={waited_s:g}s). Use a smaller grid.shape or "
            "grid.cpus_per_rank / grid.gpus_per_rank, fewer data.workers, or add nodes."
        )
