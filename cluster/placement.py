"""Where the trainer ranks and data workers go: the placement-group layout for a grid, as a pure function.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
