"""The job's typed configuration: one small dataclass per component, loaded from TOML.

A job config is built in layers (:class:`Layer`), each overriding the ones before:

1. a preset shipped in the package (``cluster/presets/{paper,demo,small}.toml``): ``--preset NAME``,
   or, when only ``--config`` files are given, :data:`BASE_PRESET` (``paper``), so a partial file
   changes the paper's recipe where it says and nowhere else;
2. TOML files (``--config FILE``, one or more, in order);
3. ``--set section.key=value`` overrides from the command line (values coerced to the field's type);
4. the CLI's own flags (``--steps``, ``--epochs``, ``--metrics-port``, ``--data``).

:func:`resolve_layers` also says which layer each value came from (``alexnet config --sources``).

Every key is checked before any actor starts: unknown sections and keys are refused (with the
valid ones listed), each section checks its own values in ``__post_init__``, and
:meth:`JobConfig.validate` builds the two objects that own the model and parallel rules,
:class:`alexnet.config.ModelConfig` and :class:`pipeline.grid.Grid`, translating the grid's
refusals to the config keys a user sets. Errors are ``ValueError`` naming the key and the fix.

Who takes what: the run's checkpoints take ``[checkpoint]``, the LR rule ``[schedule]``, the
failure policy and the fault plan ``[faults]``, the reporting callbacks plain values (batch size,
``train.log_every_steps``), the data pool a :class:`alexnet.data.reader.ReaderSpec` built from
``[data]``; the coordinator, which drives them all, the trainer group and the trainer actors,
which build an engine from ``[model]``, ``[grid]``, ``[optim]``, ``[data]`` and ``[train]``, take
the whole :class:`JobConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from alexnet.config import CROP_FRACTION, ModelConfig, check_crop, crop_size
from alexnet.data.transforms import CROPS
from alexnet.layers import LRN_KERNEL_SETTINGS as LRN_KERNELS
from alexnet.optim import OPTIM_RULES
from pipeline.grid import Grid, model_fields, parse_shape
from pipeline.precision import COMPILE_CHOICES, PRECISIONS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib

PRESETS = ("paper", "demo", "small")
# the preset a --config file alone is layered on: the paper's recipe (README: "Presets and config")
BASE_PRESET = "paper"
LR_SCHEDULES = ("plateau", "step", "constant")
DEVICES = ("auto", "cpu", "cuda")
AUTO = "auto"  # grid.shape chosen from the cluster (cluster.scaling)
LR_SCALINGS = ("none", "linear")
SWITCHES = ("auto", "on", "off")


def _need(cond: bool, key: str, value: Any, fix: str) -> None:
    """Raise the project's standard config error: the key, its bad value, and the fix."""
    if not cond:
        raise ValueError(f"{key}={value!r}: {fix}")


@dataclass(frozen=True)
class ModelSection:
    """The network: ``variant = "paper"`` (227 px, the 2012 widths) or ``"small"`` (32-64 px).

    ``input_size`` is the side of the crops the network sees; 0 (the default) takes the paper's
    fraction of the stored images' side, 227 of 256 (:func:`alexnet.config.crop_size`), resolved
    against the dataset before the run starts (:meth:`JobConfig.for_stored_size`).
    ``lrn_convention``: ``"per_size"`` (alpha / n, the network as cuda-convnet and Caffe trained
    it) or ``"paper"`` (alpha as printed); see :class:`alexnet.config.ModelConfig`.

    The paper's findings as switches (defaults the paper's; :class:`alexnet.config.ModelConfig`,
    README "The paper's findings"): ``activation`` (relu/tanh, section 3.1), ``pooling``
    (overlapping 3/2 or non_overlapping 2/2, 3.4), ``lrn`` (3.3), ``columns`` (2, or 1: the
    one-column net of 3.2, on grids with C = 1), ``remove_blocks`` (conv3 and/or conv4, section 6)
    and ``dropout`` (4.2).

    Checked by the :class:`alexnet.config.ModelConfig` it builds, whose errors name the
    ``model.*`` keys (an unset ``input_size`` is checked at the variant's default size).
    """

    variant: str = "paper"
    num_classes: int = 1000
    input_size: int = 0  # 0: CROP_FRACTION of the stored side (the shards at --data)
    dropout: float = 0.5
    lrn_convention: str = "per_size"
    seed: int = 0
    activation: str = "relu"
    pooling: str = "overlapping"
    lrn: bool = True
    columns: int = 2
    remove_blocks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _need(self.input_size >= 0, "model.input_size", self.input_size, "use > 0 px, or 0 (from the data)")
        self._model_config(self.input_size or None)  # ModelConfig's checks are the model's only ones

    def to_model_config(self) -> ModelConfig:
        """The :class:`alexnet.config.ModelConfig` this section describes (``input_size`` resolved)."""
        if not self.input_size:
            raise ValueError(
                "model.input_size=0 takes its value from the stored images: resolve it with "
                "JobConfig.for_stored_size (alexnet train and alexnet config --data do), or set it"
            )
        return self._model_config(self.input_size)

    def _model_config(self, input_size: int | None) -> ModelConfig:
        return ModelConfig.for_variant(
            self.variant,
            self.num_classes,
            input_size,
            dropout=self.dropout,
            lrn_convention=self.lrn_convention,
            seed=self.seed,
            **self.switches(),
        )

    def switches(self) -> dict[str, Any]:
        """The paper's findings this section sets, as :class:`alexnet.config.ModelConfig` fields
        (dropout, which predates them, aside)."""
        keys = ("activation", "pooling", "lrn", "columns", "remove_blocks")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class GridSection:
    """The parallel layout: ``shape = "RxSxC"`` (replicas x stages x columns) and its placement.

    ``shape = "auto"`` (the paper preset's): chosen from the cluster's resources when the run starts,
    before any actor (:func:`cluster.run.resolve_grid`, the rule in :mod:`cluster.scaling`); from
    then on the run's config holds the chosen shape. ``alexnet plan`` shows the choice beforehand.

    The layout's rules (sizes, cuts, schedule, the batch split) are :class:`pipeline.grid.Grid`'s,
    checked when :meth:`JobConfig.to_grid` builds it; this section checks what only placement
    and the process groups use.
    """

    shape: str = "1x1x2"
    microbatches: int = 1
    cuts: tuple[str, ...] = ()  # first block of stages 1..S-1; empty: the engine's default split
    schedule: str = "1f1b"  # the micro-batch order (pipeline.schedules), not the learning-rate rule
    gpus_per_rank: float = 0.0
    cpus_per_rank: float = 1.0
    backend: str = "auto"  # "auto": nccl with GPUs, gloo without
    placement_timeout_s: float = 60.0
    collective_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _need(self.gpus_per_rank >= 0, "grid.gpus_per_rank", self.gpus_per_rank, "use >= 0 (0: CPU only)")
        _need(self.cpus_per_rank > 0, "grid.cpus_per_rank", self.cpus_per_rank, "use > 0")
        _need(
            self.backend in ("auto", "gloo", "nccl"),
            "grid.backend",
            self.backend,
            'use "auto", "gloo" or "nccl"',
        )
        _need(self.placement_timeout_s > 0, "grid.placement_timeout_s", self.placement_timeout_s, "use > 0")
        _need(
            self.collective_timeout_s > 0, "grid.collective_timeout_s", self.collective_timeout_s, "use > 0"
        )

    @property
    def is_auto(self) -> bool:
        """Whether the shape is left to the cluster (``"auto"``)."""
        return self.shape.strip().lower() == AUTO

    @property
    def dims(self) -> tuple[int, int, int]:
        """(R, S, C) parsed from ``shape`` by :func:`pipeline.grid.parse_shape`."""
        if self.is_auto:
            raise ValueError(
                "grid.shape='auto' is chosen from the cluster when the run starts (alexnet plan shows the "
                "choice): resolve it first (cluster.run.resolve_grid), or give RxSxC"
            )
        try:
            return parse_shape(self.shape)
        except ValueError as e:
            raise ValueError(f"grid.shape={self.shape!r}: {e}") from None

    @property
    def world_size(self) -> int:
        """Trainer ranks: R x S x C."""
        r, s, c = self.dims
        return r * s * c


# A Grid refusal names the Grid's own fields; each of them is set by one config key.
_GRID_FIELD_KEYS = {
    "replicas": "grid.shape",
    "stages": "grid.shape",
    "columns": "grid.shape",
    "microbatches": "grid.microbatches",
    "global_batch": "optim.batch_size",
    "cuts": "grid.cuts",
    "schedule": "grid.schedule",
    "model.columns": "model.columns",
    "model.remove_blocks": "model.remove_blocks",
}


def grid_error_keys(message: str) -> list[str]:
    """The config keys behind a :class:`pipeline.grid.Grid` refusal, in the order it names them."""
    fields = re.findall(r"\b(" + "|".join(map(re.escape, _GRID_FIELD_KEYS)) + r")\b", message)
    return list(dict.fromkeys(_GRID_FIELD_KEYS[f] for f in fields)) or ["grid.shape"]


@dataclass(frozen=True)
class OptimSection:
    """The paper's SGD: batch 128, momentum 0.9, weight decay 5e-4, initial learning rate 0.01.

    ``rule`` (:mod:`alexnet.optim`): ``"paper"``, v <- 0.9 v - 0.0005 lr w - lr g, w <- w + v
    (the rate inside the momentum, as cuda-convnet), weight decay on the weights only; ``"torch"``,
    ``torch.optim.SGD`` (the rate outside the momentum, weight decay on every parameter). A run
    resumes only under the rule its checkpoint was written with.

    The batch and the rate on more GPUs (README "Scaling out"): ``batch_size`` is the global batch
    (every replica's rows summed; the paper's 128), each replica takes ``batch_size / R``, and
    ``lr`` is its rate. ``replica_batch_size`` > 0 fixes each replica's batch instead, so the global
    batch becomes R x ``replica_batch_size`` and ``batch_size`` stays the recipe's batch, the one
    ``lr`` is for. ``lr_scaling = "linear"`` then multiplies ``lr`` by (global batch / ``batch_size``),
    reached by a linear warm-up from ``lr`` over ``warmup_epochs`` epochs (Goyal et al. 2017,
    "Accurate, Large Minibatch SGD"), the rate raised at each epoch end (where the coordinator sets
    rates); ``"none"`` (the paper's recipe) keeps ``lr``. Both are off by default;
    :meth:`JobConfig.describe_batch` says how they combine.
    """

    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rule: str = "paper"
    replica_batch_size: int = 0  # 0: batch_size / replicas
    lr_scaling: str = "none"  # "linear": lr x global batch / batch_size, after a warm-up
    warmup_epochs: int = 5  # with lr_scaling = "linear": epochs from lr up to the scaled rate

    def __post_init__(self) -> None:
        _need(self.batch_size >= 1, "optim.batch_size", self.batch_size, "use >= 1")
        _need(self.lr > 0, "optim.lr", self.lr, "use > 0")
        _need(0 <= self.momentum < 1, "optim.momentum", self.momentum, "use a value in [0, 1)")
        _need(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "use >= 0")
        _need(self.rule in OPTIM_RULES, "optim.rule", self.rule, f"use one of {OPTIM_RULES}")
        _need(
            self.replica_batch_size >= 0,
            "optim.replica_batch_size",
            self.replica_batch_size,
            "use >= 1 (images per replica), or 0 (optim.batch_size split over the replicas)",
        )
        _need(
            self.lr_scaling in LR_SCALINGS, "optim.lr_scaling", self.lr_scaling, f"use one of {LR_SCALINGS}"
        )
        _need(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, "use >= 0 (0: no warm-up)")


@dataclass(frozen=True)
class ScheduleSection:
    """The learning-rate rule, applied at each epoch end (:mod:`cluster.lr_schedule`).

    The section keeps its name ``[schedule]`` for existing configs; in code it is the
    ``lr_schedule`` (``grid.schedule`` is the unrelated micro-batch order). Epochs are counted
    from 0, as the log lines count them.

    * ``plateau`` (the paper's "divide by 10 when the validation error stopped improving"):
      multiply the rate by ``factor`` when the validation top-1 error has not improved on its
      best by ``threshold`` of it (relative: 0.03 is 3 % of the error) for ``patience`` epochs,
      after at least ``min_epochs`` epochs at the rate, at most ``max_reductions`` times. The
      defaults (15, 3 %) keep a cut away from an error still falling 0.2 pp per epoch under
      the +-0.2 pp sampling noise of 50,000 validation images, and cut a flat one after 16 epochs;
    * ``step`` (torchvision's reference recipe, ``MultiStepLR``): multiply it by ``factor`` after
      each of the ``milestones`` (epoch counts: ``[30, 60]`` runs epochs 0-29 at lr, 30-59 at
      lr / 10, 60-89 at lr / 100);
    * ``constant``: never change it.
    """

    kind: str = "plateau"
    factor: float = 0.1
    patience: int = 15
    threshold: float = 0.03
    min_epochs: int = 10
    max_reductions: int = 3
    milestones: tuple[int, ...] = (30, 60)

    def __post_init__(self) -> None:
        _need(self.kind in LR_SCHEDULES, "schedule.kind", self.kind, f"use one of {LR_SCHEDULES}")
        _need(0 < self.factor < 1, "schedule.factor", self.factor, "use a value in (0, 1), e.g. 0.1")
        _need(self.patience >= 1, "schedule.patience", self.patience, "use >= 1 (epochs)")
        _need(
            0 <= self.threshold < 1,
            "schedule.threshold",
            self.threshold,
            "use a fraction of the error in [0, 1), e.g. 0.03 (3 %)",
        )
        _need(self.min_epochs >= 1, "schedule.min_epochs", self.min_epochs, "use >= 1 (epochs)")
        _need(self.max_reductions >= 0, "schedule.max_reductions", self.max_reductions, "use >= 0")
        m = list(self.milestones)
        _need(
            all(e >= 1 for e in m) and all(a < b for a, b in zip(m, m[1:], strict=False)),
            "schedule.milestones",
            m,
            "give epoch counts >= 1 in increasing order, e.g. [30, 60] (--set schedule.milestones=30,60)",
        )
        if self.kind == "plateau":
            _need(
                self.max_reductions > 0,
                "schedule.max_reductions",
                0,
                'a plateau rule with no reductions never cuts: use >= 1, or schedule.kind = "constant"',
            )
        if self.kind == "step":
            _need(
                bool(m),
                "schedule.milestones",
                m,
                "give at least one, e.g. --set schedule.milestones=30,60, or --set schedule.kind=constant",
            )

    def first_cut_epochs(self) -> int:
        """Epochs the plateau rule needs before it can cut at all: the first epoch sets the best,
        then ``patience`` without an improvement, and at least ``min_epochs`` at the rate."""
        return max(self.patience + 1, self.min_epochs)


@dataclass(frozen=True)
class TrainSection:
    """Length of the run and how the coordinator drives it.

    ``steps`` > 0 wins over ``epochs``; both count from step 0, so a resumed run stops where an
    uninterrupted one would. ``steps_per_call`` steps run per Ray call to the trainers (the
    coordinator is off the per-step path); a smaller value reacts faster to SIGTERM. ``seed`` is
    the run's seed: every random draw (the weights' initialisation and the dropout masks, the data
    order and augmentation) is keyed by it, so another seed of the same config is
    ``--set train.seed=1``; ``model.seed`` and ``data.seed`` are added to it, to vary one alone.
    """

    epochs: int = 90
    steps: int = 0
    seed: int = 0
    device: str = "auto"
    steps_per_call: int = 10
    log_every_steps: int = 10
    threads_per_rank: int = 0  # torch intra-op threads per trainer; 0: Ray's cpus_per_rank
    # numerics (pipeline.precision): "auto" is bf16 on a GPU that has it, fp32 on CPU
    precision: str = "auto"
    # deterministic kernels and pinned NCCL algorithms: a resume on the same GPUs is bit-exact
    deterministic: bool = False
    cudnn_benchmark: str = "auto"  # let cuDNN time its algorithms; auto: on CUDA, unless deterministic
    lrn_kernel: str = "auto"  # "compiled" (one kernel per direction) or "eager"; auto: compiled on CUDA
    # "on": each rank's stage compiled (torch.compile) between exchange points; the LRN inside the
    # stage's graph (train.lrn_kernel then does not apply); the first steps pay the compilation.
    # "cudagraphs": the same, replayed as CUDA graphs on CUDA (mode="reduce-overhead"); "on" on CPU
    compile: str = "off"
    # fine-tuning (`--init-from`): blocks whose weights stay as loaded (no gradient, no update), e.g.
    # ["conv1", "conv2"]; a stage that only follows frozen blocks is refused (its backward has no use)
    freeze: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _need(self.epochs >= 1, "train.epochs", self.epochs, "use >= 1")
        _need(self.steps >= 0, "train.steps", self.steps, "use >= 0 (0: run train.epochs)")
        _need(self.device in DEVICES, "train.device", self.device, f"use one of {DEVICES}")
        _need(self.steps_per_call >= 1, "train.steps_per_call", self.steps_per_call, "use >= 1")
        _need(self.log_every_steps >= 1, "train.log_every_steps", self.log_every_steps, "use >= 1")
        _need(self.threads_per_rank >= 0, "train.threads_per_rank", self.threads_per_rank, "use >= 0")
        _need(self.precision in PRECISIONS, "train.precision", self.precision, f"use one of {PRECISIONS}")
        _need(
            self.cudnn_benchmark in SWITCHES,
            "train.cudnn_benchmark",
            self.cudnn_benchmark,
            f"use one of {SWITCHES}",
        )
        _need(
            self.lrn_kernel in LRN_KERNELS, "train.lrn_kernel", self.lrn_kernel, f"use one of {LRN_KERNELS}"
        )
        _need(self.compile in COMPILE_CHOICES, "train.compile", self.compile, f"use one of {COMPILE_CHOICES}")

        from alexnet.model import BLOCK_NAMES

        bad = [b for b in self.freeze if b not in BLOCK_NAMES]
        _need(
            not bad,
            "train.freeze",
            list(self.freeze),
            f"{bad} are not blocks: use names of {list(BLOCK_NAMES)}",
        )
        _need(
            len(set(self.freeze)) < len(BLOCK_NAMES),
            "train.freeze",
            list(self.freeze),
            "every block frozen leaves nothing to train: leave at least fc8 out",
        )
        if self.deterministic:
            # combinations whose numbers depend on more than the seeds and the data
            _need(
                self.cudnn_benchmark != "on",
                "train.cudnn_benchmark",
                self.cudnn_benchmark,
                "with train.deterministic=true cuDNN must not choose its algorithms by timing them "
                "(two runs could pick different ones): use auto or off",
            )
            _need(
                self.precision != "fp16",
                "train.precision",
                self.precision,
                "fp16's dynamic loss scale is not checkpointed, so a resumed run would not be bit-exact "
                "as train.deterministic=true promises: use bf16 or fp32 (or deterministic=false)",
            )

    def benchmark_cudnn(self, cuda: bool) -> bool:
        """Whether cuDNN benchmarks its algorithms (``cudnn_benchmark``; auto: CUDA, not deterministic)."""
        if self.cudnn_benchmark == "auto":
            return cuda and not self.deterministic
        return self.cudnn_benchmark == "on"


@dataclass(frozen=True)
class DataSection:
    """The data workers. ``path`` (the shards' directory or URL) is usually given by ``--data``."""

    path: str = ""
    workers: int = 2
    # the epoch is read as this many virtual streams (batch t from stream t % streams), hosted by the
    # workers: the batches do not depend on data.workers, which may change on resume; at most this many
    # workers. 0: min(batches per epoch, 16); a run keeps the number its checkpoints record
    streams: int = 0
    # where JPEGs are decoded: "worker" (data workers ship decoded uint8 crops), "device" (they ship the
    # JPEG bytes and augmentation parameters, the stage-0 ranks decode in batches on their device:
    # nvJPEG on a GPU), "auto" (device when the ranks have GPUs, else worker); same pixels either way
    decode: str = "auto"
    prefetch: int = 4
    seed: int = 0
    shuffle_buffer: int = 1000  # records per stream's shuffle buffer (0: shard order only)
    mean: str = "image"  # subtract the training-set mean "image" (the paper) or mean "rgb" pixel
    input_scale: float = 1.0  # model input = (pixels - mean + lighting) * input_scale
    # the run fails once an epoch loses more than this fraction of its samples to unreadable or
    # truncated shards and corrupt samples (0: any loss fails the run; 1: never)
    max_skipped_fraction: float = 0.01
    # a shard member (an image) larger than this is a corrupt sample, counted and skipped, never read
    # whole: a 256 px JPEG is 20-100 KB, so the default leaves room for any --size a user builds
    max_sample_bytes: int = 4 << 20
    # the paper's training augmentation (section 4.1), each a switch: "random" 227 crops or the
    # "center" one; horizontal flips; the PCA colour lighting (alexnet.data.transforms.Augmentation)
    crop: str = "random"
    flip: bool = True
    lighting: bool = True

    def __post_init__(self) -> None:
        _need(self.crop in CROPS, "data.crop", self.crop, f"use one of {CROPS}")
        _need(self.workers >= 1, "data.workers", self.workers, "use >= 1")
        _need(
            self.max_sample_bytes >= 1024,
            "data.max_sample_bytes",
            self.max_sample_bytes,
            "use >= 1024 (bytes; default 4194304)",
        )
        _need(self.streams >= 0, "data.streams", self.streams, "use >= data.workers, or 0 (automatic)")
        _need(
            self.decode in ("auto", "worker", "device"),
            "data.decode",
            self.decode,
            'use "auto", "worker" or "device"',
        )
        _need(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer, "use >= 0")
        _need(self.mean in ("image", "rgb"), "data.mean", self.mean, 'use "image" or "rgb"')
        _need(self.input_scale > 0, "data.input_scale", self.input_scale, "use > 0 (1.0: raw pixel units)")
        _need(self.prefetch >= 1, "data.prefetch", self.prefetch, "use >= 1 (batches per worker)")
        _need(
            0 <= self.max_skipped_fraction <= 1,
            "data.max_skipped_fraction",
            self.max_skipped_fraction,
            "use a fraction of an epoch's samples in [0, 1], e.g. 0.01",
        )


@dataclass(frozen=True)
class CheckpointSection:
    """``every_steps`` (0: only at epoch ends and the run's end), ``keep`` the last K.

    ``max_failed_writes``: checkpoint writes in a row that may fail (disk full, permissions, a
    flaky store) before the run fails; 0: the first failed write fails it. The run's last
    checkpoint must always succeed.
    """

    every_steps: int = 0
    at_epoch_end: bool = True
    keep: int = 3
    background: bool = True
    stop_timeout_s: float = 120.0  # bound on the final checkpoint after SIGTERM
    max_failed_writes: int = 0

    def __post_init__(self) -> None:
        _need(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "use >= 0 (0: off)")
        _need(self.keep >= 1, "checkpoint.keep", self.keep, "use >= 1")
        _need(self.max_failed_writes >= 0, "checkpoint.max_failed_writes", self.max_failed_writes, "use >= 0")
        _need(self.stop_timeout_s > 0, "checkpoint.stop_timeout_s", self.stop_timeout_s, "use > 0")


@dataclass(frozen=True)
class MetricsSection:
    """The Prometheus endpoint: ``port`` (-1: off, 0: any free port) and bind ``addr``."""

    port: int = -1
    addr: str = "127.0.0.1"
    trace_steps: int = 3  # steps of pipeline timeline written as a Chrome trace at the end

    def __post_init__(self) -> None:
        _need(-1 <= self.port <= 65535, "metrics.port", self.port, "use -1 (off), 0 (any) or a TCP port")
        _need(bool(self.addr), "metrics.addr", self.addr, 'give a bind address, e.g. "0.0.0.0" on a cluster')
        _need(self.trace_steps >= 0, "metrics.trace_steps", self.trace_steps, "use >= 0")


@dataclass(frozen=True)
class EvalSection:
    """Validation at epoch ends (every ``every_epochs``): the center-crop pass always; the paper's
    10-crop pass, 10x its cost, when ``ten_crop`` and due: at validations whose epoch count is a
    multiple of ``ten_crop_every_epochs``, and at the run's last validation (0: only there)."""

    every_epochs: int = 1
    ten_crop: bool = True
    ten_crop_every_epochs: int = 0
    batch_size: int = 0  # 0: optim.batch_size
    max_samples: int = 0  # 0: the whole val split; else its first max_samples images

    def __post_init__(self) -> None:
        _need(self.every_epochs >= 0, "eval.every_epochs", self.every_epochs, "use >= 0 (0: off)")
        _need(
            self.ten_crop_every_epochs >= 0,
            "eval.ten_crop_every_epochs",
            self.ten_crop_every_epochs,
            "use >= 0 (0: only at the run's last validation)",
        )
        _need(self.batch_size >= 0, "eval.batch_size", self.batch_size, "use >= 0")
        _need(self.max_samples >= 0, "eval.max_samples", self.max_samples, "use >= 0 (0: all)")


@dataclass(frozen=True)
class FaultsSection:
    """Failure handling and fault injection (off by default; -1 means off).

    ``max_failures``: trainer-group restarts allowed before the run fails. Injection, for tests and
    for rehearsing a cluster: ``kill_rank``/``kill_step`` make grid rank R's actor process exit
    abruptly the first time it reaches step K; ``kill_data_worker``/``kill_data_step`` kill data
    worker W's process while the chunk reaching step K runs; ``nan_step`` feeds NaN images into
    step K (its loss is NaN: the run must stop without checkpointing over a good one);
    ``kill_in_checkpoint_step`` SIGKILLs the driver while it writes the checkpoint of step K,
    between its tensor files and its manifest (a crash mid-write: that directory is no checkpoint).
    """

    max_failures: int = 3
    kill_rank: int = -1
    kill_step: int = -1
    kill_data_worker: int = -1
    kill_data_step: int = -1
    nan_step: int = -1
    kill_in_checkpoint_step: int = -1

    def __post_init__(self) -> None:
        _need(self.max_failures >= 0, "faults.max_failures", self.max_failures, "use >= 0")
        keys = ("kill_rank", "kill_step", "kill_data_worker", "kill_data_step", "nan_step")
        for key in (*keys, "kill_in_checkpoint_step"):
            _need(getattr(self, key) >= -1, f"faults.{key}", getattr(self, key), "use -1 (off) or >= 0")


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "grid": GridSection,
    "optim": OptimSection,
    "schedule": ScheduleSection,
    "train": TrainSection,
    "data": DataSection,
    "checkpoint": CheckpointSection,
    "metrics": MetricsSection,
    "eval": EvalSection,
    "faults": FaultsSection,
}


@dataclass(frozen=True)
class JobConfig:
    """The whole job: one section per component. Build with :func:`load_config`."""

    model: ModelSection = field(default_factory=ModelSection)
    grid: GridSection = field(default_factory=GridSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    eval: EvalSection = field(default_factory=EvalSection)
    faults: FaultsSection = field(default_factory=FaultsSection)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks that span sections (each section checked its own values already); builds the one
        Grid of this config, which :meth:`to_grid` returns from then on."""
        self._check_batch_scaling()
        grid = self._build_grid()
        # not a field: neither compared nor written out; None until an auto shape is resolved
        object.__setattr__(self, "_grid", None if self.grid.is_auto else grid)
        # 1F1B with fewer micro-batches than stages runs in GPipe's order (pipeline/schedules.py):
        # no refusal; tests/pipeline/test_equivalence.py and test_nccl_rules.py cover M < S
        if self.faults.kill_rank >= 0 and not self.grid.is_auto:
            _need(
                self.faults.kill_rank < grid.world_size,
                "faults.kill_rank",
                self.faults.kill_rank,
                f"grid {self.grid.shape} has ranks 0..{grid.world_size - 1}",
            )
        if self.faults.kill_data_worker >= 0:
            _need(
                self.faults.kill_data_worker < self.data.workers,
                "faults.kill_data_worker",
                self.faults.kill_data_worker,
                f"data.workers={self.data.workers}: use 0..{self.data.workers - 1}",
            )
        if self.train.device == "cuda":
            _need(self.grid.gpus_per_rank > 0, "grid.gpus_per_rank", 0, 'train.device="cuda" needs > 0')
        self._check_gpus_per_rank()
        self._check_freeze(grid)

    def _check_batch_scaling(self) -> None:
        """A per-replica batch splits into the micro-batches; a step rule's cut is not inside the warm-up."""
        o, g = self.optim, self.grid
        if o.replica_batch_size:
            _need(
                o.replica_batch_size % g.microbatches == 0,
                "optim.replica_batch_size",
                o.replica_batch_size,
                f"does not split into grid.microbatches={g.microbatches}: use a multiple of it",
            )
        warm = self.warmup_epochs()
        if warm and self.schedule.kind == "step":
            _need(
                self.schedule.milestones[0] > warm,
                "schedule.milestones",
                list(self.schedule.milestones),
                f"the first cut falls inside the optim.warmup_epochs={warm} warm-up: put the milestones "
                "after it, or shorten the warm-up",
            )

    @property
    def global_batch(self) -> int:
        """Images per step over all replicas: ``optim.batch_size``, or R x ``optim.replica_batch_size``."""
        o = self.optim
        return o.replica_batch_size * self.grid.dims[0] if o.replica_batch_size else o.batch_size

    def lr_factor(self) -> float:
        """What ``optim.lr_scaling`` multiplies ``optim.lr`` by: global batch / ``optim.batch_size``
        (linear), or 1."""
        return self.global_batch / self.optim.batch_size if self.optim.lr_scaling == "linear" else 1.0

    def warmup_epochs(self) -> int:
        """Epochs of the linear warm-up: ``optim.warmup_epochs`` when the scaled rate differs from
        ``optim.lr``, else 0 (an auto grid's factor is not known yet: the key's value)."""
        o = self.optim
        if o.lr_scaling != "linear" or not o.replica_batch_size:
            return 0
        return o.warmup_epochs if self.grid.is_auto or self.lr_factor() != 1.0 else 0

    def describe_batch(self) -> str:
        """How the batch and the rate combine, in words: the run's first line and ``alexnet config``."""
        o, g = self.optim, self.grid
        if g.is_auto:
            split = (
                f"{o.replica_batch_size} images per replica (optim.replica_batch_size) x the replicas"
                if o.replica_batch_size
                else f"global batch {o.batch_size} (optim.batch_size) split over the replicas"
            )
            rate = (
                f"lr {o.lr:g} x (global batch / {o.batch_size}) after a {o.warmup_epochs}-epoch "
                "linear warm-up"
                if o.lr_scaling == "linear" and o.replica_batch_size
                else f"lr {o.lr:g}"
            )
            when = "grid.shape='auto' (chosen when the run starts)"
            return f"{split} of {when}; {rate} (optim.lr_scaling={o.lr_scaling!r})"
        r = g.dims[0]
        per = o.replica_batch_size or o.batch_size // r
        source = (
            "optim.replica_batch_size" if o.replica_batch_size else f"optim.batch_size={o.batch_size} / {r}"
        )
        text = f"global batch {self.global_batch} = {r} replica(s) x {per} ({source})"
        factor = self.lr_factor()
        if o.lr_scaling == "linear" and factor != 1.0:
            scaled = f"{self.global_batch}/{o.batch_size} = {o.lr * factor:g}"
            rate = f"lr {o.lr:g} x {scaled} (optim.lr_scaling='linear')"
            warm = self.warmup_epochs()
            rate += (
                f", reached by a linear warm-up from {o.lr:g} over {warm} epochs" if warm else ", no warm-up"
            )
        else:
            rate = f"lr {o.lr:g} (optim.lr_scaling={o.lr_scaling!r}"
            if self.global_batch != o.batch_size:
                rate += (
                    f": unscaled at {self.global_batch / o.batch_size:g}x the recipe's batch {o.batch_size}"
                )
            rate += ")"
        return f"{text}; {rate}"

    def _check_freeze(self, grid: Grid) -> None:
        """A stage whose blocks and every block before it are frozen has nothing to backpropagate
        into (its output needs no gradient): refused, naming the stage."""
        frozen = set(self.train.freeze)
        done: list[str] = []
        for s in range(grid.stages):
            done += list(grid.stage_blocks(s))
            _need(
                not set(done) <= frozen,
                "train.freeze",
                list(self.train.freeze),
                f"stage {s} ({', '.join(grid.stage_blocks(s))}) and every block before it are frozen, so it "
                "has nothing to train: freeze fewer blocks, or cut the grid after them (grid.cuts, or fewer "
                "stages)",
            )

    def uses_nccl(self) -> bool:
        """Whether the ranks talk over NCCL: ``grid.backend`` nccl, or auto with GPUs for the ranks."""
        g = self.grid
        return g.backend == "nccl" or (
            g.backend == "auto" and g.gpus_per_rank > 0 and self.train.device != "cpu"
        )

    def decode_on_device(self) -> bool:
        """Whether the stage-0 ranks decode the JPEGs (``data.decode``; "auto": when they have GPUs)."""
        if self.data.decode == "auto":
            return self.grid.gpus_per_rank > 0 and self.train.device != "cpu"
        return self.data.decode == "device"

    def _check_gpus_per_rank(self) -> None:
        """One GPU per rank: a rank drives exactly one device, and NCCL refuses two ranks on one GPU."""
        g = self.grid
        _need(
            g.gpus_per_rank <= 1,
            "grid.gpus_per_rank",
            g.gpus_per_rank,
            "a rank uses one GPU, the others would sit idle: use 1 and more ranks (grid.shape) for more GPUs",
        )
        if self.uses_nccl():
            _need(
                g.gpus_per_rank == 1,
                "grid.gpus_per_rank",
                g.gpus_per_rank,
                "NCCL needs one whole GPU per rank (two ranks on one GPU cannot share a communicator): "
                'use 1, or grid.backend="gloo" with train.device="cpu" to run without GPUs',
            )

    def warnings(self) -> list[str]:
        """What this config asks for that is allowed but probably not what was meant: a plateau rule
        that cannot act in this run (no validation to watch, or a run, counted in epochs, that ends
        before its patience could). Such a run keeps ``optim.lr`` throughout, a normal thing for a
        short run; ``alexnet train`` and ``alexnet config`` print each as a warning. A step rule's
        milestones past the run's end say nothing, as torchvision's recipe allows them. And the batch:
        a linear rate scaling with nothing to scale, a per-replica batch too small for a GPU."""
        return self._plateau_warnings() + self._batch_warnings()

    def _batch_warnings(self) -> list[str]:
        from cluster.scaling import GPU_BUSY_BATCH, small_batch_warning

        o, out = self.optim, []
        if o.lr_scaling == "linear" and not o.replica_batch_size:
            out.append(
                "optim.lr_scaling='linear' multiplies optim.lr by the global batch over optim.batch_size, "
                "which stays 1 while optim.replica_batch_size=0 (the global batch is optim.batch_size): set "
                "optim.replica_batch_size to grow the batch with the replicas"
            )
        if not self.grid.is_auto and self.grid.gpus_per_rank > 0 and self.train.device != "cpu":
            r, per = self.grid.dims[0], self.global_batch // self.grid.dims[0]
            if per < GPU_BUSY_BATCH:
                out.append(small_batch_warning(per, r, self.global_batch))
        return out

    def _plateau_warnings(self) -> list[str]:
        s, lr = self.schedule, f"the rate stays optim.lr={self.optim.lr!r} throughout"
        if s.kind != "plateau":
            return []
        if self.eval.every_epochs == 0:
            return [
                "schedule.kind='plateau' cuts on the validation error, which eval.every_epochs=0 never "
                f"measures: {lr} (--set schedule.kind=constant says so; --set eval.every_epochs=1 "
                "validates)"
            ]
        need, epochs = s.first_cut_epochs(), self.train.epochs
        if self.train.steps or need < epochs:
            return []
        key, value = "schedule.patience", s.patience
        if s.min_epochs > s.patience + 1:
            key, value = "schedule.min_epochs", s.min_epochs
        return [
            f"schedule.kind='plateau' with {key}={value!r} needs more than {need} epochs to cut the rate "
            f"and train.epochs={epochs} ends the run first: {lr} (--set schedule.kind=constant says so; "
            f"lower {key} for a cut in this run)"
        ]

    def to_grid(self) -> Grid:
        """The engine's :class:`pipeline.grid.Grid` of ``[grid]``, the global batch and the
        model's blocks, built once when this config was checked (an auto shape: once resolved)."""
        if self._grid is None:
            self.grid.dims  # noqa: B018  the error saying how to resolve grid.shape='auto'
        return self._grid

    def _build_grid(self) -> Grid:
        """The Grid owns the layout's rules; its refusals come back naming the config keys to change.
        An auto shape is checked as one replica of one stage (what it may choose is checked again
        when it is resolved)."""
        g = self.grid
        # the model's blocks and columns (input_size plays no part in them)
        model = self.model._model_config(self.model.input_size or None)
        if g.is_auto:
            _need(
                not g.cuts,
                "grid.cuts",
                list(g.cuts),
                "grid.shape='auto' chooses the stages itself: leave grid.cuts empty, or give an explicit "
                "shape",
            )
        r, s, c = (1, 1, model.columns) if g.is_auto else g.dims
        try:
            cuts = tuple(g.cuts) or None
            b = self.optim.replica_batch_size * r if self.optim.replica_batch_size else self.optim.batch_size
            return Grid(r, s, c, g.microbatches, b, cuts, g.schedule, **model_fields(model))
        except ValueError as e:
            values = {
                "model.columns": self.model.columns,
                "model.remove_blocks": list(self.model.remove_blocks),
                "grid.shape": g.shape,
                "grid.microbatches": g.microbatches,
                "grid.cuts": list(g.cuts),
                "grid.schedule": g.schedule,
                "optim.batch_size": self.optim.batch_size,
            }
            named = ", ".join(f"{k}={values[k]!r}" for k in grid_error_keys(str(e)))
            raise ValueError(f"{named}: {e}") from None

    def model_config(self) -> ModelConfig:
        """The :class:`alexnet.config.ModelConfig` of ``[model]`` (``input_size`` resolved), its
        seed ``model.seed + train.seed``."""
        return dataclasses.replace(self.model.to_model_config(), seed=self.model.seed + self.train.seed)

    @property
    def data_seed(self) -> int:
        """The data order's and augmentation's seed: ``data.seed + train.seed``."""
        return self.data.seed + self.train.seed

    def for_stored_size(self, stored: int, where: str = "the shards") -> JobConfig:
        """This config for images stored ``stored`` px square (the dataset's ``size``).

        ``model.input_size`` 0 becomes the paper's fraction of it (:func:`alexnet.config.crop_size`);
        a set one is kept, but refused if it is larger than the stored side or crops less than half
        of it. Errors name ``where`` (the shards) and the fix."""
        from alexnet.data.index import check_input_size  # the reader's own check: crop <= stored

        size = self.model.input_size or crop_size(stored)
        try:
            check_input_size(size, stored)
            check_crop(size, stored)
            resolved = self.replace(**{"model.input_size": size})
        except ValueError as e:
            origin = "" if self.model.input_size else f" ({CROP_FRACTION:.3f} of the {stored} px images)"
            raise ValueError(f"{where}{origin}: {e}") from None
        return resolved

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain JSON-able dict (tuples as lists); :func:`from_dict` inverts it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **overrides: Any) -> JobConfig:
        """A copy with ``{"section.key": value}`` overrides applied (values coerced, validated)."""
        return from_dict(self.to_dict(), overrides)

    def for_data(self, data_url: str) -> JobConfig:
        """This config for the shards at ``data_url``: ``data.path`` set to it and
        ``model.input_size`` resolved against their stored size (:meth:`for_stored_size`)."""
        from alexnet.data.index import DatasetIndex  # reads dataset.json; refuses a missing one

        index = DatasetIndex.load(data_url)
        return self.replace(**{"data.path": data_url}).for_stored_size(index.size, data_url)

    def to_toml(self, sources: dict[str, str] | None = None) -> str:
        """Every section and key with its value, as TOML that :func:`load_config` reads back to this
        config (``alexnet config`` prints it; ``alexnet train`` writes it as ``RUN/config.toml``);
        with ``sources`` (``{"section.key": origin}``), each line ends in a comment naming its origin."""
        return _toml(self.to_dict(), sources or {})


def check_resume_variant(saved: JobConfig, cfg: JobConfig, url: str) -> None:
    """Refuse to continue the checkpoint at ``url`` (its manifest's config ``saved``) as another
    variant: another [model] section, or other augmentation switches (``data.crop``, ``data.flip``,
    ``data.lighting``), since an exact resume draws what the run drew."""
    was, now = saved.to_dict(), cfg.to_dict()
    for section, keys in (("model", list(now["model"])), ("data", ["crop", "flip", "lighting"])):
        diff = [k for k in keys if was[section][k] != now[section][k]]
        if diff:
            saved_as = ", ".join(f"{section}.{k}={was[section][k]!r}" for k in diff)
            has = ", ".join(f"{now[section][k]!r}" for k in diff)
            fix = " ".join(f"--set {section}.{k}={_toml_value(was[section][k])}" for k in diff)
            raise ValueError(
                f"{url}: saved with {saved_as}, this run has {has}; a checkpoint resumes only as the "
                f"variant it trained: resume with the same [{section}] section ({fix}), or start a new "
                "--run-dir"
            )


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)  # repr of a float is TOML: 0.0005, 1e-05, inf
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string (same escapes, \uXXXX)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise AssertionError(f"no TOML form for config value {v!r}")


def _toml(tree: dict[str, dict[str, Any]], comments: dict[str, str]) -> str:
    """Two-level TOML of ``{section: {key: scalar or list}}``, the whole job config's shape.

    Written here rather than with a writer package: tomllib only reads, and a config is one table
    per section holding strings, numbers, booleans and flat lists, a dozen lines to write (and
    tested to read back equal)."""
    out = []
    for name, values in tree.items():
        out.append(f"[{name}]")
        for k, v in values.items():
            note = comments.get(f"{name}.{k}")
            out.append(f"{k} = {_toml_value(v)}" + (f"  # {note}" if note else ""))
        out.append("")
    return "\n".join(out)


# number types of config fields: how a message names them, and the TOML values each accepts
_NUMBERS: dict[type, tuple[str, tuple[type, ...]]] = {
    int: ("an integer", (int,)),
    float: ("a number", (int, float)),
}


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Convert a TOML value or a ``--set`` string to the field's declared type."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, str):  # "30,60", or TOML's "[30, 60]" written on the command line
            text = value.strip()
            text = text[1:-1] if text.startswith("[") and text.endswith("]") else text
            value = [v.strip().strip("'\"") for v in text.split(",") if v.strip()]
        example = '["conv3"] or conv3,fc6' if item is str else "[30, 60] or 30,60"
        _need(isinstance(value, list | tuple), key, value, f"give a list, e.g. {example}")
        return tuple(_coerce(key, item, v) for v in value)
    if hint is bool:
        if isinstance(value, str):
            low = value.strip().lower()
            _need(low in ("true", "false", "1", "0", "yes", "no"), key, value, "use true or false")
            return low in ("true", "1", "yes")
        _need(isinstance(value, bool), key, value, "use true or false")
        return value
    if hint in _NUMBERS:
        what, accepted = _NUMBERS[hint]
        if isinstance(value, str):
            try:
                return hint(value.strip())
            except ValueError:
                raise ValueError(f"{key}={value!r}: give {what}") from None
        _need(isinstance(value, accepted) and not isinstance(value, bool), key, value, f"give {what}")
        return hint(value)
    if hint is str:
        _need(isinstance(value, str), key, value, "give a string")
        return value
    raise AssertionError(f"unsupported config type {hint} for {key}")


def _section(name: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for k in values:
        if k not in known:
            raise ValueError(f"unknown key {name}.{k}: the [{name}] section has {', '.join(known)}")
    return cls(**{k: _coerce(f"{name}.{k}", hints[k], v) for k, v in values.items()})


def _set_path(tree: dict[str, dict[str, Any]], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"override {key!r}: write section.key=value, e.g. optim.lr=0.02")
    if parts[0] not in SECTIONS:
        raise ValueError(f"unknown section {parts[0]!r} in {key!r}: use one of {', '.join(SECTIONS)}")
    tree.setdefault(parts[0], {})[parts[1]] = value


def _flatten(tree: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``{section: {key: value}}`` -> ``{"section.key": value}``; unknown sections refused (naming
    ``where``, the file, when given)."""
    at = f"{where}: " if where else ""
    out = {}
    for name, values in tree.items():
        if name not in SECTIONS:
            raise ValueError(f"{at}unknown section [{name}]: use one of {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ValueError(f"{at}[{name}] must be a table of keys, got {values!r}")
        out.update({f"{name}.{k}": v for k, v in values.items()})
    return out


def from_dict(tree: dict[str, Any], overrides: dict[str, Any] | None = None) -> JobConfig:
    """A validated :class:`JobConfig` from nested ``{section: {key: value}}`` plus dotted overrides;
    keys neither gives take the dataclasses' defaults."""
    merged: dict[str, dict[str, Any]] = {}
    for key, value in {**_flatten(tree), **(overrides or {})}.items():
        _set_path(merged, key, value)
    return JobConfig(**{name: _section(name, values) for name, values in merged.items()})


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """``["optim.lr=0.02", ...]`` -> ``{"optim.lr": "0.02"}`` (coerced later against the field type)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: write --set section.key=value, e.g. --set optim.lr=0.02")
        out[key.strip()] = value
    return out


def preset_text(name: str) -> str:
    """The TOML text of a shipped preset."""
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: use one of {', '.join(PRESETS)}, or --config FILE.toml")
    return resources.files("cluster").joinpath("presets", f"{name}.toml").read_text()


@dataclass(frozen=True)
class Layer:
    """One layer of a job config: where its values came from (``preset small``, ``--config a.toml``,
    ``--set``) and the values, ``{"section.key": value}`` (TOML values, or strings to coerce)."""

    origin: str
    values: dict[str, Any]


def _toml_layer(text: str, where: str, origin: str) -> Layer:
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: not valid TOML ({e})") from None
    return Layer(origin, _flatten(tree, where))


def preset_layer(name: str) -> Layer:
    """The layer of a shipped preset (``--preset NAME``)."""
    return _toml_layer(preset_text(name), f"preset {name}", f"preset {name}")


def file_layer(path: str | Path) -> Layer:
    """The layer of a TOML file (``--config FILE``)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None
    return _toml_layer(text, str(path), f"--config {path}")


def config_layers(preset: str | None, paths: str | Path | list | tuple | None = None) -> list[Layer]:
    """The preset's layer (``--preset``; :data:`BASE_PRESET` when only files are given), then each
    file's (``--config``, in order). At least one of the two is needed."""
    paths = [] if paths is None else [paths] if isinstance(paths, str | Path) else list(paths)
    if preset is None and not paths:
        raise ValueError(
            f"give --preset NAME ({', '.join(PRESETS)}) and/or --config FILE.toml (a file alone "
            f"starts from --preset {BASE_PRESET})"
        )
    base = preset_layer(preset or BASE_PRESET)
    if preset is None:  # say in --sources that the file's missing keys are the base preset's
        base = Layer(f"preset {BASE_PRESET} (the base of --config)", base.values)
    return [base, *(file_layer(p) for p in paths)]


DEFAULT_ORIGIN = "default (cluster/config.py)"


def resolve_layers(layers: list[Layer]) -> tuple[JobConfig, dict[str, str]]:
    """The validated config of ``layers`` (each overriding the ones before) and, for every key
    (``"section.key"``), the origin of its value (:data:`DEFAULT_ORIGIN`: no layer set it)."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for layer in layers:
        values.update(layer.values)
        origin.update(dict.fromkeys(layer.values, layer.origin))
    cfg = from_dict({}, values)
    keys = [f"{s}.{k}" for s, vals in cfg.to_dict().items() for k in vals]
    return cfg, {k: origin.get(k, DEFAULT_ORIGIN) for k in keys}


def load_config(
    preset: str | None = None,
    path: str | Path | list | tuple | None = None,
    overrides: dict[str, Any] | None = None,
) -> JobConfig:
    """The config of a preset and/or TOML files (``path``: one or a list), then dotted overrides,
    layered as the module docstring says (a file alone on :data:`BASE_PRESET`); validated."""
    layers = config_layers(preset, path) + [Layer("--set", dict(overrides or {}))]
    return resolve_layers(layers)[0]
