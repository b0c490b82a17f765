"""From a cluster's resources to a grid: the ``grid.shape = "auto"`` rule, and the costs of a grid.

Pure code (no Ray): :class:`Resources` is what a cluster has (nodes, their GPUs, CPUs and GPU
memory), read by the caller from ``ray.nodes()``, this machine or the command line;
:func:`choose_grid` is the auto rule; :func:`rank_costs` the per-rank cost model of a grid.

The auto rule (DESIGN "Choosing the grid"): the paper's columns are a fidelity choice, two GPUs of
one node per replica; AlexNet fits on one GPU, so a second stage is taken only when a rank's
memory (:func:`rank_costs`, at one stage) does not fit the GPU; more GPUs mean more replicas,
each replica's ranks on one node, as many as the GPUs allow with every replica's batch equal (the
largest count whose share of the global batch is whole: 6 GPUs and batch 128 give 2 replicas).

The cost model, per rank and per step (``alexnet plan`` labels each number by its origin):

* memory, *computed*: parameters, their gradients and momentum (3 x 4 bytes per parameter), and
  the tensors autograd saves for backward at the micro-batch size, times the micro-batches a stage
  holds at once (GPipe: all M; 1F1B: min(M, S - s)). What each block saves is counted from the ops
  the engine runs (conv/linear input, activation output, LRN's output and denominator, max-pool's
  int64 indices, dropout's mask), so it equals the engine's own meter (``track_memory``) up to a few
  bytes per image on the per-column path (tests/cluster/test_scaling.py measures it);
* bytes sent, *computed* exactly from the geometry: the column all-gathers (forward: this
  column's part; backward, a reduce-scatter: the other column's), the stage boundary (activations
  forward, their gradients back), the gradient all-reduce (a ring: 2 (R-1)/R of the rank's
  parameter bytes);
* time, *estimated*: per-block compute from a rate (measured on this machine by
  :func:`measure_block_seconds`, or a GPU's FLOP/s), links at a bandwidth, the pipeline's
  (M + S - 1) micro-batch slots of its slowest stage, and no overlap of the all-reduce.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from alexnet.config import ModelConfig
from alexnet.model import block_spec, geometry, model_blocks, net_columns, previous_block
from pipeline.grid import Grid

GIB = 1 << 30
# a GPU of unknown memory (Ray does not report it) is taken to have this much: the smallest common
# datacenter GPU (V100 16 GB, T4); the paper network's rank at batch 128 needs ~1-2 GB of it
ASSUMED_GPU_MEMORY_GB = 16.0
# rows per replica below which a GPU runs mostly idle between kernels (the paper's step is a few ms)
GPU_BUSY_BATCH = 32
FLOAT_BYTES = 4  # fp32 parameters, gradients, momentum; activations as the CPU engine saves them
INDEX_BYTES = 8  # max-pool's saved argmax indices are int64


# -- what a cluster has ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """One node: its GPUs, CPUs and memory per GPU (GB; 0: unknown)."""

    gpus: int
    cpus: float
    gpu_memory_gb: float = 0.0
    name: str = ""


@dataclass(frozen=True)
class Resources:
    """A cluster's nodes, and where that was read from (``where``: for the printed line)."""

    nodes: tuple[Node, ...]
    where: str = "the cluster"

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @classmethod
    def uniform(
        cls, nodes: int, gpus_per_node: int, gpu_memory_gb: float = 0.0, cpus: float = 0
    ) -> Resources:
        """``nodes`` equal nodes (``alexnet plan --nodes N --gpus-per-node G``)."""
        if nodes < 1 or gpus_per_node < 0:
            raise ValueError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: use nodes >= 1, GPUs >= 0")
        node = Node(gpus_per_node, cpus or 8.0 * max(gpus_per_node, 1), gpu_memory_gb)
        return cls(tuple(node for _ in range(nodes)), "the command line")

    @classmethod
    def this_machine(cls) -> Resources:
        """This machine as the embedded local Ray sees it: its CPUs and CUDA GPUs (with their memory)."""
        import os

        import torch

        gpus = torch.cuda.device_count()
        memory = min(
            (torch.cuda.get_device_properties(i).total_memory / 1e9 for i in range(gpus)), default=0.0
        )
        return cls((Node(gpus, float(os.cpu_count() or 1), memory, "local"),), "this machine")

    @classmethod
    def from_ray_nodes(cls, nodes: Sequence[Mapping[str, Any]], where: str = "the Ray cluster") -> Resources:
        """From ``ray.nodes()``: its alive nodes' ``GPU`` and ``CPU`` (Ray reports no GPU memory)."""
        out = []
        for n in nodes:
            if not n.get("Alive"):
                continue
            res = n.get("Resources", {})
            out.append(Node(int(res.get("GPU", 0)), float(res.get("CPU", 0)), 0.0, n.get("NodeID", "")[:8]))
        return cls(tuple(out), where)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# -- the per-rank cost model ----------------------------------------------------------------------
def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _block_input_elems(cfg: ModelConfig, name: str, column: int) -> int:
    """Elements per image of block ``name``'s input in ``column`` (gathered at an exchange point)."""
    spec = block_spec(cfg, name)
    if spec.input == "image":
        return cfg.in_channels * cfg.input_size**2
    prev = previous_block(cfg, name)
    if spec.exchange:
        return sum(_numel(geometry(cfg, prev, c).out) for c in net_columns(cfg))
    return _numel(geometry(cfg, prev, column).out)


def _input_saved_before(cfg: ModelConfig, name: str, stage_blocks: Sequence[str]) -> bool:
    """Whether block ``name``'s input is a tensor the previous block already saved (its activation
    output, with no pool or dropout after it, in this stage, read as it is): then it is not counted
    again (the engine's meter counts a tensor once)."""
    spec = block_spec(cfg, name)
    if spec.input != "own" or stage_blocks.index(name) == 0:
        return False
    prev = block_spec(cfg, previous_block(cfg, name))
    return prev.act and not prev.pool and not prev.dropout


def saved_bytes_per_image(cfg: ModelConfig, blocks: Sequence[str], columns: Sequence[int], last: bool) -> int:
    """Bytes autograd keeps for backward per image, for ``blocks`` in ``columns`` (one rank's stage).

    Per block and column: the conv/linear input (the image once per rank; at an exchange the
    gathered tensor), the activation's output, LRN's output and denominator (its input is the
    activation's output), max-pool's int64 indices (its input is already saved), dropout's mask;
    on the last stage the log-softmax of the logits."""
    total = 0
    image_counted = False
    for name in blocks:
        spec = block_spec(cfg, name)
        for c in columns:
            geo = geometry(cfg, name, c)
            out = _numel(geo.conv_out)
            if spec.input == "image":
                total += 0 if image_counted else _block_input_elems(cfg, name, c) * FLOAT_BYTES
                image_counted = True
            elif spec.exchange and len(columns) > 1 and c != columns[0]:
                pass  # one process holding both columns gathers (concatenates) once for both
            elif not _input_saved_before(cfg, name, blocks):
                total += _block_input_elems(cfg, name, c) * FLOAT_BYTES
            saved = (1 if spec.act else 0) + (2 if spec.lrn else 0) + (1 if spec.dropout else 0)
            if spec.lrn and not spec.act:
                saved += 1  # LRN saves its input itself
            total += saved * out * FLOAT_BYTES
            if spec.pool:
                total += _numel(geo.out) * INDEX_BYTES
    if last:
        total += cfg.num_classes * FLOAT_BYTES
    return total


def _params(cfg: ModelConfig, blocks: Sequence[str], columns: Sequence[int]) -> int:
    return sum(
        _numel(geometry(cfg, n, c).weight_shape) + geometry(cfg, n, c).weight_shape[0]
        for n in blocks
        for c in columns
    )


def in_flight(grid: Grid, stage: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once: all M under GPipe, at most
    S - s under 1F1B (:mod:`pipeline.schedules`)."""
    m = grid.microbatches
    return m if grid.schedule == "gpipe" else min(m, grid.stages - stage)


@dataclass(frozen=True)
class RankCost:
    """One rank's computed costs per step (bytes) and its compute per image (seconds, estimated)."""

    rank: int
    coords: tuple[int, int, int]
    params: int  # parameters this rank holds
    state_bytes: int  # weights, gradients, momentum
    activation_bytes: int  # peak saved for backward
    column_bytes: int  # sent over the column link (all-gathers and their backward)
    stage_bytes: int  # sent over the stage links (activations forward, gradients back)
    allreduce_bytes: int  # sent in the gradient all-reduce (a ring)
    messages: int  # collectives and point-to-point posts per step (each pays the link's latency)
    column_messages: int = 0

    @property
    def memory_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes


def rank_costs(cfg: ModelConfig, grid: Grid) -> list[RankCost]:
    """The computed costs of every rank of ``grid`` running ``cfg``'s network (fp32)."""
    out = []
    mb = grid.microbatch_size
    for rank in range(grid.world_size):
        r, s, c = grid.coords(rank)
        blocks, cols = grid.stage_blocks(s), grid.columns_of(c)
        last = s == grid.stages - 1
        params = _params(cfg, blocks, cols)
        act = saved_bytes_per_image(cfg, blocks, cols, last) * mb * in_flight(grid, s)
        if grid.columns == 1 and len(cols) == 2:  # the fused path saves its stacked conv weights
            convs = [n for n in blocks if block_spec(cfg, n).kind == "conv"]
            act += _params(cfg, convs, cols) * FLOAT_BYTES * in_flight(grid, s)
        col_bytes = col_msgs = 0
        if grid.columns == 2:
            widths = []
            for n in blocks:
                if block_spec(cfg, n).exchange:
                    widths.append(max(_numel(geometry(cfg, previous_block(cfg, n), k).out) for k in (0, 1)))
            if last:  # the logit halves gathered for the loss
                widths.append(max(geometry(cfg, blocks[-1], k).out[0] for k in (0, 1)))
            # forward: this column's (padded) part; backward: the other column's part's gradient
            col_bytes = 2 * sum(widths) * FLOAT_BYTES * grid.replica_batch
            col_msgs = 2 * len(widths) * grid.microbatches
        p2p = 0
        if grid.stages > 1:
            if not last:  # activations to s + 1
                p2p += sum(_numel(geometry(cfg, blocks[-1], k).out) for k in cols)
            if s > 0:  # gradients to s - 1
                p2p += sum(_numel(geometry(cfg, previous_block(cfg, blocks[0]), k).out) for k in cols)
        ring = 2 * (grid.replicas - 1) / grid.replicas
        allreduce = int(ring * params * FLOAT_BYTES)
        msgs = (1 if s > 0 else 0) + (1 if not last else 0)
        out.append(
            RankCost(
                rank,
                (r, s, c),
                params,
                3 * params * FLOAT_BYTES,
                act,
                col_bytes,
                p2p * FLOAT_BYTES * grid.replica_batch,
                allreduce,
                msgs * grid.microbatches + (1 if grid.replicas > 1 else 0),
                col_msgs,
            )
        )
    return out


# -- time -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Links:
    """Link bandwidths (GB/s, 1e9 bytes) and latency per message: within a node (NVLink by default)
    and between nodes (a datacenter network, 100 Gbit/s by default)."""

    node_gb_s: float = 200.0
    network_gb_s: float = 12.5
    latency_s: float = 20e-6


@dataclass(frozen=True)
class BlockRates:
    """Seconds per image of each block's forward and backward, per column held, and per parameter of
    the update; ``origin`` says where they came from (measured here, or a GPU's rate)."""

    per_image: dict[str, float]  # block -> seconds per image per column (both directions)
    fused_per_image: dict[str, float]  # block -> seconds per image for both columns fused (C = 1)
    update_per_param: float
    origin: str

    @classmethod
    def from_flops(cls, cfg: ModelConfig, tflops: float, hbm_gb_s: float = 2000.0) -> BlockRates:
        """A GPU at an effective ``tflops`` (forward + backward is 3 x 2 FLOP per MAC) and its memory
        bandwidth for the update (~6 fp32 passes per parameter)."""
        per = {}
        for spec in model_blocks(cfg):
            macs = _numel(geometry(cfg, spec.name, 0).weight_shape) * _numel(
                geometry(cfg, spec.name, 0).conv_out[1:]
            )
            per[spec.name] = 6 * macs / (tflops * 1e12)
        both = {n: v * len(net_columns(cfg)) for n, v in per.items()}
        return cls(
            per, both, 6 * FLOAT_BYTES / (hbm_gb_s * 1e9), f"estimated from {tflops:g} TFLOP/s per GPU"
        )


def measure_block_seconds(cfg: ModelConfig, batch: int = 16, repeats: int = 3) -> BlockRates:
    """Each block's forward + backward on this machine's CPU at ``batch`` rows (one thread, the fastest
    of ``repeats``), per image: one column (the C = 2 path) and both fused (the C = 1 path); and the
    paper update per parameter."""
    import torch

    from alexnet.layers import StepContext
    from alexnet.model import Stage
    from alexnet.optim import make_optimizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per, fused = {}, {}
        ctx = StepContext(seed=0, step=0)
        params = 0
        seconds_update = 0.0
        for spec in model_blocks(cfg):
            for cols, into in (((0,), per), (net_columns(cfg), fused)):
                stage = Stage(cfg, [spec.name], cols, fused=len(cols) > 1)
                xs = _block_inputs(cfg, spec.name, cols, batch)
                if len(cols) > 1:  # the engine's layout of a fused stage on CPU (pipeline.engine)
                    xs = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in xs]
                other = _other_part(cfg, spec.name, batch)

                def exchange(_spec, parts, other=other):
                    return torch.cat([parts[0], other], 1)

                def once(stage=stage, xs=xs, exchange=exchange):
                    outs = stage.run(xs, exchange, ctx)
                    sum(o.float().sum() for o in outs).backward()

                into[spec.name] = _best_seconds(once, repeats) / batch
            stage = Stage(cfg, [spec.name], net_columns(cfg))
            opt = make_optimizer(stage.named_parameters(), "paper", 0.01)
            for p in stage.parameters():
                p.grad = torch.zeros_like(p)
            seconds_update += _best_seconds(opt.step, repeats)
            params += sum(p.numel() for p in stage.parameters())
    finally:
        torch.set_num_threads(threads)
    return BlockRates(per, fused, seconds_update / params, "measured on this machine's CPU (1 thread)")


def _block_inputs(cfg: ModelConfig, name: str, cols: Sequence[int], batch: int) -> list:
    import torch

    spec = block_spec(cfg, name)
    if spec.input == "image":
        return [torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)]
    prev = previous_block(cfg, name)
    return [torch.randn(batch, *geometry(cfg, prev, c).out, requires_grad=True) for c in cols]


def _other_part(cfg: ModelConfig, name: str, batch: int):
    import torch

    spec = block_spec(cfg, name)
    if not spec.exchange or len(net_columns(cfg)) < 2:
        return None
    return torch.randn(batch, *geometry(cfg, previous_block(cfg, name), 1).out)


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` calls after a warm-up: on a shared machine the least disturbed."""
    fn()  # warm-up: allocations, oneDNN's primitive cache
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@dataclass(frozen=True)
class Estimate:
    """A grid's estimated step time and its parts (seconds), and images per second."""

    step_s: float
    compute_s: float
    column_s: float
    stage_s: float
    allreduce_s: float
    update_s: float
    images_per_s: float


def estimate_step(
    cfg: ModelConfig, grid: Grid, costs: list[RankCost], rates: BlockRates, links: Links, nodes_spanned: int
) -> Estimate:
    """The step time of ``grid``: a micro-batch through every stage, then M - 1 more at the pace of the
    slowest (a stage's micro-batch: compute, column exchanges and stage sends, serial within a rank),
    then the all-reduce (over the network when the replicas span nodes) and the update."""
    mb, m, s_count = grid.microbatch_size, grid.microbatches, grid.stages
    slot = []
    parts = {"compute": 0.0, "column": 0.0, "stage": 0.0}
    for s in range(s_count):
        cost = next(c for c in costs if c.coords[1] == s)
        cols = grid.columns_of(cost.coords[2])
        table = rates.fused_per_image if len(cols) > 1 else rates.per_image
        compute = mb * sum(table[n] for n in grid.stage_blocks(s))
        column = (cost.column_bytes / m) / (
            links.node_gb_s * 1e9
        ) + cost.column_messages / m * links.latency_s
        stage = (cost.stage_bytes / m) / (links.node_gb_s * 1e9) + (links.latency_s if s_count > 1 else 0.0)
        slot.append((compute + column + stage, compute, column, stage))
    # the pipeline: a micro-batch through every stage (fill and drain), and M - 1 more at the pace
    # of the slowest; (M + S - 1) slots of the slowest when the stages are equal
    worst = max(slot)
    slots = m + s_count - 1
    fill = sum(x[0] for x in slot) - worst[0]
    link = links.network_gb_s if nodes_spanned > 1 else links.node_gb_s
    biggest = max(costs, key=lambda c: c.allreduce_bytes)
    allreduce = biggest.allreduce_bytes / (link * 1e9) + (links.latency_s if grid.replicas > 1 else 0.0)
    update = max(c.params for c in costs) * rates.update_per_param
    scale = (fill + m * worst[0]) / (slots * worst[0])  # parts as shares of the slowest stage's
    parts = {k: worst[i] * slots * scale for i, k in ((1, "compute"), (2, "column"), (3, "stage"))}
    step = fill + m * worst[0] + allreduce + update
    return Estimate(
        step, parts["compute"], parts["column"], parts["stage"], allreduce, update, grid.global_batch / step
    )


# -- the auto rule ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridChoice:
    """What ``grid.shape = "auto"`` chose, and the one line that says so and why."""

    shape: str
    line: str
    idle: int = 0
    warnings: tuple[str, ...] = field(default_factory=tuple)


def stages_for_memory(cfg: ModelConfig, grid_of: Callable[[int], Grid], memory_gb: float) -> tuple[int, int]:
    """The fewest stages whose largest rank fits ``memory_gb`` (and that rank's bytes);
    ``grid_of(S)`` builds the one-replica grid of S stages."""
    blocks = len(model_blocks(cfg))
    need = 0
    for s in range(1, blocks + 1):
        need = max(c.memory_bytes for c in rank_costs(cfg, grid_of(s)))
        if need <= memory_gb * 1e9:
            return s, need
    raise ValueError(
        f"a rank needs {need / 1e9:.1f} GB even split over {blocks} stages, more than the {memory_gb:g} GB "
        "per GPU: lower optim.batch_size or raise grid.microbatches"
    )


def largest_replicas(capacity: int, global_batch: int, microbatches: int, per_replica: int) -> int:
    """The largest replica count up to ``capacity`` whose share of ``global_batch`` splits into
    ``microbatches`` equal micro-batches (``per_replica`` > 0: each replica's batch is fixed, so any
    count up to capacity)."""
    if per_replica:
        return capacity
    return max((r for r in range(1, capacity + 1) if global_batch % (r * microbatches) == 0), default=1)


def choose_grid(res: Resources, cfg: Any, gpu_memory_gb: float = 0.0) -> GridChoice:
    """The ``grid.shape = "auto"`` grid of job config ``cfg`` (:class:`cluster.config.JobConfig`) on
    ``res``; ``gpu_memory_gb`` (0: the nodes' reported memory, else :data:`ASSUMED_GPU_MEMORY_GB`)
    decides whether a rank needs a second stage. See the module docstring for the rule."""
    model = cfg.model._model_config(cfg.model.input_size or None)
    g, o = cfg.grid, cfg.optim
    if g.gpus_per_rank > 0 and cfg.train.device != "cpu":
        return _choose_gpu_grid(res, cfg, model, gpu_memory_gb)
    cols, unit = model.columns, model.columns * g.cpus_per_rank
    per_node = sum(int(n.cpus // unit) for n in res.nodes)
    capacity = max(1, min(per_node, int((res.cpus - cfg.data.workers) // unit)))
    r = largest_replicas(capacity, o.batch_size, g.microbatches, o.replica_batch_size)
    shape = f"{r}x1x{cols}"
    per = o.replica_batch_size or o.batch_size // r
    why = (
        f"a replica takes {unit:g} CPUs (grid.cpus_per_rank={g.cpus_per_rank:g} x {cols} columns), the data "
        f"workers {cfg.data.workers} (data.workers)"
    )
    line = (
        f"no GPUs, {res.cpus:g} CPUs on {_plural(len(res.nodes), 'node')} ({res.where}): grid {shape} "
        f"({_plural(r, 'replica')} x 1 stage x {_plural(cols, 'column')}), {per} images per replica; {why}"
    )
    return GridChoice(shape, line)


def _choose_gpu_grid(res: Resources, cfg: Any, model: ModelConfig, gpu_memory_gb: float) -> GridChoice:
    from pipeline.grid import model_fields

    g, o, cols = cfg.grid, cfg.optim, model.columns
    if res.gpus == 0:
        raise ValueError(
            f"grid.shape='auto' with grid.gpus_per_rank={g.gpus_per_rank:g}: {res.where} has no GPUs; run "
            "on a GPU cluster (RAY_ADDRESS), or on CPUs with --set train.device=cpu "
            "--set grid.gpus_per_rank=0"
        )
    reported = [n.gpu_memory_gb for n in res.nodes if n.gpus and n.gpu_memory_gb > 0]
    memory = gpu_memory_gb or (min(reported) if reported else ASSUMED_GPU_MEMORY_GB)
    origin = (
        "--gpu-memory-gb"
        if gpu_memory_gb
        else "as the GPUs report"
        if reported
        else "assumed: Ray does not report GPU memory"
    )
    for stages in range(1, len(model_blocks(model)) + 1):
        unit = stages * cols
        capacity = sum(n.gpus // unit for n in res.nodes)
        if capacity == 0:
            break
        r = largest_replicas(capacity, o.batch_size, g.microbatches, o.replica_batch_size)
        batch = o.replica_batch_size * r if o.replica_batch_size else o.batch_size
        grid = Grid(r, stages, cols, g.microbatches, batch, None, g.schedule, **model_fields(model))
        need = max(c.memory_bytes for c in rank_costs(model, grid))
        if need <= memory * 1e9:
            return _gpu_choice(res, grid, need, memory, origin, capacity, o)
    most = max(n.gpus for n in res.nodes)
    raise ValueError(
        f"grid.shape='auto': no grid fits {res.where} ({res.gpus} GPUs, at most {most} on a node, "
        f"{memory:g} GB each, {origin}): a replica's ranks must share a node and each rank's memory fit one "
        "GPU; lower optim.batch_size, raise grid.microbatches, or add GPUs per node"
    )


def _gpu_choice(
    res: Resources, grid: Grid, need: int, memory: float, origin: str, capacity: int, o: Any
) -> GridChoice:
    r, s, c = grid.replicas, grid.stages, grid.columns
    unit = s * c
    per = grid.replica_batch
    stage_why = (
        f"{_plural(s, 'stage')}: a rank needs {need / 1e9:.1f} GB of the {memory:g} GB per GPU ({origin})"
        if s == 1
        else f"{s} stages: one stage would need more than the {memory:g} GB per GPU ({origin}); a rank now "
        f"needs {need / 1e9:.1f} GB"
    )
    idle, reasons = res.gpus - r * unit, []
    for n in res.nodes:
        if n.gpus % unit:
            where = f"node {n.name}" if n.name else "a node"
            reasons.append(
                (n.gpus % unit, f"{where} has {n.gpus}, not a multiple of the {unit} a replica takes")
            )
    if capacity > r:
        reasons.append(
            (
                (capacity - r) * unit,
                f"{capacity} replicas would not split optim.batch_size={o.batch_size} into equal whole "
                f"shares, {r} do",
            )
        )
    if len(reasons) == 1:
        idle_text = f"; {idle} GPUs idle: {reasons[0][1]}"
    else:
        idle_text = f"; {idle} GPUs idle: " + "; ".join(f"{k} as {why}" for k, why in reasons) if idle else ""
    nodes = len([n for n in res.nodes if n.gpus])
    line = (
        f"{res.gpus} GPUs on {_plural(nodes, 'node')}: grid {grid.shape} ({_plural(r, 'replica')} x "
        f"{_plural(s, 'stage')} x {_plural(c, 'column')}), {per} images per replica; {stage_why}{idle_text}"
    )
    warnings = []
    if per < GPU_BUSY_BATCH:
        warnings.append(small_batch_warning(per, r, o.batch_size))
    return GridChoice(grid.shape, line, idle, tuple(warnings))


def small_batch_warning(per_replica: int, replicas: int, global_batch: int) -> str:
    """The warning for a per-replica batch too small to keep a GPU busy."""
    return (
        f"each replica's batch is {per_replica} images (optim.batch_size={global_batch} over "
        f"{_plural(replicas, 'replica')}), below the {GPU_BUSY_BATCH} that keep a GPU busy: the GPUs will "
        "mostly wait. Fewer replicas (an explicit grid.shape), or a per-replica batch "
        '(optim.replica_batch_size, with optim.lr_scaling=linear: README "Scaling out")'
    )


# -- a study's runs side by side ------------------------------------------------------------------
def _share(nodes: Sequence[Node], k: int, unit_gpus: int) -> Node | tuple[Node, ...] | None:
    """One run's share when ``k`` runs split ``nodes`` evenly: whole nodes each (as many nodes as
    runs or more), else a node's GPUs split among the runs placed on it (whole replicas); None when
    a share would hold no replica."""
    if len(nodes) >= k:
        return tuple(nodes[: len(nodes) // k])
    per_node = math.ceil(k / len(nodes))
    small = min(nodes, key=lambda n: n.gpus)
    gpus = small.gpus // per_node // unit_gpus * unit_gpus
    if gpus < unit_gpus:
        return None
    return dataclasses.replace(small, gpus=gpus, cpus=small.cpus / per_node)


def study_share(res: Resources, runs: int, unit_gpus: int = 2) -> tuple[int, Resources]:
    """How many of ``runs`` runs a study starts together on ``res``, and the share of it each run's
    ``grid.shape = "auto"`` is chosen for: the split that keeps the most GPUs busy (of those, the
    one with the most runs at once), each run at least one replica (``unit_gpus``: its two columns)
    on one node. Without GPUs (a laptop, a CPU cluster) the runs go one after another, each on all
    of ``res``."""
    nodes = [n for n in res.nodes if n.gpus >= unit_gpus]
    pairs = sum(n.gpus // unit_gpus for n in nodes)
    whole = sum(n.gpus for n in res.nodes)
    best = (sum(n.gpus for n in nodes), 1, res)  # one run on all of it (busy GPUs, runs, share)
    for k in range(2, min(runs, pairs) + 1):
        part = _share(nodes, k, unit_gpus)
        if part is None:
            continue
        part = part if isinstance(part, tuple) else (part,)
        busy = k * sum(n.gpus for n in part)
        if busy > best[0] or (busy == best[0] and k > best[1]):
            best = (busy, k, Resources(part, f"1/{k} of {res.where} ({whole} GPUs)"))
    return best[1], best[2]
