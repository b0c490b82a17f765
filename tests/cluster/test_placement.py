"""Placement of trainer ranks: the layout as a pure function, then on a real 2-node Ray cluster."""

import os

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


@pytest.mark.timeout(240)
def test_trainer_ranks_share_their_nodes_gpus_and_take_the_one_ray_assigned(ray_local_shutdown):
    """Ray's fake GPUs on two nodes: every rank's CUDA_VISIBLE_DEVICES becomes its node's GPUs (Ray
    alone sets only the rank's own) and its device index is the position of the GPU Ray assigned."""
    import ray
    from ray.cluster_utils import Cluster

    from cluster.config import load_config
    from cluster.faults import RankFaults
    from cluster.group import RayTrainerGroup
    from cluster.plan import RunPlan
    from cluster.rank import TrainerActor

    cluster = Cluster()
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, num_gpus=2)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        cfg = load_config(preset="demo", overrides={"grid.gpus_per_rank": "1", "train.device": "auto"})
        plan = RunPlan(steps_per_epoch=1, total_steps=1, data_workers=1)
        group = RayTrainerGroup(cfg, plan, "unused")
        actor_cls = ray.remote(TrainerActor)
        group.actors = [
            actor_cls.options(num_cpus=1, num_gpus=1).remote(
                r, cfg.to_dict(), plan.__dict__, "", RankFaults()
            )
            for r in range(4)
        ]

        def probe(actor):
            return (
                ray.get_runtime_context().get_node_id(),
                [str(g) for g in ray.get_gpu_ids()],
                os.environ.get("CUDA_VISIBLE_DEVICES"),
                actor.gpu_index,
            )

        before = ray.get([a.__ray_call__.remote(probe) for a in group.actors], timeout=60)
        assert all(vis == gpus[0] for _, gpus, vis, _ in before)  # Ray: each actor sees its own GPU only
        group._share_gpus()
        after = ray.get([a.__ray_call__.remote(probe) for a in group.actors], timeout=60)
        nodes = {node for node, *_ in after}
        assert len(nodes) == 2
        for node in nodes:
            mine = [(gpus[0], vis, index) for n, gpus, vis, index in after if n == node]
            node_gpus = sorted(g for g, _, _ in mine)
            assert len(mine) == 2 and {vis for _, vis, _ in mine} == {",".join(node_gpus)}
            for gpu, vis, index in mine:
                assert vis.split(",")[index] == gpu  # the device torch numbers index is Ray's pick
            assert len({index for *_, index in mine}) == 2  # two ranks, two GPUs
        group.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
