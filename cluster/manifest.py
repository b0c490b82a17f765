"""What a checkpoint records about the run, and how a run continues from it.

:class:`Manifest` is the typed form of the run's entries in a checkpoint's ``manifest.json``
(:mod:`cluster.checkpoint` adds the file-level ones: ``format_version``, ``files``,
``written_unix_s``)::

    step, epoch                  the step reached (the next one to run) and its epoch
    schedule                     the learning-rate rule's state (cluster.lr_schedule)
    data.workers, .streams       the data workers' count and the epoch's virtual streams
    data.positions               the streams' positions at ``step``
    data.steps_per_epoch         batches per epoch: the data position is counted in them
    config                       the whole job config (JobConfig.to_dict), the model's switches too
    grid                         the grid that wrote it (pipeline.grid.Grid.to_dict), for the record
    inference                    what inference needs besides the weights (:class:`Preprocess`):
                                 classes, input_size, input_scale, mean (its kind; the tensor is
                                 the checkpoint's mean.safetensors)

Every entry is covered by the manifest's own sha256 and every file by its sha256
(:mod:`cluster.checkpoint`); :func:`expected_tensors` parses the entries and gives the shapes the
tensor files must have, so a checkpoint whose entries do not parse, or whose tensors do not fit its
config, is a damaged one (the loaders then take an older checkpoint), and nothing is allocated
for a model the tensors are not.

:meth:`Manifest.check_resume` refuses a checkpoint a run cannot continue exactly;
:class:`RunCheckpoints` is the coordinator's checkpoint management (assemble, write, find the
newest, restore).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alexnet.data.index import DatasetIndex
from alexnet.model import TwoColumnAlexNet
from alexnet.optim import check_resume_rule
from cluster.checkpoint import (
    MEAN_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    Checkpoint,
    CheckpointManager,
    CheckpointRecord,
    CorruptCheckpoint,
    Expected,
    list_checkpoints,
    load_checkpoint,
    load_newest,
    scan_checkpoints,
)
from cluster.config import CheckpointSection, JobConfig, check_resume_variant, from_dict
from cluster.faults import CheckpointWriteFailed
from cluster.plan import RunPlan


@dataclass(frozen=True)
class Preprocess:
    """What turns an image into the model's input, as a checkpoint records it: the class names (in
    label order), the crop side, and ``input = (pixels - mean) * input_scale``."""

    classes: tuple[str, ...]
    input_size: int
    input_scale: float
    mean_kind: str  # data.mean: "image" (the per-pixel mean image) or "rgb" (the mean pixel)
    mean: Tensor  # (3, S, S) for "image", (3, 1, 1) for "rgb"; pixel units 0-255, float32
    # the stored images' side the crops were taken from (dataset.json's size): what `alexnet
    # predict` scales a file's short side to; 0 in checkpoints written before it was recorded
    stored_size: int = 0

    @classmethod
    def of(cls, cfg: JobConfig, index: DatasetIndex) -> Preprocess:
        """The preprocessing of run ``cfg`` (``model.input_size`` resolved) on the dataset ``index``."""
        size = cfg.model_config().input_size
        mean = index.mean_tensor(size, cfg.data.mean)
        return cls(tuple(index.classes), size, float(cfg.data.input_scale), cfg.data.mean, mean, index.size)

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``inference`` entry (the mean tensor goes to its own file)."""
        return {
            "classes": list(self.classes),
            "input_size": self.input_size,
            "input_scale": self.input_scale,
            "mean": self.mean_kind,
            "stored_size": self.stored_size,
        }

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint) -> Preprocess:
        """The preprocessing checkpoint ``ck`` records (loaded with its mean file; checked by
        :func:`expected_tensors` when it was loaded)."""
        if MEAN_FILE not in ck.extra:
            raise CorruptCheckpoint(ck.url, f"{MEAN_FILE} was not loaded")
        inf = ck.manifest["inference"]
        mean = ck.extra[MEAN_FILE]["mean"]
        stored = inf.get("stored_size", 0)
        return cls(
            tuple(inf["classes"]), inf["input_size"], float(inf["input_scale"]), inf["mean"], mean, stored
        )


def _check_inference(inf: Any, num_classes: int, input_size: int) -> tuple[int, ...]:
    """The shape of the mean tensor the ``inference`` entry ``inf`` describes, after checking it
    against the model's config (a ``ValueError`` or ``TypeError`` says what is wrong)."""
    if not isinstance(inf, dict):
        raise ValueError("no inference entry (classes, input_size, input_scale, mean)")
    classes = inf["classes"]
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise TypeError("inference.classes is not a list of names")
    if len(classes) != num_classes:
        raise ValueError(f"inference.classes names {len(classes)} classes, the model has {num_classes}")
    if inf["input_size"] != input_size:
        raise ValueError(f"inference.input_size={inf['input_size']}, the model's is {input_size}")
    if not isinstance(inf["input_scale"], (int, float)) or isinstance(inf["input_scale"], bool):
        raise TypeError("inference.input_scale is not a number")
    stored = inf.get("stored_size", 0)
    if not isinstance(stored, int) or isinstance(stored, bool) or not (stored == 0 or stored >= input_size):
        raise ValueError(f"inference.stored_size={stored!r}: not 0 or a side >= input_size {input_size}")
    shapes = {"image": (3, input_size, input_size), "rgb": (3, 1, 1)}
    if inf["mean"] not in shapes:
        raise ValueError(f"inference.mean={inf['mean']!r}: not 'image' or 'rgb'")
    return shapes[inf["mean"]]


def expected_tensors(manifest: dict[str, Any]) -> Expected:
    """The tensors each file of a checkpoint with ``manifest`` must hold: the model of its config
    (built on the meta device: shapes only, nothing allocated), the optimizer's buffers (a subset of
    the same), and the mean its ``inference`` entry describes. Parses every run entry on the way
    (:meth:`Manifest.from_json`): what does not parse raises (a damaged manifest)."""
    m = Manifest.from_json(manifest)
    mcfg = from_dict(m.config).model_config()
    with torch.device("meta"):
        model = TwoColumnAlexNet(mcfg)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    out: Expected = {MODEL_FILE: (shapes, True), OPTIMIZER_FILE: (shapes, False)}
    if m.inference is not None:
        mean = _check_inference(m.inference, mcfg.num_classes, mcfg.input_size)
        out[MEAN_FILE] = ({"mean": list(mean)}, True)
    return out


@dataclass(frozen=True)
class Manifest:
    """The run's position and settings as one checkpoint records them."""

    step: int
    epoch: int
    lr_schedule: dict[str, Any]  # LRSchedule.state_dict()
    data_workers: int
    data_positions: list[dict]
    steps_per_epoch: int
    config: dict[str, Any]
    data_streams: int  # the epoch's virtual streams, which the positions belong to
    grid: dict[str, Any] | None = None
    inference: dict[str, Any] | None = None  # Preprocess.to_json(); None: a checkpoint for resuming only

    @property
    def streams(self) -> int:
        """The streams its data positions belong to."""
        return self.data_streams

    def to_json(self) -> dict[str, Any]:
        """The manifest entries (JSON-able) this object stands for."""
        out: dict[str, Any] = {
            "step": self.step,
            "epoch": self.epoch,
            "schedule": self.lr_schedule,
            "data": {
                "workers": self.data_workers,
                "streams": self.data_streams,
                "positions": self.data_positions,
                "steps_per_epoch": self.steps_per_epoch,
            },
            "config": self.config,
        }
        if self.grid is not None:
            out["grid"] = self.grid
        if self.inference is not None:
            out["inference"] = self.inference
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        """Read a checkpoint's manifest; a missing entry or one of the wrong type raises KeyError,
        TypeError or ValueError (a damaged manifest: see :func:`expected_tensors`)."""
        data = d["data"]
        positions = data["positions"]
        if not (isinstance(positions, list) and all(isinstance(p, dict) for p in positions)):
            raise TypeError("data.positions is not a list of positions")
        for key, value in (("schedule", d["schedule"]), ("config", d["config"])):
            if not isinstance(value, dict):
                raise TypeError(f"{key} is not a table")
        return cls(
            step=_int(d["step"]),
            epoch=_int(d["epoch"]),
            lr_schedule=d["schedule"],
            data_workers=_int(data["workers"]),
            data_positions=positions,
            steps_per_epoch=_int(data["steps_per_epoch"]),
            config=d["config"],
            data_streams=_int(data["streams"]),
            grid=d.get("grid"),
            inference=d.get("inference"),
        )

    def check_resume(self, cfg: JobConfig, plan: RunPlan, url: str) -> None:
        """Refuse a checkpoint this run cannot continue exactly (model, update rule, batch, data
        position)."""
        saved = from_dict(self.config)  # parsed when the checkpoint was loaded (expected_tensors)
        check_resume_variant(saved, cfg, url)
        check_resume_rule(saved.optim.rule, cfg.optim.rule, url)
        b_saved = saved.optim.batch_size
        if b_saved != cfg.optim.batch_size:
            raise ValueError(
                f"{url}: saved with optim.batch_size={b_saved}, this run has {cfg.optim.batch_size}; "
                f"the data position is counted in batches: --set optim.batch_size={b_saved}"
            )
        if saved.global_batch != cfg.global_batch:  # optim.replica_batch_size x another replica count
            raise ValueError(
                f"{url}: saved with a global batch of {saved.global_batch} (grid.shape="
                f"{saved.grid.shape!r} x optim.replica_batch_size={saved.optim.replica_batch_size}), this "
                f"run's is {cfg.global_batch}; the data position is counted in batches: --set "
                f"grid.shape={saved.grid.shape}"
            )
        if self.steps_per_epoch != plan.steps_per_epoch:
            raise ValueError(
                f"{url}: saved with {self.steps_per_epoch} steps per epoch, the dataset at --data gives "
                f"{plan.steps_per_epoch}; the data position is counted in steps of that dataset: "
                "resume with the shards the run was started on (or start a new --run-dir)"
            )
        at_epoch_end = self.step % plan.steps_per_epoch == 0
        saved, want = self.streams, self.streams_for(cfg, plan)
        if saved != want and not at_epoch_end:
            raise ValueError(
                f"{url}: step {self.step} is inside an epoch, whose sample order belongs to "
                f"data.streams={saved}; resume with --set data.streams={saved} (or 0: the checkpoint's) "
                "(other streams are possible from a checkpoint at an epoch end)"
            )
        if cfg.data.workers > want:
            raise ValueError(
                f"{url}: data.workers={cfg.data.workers} exceeds the run's data.streams={want} (each "
                f"worker hosts whole streams); resume with --set data.workers={want} or fewer"
            )

    def streams_for(self, cfg: JobConfig, plan: RunPlan) -> int:
        """The streams a resumed run reads: the checkpoint's unless ``data.streams`` sets others
        (a run keeps its sample order; data.workers may change)."""
        if cfg.data.streams == 0:
            return self.streams
        return plan.streams

    def positions_for(self, streams: int) -> list[dict] | None:
        """The data positions to resume ``streams`` streams at (None: the start of the step's
        epoch, for other streams, which :meth:`check_resume` allows at an epoch end only)."""
        return self.data_positions if self.streams == streams else None


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: a verified checkpoint (the tensors the group loads) and its
    manifest, parsed once (:meth:`of`); what the coordinator restores a run to."""

    checkpoint: Checkpoint
    manifest: Manifest

    @classmethod
    def of(cls, ck: Checkpoint) -> ResumePoint:
        """``ck`` with its manifest parsed (what does not parse raises)."""
        return cls(ck, Manifest.from_json(ck.manifest))

    @property
    def step(self) -> int:
        """The step the run continues at (the checkpoint's)."""
        return self.manifest.step

    @property
    def url(self) -> str:
        """The checkpoint's directory."""
        return self.checkpoint.url

    def resumed_plan(self, cfg: JobConfig, plan: RunPlan) -> RunPlan:
        """``plan`` reading the epoch as the streams the checkpoint records (unless ``data.streams``
        sets others: :meth:`Manifest.streams_for`)."""
        return dataclasses.replace(plan, data_streams=self.manifest.streams_for(cfg, plan))


def load_resume(
    run_dir: str, cfg: JobConfig, plan: RunPlan, start: str | None = None, resume: bool = True
) -> tuple[ResumePoint | None, list[str]]:
    """Where a run in ``run_dir`` starts, decided once: the checkpoint a ``--resume`` continues
    from, checked for this run (None: a fresh start), and one line per newer checkpoint of
    ``run_dir`` skipped as incomplete or corrupt. Without ``resume`` (a new run) a ``run_dir``
    that holds checkpoints is refused: it would mix two runs' histories.

    Without ``start``: the newest complete checkpoint in ``run_dir``; checkpoints there that are
    all damaged are refused (a fresh start would hide them). ``start`` (``--from-checkpoint``): that
    checkpoint directory (or that run dir's newest); the run writes into ``run_dir``, which must
    hold no complete checkpoint newer than it (a later ``--resume`` would take that one, of
    another history).
    """
    if not resume:
        if scan_checkpoints(run_dir):
            raise ValueError(
                f"--run-dir {run_dir} already holds checkpoints: pass --resume to continue that run, "
                "or choose a new --run-dir"
            )
        return None, []
    if start is None:
        ck, skipped = load_newest(run_dir, expect=expected_tensors)
        if ck is None and skipped:
            raise ValueError(
                f"--resume: no complete checkpoint in --run-dir {run_dir} ({'; '.join(skipped)}): "
                "continue from one in another directory with --from-checkpoint DIR, or remove these "
                "to start the run again"
            )
    else:
        ck, skipped = load_checkpoint(start, expect=expected_tensors), []
        newer = [url for step, url in list_checkpoints(run_dir) if step > ck.step]
        if newer:
            raise ValueError(
                f"--from-checkpoint {start} is step {ck.step}, but --run-dir {run_dir} holds newer "
                f"complete checkpoints ({', '.join(u.rsplit('/', 1)[-1] for u in newer)}): a run "
                "continued there would mix two histories; pass a new --run-dir (the run continues "
                "there from this checkpoint), or move those out of the run's checkpoints/ first"
            )
    if ck is None:
        return None, skipped
    point = ResumePoint.of(ck)
    point.manifest.check_resume(cfg, plan, ck.url)
    return point, skipped


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{v!r} is not an integer")
    return v


class RunCheckpoints:
    """The coordinator's checkpoints of one run.

    :meth:`save` assembles the :class:`Manifest` from the group's snapshot and the run's position
    and hands everything to the background writer (:class:`cluster.checkpoint.CheckpointManager`,
    keeping ``checkpoint.keep``); :meth:`newest` and :meth:`load_newest` first let a write in
    flight complete, since it may be the newest checkpoint.
    """

    def __init__(
        self,
        run_dir: str,
        section: CheckpointSection,
        plan: RunPlan,
        config: dict[str, Any],
        grid: dict[str, Any] | None = None,
        preprocess: Preprocess | None = None,
        before_manifest: Callable[[int], None] | None = None,
    ) -> None:
        self.run_dir, self.plan, self.config, self.grid = run_dir, plan, config, grid
        self.preprocess = preprocess  # None: checkpoints to resume from only (no eval); tests
        self.writer = CheckpointManager(run_dir, section.keep, section.background, before_manifest)
        self.max_failed_writes = section.max_failed_writes
        self.last_step = -1  # the step of the newest checkpoint saved or restored (-1: none)

    def save(
        self,
        step: int,
        model: dict[str, Tensor],
        optimizer: dict[str, Tensor],
        positions: list[dict],
        lr_schedule: dict[str, Any],
    ) -> Future:
        """Write a checkpoint of ``step`` in the background; a Future of its CheckpointRecord.

        The tensors are handed over (``copy=False``): the caller must not modify them afterwards."""
        manifest = Manifest(
            step=step,
            epoch=step // self.plan.steps_per_epoch,
            lr_schedule=lr_schedule,
            data_workers=self.plan.data_workers,
            data_streams=self.plan.streams,
            data_positions=positions,
            steps_per_epoch=self.plan.steps_per_epoch,
            config=self.config,
            grid=self.grid,
            inference=None if self.preprocess is None else self.preprocess.to_json(),
        )
        extra = None if self.preprocess is None else {MEAN_FILE: {"mean": self.preprocess.mean}}
        fut = self.writer.save(step, model, optimizer, manifest.to_json(), copy=False, extra=extra)
        self.last_step = step
        return fut

    @property
    def last(self) -> CheckpointRecord | None:
        """The newest checkpoint written by this run so far."""
        return self.writer.last

    def newest(self) -> tuple[int, str] | None:
        """(step, url) of the newest complete checkpoint in the run directory, or None."""
        self.writer.wait(raise_errors=False)  # a failed write is the policy's (check_writes)
        found = list_checkpoints(self.run_dir)
        return found[-1] if found else None

    def load_newest(self) -> tuple[ResumePoint | None, list[str]]:
        """The newest checkpoint that is complete and verifies (None: none), and one line per
        newer one skipped (see :func:`cluster.checkpoint.load_newest`)."""
        self.writer.wait(raise_errors=False)
        ck, skipped = load_newest(self.run_dir, expect=expected_tensors)
        return (None if ck is None else ResumePoint.of(ck)), skipped

    @property
    def failing(self) -> bool:
        """The newest write that ended failed (within ``checkpoint.max_failed_writes``, or the
        run would have failed)."""
        return bool(self.writer.failures)

    def check_writes(self) -> None:
        """Fail the run (:class:`cluster.faults.CheckpointWriteFailed`) once more writes in a row
        failed than ``checkpoint.max_failed_writes`` allows (default 0: the first failure)."""
        failures = list(self.writer.failures)
        if len(failures) > self.max_failed_writes:
            raise self._write_error(
                failures,
                f"{len(failures)} write(s) in a row failed, more than "
                f"checkpoint.max_failed_writes={self.max_failed_writes}",
            )

    def wait(self, timeout: float | None = None) -> CheckpointRecord | None:
        """Block until the write in flight (if any) is done. The run's last checkpoint has no next
        one to make up for it: if it (or the write before it) failed, that is a
        :class:`cluster.faults.CheckpointWriteFailed` whatever ``checkpoint.max_failed_writes``."""
        rec = self.writer.wait(timeout, raise_errors=False)
        failures = list(self.writer.failures)
        if failures:
            raise self._write_error(failures, "the run's last checkpoint is not on disk")
        return rec

    def _write_error(self, failures: list[tuple[int, BaseException]], why: str) -> CheckpointWriteFailed:
        step, error = failures[-1]
        try:
            newest = self.newest()
        except OSError:  # the storage that failed the write may fail the listing too
            newest = None
        where = (
            f"the newest complete checkpoint is {newest[1]} (step {newest[0]})"
            if newest
            else "no complete checkpoint was written"
        )
        return CheckpointWriteFailed(
            f"the checkpoint of step {step} could not be written to --run-dir {self.run_dir} "
            f"({type(error).__name__}: {error}); {why}. {where}. Free space or fix the permissions "
            "there and continue with --resume (checkpoint.max_failed_writes=N rides out N failed "
            "writes in a row on a flaky store)"
        )

    def close(self, timeout: float | None = None) -> None:
        """Finish the write in flight and stop the writer thread."""
        self.writer.close(timeout)
