"""The per-rank training engine: this rank's stage, the micro-batch schedule, data parallelism, SGD.

Every rank of the grid builds one :class:`Engine` and calls :meth:`Engine.step` once per
global step, with the same ``step`` and ``lr`` everywhere. Per step:

1. the rank runs its schedule's actions (:mod:`pipeline.schedules`). A forward receives
   this stage's input from stage s-1 (one tensor per held column) or takes the images,
   runs the stage's blocks (the exchanges inside are all-gathers over the column group,
   :mod:`pipeline.exchange`) and sends one tensor per held column to stage s+1, or on the
   last stage gathers the logit halves and computes the loss. A backward receives the
   output gradients (or starts from the loss), back-propagates, and sends the input
   gradients to stage s-1 (point to point: :mod:`pipeline.p2p`);
2. gradients are summed across replicas, each parameter's all-reduce launched (async) as
   soon as its gradient is final during the last backward, so it overlaps the rest of it;
3. the update rule (:mod:`alexnet.optim`, ``optim.rule``), learning rate from the caller.

Loss scaling, so that gradients are exact for any R, S, C, M: each micro-batch's loss is
``sum of its cross-entropies / B_global``; the sum over micro-batches and the all-reduce
SUM over replicas then give the gradient of the global-batch mean. With C = 2 both column
ranks compute that loss from the same gathered logits and the gather's backward sums their
two gradients, so each also divides by C (without it the gradient comes back doubled).

Optimizer: :func:`alexnet.optim.make_optimizer` of ``rule``: the paper's (default; v <- 0.9 v -
0.0005 lr w - lr g, w <- w + v, no weight decay on biases) or torch's SGD. Either keeps one
momentum buffer per parameter (``state_dict()["optimizer"]``, canonical keys); what it holds
depends on the rule (see :mod:`alexnet.optim`).

Why not DDP for step 2: DDP decides at forward time which backward reduces, which does
not fit GPipe (all forwards before any backward); gradient hooks on the last backward give
the same overlap in a few lines.

Besides stepping, inference and its state: ``grads()`` (this rank's gradients after the last
step, canonical keys; for verification) and ``track_memory`` (peak bytes of saved
activations per step, reported as ``activation_peak_bytes``).

Numerics (``precision``: autocast, fp16's loss scale; the fused path for a rank holding both
columns; channels_last on CUDA) are described in :class:`Engine`. A step reads nothing back
from the device: its scores stay device tensors and its timeline spans unresolved marks (CUDA
events on a GPU) until :meth:`Engine.read_steps`, which the trainer calls once per chunk.

The metrics of each step (per rank, seconds unless named otherwise; :meth:`Engine.step` or
:meth:`Engine.read_steps`): ``loss``
(mean cross-entropy of the replica's rows), ``top1`` / ``top5`` (hit counts), ``samples``
(rows), ``compute_s`` (forward + backward without the exchanges), ``exchange_s`` (column
all-gathers and their backward), ``pipeline_wait_s`` (blocked on receives from and sends to
the neighbouring stages), ``grad_sync_s`` (waiting for the replica gradient sums after the
last backward), ``optimizer_s`` (the SGD update alone) and ``step_s`` (the whole step). The
first three are NaN except on the last stage. Times are the timeline's: host time on CPU,
device time (CUDA events) on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alexnet.config import ModelConfig
from alexnet.layers import LRN_KERNEL_SETTINGS, StepContext
from alexnet.model import BlockSpec, Stage, concat_exchange, geometry, previous_block
from alexnet.optim import make_optimizer
from alexnet.scoring import Tally
from pipeline.dist import Comm, Groups
from pipeline.exchange import ColumnExchange
from pipeline.grid import Grid
from pipeline.p2p import ACT, GRAD, StageLink, step_plan
from pipeline.precision import (
    COMPILE_CHOICES,
    activation_dtype,
    autocast_dtype,
    loss_scaler,
    resolve_precision,
)
from pipeline.schedules import Action, make_schedule
from pipeline.timeline import Event, Timeline
from pipeline.timeline import totals as totals_of

log = logging.getLogger("alexnet.engine")


class _GradSync:
    """Sums gradients across replicas: an async all-reduce per parameter, launched from its
    post-accumulate hook while :attr:`armed` (during the step's last backward)."""

    def __init__(self, params: list[nn.Parameter], comm: Comm, group, timeline: Timeline) -> None:
        self.comm, self.group, self.timeline = comm, group, timeline
        self.armed, self.works = False, []
        for p in params:
            p.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, p: Tensor) -> None:
        if self.armed:
            self.works.append(self.comm.all_reduce(p.grad, self.group, async_op=True))

    def wait(self) -> None:
        with self.timeline.span("grad_sync"):
            for w in self.works:
                w.wait()
        self.armed, self.works = False, []


class _ActivationMeter:
    """Bytes of tensors saved for backward that are alive, and their peak (parameters excluded).

    A saved tensor is counted from the forward that saves it until autograd frees it (after
    its backward); views with the same data pointer and size are counted once.
    """

    class _Handle:
        __slots__ = ("meter", "key", "t")

        def __init__(self, meter, key, t):
            self.meter, self.key, self.t = meter, key, t

        def __del__(self):
            self.meter._release(self.key)

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.param_ptrs = {p.data_ptr() for p in params}
        self.live: dict[tuple[int, int], list[int]] = {}
        self.current = self.peak = 0

    def reset(self) -> None:
        self.peak = self.current

    def pack(self, t: Tensor):
        if t.data_ptr() in self.param_ptrs:
            return t
        key = (t.data_ptr(), t.numel() * t.element_size())
        entry = self.live.setdefault(key, [key[1], 0])
        if entry[1] == 0:
            self.current += key[1]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        return self._Handle(self, key, t)

    def unpack(self, h):
        return h.t if isinstance(h, self._Handle) else h

    def _release(self, key) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


LRN_KERNEL_CHOICES = LRN_KERNEL_SETTINGS
_INFER = -1  # the timeline's step number of inference spans
_CPU_GRAPHS_NOTED: list[bool] = []  # "cudagraphs" on CPU has been logged (once per process)


def compile_mode(setting: str, device: torch.device) -> str | None:
    """``torch.compile``'s ``mode`` for ``train.compile = setting`` on ``device``.

    ``"cudagraphs"`` on CUDA is ``"reduce-overhead"`` (Inductor, its graphs replayed as CUDA graph
    trees); everywhere else None, torch's default (``"cudagraphs"`` on CPU is ``"on"``: CUDA graphs
    need CUDA). One code path, the mode a parameter.
    """
    return "reduce-overhead" if setting == "cudagraphs" and device.type == "cuda" else None


@dataclass
class StepReport:
    """One step's results, read from the device after the step: its metrics (module doc) and its
    timeline events."""

    step: int
    metrics: dict[str, float]
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True)
class EngineConfig:
    """How one rank's engine runs (the job's ``[optim]`` and ``[train]`` keys it needs).

    ``precision``: :mod:`pipeline.precision` (``auto`` resolved for ``device``, an unsupported one a
    ``ValueError``); ``fused`` (None: when the rank holds both columns) runs the stage the fused
    way (:class:`alexnet.model.Stage`); ``lrn_kernel`` ``auto`` is the compiled LRN on CUDA, the
    eager one on CPU; ``compile`` (``train.compile``) ``"on"`` runs the training forward (and so
    its backward) compiled between exchange points, ``"cudagraphs"`` the same replayed as CUDA graphs
    on CUDA (:func:`compile_mode`; on CPU as ``"on"``); ``track_memory``: peak saved-activation bytes
    per step (for benchmarks). The process-wide backend flags (TF32, cuDNN, determinism) are not
    the engine's: :func:`pipeline.precision.configure_backends` sets them once per process.
    """

    device: torch.device = torch.device("cpu")
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rule: str = "paper"
    precision: str = "fp32"
    fused: bool | None = None
    lrn_kernel: str = "auto"
    compile: str = "off"
    track_memory: bool = False
    frozen: tuple[str, ...] = ()  # blocks whose parameters get no gradient (train.freeze)

    def __post_init__(self) -> None:
        if self.lrn_kernel not in LRN_KERNEL_CHOICES:
            raise ValueError(f"train.lrn_kernel={self.lrn_kernel!r}: use one of {LRN_KERNEL_CHOICES}")
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"train.compile={self.compile!r}: use one of {COMPILE_CHOICES}")


class Engine:
    """One rank's share of the training: its stage's blocks for its column(s), its schedule, SGD.

    ``groups`` comes from :func:`pipeline.dist.init_distributed` for the same grid shape;
    ``config``: :class:`EngineConfig`. On CUDA, and for a fused stage on CPU, the conv activations
    are channels_last; inference stays eager when the stage is compiled.

    :meth:`submit_step` runs a step without reading anything back from the device (its metrics
    and timings stay there); :meth:`read_steps` reads every submitted step at once. :meth:`step`
    is the two for one step.
    """

    def __init__(
        self, model_cfg: ModelConfig, grid: Grid, rank: int, groups: Groups, config: EngineConfig
    ) -> None:
        g = groups.grid
        if (g.replicas, g.stages, g.columns) != (grid.replicas, grid.stages, grid.columns):
            raise ValueError(
                f"groups were made for grid {g.shape} but the engine got {grid.shape}: "
                "call init_distributed with the same grid shape"
            )
        grid.check_model(model_cfg)
        self.cfg, self.grid, self.rank, self.groups, self.config = model_cfg, grid, rank, groups, config
        self.device = torch.device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        self.autocast_dtype = autocast_dtype(self.precision)
        self.act_dtype = activation_dtype(self.precision)  # what crosses boundaries and exchanges
        self.r, self.s, self.c = grid.coords(rank)
        self.first, self.last = self.s == 0, self.s == grid.stages - 1
        self.prev = grid.rank_of(self.r, self.s - 1, self.c) if not self.first else None
        self.next = grid.rank_of(self.r, self.s + 1, self.c) if not self.last else None
        self.columns, self.blocks = grid.columns_of(self.c), grid.stage_blocks(self.s)
        self.fused = len(self.columns) == 2 if config.fused is None else config.fused
        self.timeline = Timeline(rank, (self.r, self.s, self.c), self.device)
        self._build_stage()
        self._build_comms()
        # compiled between exchange points: which those are is known once the comms are built
        self.compile_mode = compile_mode(config.compile, self.device)
        self.cudagraphs = self.compile_mode == "reduce-overhead"
        self._run_stage = self._compiled_stage() if config.compile != "off" else self.stage.run

    def _build_stage(self) -> None:
        """The stage's modules, layout, optimizer and (``compile``) compiled forward."""
        cfg, cuda = self.config, self.device.type == "cuda"
        # channels_last on CUDA, and for the fused stage on CPU too (FusedAlexNet's layout: oneDNN's
        # grouped convolutions and max-pool run without reordering; bench/host.py measured the
        # contiguous layout's max-pool alone at ~4 ms of a ~25 ms small step)
        self.memory_format = torch.channels_last if cuda or self.fused else torch.contiguous_format
        kernel = ("compiled" if cuda else "eager") if cfg.lrn_kernel == "auto" else cfg.lrn_kernel
        if cfg.compile != "off":
            kernel = "traced"  # in the stage's graph: no separately compiled LRN inside it
        self.stage = Stage(self.cfg, self.blocks, self.columns, self.fused, kernel).to(self.device)
        # fine-tuning: frozen blocks' parameters get no gradient, so neither SGD rule (both skip a
        # parameter without one) nor the replica all-reduce (hooked on trainable ones) touches them
        for name, p in self.stage.named_parameters():
            p.requires_grad_(name.split(".", 1)[0] not in cfg.frozen)
        params = list(self.stage.parameters())
        self.scaler = loss_scaler(self.precision, self.device)
        # the scaler's step reads its inf flag on the host before the paper's rule (fp16 only)
        self.optimizer = make_optimizer(
            self.stage.named_parameters(), cfg.rule, 0.0, cfg.momentum, cfg.weight_decay
        )
        self.param_names = dict(self.stage.named_parameters())
        self.meter = _ActivationMeter(params) if cfg.track_memory else None
        self.compile = cfg.compile

    def _build_comms(self) -> None:
        """The schedule, the column exchange, gradient sync and the point-to-point plan."""
        grid, groups = self.grid, self.groups
        self.schedule = make_schedule(grid.schedule, grid.stages, grid.microbatches)
        self.actions: list[Action] = self.schedule.actions(self.s)
        self.column_exchange = (
            ColumnExchange(self.cfg, groups.comm, groups.column, self.c, self.timeline)
            if grid.columns == 2
            else None
        )
        params = [p for p in self.stage.parameters() if p.requires_grad]
        self.grad_sync = (
            _GradSync(params, groups.comm, groups.data, self.timeline) if groups.data is not None else None
        )
        # per-column shapes (without the batch) of what crosses our input and output boundaries
        self.in_shapes = (
            [geometry(self.cfg, previous_block(self.cfg, self.blocks[0]), c).out for c in self.columns]
            if not self.first
            else []
        )
        self.out_shapes = [geometry(self.cfg, self.blocks[-1], c).out for c in self.columns]
        self.link = StageLink(groups.comm, groups.pipeline, self.device, self.timeline, self.act_dtype)
        # each action's receive and send peer: the P2P layer posts receives ahead from it
        self.plan = step_plan(
            self.actions, self.prev, self.next, self.in_shapes, self.out_shapes, grid.microbatch_size
        )
        # submitted steps: (step, scores on the device, peak saved-activation bytes or None)
        self._unread: list[tuple[int, Tensor | None, int | None]] = []

    def _compiled_stage(self) -> Callable[..., list[Tensor]]:
        """``train.compile = "on"`` (or ``"cudagraphs"``, below): the stage's forward compiled between
        exchange points, so every collective and P2P transfer stays outside the compiled regions
        (Dynamo cannot trace gloo's or NCCL's calls into a graph, and a graph break inside an
        autograd Function would split it).

        Without a column exchange (C = 1: the rank holds both columns, the exchanges are
        concatenations or, fused, nothing) the whole stage is one region; with one (C = 2) each
        block is its own region, the all-gathers between them eager. The keyed dropout is a
        graph break (:func:`alexnet.layers.dropout_masks`: its keys are Python ints of the step,
        which a graph would bake in). The backward is compiled with the forward (AOTAutograd).

        ``"cudagraphs"`` on CUDA: the same regions with ``mode="reduce-overhead"``, each compiled
        graph (forward and backward) recorded once and replayed as a CUDA graph (CUDAGraph Trees,
        one memory pool for all of this rank's graphs). The rules this engine keeps for them:

        * one generation per optimizer step: :meth:`_run_step` calls
          ``torch.compiler.cudagraph_mark_step_begin()`` once, before the step's first forward,
          never per micro-batch. Within the step every forward and backward is a node of one path
          of the tree, so GPipe's M forwards before their backwards (and 1F1B's interleaving) each
          get their own outputs, kept until their backward; torch's own heuristic (a new
          generation at a compiled call once a backward has run since the last forward) may start
          one in the middle of 1F1B, at F2 after B0, while F1's backward is still pending;
        * nothing a graph wrote outlives the step, as the next generation's replays overwrite it:
          the scores and losses are eager tensors made outside the regions (the last stage's
          logits concatenation, the cross-entropy), sends are waited before the update, and the
          parameters' ``.grad`` (the backward graphs' outputs, accumulated over the step's
          micro-batches, summed across replicas and read by the update in the same step) are set
          to None by ``zero_grad(set_to_none=True)`` before the next step's first replay (a
          ``.grad`` kept across steps is what fails in pytorch#169545); :meth:`grads` copies them;
        * static addresses: parameters are updated in place by the update (eager, outside any
          graph), so their addresses never change; the regions' other inputs (a micro-batch of
          images, a received activation, the dropout masks drawn at the graph break) are copied
          into the graph's own input buffers at each replay;
        * static shapes: every micro-batch of a training step has B/(R M) rows (the grid refuses a
          batch that does not divide), so each region has one shape and one recording;
          inference (any rows, eval mode) does not enter the graphs (:meth:`infer`);
        * collectives and P2P stay outside the regions (as for ``"on"``), so no NCCL call is
          captured in a graph; the replica all-reduce runs from gradient hooks, eagerly.
        """
        mode = self.compile_mode
        if self.config.compile == "cudagraphs" and mode is None and not _CPU_GRAPHS_NOTED:
            _CPU_GRAPHS_NOTED.append(True)
            log.warning(
                "train.compile=cudagraphs on %s: CUDA graphs need CUDA; compiling as 'on'", self.device.type
            )
        if self.column_exchange is None:
            return torch.compile(self.stage.run, mode=mode)
        for blocks in self.stage.values():
            for block in blocks.values():
                block.compile(mode=mode)
        return self.stage.run

    # -- overridable pieces (the tests plant faults by overriding them) ----------------------
    def _exchange(self, spec: BlockSpec, parts: list[Tensor]) -> Tensor:
        parts = [p.to(self.act_dtype) for p in parts]  # gathered in the autocast dtype
        if self.column_exchange is None:
            return concat_exchange(spec, parts)
        return self.column_exchange(spec, parts)

    def _full_logits(self, outs: list[Tensor]) -> Tensor:
        if self.column_exchange is None:
            return torch.cat(outs, dim=1)
        return self.column_exchange.logits(outs[0])

    def _loss_scale(self) -> float:
        return 1.0 / (self.grid.global_batch * self.grid.columns)

    def _loss(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(loss to back-propagate, summed cross-entropy of the micro-batch for the metrics).

        In float32 whatever the precision (``.float()`` is the tensor itself in fp32)."""
        ce = F.cross_entropy(logits.float(), labels, reduction="sum")
        return ce * self._loss_scale(), ce.detach()

    # -- one step ----------------------------------------------------------------------------
    def _check_inputs(self, images: Tensor | None, labels: Tensor | None) -> None:
        b, size = self.grid.replica_batch, self.cfg.input_size
        want = (b, self.cfg.in_channels, size, size)
        if self.first and (images is None or tuple(images.shape) != want):
            got = None if images is None else tuple(images.shape)
            raise ValueError(f"rank {self.rank} (stage 0) needs images of shape {want} (B/R rows), got {got}")
        if self.last and (labels is None or tuple(labels.shape) != (b,)):
            got = None if labels is None else tuple(labels.shape)
            raise ValueError(f"rank {self.rank} (last stage) needs labels of shape ({b},), got {got}")

    def _sample_index(self, mb: int, rows: int) -> Tensor:
        start = self.r * self.grid.replica_batch + mb * self.grid.microbatch_size
        return torch.arange(start, start + rows, device=self.device, dtype=torch.int64)

    def _layout(self, x: Tensor) -> Tensor:
        """Conv activations in the engine's memory format (channels_last on CUDA)."""
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def _eager(self):
        """A context that runs compiled code eagerly: compiled blocks (``train.compile`` with one
        column per rank compiles the blocks themselves) in :meth:`infer`, where another batch size
        and eval mode would recompile them and, with CUDA graphs, record graphs outside a step."""
        if self.compile == "off":
            return contextlib.nullcontext()
        return torch.compiler.set_stance("force_eager")  # sets the stance now; its exit restores it

    def _autocast(self):
        if self.autocast_dtype is None:  # fp32 / tf32: a disabled autocast costs its setup per call
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self, step: int, lr: float, images: Tensor | None, labels: Tensor | None) -> dict[str, float]:
        """Run one global step on this rank (:meth:`submit_step`) and read its metrics (reading, and
        so dropping, any step submitted earlier and not read yet)."""
        self.submit_step(step, lr, images, labels)
        return self.read_steps()[-1].metrics

    def submit_step(self, step: int, lr: float, images: Tensor | None, labels: Tensor | None) -> None:
        """Run one global step on this rank: schedule, gradient sync, SGD update. See the module doc.

        Reads nothing from the device (on a GPU the host runs ahead of the kernels it launched);
        the step's metrics come from :meth:`read_steps`.
        """
        self._check_inputs(images, labels)
        tl = self.timeline
        tl.clear(step)
        try:
            with tl.span("step"):
                scores = self._run_step(step, lr, images, labels)
        except BaseException:
            tl.discard(step)
            raise
        self._unread.append((step, scores, self.meter.peak if self.meter is not None else None))

    def _run_step(self, step: int, lr: float, images: Tensor | None, labels: Tensor | None) -> Tensor | None:
        """The step's work; returns the last stage's (3,) float64 [loss sum, top-1, top-5] on the device."""
        tl, mbs = self.timeline, self.grid.microbatch_size
        self.link.start(self.plan)  # nothing left over from a step that raised
        if self.meter is not None:
            self.meter.reset()
        if not self.stage.training:  # train() walks every module: not once per step
            self.stage.train()
        self.optimizer.zero_grad(set_to_none=True)  # before any replay: see _compiled_stage
        if self.cudagraphs:  # the step is one generation of the CUDA graph trees (_compiled_stage)
            torch.compiler.cudagraph_mark_step_begin()
        imgs = self._layout(images).split(mbs) if self.first else None
        labs = labels.split(mbs) if self.last else None
        live: dict[int, tuple[list[Tensor], list[Tensor]]] = {}  # mb -> (inputs, outputs or [loss])
        tally = Tally()  # the last stage's scores of the step's micro-batches
        for i, a in enumerate(self.actions):
            tl.mb = a.mb
            if a.kind == "F":
                live[a.mb] = self._forward(step, a.mb, imgs, labs, tally)
            else:
                if self.grad_sync is not None and i == len(self.actions) - 1:
                    self.grad_sync.armed = True
                self._backward(a.mb, *live.pop(a.mb))
        tl.mb = None
        self.link.wait_sends()
        if self.grad_sync is not None:
            self.grad_sync.wait()
        with tl.span("optimizer"):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.scaler is None:
                self.optimizer.step()
            else:  # fp16: unscale, agree on inf/NaN across the world, skip or step, adapt the scale
                self.scaler.unscale_(self.optimizer)
                self.scaler.step(self.optimizer)
                self.scaler.update()
        if not self.last:
            return None
        return torch.stack([tally.loss_sum, tally.top1.double(), tally.top5.double()])

    def _forward(
        self, step: int, mb: int, imgs: Sequence[Tensor] | None, labs: Sequence[Tensor] | None, tally: Tally
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Micro-batch ``mb``'s forward: (its inputs, its outputs) or on the last stage (inputs, [loss])."""
        rows = self.grid.microbatch_size
        if self.first:
            self.link.flush()  # no receive to pair the previous action's sends with
            inputs, xs = [], [imgs[mb]]
        else:
            inputs = self.link.recv(self.in_shapes, rows, self.prev, mb, ACT)
            xs = [self._layout(x.requires_grad_()) for x in inputs]
        ctx = StepContext(seed=self.cfg.seed, step=step, sample_index=self._sample_index(mb, rows))
        hooks = (
            torch.autograd.graph.saved_tensors_hooks(self.meter.pack, self.meter.unpack)
            if self.meter is not None
            else contextlib.nullcontext()
        )
        with self.timeline.span("forward", f"F{mb}"), hooks:
            with self._autocast():
                outs = self._run_stage(xs, self._exchange, ctx)
                logits = self._full_logits(outs) if self.last else None
            if self.last:
                loss, ce = self._loss(logits, labs[mb])
                tally.add(logits.detach().float(), labs[mb], loss=False)
                tally.add_loss(ce)
                outs = [loss if self.scaler is None else self.scaler.scale(loss)]
            else:
                outs = [o.to(self.act_dtype) for o in outs]  # the boundary carries the autocast dtype
        if not self.last:
            self.link.send(outs, self.next, mb, ACT)
        return inputs, outs

    def _backward(self, mb: int, inputs: list[Tensor], outs: list[Tensor]) -> None:
        if self.last:
            self.link.flush()
        rows = self.grid.microbatch_size
        grads = None if self.last else self.link.recv(self.out_shapes, rows, self.next, mb, GRAD)
        with self.timeline.span("backward", f"B{mb}"):
            torch.autograd.backward(outs, grads)
        if not self.first:
            self.link.send([x.grad for x in inputs], self.prev, mb, GRAD)

    def read_steps(self) -> list[StepReport]:
        """The metrics and events of every step submitted since the last read, in order: one read of
        the device for all of them (the scores in one copy, the timeline's events after one wait)."""
        unread, self._unread = self._unread, []
        events = self.timeline.read()
        scored = [sc for _, sc, _ in unread if sc is not None]
        values = torch.stack(scored).tolist() if scored else []
        reports = []
        for step, sc, peak in unread:
            scores = values.pop(0) if sc is not None else [math.nan] * 3
            evs = events.get(step, [])
            reports.append(StepReport(step, self._metrics(scores, totals_of(evs), peak), evs))
        return reports

    def _metrics(self, scores: list[float], t: dict[str, float], peak: int | None) -> dict[str, float]:
        """The step's metrics (see the module docstring) from its scores, its timeline totals and its
        peak of saved activations (None: not tracked)."""
        exchange = t["exchange"]
        loss_sum, top1, top5 = scores
        out = {
            "loss": loss_sum / self.grid.replica_batch,
            "top1": top1,
            "top5": top5,
            "samples": float(self.grid.replica_batch),
            "compute_s": t["forward"] + t["backward"] - exchange,
            "exchange_s": exchange,
            "pipeline_wait_s": t["recv"] + t["send_wait"],
            "grad_sync_s": t["grad_sync"],
            "optimizer_s": t["optimizer"],
            "step_s": t["step"],
        }
        if peak is not None:
            out["activation_peak_bytes"] = float(peak)
        return out

    # -- inference ---------------------------------------------------------------------------
    def infer(self, images: Tensor | None) -> Tensor | None:
        """Forward only, eval mode (no dropout), in micro-batches of at most B/(R M) rows.

        Stage-0 ranks pass images (any number of rows, the same on both column ranks);
        returns the float32 logits (rows, num_classes) on last-stage ranks, None elsewhere. Each
        micro-batch is preceded by a small header (rows, more-to-come) so later stages need
        not know the batch size.
        """
        if self.first and images is None:
            raise ValueError(f"rank {self.rank} is on stage 0: infer() needs the images")
        was_training = self.stage.training
        self.stage.eval()
        self.link.start(None)
        logits: list[Tensor] = []
        step_before = self.timeline.step
        self.timeline.clear(_INFER)  # its spans are not a training step's: dropped at the end
        try:
            with torch.no_grad(), self._eager():
                chunks = list(self._layout(images).split(self.grid.microbatch_size)) if self.first else None
                mb, more = 0, True
                while more:
                    if self.first:
                        self.link.flush()
                        xs, more = [chunks[mb]], mb + 1 < len(chunks)
                    else:
                        xs, more = self.link.recv_headed(self.in_shapes, self.prev, mb)
                        xs = [self._layout(x) for x in xs]
                    with self._autocast():
                        outs = self.stage.run(xs, self._exchange)  # eval mode: no dropout, no context
                        if self.last:
                            logits.append(self._full_logits(outs).float())
                    if not self.last:
                        self.link.send_headed([o.to(self.act_dtype) for o in outs], self.next, mb, more)
                    mb += 1
            self.link.wait_sends()
        finally:
            self.stage.train(was_training)
            self.timeline.discard(_INFER)
            self.timeline.clear(step_before)
        return torch.cat(logits) if self.last else None

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """This rank's parameters and momentum buffers under canonical keys (copies; a buffer not yet
        made, before the first step, is zeros: both rules start from zero momentum)."""
        model = {k: p.detach().clone() for k, p in self.param_names.items()}
        optim = {}
        for k, p in self.param_names.items():
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            optim[k] = buf.detach().clone() if buf is not None else torch.zeros_like(model[k])
        return {"model": model, "optimizer": optim}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Take this rank's slice of a (full or partial) state: ``{"model": ..., "optimizer": ...}``."""
        model, optim = state["model"], state.get("optimizer") or {}
        missing = [k for k in self.param_names if k not in model]
        if missing:
            raise ValueError(
                f"state lacks this rank's parameters {missing}: is it a checkpoint of this model?"
            )
        with torch.no_grad():
            for k, p in self.param_names.items():
                if tuple(model[k].shape) != tuple(p.shape):
                    raise ValueError(
                        f"{k}: checkpoint shape {tuple(model[k].shape)} != model {tuple(p.shape)}; "
                        "the model config differs from the checkpoint's"
                    )
                p.copy_(model[k])
                if k in optim:
                    self.optimizer.state[p]["momentum_buffer"] = optim[k].detach().clone().to(p.device)

    def grads(self) -> dict[str, Tensor]:
        """This rank's gradients of the last step (after the replica sum), canonical keys."""
        return {k: p.grad.detach().clone() for k, p in self.param_names.items() if p.grad is not None}
