"""Where the trainer ranks go: the placement-group layout for a grid, as a pure function.

Wanted: the columns of one stage on one node (they all-gather at every exchange point), a whole
replica on one node where it fits (its stages pass activations point to point), and replicas
spread over nodes (they only all-reduce gradients once per step). Ray's placement
groups have no affinity between bundles of one group beyond PACK/SPREAD, but a bundle always lands
on a single node, so the layout is expressed by what one bundle holds:

* ``replica``: one bundle per replica (all its ranks), ``SPREAD`` across nodes;
* ``stage``: one bundle per (replica, stage) (its columns), ``PACK`` so a replica's stages stay close;
* ``rank``: one bundle per rank, ``PACK`` (a stage does not fit one node: its columns are split).

The first level whose bundle fits on some alive node is taken. An actor is then scheduled into its
bundle with its own (smaller) resource request, so several ranks share one bundle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.grid import Grid


@dataclass(frozen=True)
class PlacementPlan:
    """Bundles of one placement group, its strategy, and the bundle index of each rank."""

    level: str  # "replica", "stage" or "rank"
    strategy: str
    bundles: list[dict[str, float]]
    bundle_of_rank: list[int]


def _scaled(per_rank: Mapping[str, float], n: int) -> dict[str, float]:
    return {k: v * n for k, v in per_rank.items() if v > 0}


def _fits(need: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> bool:
    return any(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in nodes)


def plan_placement(
    grid: Grid, per_rank: Mapping[str, float], nodes: Sequence[Mapping[str, float]]
) -> PlacementPlan:
    """Choose the layout for ``grid`` given each rank's resources and the alive nodes' totals.

    ``nodes`` empty (e.g. an autoscaling cluster with no workers yet) picks the ``stage`` level:
    its bundles are the smallest that keep a stage's columns together.
    """
    s, c, world = grid.stages, grid.columns, grid.world_size
    ranks = range(world)
    if nodes and _fits(_scaled(per_rank, s * c), nodes):
        return PlacementPlan(
            "replica",
            "SPREAD",
            [_scaled(per_rank, s * c) for _ in range(grid.replicas)],
            [r // (s * c) for r in ranks],
        )
    if not nodes or _fits(_scaled(per_rank, c), nodes):
        return PlacementPlan(
            "stage", "PACK", [_scaled(per_rank, c) for _ in range(world // c)], [r // c for r in ranks]
        )
    return PlacementPlan("rank", "PACK", [_scaled(per_rank, 1) for _ in ranks], list(ranks))
