"""``grid.shape = "auto"`` (the rule, a pure function of the resources and the config), the batch and
learning-rate scaling, and the per-rank cost model ``alexnet plan`` shows, checked against the
engine's own measured activation peak. No Ray here (tests/cluster/test_auto_grid_ray.py has the
fake-GPU cluster)."""

from __future__ import annotations

import json

import pytest
import torch

from alexnet.config import ModelConfig
from cluster.config import load_config
from cluster.lr_schedule import LRSchedule, Warmup, warmup_of
from cluster.run import resolve_grid
from cluster.scaling import Node, Resources, choose_grid, rank_costs, saved_bytes_per_image
from pipeline.grid import Grid

PAPER = load_config(preset="paper")


@pytest.mark.parametrize(
    "nodes, gpus, shape, words",
    [
        (
            2,
            4,
            "4x1x2",
            ["8 GPUs on 2 nodes: grid 4x1x2 (4 replicas x 1 stage x 2 columns), 32 images per replica"],
        ),
        (1, 8, "4x1x2", ["8 GPUs on 1 node: grid 4x1x2", "32 images per replica"]),
        # 3 replicas would split 128 unevenly: 2 replicas, 2 GPUs named idle with the reason
        (1, 6, "2x1x2", ["grid 2x1x2", "64 images per replica", "2 GPUs idle: 3 replicas would not split"]),
        (4, 8, "16x1x2", ["32 GPUs on 4 nodes: grid 16x1x2", "8 images per replica"]),
        (1, 7, "2x1x2", ["3 GPUs idle", "1 as a node has 7, not a multiple of the 2", "2 as 3 replicas"]),
        (1, 1, None, ["no grid fits", "at most 1 on a node"]),
    ],
)
def test_auto_grid_fills_the_gpus_with_equal_whole_shares_of_the_batch(nodes, gpus, shape, words):
    res = Resources.uniform(nodes, gpus)
    if shape is None:
        with pytest.raises(ValueError) as e:
            choose_grid(res, PAPER)
        line = str(e.value)
    else:
        cfg, lines = resolve_grid(PAPER, res)
        assert cfg.grid.shape == shape and cfg.to_grid().shape == shape
        line = lines[0]
        assert "1 stage: a rank needs" in line and "16 GB per GPU (assumed" in line  # how it knows
    for w in words:
        assert w in line, (w, line)


def test_a_small_per_replica_batch_is_a_warning_not_an_error():
    _, lines = resolve_grid(PAPER, Resources.uniform(4, 8))
    assert (
        lines[1].startswith("warning: each replica's batch is 8 images")
        and "optim.replica_batch_size" in lines[1]
    )
    _, lines = resolve_grid(PAPER, Resources.uniform(1, 8))  # 32 per replica: no warning
    assert len(lines) == 1
    # an explicit shape warns through the config's warnings
    (w,) = load_config(preset="paper", overrides={"grid.shape": "8x1x2"}).warnings()
    assert "each replica's batch is 16 images" in w


def test_a_rank_that_does_not_fit_the_gpu_memory_takes_more_stages():
    one = choose_grid(Resources.uniform(1, 8), PAPER, gpu_memory_gb=40)
    assert one.shape == "4x1x2" and "of the 40 GB per GPU (--gpu-memory-gb)" in one.line
    # at 0.45 GB a one-stage rank (0.52 GB at 32 images) does not fit: two stages (0.41 GB), fewer replicas
    two = choose_grid(Resources.uniform(1, 8), PAPER, gpu_memory_gb=0.45)
    assert two.shape == "2x2x2" and "2 stages: one stage would need more than the 0.45 GB" in two.line
    reported = Resources((Node(8, 64, 80.0, "n1"),))
    assert "of the 80 GB per GPU (as the GPUs report)" in choose_grid(reported, PAPER).line


def test_auto_grid_on_cpus_and_its_refusals():
    small = load_config(preset="small", overrides={"grid.shape": "auto"})
    c = choose_grid(Resources.uniform(1, 0, cpus=16), small)
    assert c.shape == "4x1x2" and c.line.startswith(
        "no GPUs, 16 CPUs on 1 node (the command line): grid 4x1x2"
    )
    assert choose_grid(Resources.uniform(1, 0, cpus=2), small).shape == "1x1x2"  # at least one replica
    with pytest.raises(ValueError, match="has no GPUs.*--set train.device=cpu --set grid.gpus_per_rank=0"):
        choose_grid(Resources.uniform(2, 0), PAPER)
    # the demo keeps its explicit grid: nothing is resolved, nothing printed
    demo = load_config(preset="demo")
    assert resolve_grid(demo, Resources.uniform(4, 8)) == (demo, [])


def test_auto_in_the_config_and_its_errors():
    assert PAPER.grid.shape == "auto" and PAPER.grid.is_auto
    with pytest.raises(ValueError, match="grid.shape='auto' is chosen from the cluster when the run starts"):
        PAPER.to_grid()
    with pytest.raises(ValueError, match="grid.cuts=\\['conv3'\\]: grid.shape='auto' chooses the stages"):
        load_config(preset="paper", overrides={"grid.cuts": "conv3"})
    with pytest.raises(
        ValueError, match="optim.replica_batch_size=30: does not split into grid.microbatches=4"
    ):
        load_config(preset="paper", overrides={"optim.replica_batch_size": 30, "grid.microbatches": 4})
    with pytest.raises(ValueError, match="optim.lr_scaling='square': use one of"):
        load_config(preset="paper", overrides={"optim.lr_scaling": "square"})
    with pytest.raises(ValueError, match="schedule.milestones=\\[3, 6\\]: the first cut falls inside"):
        sets = {"optim.lr_scaling": "linear", "optim.replica_batch_size": 64, "schedule.kind": "step"}
        load_config(preset="paper", overrides={**sets, "schedule.milestones": "3,6"})


def test_batch_and_rate_scaling_say_how_they_combine():
    sets = {"grid.shape": "8x1x2", "optim.replica_batch_size": 64, "optim.lr_scaling": "linear"}
    cfg = load_config(preset="paper", overrides=sets)
    assert cfg.global_batch == 512 and cfg.to_grid().global_batch == 512 and cfg.to_grid().replica_batch == 64
    assert cfg.lr_factor() == 4.0 and cfg.warmup_epochs() == 5
    assert cfg.describe_batch() == (
        "global batch 512 = 8 replica(s) x 64 (optim.replica_batch_size); lr 0.01 x 512/128 = 0.04 "
        "(optim.lr_scaling='linear'), reached by a linear warm-up from 0.01 over 5 epochs"
    )
    plain = load_config(preset="paper", overrides={"grid.shape": "4x1x2"})
    assert plain.global_batch == 128 and plain.lr_factor() == 1.0 and warmup_of(plain) is None
    assert plain.describe_batch() == (
        "global batch 128 = 4 replica(s) x 32 (optim.batch_size=128 / 4); lr 0.01 (optim.lr_scaling='none')"
    )
    unscaled = load_config(preset="paper", overrides={**sets, "optim.lr_scaling": "none"})
    assert (
        "lr 0.01 (optim.lr_scaling='none': unscaled at 4x the recipe's batch 128)"
        in unscaled.describe_batch()
    )
    (w,) = load_config(
        preset="paper", overrides={"grid.shape": "4x1x2", "optim.lr_scaling": "linear"}
    ).warnings()
    assert "stays 1 while optim.replica_batch_size=0" in w


def test_the_warm_up_raises_the_rate_each_epoch_then_the_rule_takes_over():
    sets = {"grid.shape": "8x1x2", "optim.replica_batch_size": 64, "optim.lr_scaling": "linear"}
    cfg = load_config(preset="paper", overrides={**sets, "schedule.kind": "step", "schedule.milestones": "7"})
    sched = LRSchedule.for_run(cfg)
    assert sched.warmup == Warmup(5, 0.01, 0.04)
    rates = [sched.lr]
    cuts = []
    for epoch in range(8):
        cut = sched.update(epoch, None)
        cuts.append(cut)
        rates.append(sched.lr)
    assert rates == pytest.approx([0.01, 0.016, 0.022, 0.028, 0.034, 0.04, 0.04, 0.004, 0.004])
    assert (
        cuts[0].describe()
        == "lr 0.01 -> 0.016 at epoch 0: warm-up 1/5 (optim.warmup_epochs, optim.lr_scaling='linear')"
    )
    assert cuts[5] is None and "milestone 7" in cuts[6].describe()
    # resumed at epoch 3 from its state: the same rates on
    state = LRSchedule.for_run(cfg)
    for epoch in range(3):
        state.update(epoch, None)
    again = LRSchedule.from_state(cfg.schedule, state.state_dict(), 3, warmup_of(cfg))
    resumed = []
    for epoch in range(3, 8):
        again.update(epoch, None)
        resumed.append(again.lr)
    assert resumed == pytest.approx(rates[4:])
    # warmup_epochs=0: the scaled rate from the first step
    now = load_config(preset="paper", overrides={**sets, "optim.warmup_epochs": 0})
    assert LRSchedule.for_run(now).lr == pytest.approx(0.04)


@pytest.mark.parametrize("shape, microbatches", [("1x1x1", 1), ("1x1x2", 1), ("1x2x2", 2), ("1x2x1", 4)])
def test_memory_model_equals_the_engines_measured_activation_peak(shape, microbatches):
    """The computed saved-activation bytes of each rank against the engine's meter (track_memory) on
    one real training step of the small network, the ranks as threads of this process."""
    from pipeline.engine import Engine, EngineConfig
    from pipeline.local_world import local_groups, run_threads

    cfg = ModelConfig.small(num_classes=10, input_size=32)
    grid = Grid.parse(shape, microbatches=microbatches, global_batch=8, model=cfg)

    def step(rank, world):
        e = Engine(cfg, grid, rank, local_groups(world, grid, rank), EngineConfig(track_memory=True))
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        return e.step(0, 0.01, x if e.first else None, y if e.last else None)["activation_peak_bytes"]

    measured = run_threads(step, grid.world_size)
    computed = [c.activation_bytes for c in rank_costs(cfg, grid)]
    for m, c in zip(measured, computed, strict=True):
        assert abs(c - m) <= 0.01 * m, (shape, computed, measured)


def test_costs_of_the_paper_grid_are_the_geometry_s():
    cfg = ModelConfig()
    grid = Grid.parse("2x2x2", microbatches=2, global_batch=128, cuts=("conv4",), model=cfg)
    costs = rank_costs(cfg, grid)
    assert sum(c.params for c in costs if c.coords[0] == 0) == 60_965_224  # one replica holds the model once
    r0 = costs[0]  # replica 0, stage 0, column 0
    assert grid.stage_blocks(0) == ("conv1", "conv2", "conv3")
    # exchanges in stage 0: conv3's input, 128x13x13 per column, forward and its gradient back, 64 rows
    assert r0.column_bytes == 2 * 128 * 13 * 13 * 4 * 64
    # stage boundary: conv3's output 192x13x13 per column, forward only from stage 0
    assert r0.stage_bytes == 192 * 13 * 13 * 4 * 64
    assert r0.allreduce_bytes == r0.params * 4  # a ring of 2: 2 (R-1)/R = 1
    assert saved_bytes_per_image(cfg, ("fc8",), (0,), last=True) == 4096 * 4 + 1000 * 4


def test_alexnet_plan_recommends_a_grid_using_all_32_gpus_and_prints_its_table(capsys):
    from alexnet.cli import main

    assert main(["plan", "--preset", "paper", "--nodes", "4", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "alexnet plan for the command line: 4 node(s), 32 GPUs" in out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    shapes = [r[0] for r in rows]
    assert shapes[:3] == ["16x1x2", "8x2x2", "4x4x2"] and all(int(r[2]) == 32 for r in rows)  # every GPU
    assert "recommended: grid.shape = 16x1x2" in out and "predicted: " in out and "90 epochs" in out
    for origin in ("memory: computed", "bytes: computed", "time: estimated"):
        assert origin in out
    # the 8 images per replica are warned about, and the per-replica batch offered with its recipe
    assert (
        "or, not the paper's recipe, --set optim.replica_batch_size=32 --set optim.lr_scaling=linear" in out
    )
    assert main(["plan", "--preset", "paper", "--nodes", "1", "--gpus-per-node", "6", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["recommended"]["shape"] == "2x1x2" and "2 GPUs idle" in plan["recommended"]["why"]
    row = next(r for r in plan["grids"] if r["shape"] == "2x1x2")
    assert row["memory_bytes"] == row["state_bytes"] + row["activation_bytes"] and row["images_per_s"] > 0


def test_alexnet_plan_without_a_cluster_says_how_to_give_one(capsys, monkeypatch):
    from alexnet.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["plan", "--preset", "paper"]) == 2
    err = capsys.readouterr().err
    assert "no cluster to plan for" in err and "--nodes 4 --gpus-per-node 8" in err and "RAY_ADDRESS" in err
    assert main(["plan", "--preset", "paper", "--nodes", "2"]) == 2
    assert "give both" in capsys.readouterr().err


def test_resources_read_from_ray_nodes_six_gpus_on_one_node():
    """``ray.nodes()`` as Ray returns it: a CPU head, a dead node, one 6-GPU worker: 2x1x2, 2 idle."""
    nodes = [
        {"NodeID": "head0000aaaa", "Alive": True, "Resources": {"CPU": 2.0}},
        {"NodeID": "dead0000bbbb", "Alive": False, "Resources": {"CPU": 8.0, "GPU": 8.0}},
        {"NodeID": "gpu00000cccc", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 6.0}},
    ]
    res = Resources.from_ray_nodes(nodes)
    assert res.gpus == 6 and res.cpus == 10 and [n.name for n in res.nodes] == ["head0000", "gpu00000"]
    cfg, (line,) = resolve_grid(PAPER, res)
    assert cfg.grid.shape == "2x1x2" and cfg.to_grid().replica_batch == 64
    assert line.startswith(
        "6 GPUs on 1 node: grid 2x1x2 (2 replicas x 1 stage x 2 columns), 64 images per replica"
    )
    assert line.endswith(
        "2 GPUs idle: 3 replicas would not split optim.batch_size=128 into equal whole shares, 2 do"
    )


def test_alexnet_config_prints_how_the_batch_and_the_rate_combine(capsys):
    from alexnet.cli import main

    sets = [
        "--set",
        "grid.shape=16x1x2",
        "--set",
        "optim.replica_batch_size=32",
        "--set",
        "optim.lr_scaling=linear",
    ]
    assert main(["config", "--preset", "paper", *sets]) == 0
    out = capsys.readouterr().out
    assert (
        "# batch and learning rate: global batch 512 = 16 replica(s) x 32 (optim.replica_batch_size); "
        "lr 0.01 x 512/128 = 0.04 (optim.lr_scaling='linear'), reached by a linear warm-up from 0.01 over "
        "5 epochs"
    ) in out
    assert 'lr_scaling = "linear"' in out and "replica_batch_size = 32" in out and "warmup_epochs = 5" in out
    assert main(["config", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert (
        'shape = "auto"' in out
        and "# grid.shape = auto: see the grid a cluster gets with `alexnet plan`" in out
    )
