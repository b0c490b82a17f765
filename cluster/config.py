"""The job's typed configuration: one small dataclass per component, loaded from TOML.

A job config is built in three layers, later ones winning:

1. a preset shipped in the package (``cluster/presets/{paper,demo,small}.toml``) or a TOML file;
2. ``--set section.key=value`` overrides from the command line (values coerced to the field's type);
3. the CLI's own flags (``--steps``, ``--epochs``, ``--metrics-port``), applied as overrides.

Every key is checked: unknown sections and keys are refused (with the valid ones listed), and
every value is validated in its section's ``__post_init__`` plus the cross-section checks in
:meth:`JobConfig.validate`, all before any actor starts. Errors are ``ValueError`` naming the
key and the fix.

Each component receives only its own section (``cfg.checkpoint`` goes to the checkpoint
manager, ``cfg.data`` to the data workers, ...), as torchtitan does after removing its
monolithic config.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from alexnet.config import LRN_CONVENTIONS, ModelConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib

PRESETS = ("paper", "demo", "small")
SCHEDULES = ("1f1b", "gpipe")
LR_SCHEDULES = ("plateau", "constant")
DEVICES = ("auto", "cpu", "cuda")


def _need(cond: bool, key: str, value: Any, fix: str) -> None:
    """Raise the project's standard config error: the key, its bad value, and the fix."""
    if not cond:
        raise ValueError(f"{key}={value!r}: {fix}")


@dataclass(frozen=True)
class ModelSection:
    """The network: ``variant = "paper"`` (227 px, the 2012 widths) or ``"small"`` (32-64 px)."""

    variant: str = "paper"
    num_classes: int = 1000
    input_size: int = 227
    dropout: float = 0.5
    lrn_convention: str = "paper"
    seed: int = 0

    def __post_init__(self) -> None:
        _need(self.variant in ("paper", "small"), "model.variant", self.variant, 'use "paper" or "small"')
        _need(self.num_classes >= 2, "model.num_classes", self.num_classes, "need at least 2 classes")
        _need(
            self.lrn_convention in LRN_CONVENTIONS,
            "model.lrn_convention",
            self.lrn_convention,
            f"use one of {LRN_CONVENTIONS}",
        )
        _need(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "use a value in [0, 1)")
        if self.variant == "small":
            _need(self.input_size >= 32, "model.input_size", self.input_size, "the small variant needs >= 32")
        self.to_model_config()  # ModelConfig's own checks (e.g. input too small for the paper net)

    def to_model_config(self) -> ModelConfig:
        """The :class:`alexnet.config.ModelConfig` this section describes."""
        common = dict(dropout=self.dropout, lrn_convention=self.lrn_convention, seed=self.seed)
        if self.variant == "small":
            return ModelConfig.small(num_classes=self.num_classes, input_size=self.input_size, **common)
        return ModelConfig(num_classes=self.num_classes, input_size=self.input_size, **common)


@dataclass(frozen=True)
class GridSection:
    """The parallel layout: ``shape = "RxSxC"`` (replicas x stages x columns) and its placement."""

    shape: str = "1x1x2"
    microbatches: int = 1
    cuts: tuple[str, ...] = ()  # first block of stages 1..S-1; empty: the engine's default split
    schedule: str = "1f1b"
    gpus_per_rank: float = 0.0
    cpus_per_rank: float = 1.0
    backend: str = "auto"  # "auto": nccl with GPUs, gloo without
    placement_timeout_s: float = 60.0
    collective_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _need(len(self.dims) == 3, "grid.shape", self.shape, 'write "RxSxC", e.g. "1x2x2"')
        r, s, c = self.dims
        _need(r >= 1 and s >= 1, "grid.shape", self.shape, "replicas and stages must be >= 1")
        _need(c in (1, 2), "grid.shape", self.shape, "columns (the last number) must be 1 or 2")
        _need(s <= 8, "grid.shape", self.shape, "the network has 8 blocks: use at most 8 stages")
        _need(self.microbatches >= 1, "grid.microbatches", self.microbatches, "use >= 1")
        _need(self.schedule in SCHEDULES, "grid.schedule", self.schedule, f"use one of {SCHEDULES}")
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
        _need(
            not self.cuts or len(self.cuts) == s - 1,
            "grid.cuts",
            list(self.cuts),
            f"give {s - 1} block names (the first block of stages 1..{s - 1}) or none",
        )

    @property
    def dims(self) -> tuple[int, ...]:
        """(R, S, C) parsed from ``shape`` (empty tuple when unparsable)."""
        try:
            return tuple(int(x) for x in self.shape.lower().split("x"))
        except ValueError:
            return ()

    @property
    def world_size(self) -> int:
        r, s, c = self.dims
        return r * s * c

    def to_grid(self, global_batch: int):
        """The engine's :class:`pipeline.grid.Grid` for this layout (the engine validates it too)."""
        from pipeline.grid import Grid

        r, s, c = self.dims
        return Grid(
            replicas=r,
            stages=s,
            columns=c,
            microbatches=self.microbatches,
            global_batch=global_batch,
            cuts=tuple(self.cuts) or None,
            schedule=self.schedule,
        )


@dataclass(frozen=True)
class OptimSection:
    """The paper's SGD: batch 128, momentum 0.9, weight decay 5e-4, initial learning rate 0.01."""

    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        _need(self.batch_size >= 1, "optim.batch_size", self.batch_size, "use >= 1")
        _need(self.lr > 0, "optim.lr", self.lr, "use > 0")
        _need(0 <= self.momentum < 1, "optim.momentum", self.momentum, "use a value in [0, 1)")
        _need(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "use >= 0")


@dataclass(frozen=True)
class ScheduleSection:
    """Learning-rate schedule, applied at each epoch end after validation.

    ``plateau`` (the paper): divide the rate by ``1 / factor`` when the validation top-1 error has
    not improved by ``threshold`` for ``patience`` epochs, at most ``max_reductions`` times.
    """

    kind: str = "plateau"
    factor: float = 0.1
    patience: int = 1
    threshold: float = 1e-3
    max_reductions: int = 3

    def __post_init__(self) -> None:
        _need(self.kind in LR_SCHEDULES, "schedule.kind", self.kind, f"use one of {LR_SCHEDULES}")
        _need(0 < self.factor < 1, "schedule.factor", self.factor, "use a value in (0, 1), e.g. 0.1")
        _need(self.patience >= 1, "schedule.patience", self.patience, "use >= 1 (epochs)")
        _need(self.threshold >= 0, "schedule.threshold", self.threshold, "use >= 0")
        _need(self.max_reductions >= 0, "schedule.max_reductions", self.max_reductions, "use >= 0")


@dataclass(frozen=True)
class TrainSection:
    """Length of the run and how the coordinator drives it.

    ``steps`` > 0 wins over ``epochs``; both count from step 0, so a resumed run stops where an
    uninterrupted one would. ``steps_per_call`` steps run per Ray call to the trainers (the
    coordinator is off the per-step path); a smaller value reacts faster to SIGTERM.
    """

    epochs: int = 90
    steps: int = 0
    seed: int = 0
    device: str = "auto"
    steps_per_call: int = 10
    log_every_steps: int = 10
    threads_per_rank: int = 0  # torch intra-op threads per trainer; 0: Ray's cpus_per_rank
    # debug (off by default): stage-0 trainers return the sample keys they consumed with each
    # step's results (Coordinator.history.keys), so tests can check an epoch saw every sample once
    record_keys: bool = False

    def __post_init__(self) -> None:
        _need(self.epochs >= 1, "train.epochs", self.epochs, "use >= 1")
        _need(self.steps >= 0, "train.steps", self.steps, "use >= 0 (0: run train.epochs)")
        _need(self.device in DEVICES, "train.device", self.device, f"use one of {DEVICES}")
        _need(self.steps_per_call >= 1, "train.steps_per_call", self.steps_per_call, "use >= 1")
        _need(self.log_every_steps >= 1, "train.log_every_steps", self.log_every_steps, "use >= 1")
        _need(self.threads_per_rank >= 0, "train.threads_per_rank", self.threads_per_rank, "use >= 0")


@dataclass(frozen=True)
class DataSection:
    """The data workers. ``path`` (the shards' directory or URL) is usually given by ``--data``."""

    path: str = ""
    workers: int = 2
    prefetch: int = 4
    seed: int = 0
    shuffle_buffer: int = 1000  # records per worker's shuffle buffer (0: shard order only)
    mean: str = "image"  # subtract the training-set mean "image" (the paper) or mean "rgb" pixel
    input_scale: float = 1.0  # model input = (pixels - mean + lighting) * input_scale

    def __post_init__(self) -> None:
        _need(self.workers >= 1, "data.workers", self.workers, "use >= 1")
        _need(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer, "use >= 0")
        _need(self.mean in ("image", "rgb"), "data.mean", self.mean, 'use "image" or "rgb"')
        _need(self.input_scale > 0, "data.input_scale", self.input_scale, "use > 0 (1.0: raw pixel units)")
        _need(self.prefetch >= 1, "data.prefetch", self.prefetch, "use >= 1 (batches per worker)")


@dataclass(frozen=True)
class CheckpointSection:
    """``every_steps`` (0: only at epoch ends and the run's end), ``keep`` the last K."""

    every_steps: int = 0
    at_epoch_end: bool = True
    keep: int = 3
    background: bool = True
    stop_timeout_s: float = 120.0  # bound on the final checkpoint after SIGTERM

    def __post_init__(self) -> None:
        _need(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "use >= 0 (0: off)")
        _need(self.keep >= 1, "checkpoint.keep", self.keep, "use >= 1")
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
    """Validation at epoch ends: center crop always, the paper's 10-crop when ``ten_crop``."""

    every_epochs: int = 1
    ten_crop: bool = True
    batch_size: int = 0  # 0: optim.batch_size
    max_samples: int = 0  # 0: the whole val split

    def __post_init__(self) -> None:
        _need(self.every_epochs >= 0, "eval.every_epochs", self.every_epochs, "use >= 0 (0: off)")
        _need(self.batch_size >= 0, "eval.batch_size", self.batch_size, "use >= 0")
        _need(self.max_samples >= 0, "eval.max_samples", self.max_samples, "use >= 0 (0: all)")


@dataclass(frozen=True)
class FaultsSection:
    """Failure handling and fault injection (off by default; -1 means off).

    ``max_failures``: trainer-group restarts allowed before the run fails. Injection, for tests and
    for rehearsing a cluster: ``kill_rank``/``kill_step`` make grid rank R's actor process exit
    abruptly the first time it reaches step K; ``kill_data_worker``/``kill_data_step`` kill data
    worker W's process while the chunk reaching step K runs; ``nan_step`` feeds NaN images into
    step K (its loss is NaN: the run must stop without checkpointing over a good one).
    """

    max_failures: int = 3
    kill_rank: int = -1
    kill_step: int = -1
    kill_data_worker: int = -1
    kill_data_step: int = -1
    nan_step: int = -1

    def __post_init__(self) -> None:
        _need(self.max_failures >= 0, "faults.max_failures", self.max_failures, "use >= 0")
        for key in ("kill_rank", "kill_step", "kill_data_worker", "kill_data_step", "nan_step"):
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
        """Checks that span sections (each section checked its own values already)."""
        r, s, c = self.grid.dims
        b, m = self.optim.batch_size, self.grid.microbatches
        _need(
            b % r == 0,
            "optim.batch_size",
            b,
            f"must divide evenly over grid.shape={self.grid.shape!r}'s {r} replicas",
        )
        _need(
            (b // r) % m == 0,
            "grid.microbatches",
            m,
            f"must divide the per-replica batch {b // r} (optim.batch_size / replicas)",
        )
        _need(
            m >= s or self.grid.schedule == "gpipe",
            "grid.microbatches",
            m,
            f"1F1B needs at least as many micro-batches as stages ({s}); raise it or use gpipe",
        )
        if self.faults.kill_rank >= 0:
            _need(
                self.faults.kill_rank < self.grid.world_size,
                "faults.kill_rank",
                self.faults.kill_rank,
                f"grid {self.grid.shape} has ranks 0..{self.grid.world_size - 1}",
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

    def model_config(self) -> ModelConfig:
        return self.model.to_model_config()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain JSON-able dict (tuples as lists); :func:`from_dict` inverts it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **overrides: Any) -> JobConfig:
        """A copy with ``{"section.key": value}`` overrides applied (values coerced, validated)."""
        return from_dict(self.to_dict(), overrides)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Convert a TOML value or a ``--set`` string to the field's declared type."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _need(isinstance(value, list | tuple), key, value, 'give a list, e.g. ["conv3"] or conv3,fc6')
        return tuple(str(v) for v in value)
    if hint is bool:
        if isinstance(value, str):
            low = value.strip().lower()
            _need(low in ("true", "false", "1", "0", "yes", "no"), key, value, "use true or false")
            return low in ("true", "1", "yes")
        _need(isinstance(value, bool), key, value, "use true or false")
        return value
    if hint is int:
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise ValueError(f"{key}={value!r}: give an integer") from None
        _need(isinstance(value, int) and not isinstance(value, bool), key, value, "give an integer")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise ValueError(f"{key}={value!r}: give a number") from None
        _need(isinstance(value, int | float) and not isinstance(value, bool), key, value, "give a number")
        return float(value)
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


def from_dict(tree: dict[str, Any], overrides: dict[str, Any] | None = None) -> JobConfig:
    """A validated :class:`JobConfig` from nested ``{section: {key: value}}`` plus dotted overrides."""
    merged: dict[str, dict[str, Any]] = {}
    for name, values in tree.items():
        if name not in SECTIONS:
            raise ValueError(f"unknown section [{name}]: use one of {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ValueError(f"[{name}] must be a table of keys, got {values!r}")
        merged[name] = dict(values)
    for key, value in (overrides or {}).items():
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


def load_config(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> JobConfig:
    """Load a preset or a TOML file (exactly one), apply dotted overrides, validate everything."""
    if (preset is None) == (path is None):
        raise ValueError("give exactly one of --preset NAME or --config FILE.toml")
    if preset is not None:
        text, where = preset_text(preset), f"preset {preset}"
    else:
        try:
            text, where = Path(path).read_text(), str(path)
        except OSError as e:
            raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: not valid TOML ({e})") from None
    return from_dict(tree, overrides)
