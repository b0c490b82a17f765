"""Placement of trainer ranks: the layout as a pure function, then on a real 2-node Ray cluster."""

import pytest

from cluster.placement import plan_placement
from pipeline.grid import Grid

GPU_RANK = {"CPU": 1.0, "GPU": 1.0}


def test_replica_per_node_where_it_fits():
    grid = Grid.parse("2x2x2", microbatches=2, global_batch=8)
    plan = plan_placement(grid, GPU_RANK, [{"CPU": 16, "GPU": 8}] * 2)
    assert plan.level == "replica" and plan.strategy == "SPREAD"
    assert plan.bundles == [{"CPU": 4, "GPU": 4}] * 2
    assert plan.bundle_of_rank == [0, 0, 0, 0, 1, 1, 1, 1]


def test_stage_columns_together_when_a_replica_does_not_fit():
    grid = Grid.parse("1x3x2", microbatches=3, global_batch=6)
    plan = plan_placement(grid, GPU_RANK, [{"CPU": 8, "GPU": 2}] * 3)
    assert plan.level == "stage" and plan.strategy == "PACK"
    assert plan.bundles == [{"CPU": 2, "GPU": 2}] * 3
    # both columns of a stage share a bundle, i.e. a node
    for s in range(3):
        assert plan.bundle_of_rank[grid.rank_of(0, s, 0)] == plan.bundle_of_rank[grid.rank_of(0, s, 1)]


def test_rank_bundles_when_a_stage_does_not_fit_and_unknown_nodes():
    grid = Grid.parse("1x1x2", microbatches=1, global_batch=2)
    assert plan_placement(grid, GPU_RANK, [{"CPU": 8, "GPU": 1}] * 2).level == "rank"
    # no node known yet (autoscaler): the smallest bundles that keep a stage together
    assert plan_placement(grid, GPU_RANK, []).level == "stage"


@pytest.mark.timeout(240)
def test_replicas_spread_and_stages_packed_on_a_two_node_cluster(ray_local_shutdown):
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cluster = Cluster()
    try:
        # two "GPU" nodes that could each hold both replicas: SPREAD must still separate them
        for _ in range(2):
            cluster.add_node(num_cpus=4, num_gpus=4)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        grid = Grid.parse("2x1x2", microbatches=1, global_batch=4)
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
        plan = plan_placement(grid, GPU_RANK, nodes)
        assert plan.level == "replica"
        pg = placement_group(plan.bundles, strategy=plan.strategy)
        ray.get(pg.ready(), timeout=60)

        @ray.remote(num_cpus=1, num_gpus=1)
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        node_of = ray.get(
            [
                where.options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        pg, placement_group_bundle_index=plan.bundle_of_rank[rank]
                    )
                ).remote()
                for rank in range(grid.world_size)
            ],
            timeout=60,
        )
        # columns of each replica's stage on one node; the two replicas on different nodes
        assert node_of[grid.rank_of(0, 0, 0)] == node_of[grid.rank_of(0, 0, 1)]
        assert node_of[grid.rank_of(1, 0, 0)] == node_of[grid.rank_of(1, 0, 1)]
        assert node_of[grid.rank_of(0, 0, 0)] != node_of[grid.rank_of(1, 0, 0)]
    finally:
        ray.shutdown()
        cluster.shutdown()
