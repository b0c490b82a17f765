"""Placement of trainer ranks and data workers: the layout as a pure function, then on a real 2-node
Ray cluster."""

import os

import pytest

from cluster.placement import feeding_bundles, plan_placement
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


CPU_RANK = {"CPU": 1.0}


def test_data_workers_join_the_replica_bundles_round_robin():
    grid = Grid.parse("2x2x1", microbatches=2, global_batch=4)
    plan = plan_placement(grid, CPU_RANK, [{"CPU": 4}] * 2, data_workers=3)
    assert plan.level == "replica" and len(plan.bundles) == 2  # still one bundle per replica
    assert plan.bundle_of_worker == [0, 1, 0]
    assert plan.bundles == [{"CPU": 2 + 2}, {"CPU": 2 + 1}]  # each replica's 2 ranks plus its workers
    assert plan_placement(grid, CPU_RANK, [{"CPU": 4}] * 2).bundles == [{"CPU": 2}] * 2  # no workers


def test_data_workers_count_in_whether_a_level_fits():
    grid = Grid.parse("1x2x2", microbatches=2, global_batch=4)
    # the 4 ranks alone fit a 4-CPU node as one replica; with 2 workers (6 CPUs) they do not
    assert plan_placement(grid, CPU_RANK, [{"CPU": 4}] * 2).level == "replica"
    plan = plan_placement(grid, CPU_RANK, [{"CPU": 4}] * 2, data_workers=2)
    assert plan.level == "stage" and plan.strategy == "PACK"
    # the workers sit in stage 0's bundle (columns 0 and 1), stage 1's bundle holds its ranks only
    assert plan.bundle_of_worker == [0, 0]
    assert plan.bundles == [{"CPU": 2 + 2}, {"CPU": 2}]
    # 3 workers do not fit beside stage 0 either: one bundle per rank, workers over the stage-0 ranks
    plan = plan_placement(grid, CPU_RANK, [{"CPU": 4}] * 2, data_workers=3)
    assert plan.level == "rank" and plan.bundle_of_worker == [0, 1, 0]
    assert plan.bundles == [{"CPU": 1 + 2}, {"CPU": 1 + 1}, {"CPU": 1}, {"CPU": 1}]


def test_data_workers_take_cpus_only_and_spread_over_replicas_first():
    grid = Grid.parse("2x2x2", microbatches=2, global_batch=8)  # rank (r * 2 + s) * 2 + c
    plan = plan_placement(grid, GPU_RANK, [{"CPU": 3, "GPU": 1}] * 8, data_workers=5)
    assert plan.level == "rank"
    # stage-0 ranks: r0c0=0, r1c0=4, r0c1=1, r1c1=5; dealt replicas first, then columns
    assert feeding_bundles(grid, plan.bundle_of_rank) == [0, 4, 1, 5]
    assert plan.bundle_of_worker == [0, 4, 1, 5, 0]
    assert plan.bundles[0] == {"CPU": 1 + 2, "GPU": 1} and plan.bundles[4] == {"CPU": 2, "GPU": 1}
    assert plan.bundles[2] == {"CPU": 1, "GPU": 1}  # a stage-1 rank: no worker
    # the unknown-nodes level (autoscaler) carries the workers too
    plan = plan_placement(grid, GPU_RANK, [], data_workers=2)
    assert plan.level == "stage" and plan.bundle_of_worker == [0, 2]  # (r0, s0) and (r1, s0)
    with pytest.raises(ValueError, match="data_workers=-1"):
        plan_placement(grid, GPU_RANK, [], data_workers=-1)


def test_data_workers_run_on_the_nodes_of_the_stage0_ranks(ray_local_shutdown, tmp_path):
    """Two 4-CPU nodes, grid 1x2x2 and 2 data workers: stage 0 with both workers fills one node, stage 1
    goes to the other. The workers (real DataPool actors, started as a run starts them) must be on
    stage 0's node; before they joined the trainers' group they landed on the free node."""
    import ray
    from ray.cluster_utils import Cluster

    from alexnet.data.writer import build_synthetic
    from cluster.config import load_config
    from cluster.data import start_pool
    from cluster.group import RayTrainerGroup
    from cluster.plan import RunPlan
    from cluster.run import resolve_run

    url = str(tmp_path / "shards")
    build_synthetic(400, url, size=40, classes=4, shard_size=50, workers=1, progress=False)
    cluster = Cluster()
    group = None
    try:
        for _ in range(2):  # no dashboard: ~10 more processes on the head that nothing here uses
            cluster.add_node(num_cpus=4, include_dashboard=False)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        sets = {"data.workers": "2", "grid.placement_timeout_s": "60"}
        cfg = load_config(preset="demo", overrides=sets)
        group = RayTrainerGroup(resolve_run(cfg, url, RunPlan(11, 11, data_workers=2, data_streams=2)))
        grid = group.grid
        res = group.reservation
        res.reserve()
        assert res.plan.level == "stage" and res.plan.bundle_of_worker == [0, 0]

        @ray.remote(num_cpus=1)
        class Rank:
            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()

        ranks = [
            Rank.options(scheduling_strategy=res.rank_strategy(r)).remote() for r in range(grid.world_size)
        ]
        group.actors = ranks  # killed by group.shutdown()
        rank_node = ray.get([a.node.remote() for a in ranks], timeout=120)
        group.pool = start_pool(group.run, 0, None, res.worker_options())
        worker_node = ray.get(
            [
                w.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
                for w in group.pool.workers
            ],
            timeout=120,
        )
        stage0 = {rank_node[grid.rank_of(0, 0, c)] for c in range(grid.columns)}
        stage1 = {rank_node[grid.rank_of(0, 1, c)] for c in range(grid.columns)}
        assert len(stage0) == len(stage1) == 1 and stage0 != stage1  # one node each
        assert set(worker_node) == stage0, (worker_node, stage0, stage1)
        assert ray.get(group.pool.workers[1].ping.remote(), timeout=60) == 1  # a working DataWorker
        group.shutdown()

        # 5 workers beside 4 ranks need 9 CPUs of the 8: the error names the workers and the layout
        sets = {"data.workers": "5", "grid.placement_timeout_s": "2"}
        cfg = load_config(preset="demo", overrides=sets)
        group = RayTrainerGroup(resolve_run(cfg, url, RunPlan(11, 11, data_workers=5, data_streams=5)))
        with pytest.raises(ValueError) as err:
            group.reservation.reserve()
        text = str(err.value)
        assert "cannot hold grid.shape='1x2x2'" in text and "data.workers=5" in text, text
        assert "needs {'CPU': 9.0} in total" in text and "the largest {'CPU': 4.0}" in text, text
        assert "its largest node {'CPU': 4.0}" in text and "add nodes" in text, text
        assert group.reservation.pg is None  # released
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_replicas_spread_and_stages_packed_on_a_two_node_cluster(
    ray_local_shutdown, tmp_path, monkeypatch, capsys
):
    """... and on the same cluster (one cluster start for both: each costs ~20 s here), the paper
    preset's grid.shape = "auto" reads it and fills it: 4x1x2, which the run's first line says."""
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
        _check_auto_grid_first_line(tmp_path, monkeypatch, capsys)
    finally:
        ray.shutdown()
        cluster.shutdown()


class _Resolved(Exception):
    """Raised where the run would plan the dataset: its grid is resolved by then."""


def _check_auto_grid_first_line(tmp_path, monkeypatch, capsys) -> None:
    """``alexnet train --preset paper`` on the joined 2 x 4 fake-GPU cluster, stopped right after it
    resolved grid.shape = "auto" (nothing trains on fake GPUs; the other clusters, 6 GPUs on one node
    and more, are unit tests of the same pure rule in tests/cluster/test_scaling.py)."""
    import cluster.job as job
    from alexnet.data.writer import build_synthetic
    from cluster.config import load_config

    url = str(tmp_path / "shards")  # 256 px, so the paper's 227 px crops resolve against them
    build_synthetic(4, url, size=256, classes=2, shard_size=4, workers=1, progress=False)
    seen = []

    def stop(cfg, data_url):
        seen.append(cfg.grid.shape)
        raise _Resolved

    monkeypatch.setattr(job, "plan_run", stop)
    capsys.readouterr()
    with pytest.raises(_Resolved):
        job.run_training(
            load_config(preset="paper", overrides={"metrics.port": -1}), url, str(tmp_path / "run")
        )
    first = capsys.readouterr().out.splitlines()[0]
    assert seen == ["4x1x2"]
    want = "8 GPUs on 2 nodes: grid 4x1x2 (4 replicas x 1 stage x 2 columns), 32 images per replica"
    assert first.startswith(f"[alexnet] {want}"), first


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
    from cluster.run import resolve_run

    cluster = Cluster()
    try:
        for _ in range(2):  # no dashboard: ~10 more processes on the head that nothing here uses
            cluster.add_node(num_cpus=2, num_gpus=2, include_dashboard=False)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        cfg = load_config(preset="demo", overrides={"grid.gpus_per_rank": "1", "train.device": "auto"})
        plan = RunPlan(steps_per_epoch=1, total_steps=1, data_workers=1, data_streams=1)
        run = resolve_run(cfg, "unused", plan)
        group = RayTrainerGroup(run)
        actor_cls = ray.remote(TrainerActor)
        group.actors = [
            actor_cls.options(num_cpus=1, num_gpus=1).remote(r, run, RankFaults()) for r in range(4)
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
