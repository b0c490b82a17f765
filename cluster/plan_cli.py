"""``alexnet plan``: the grids a cluster can run, what each costs, and the one ``grid.shape = "auto"``
picks, before anything starts.

    alexnet plan [--preset P] [--config F] [--set K=V] [--nodes N --gpus-per-node G --gpu-memory-gb M]
                 [--measure] [--json]

The cluster is the one described by the flags, or the Ray cluster in ``RAY_ADDRESS`` (joined, read,
left: nothing is started). Each grid's numbers say where they come from: memory and bytes are
computed from the model's geometry (:mod:`cluster.scaling`), step times are estimated.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

from alexnet.cli import subparser
from cluster.cli import config_source_arguments, job_config
from cluster.config import JobConfig
from cluster.scaling import (
    GPU_BUSY_BATCH,
    BlockRates,
    Links,
    Resources,
    choose_grid,
    estimate_step,
    largest_replicas,
    measure_block_seconds,
    rank_costs,
)
from pipeline.grid import Grid, model_fields

IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 training images: the paper's epochs
PAPER_EPOCHS = 90
DEFAULT_GPU_TFLOPS = 60.0  # effective, forward + backward: the DESIGN's 10-20k images/s on one GPU


@dataclass(frozen=True)
class PlanRow:
    """One grid of the plan, its computed costs and its estimate."""

    shape: str
    microbatches: int
    ranks: int
    replica_batch: int
    memory_bytes: int  # the largest rank's: state + activations
    state_bytes: int
    activation_bytes: int
    column_bytes: int  # per rank and step, the largest
    stage_bytes: int
    allreduce_bytes: int
    step_s: float
    images_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan_rows(cfg: JobConfig, res: Resources, rates: BlockRates, links: Links) -> list[PlanRow]:
    """Every (stages, columns) the network allows, up to 4 stages, each with as many replicas as the
    cluster and the batch allow (the auto rule's count), its costs and estimate."""
    model = cfg.model._model_config(cfg.model.input_size or None)
    g, o = cfg.grid, cfg.optim
    gpu = g.gpus_per_rank > 0 and cfg.train.device != "cpu"
    rows = []
    for cols in sorted({model.columns, 1}, reverse=True):
        for stages in range(1, min(4, len(model_fields(model)["blocks"])) + 1):
            unit = stages * cols if gpu else stages * cols * g.cpus_per_rank
            per_node = [n.gpus if gpu else n.cpus for n in res.nodes]
            capacity = sum(int(p // unit) for p in per_node)
            if not gpu:  # the data workers' CPUs, beside the ranks
                capacity = max(1, min(capacity, int((res.cpus - cfg.data.workers) // unit)))
            if capacity == 0:
                continue
            m = g.microbatches if stages == 1 else max(g.microbatches, stages)
            r = largest_replicas(capacity, o.batch_size, m, o.replica_batch_size)
            batch = o.replica_batch_size * r if o.replica_batch_size else o.batch_size
            try:
                grid = Grid(r, stages, cols, m, batch, None, g.schedule, **model_fields(model))
            except ValueError:
                continue  # e.g. a batch that does not split into m micro-batches
            rows.append(_row(model, grid, rates, links, res, unit))
    return rows


def _row(model: Any, grid: Grid, rates: BlockRates, links: Links, res: Resources, unit: float) -> PlanRow:
    costs = rank_costs(model, grid)
    biggest = max(res.nodes, key=lambda n: n.gpus or n.cpus)
    per_node = int((biggest.gpus or biggest.cpus) // unit)
    spanned = 1 if grid.replicas <= max(per_node, 1) else 2
    est = estimate_step(model, grid, costs, rates, links, spanned)
    big = max(costs, key=lambda c: c.memory_bytes)
    return PlanRow(
        grid.shape,
        grid.microbatches,
        grid.world_size,
        grid.replica_batch,
        big.memory_bytes,
        big.state_bytes,
        big.activation_bytes,
        max(c.column_bytes for c in costs),
        max(c.stage_bytes for c in costs),
        max(c.allreduce_bytes for c in costs),
        est.step_s,
        est.images_per_s,
    )


def read_resources(args: argparse.Namespace) -> Resources:
    """The cluster of the flags, or the Ray cluster in ``RAY_ADDRESS`` (joined, read, left)."""
    if args.nodes is not None or args.gpus_per_node is not None:
        if args.nodes is None or args.gpus_per_node is None:
            raise ValueError("--nodes and --gpus-per-node describe a cluster together: give both")
        return Resources.uniform(args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.cpus_per_node)
    if not os.environ.get("RAY_ADDRESS"):
        raise ValueError(
            "no cluster to plan for: describe one (--nodes 4 --gpus-per-node 8 [--gpu-memory-gb 80]), or "
            "set RAY_ADDRESS to a running Ray cluster (e.g. ray://HEAD:10001 or HEAD:6379; it is read, "
            "never started)"
        )
    import ray

    from cluster.job import check_ray_version

    check_ray_version(ray.__version__)
    joined = not ray.is_initialized()  # leave a Ray this process had joined before as it was
    if joined:
        ray.init(log_to_driver=False, configure_logging=False)
    try:
        return Resources.from_ray_nodes(ray.nodes(), f"the Ray cluster at {os.environ['RAY_ADDRESS']}")
    finally:
        if joined:
            ray.shutdown()


def make_plan(cfg: JobConfig, res: Resources, args: argparse.Namespace) -> dict[str, Any]:
    """The plan as JSON: the cluster, each grid's row, the recommendation and where numbers come from."""
    model = cfg.model._model_config(cfg.model.input_size or None)
    gpu = cfg.grid.gpus_per_rank > 0 and cfg.train.device != "cpu"
    if args.measure or not gpu:
        rates = measure_block_seconds(model)
    else:
        rates = BlockRates.from_flops(model, args.gpu_tflops)
    links = Links(args.node_gb_s, args.network_gb_s, args.latency_us * 1e-6)
    rows = plan_rows(cfg, res, rates, links)
    choice = choose_grid(res, cfg.replace(**{"grid.shape": "auto", "grid.cuts": []}), args.gpu_memory_gb)
    best = next((r for r in rows if r.shape == choice.shape), None)
    recommended: dict[str, Any] = {
        "shape": choice.shape,
        "why": choice.line,
        "warnings": list(choice.warnings),
    }
    if best is not None:
        recommended.update(images_per_s=best.images_per_s, paper_90_epochs_hours=_hours(best.images_per_s))
    if choice.warnings and gpu and not cfg.optim.replica_batch_size:
        recommended["with_replica_batch"] = _with_replica_batch(cfg, res, rates, links, args.gpu_memory_gb)
    return {
        "cluster": {"where": res.where, "nodes": len(res.nodes), "gpus": res.gpus, "cpus": res.cpus},
        "grids": [r.to_dict() for r in rows],
        "recommended": recommended,
        "sources": {
            "memory": "computed: fp32 weights, gradients and momentum, and the tensors saved for "
            "backward at the micro-batch size (equal to the engine's measured peak on CPU: "
            "tests/cluster/test_scaling.py)",
            "bytes": "computed from the model's geometry: per rank and step, the largest rank's",
            "time": f"estimated: per-block compute {rates.origin}; links {links.node_gb_s:g} GB/s within a "
            f"node (--node-gb-s), {links.network_gb_s:g} GB/s between nodes (--network-gb-s), "
            f"{links.latency_s * 1e6:g} us per message; the all-reduce not overlapped",
        },
    }


def _hours(images_per_s: float) -> float:
    return PAPER_EPOCHS * IMAGENET_TRAIN / images_per_s / 3600


def _with_replica_batch(
    cfg: JobConfig, res: Resources, rates: BlockRates, links: Links, gpu_memory_gb: float
) -> dict[str, Any]:
    """The auto grid again with each replica at :data:`GPU_BUSY_BATCH` images and the rate scaled
    linearly (the explicit choice of README "Scaling out"): its batch, rate and estimate."""
    sets = {
        "grid.shape": "auto",
        "grid.cuts": [],
        "optim.replica_batch_size": GPU_BUSY_BATCH,
        "optim.lr_scaling": "linear",
    }
    alt = cfg.replace(**sets)
    shape = choose_grid(res, alt, gpu_memory_gb).shape
    alt = alt.replace(**{"grid.shape": shape})
    grid, model = alt.to_grid(), alt.model._model_config(alt.model.input_size or None)
    unit = grid.stages * grid.columns
    row = _row(model, grid, rates, links, res, unit)
    return {
        "sets": f"--set optim.replica_batch_size={GPU_BUSY_BATCH} --set optim.lr_scaling=linear",
        "shape": shape,
        "batch": alt.describe_batch(),
        "images_per_s": row.images_per_s,
        "paper_90_epochs_hours": _hours(row.images_per_s),
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def format_plan(plan: dict[str, Any]) -> str:
    """The table of ``alexnet plan``."""
    c = plan["cluster"]
    lines = [
        f"alexnet plan for {c['where']}: {c['nodes']} node(s), {c['gpus']} GPUs, {c['cpus']:g} CPUs",
        f"{'grid':<9} {'M':>2} {'ranks':>5} {'img/rep':>7} {'mem/rank MB':>11} {'(state+act)':>15} "
        f"{'column MB':>9} {'stage MB':>8} {'allred MB':>9} {'step ms':>8} {'img/s':>9}",
    ]
    for r in plan["grids"]:
        split = f"{_mb(r['state_bytes'])}+{_mb(r['activation_bytes'])}"
        lines.append(
            f"{r['shape']:<9} {r['microbatches']:>2} {r['ranks']:>5} {r['replica_batch']:>7} "
            f"{_mb(r['memory_bytes']):>11} {split:>15} {_mb(r['column_bytes']):>9} "
            f"{_mb(r['stage_bytes']):>8} {_mb(r['allreduce_bytes']):>9} {r['step_s'] * 1e3:>8.2f} "
            f"{r['images_per_s']:>9,.0f}"
        )
    rec = plan["recommended"]
    lines.append(f'recommended: grid.shape = {rec["shape"]} (what grid.shape = "auto" picks): {rec["why"]}')
    if "images_per_s" in rec:
        lines.append(
            f"predicted: {rec['images_per_s']:,.0f} images/s; the paper's {PAPER_EPOCHS} epochs of ImageNet "
            f"({IMAGENET_TRAIN:,} images) in {rec['paper_90_epochs_hours']:.1f} h"
        )
    lines += [f"warning: {w}" for w in rec["warnings"]]
    alt = rec.get("with_replica_batch")
    if alt:
        lines.append(
            f"or, not the paper's recipe, {alt['sets']}: grid {alt['shape']}, {alt['batch']}; predicted "
            f"{alt['images_per_s']:,.0f} images/s, {PAPER_EPOCHS} epochs in "
            f"{alt['paper_90_epochs_hours']:.1f} h"
        )
    lines += [f"{k}: {v}" for k, v in plan["sources"].items()]
    lines.append(
        "per rank and step: mem = the largest rank's; column, stage, allred = MB it sends on each link"
    )
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan (or its JSON)."""
    for name in ("steps", "epochs", "metrics_port", "data"):
        setattr(args, name, None)
    cfg, _ = job_config(args)
    res = read_resources(args)
    plan = make_plan(cfg, res, args)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan), flush=True)
    return 0


def add_plan(sub: argparse._SubParsersAction) -> None:
    p = subparser(
        sub,
        "plan",
        "the grids a cluster can run: memory, bytes per link, estimated step time; the recommended one",
        "alexnet plan --preset paper --nodes 4 --gpus-per-node 8 --gpu-memory-gb 80",
        "RAY_ADDRESS=HEAD:6379 alexnet plan --preset paper --json",
    )
    config_source_arguments(p)
    p.add_argument("--nodes", type=int, help="nodes of the cluster to plan for (with --gpus-per-node)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (0: a CPU cluster)")
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=0.0,
        help="memory per GPU (default: 16 GB assumed when unknown)",
    )
    p.add_argument("--cpus-per-node", type=float, default=0, help="CPUs per node (default 8 per GPU)")
    p.add_argument(
        "--gpu-tflops",
        type=float,
        default=DEFAULT_GPU_TFLOPS,
        help=f"effective GPU rate for the compute estimate (default {DEFAULT_GPU_TFLOPS:g})",
    )
    p.add_argument(
        "--measure", action="store_true", help="per-block compute measured on this machine's CPU instead"
    )
    p.add_argument(
        "--node-gb-s", type=float, default=Links.node_gb_s, help="link within a node, GB/s (default NVLink)"
    )
    p.add_argument(
        "--network-gb-s",
        type=float,
        default=Links.network_gb_s,
        help="link between nodes, GB/s (default 12.5: 100 Gbit/s)",
    )
    p.add_argument("--latency-us", type=float, default=20.0, help="per message, microseconds (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_plan)


SUBCOMMANDS = [add_plan]
