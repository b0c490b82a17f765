"""The plan of a run: its sizes from the config and the dataset, and what happens at each step.

:func:`plan_run` is the one place the dataset is checked against the config (before Ray starts):
classes, sizes, a val split when the run validates, and every shard it reads on disk;
:class:`Milestones` is the one place that says what a step number means: whether it ends an
epoch, is due a validation or a checkpoint, ends the run, and how long the chunk of steps
starting there may be. Both are plain Python, tested without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec

from alexnet.data.index import DatasetIndex
from alexnet.data.reader import check_plan, resolve_streams
from cluster.config import JobConfig


@dataclass(frozen=True)
class RunPlan:
    """Sizes of the run derived from the config and the dataset index."""

    steps_per_epoch: int
    total_steps: int
    data_workers: int
    data_streams: int  # V: the epoch's virtual streams (data.streams resolved: resolve_streams)

    @property
    def streams(self) -> int:
        """The number of virtual streams the epoch is read as (see :mod:`alexnet.data.reader`)."""
        return self.data_streams


def plan_run(cfg: JobConfig, data_url: str) -> tuple[RunPlan, DatasetIndex]:
    """Check the dataset against the config and size the run (steps per epoch, total steps)."""
    index = DatasetIndex.load(data_url)  # no dataset.json there: a ValueError saying how to build it
    if index.num_classes != cfg.model.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but the dataset at {data_url} has "
            f"{index.num_classes} classes: --set model.num_classes={index.num_classes}"
        )
    d = cfg.data
    spe = check_plan(index, cfg.global_batch, cfg.model.input_size, d.workers, streams=d.streams)
    total = cfg.train.steps or cfg.train.epochs * spe
    validates = _check_val_split(index, cfg.eval.every_epochs, spe, total)
    check_shards(index, ("train", "val") if validates else ("train",))
    return RunPlan(spe, total, d.workers, resolve_streams(d.streams, spe)), index


def _check_val_split(index: DatasetIndex, every_epochs: int, steps_per_epoch: int, total: int) -> bool:
    """Whether the run validates (an epoch end every ``eval.every_epochs`` within ``total`` steps);
    if it does, refuse a dataset without val images before an epoch is trained for nothing."""
    first = every_epochs * steps_per_epoch  # the step of the first validation
    if every_epochs == 0 or first > total:
        return False
    splits = index.meta["splits"]
    if "val" in splits and index.count("val") > 0:
        return True
    what = "no val split" if "val" not in splits else "a val split without images"
    raise ValueError(
        f"--data {index.url} has {what}, but eval.every_epochs={every_epochs} validates at step {first}: "
        "train without validation with --set eval.every_epochs=0, or build the shards with validation "
        "images (SRC/val/, or alexnet shards SRC NEW_OUT --val-fraction 0.1 where SRC has none)"
    )


def check_shards(index: DatasetIndex, splits: tuple[str, ...]) -> None:
    """Every shard of ``splits`` is on disk with the size ``dataset.json`` records. One listing of
    the directory."""
    fs, root = fsspec.core.url_to_fs(index.url)
    sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"] for e in fs.ls(root, detail=True)}
    bad = []
    for split in splits:
        for shard in index.meta["splits"][split]["shards"]:
            name, want = shard["name"], shard["bytes"]
            size = sizes.get(name)
            if size is None:
                bad.append(f"{name} is missing")
            elif size != want:
                bad.append(f"{name} has {size} bytes, dataset.json says {want}")
    if bad:
        listed = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(
            f"--data {index.url}: {len(bad)} damaged shard(s): {listed}. Restore them from a good copy, "
            "or delete them and run the `alexnet shards` command that built them again (it rebuilds "
            "missing shards)"
        )


@dataclass(frozen=True)
class Due:
    """What happens once ``step`` steps are done (step 0: nothing yet)."""

    step: int
    epoch_end: bool  # the step completes an epoch
    evaluate: bool  # validation (and the LR rule) is due: an epoch end every eval.every_epochs
    checkpoint: bool  # a checkpoint is due: checkpoint.every_steps, or an epoch end (at_epoch_end)
    end: bool  # the run's last step
    ten_crop: bool = False  # the validation due here includes the 10-crop pass (eval.ten_crop_every_epochs)

    @property
    def boundary(self) -> bool:
        """The coordinator acts here, so no chunk of steps may run past it (an epoch end changes
        the learning rate the next chunk is submitted with)."""
        return self.epoch_end or self.checkpoint or self.end


@dataclass(frozen=True)
class Milestones:
    """The rule "what happens at step N", for one run."""

    steps_per_epoch: int
    total_steps: int
    steps_per_call: int
    checkpoint_every: int = 0  # 0: only at epoch ends (if at_epoch_end) and the end
    checkpoint_at_epoch_end: bool = True
    eval_every_epochs: int = 1  # 0: never
    ten_crop: bool = False  # eval.ten_crop
    ten_crop_every_epochs: int = 0  # 0: only at the run's last validation

    @classmethod
    def of(cls, cfg: JobConfig, plan: RunPlan) -> Milestones:
        """The milestones of a run of ``cfg`` sized by ``plan``."""
        return cls(
            plan.steps_per_epoch,
            plan.total_steps,
            cfg.train.steps_per_call,
            cfg.checkpoint.every_steps,
            cfg.checkpoint.at_epoch_end,
            cfg.eval.every_epochs,
            cfg.eval.ten_crop,
            cfg.eval.ten_crop_every_epochs,
        )

    def at(self, step: int) -> Due:
        """What is due once ``step`` steps are done."""
        done = step > 0
        epoch_end = done and step % self.steps_per_epoch == 0
        epochs = step // self.steps_per_epoch  # completed epochs
        periodic = done and self.checkpoint_every > 0 and step % self.checkpoint_every == 0
        evaluate = epoch_end and self.eval_every_epochs > 0 and epochs % self.eval_every_epochs == 0
        return Due(
            step=step,
            epoch_end=epoch_end,
            evaluate=evaluate,
            checkpoint=periodic or (epoch_end and self.checkpoint_at_epoch_end),
            end=step >= self.total_steps,
            ten_crop=evaluate and self._ten_crop_due(epochs),
        )

    def _ten_crop_due(self, epochs: int) -> bool:
        """Whether the validation after ``epochs`` epochs runs the 10-crop pass: every
        ``ten_crop_every_epochs`` epochs, and at the run's last validation."""
        if not self.ten_crop:
            return False
        k = self.ten_crop_every_epochs
        done = self.total_steps // self.steps_per_epoch  # epochs the run completes
        last = done - done % self.eval_every_epochs  # the epoch count of its last validation
        return epochs == last or (k > 0 and epochs % k == 0)

    def chunk(self, step: int) -> int:
        """Steps in the call starting at ``step``: up to ``steps_per_call``, ending at the next
        boundary (so an epoch end, a due checkpoint and the end happen exactly at their step)."""
        assert step < self.total_steps, f"no chunk starts at step {step} of {self.total_steps}"
        limits = [
            self.steps_per_call,
            self.total_steps - step,
            self.steps_per_epoch - step % self.steps_per_epoch,
        ]
        if self.checkpoint_every:
            limits.append(self.checkpoint_every - step % self.checkpoint_every)
        return min(limits)
