"""The learning-rate rule (the ``[schedule]`` config section), applied at each epoch end.

:meth:`LRSchedule.update` takes the epoch just completed (counted from 0, as the log lines
count them) and its validation top-1 error (None where no validation ran), and returns a
:class:`Cut` when it changed the rate: the coordinator logs it with its evidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cluster.config import JobConfig, ScheduleSection


@dataclass(frozen=True)
class Cut:
    """One change of the learning rate and why it happened."""

    epoch: int  # the epoch whose end it follows: epoch + 1 is the first at new_lr
    old_lr: float
    new_lr: float
    val_error: float | None
    best: float | None
    best_epoch: int
    milestone: int | None = None  # the step rule's milestone (epochs), None for plateau
    warmup: tuple[int, int] | None = None  # (epochs done, of) the warm-up's, when it is a warm-up step

    def describe(self) -> str:
        """``lr 0.01 -> 0.001 at epoch 23: val top-1 0.452, best 0.451 at epoch 21``."""
        head = f"lr {self.old_lr:.4g} -> {self.new_lr:.4g} at epoch {self.epoch}"
        if self.warmup is not None:
            done, of = self.warmup
            return f"{head}: warm-up {done}/{of} (optim.warmup_epochs, optim.lr_scaling='linear')"
        if self.milestone is not None:
            return f"{head}: milestone {self.milestone} epochs (schedule.milestones)"
        return f"{head}: val top-1 {self.val_error:.3f}, best {self.best:.3f} at epoch {self.best_epoch}"


@dataclass
class LRSchedule:
    """The rate and the state of the ``[schedule]`` rule (see :class:`cluster.config.ScheduleSection`).

    ``plateau``: an epoch whose validation error is below ``best * (1 - threshold)`` is the new
    best; the rate is cut when the last improvement (or the last cut, whichever is later) is
    ``patience`` epochs back and the rate has run ``min_epochs`` epochs, at most
    ``max_reductions`` times. ``step``: cut after each milestone. The state (``lr``, ``best``,
    ``best_epoch``, ``rate_epoch``, ``reductions``) is plain data, so it round-trips through the
    checkpoint manifest as JSON (:meth:`state_dict`, :meth:`from_state`).
    """

    rule: ScheduleSection
    lr: float
    best: float = math.inf
    best_epoch: int = -1  # the epoch of ``best`` (-1: none yet)
    rate_epoch: int = 0  # the first epoch run at the current rate
    reductions: int = 0
    warmup: Warmup | None = None  # not state: the config's (optim.lr_scaling = "linear")

    @classmethod
    def for_run(cls, cfg: JobConfig) -> LRSchedule:
        """A fresh run's rule: ``optim.lr`` from epoch 0, warmed up to the linearly scaled rate
        when ``optim.lr_scaling`` says so (:func:`warmup_of`)."""
        w = warmup_of(cfg)
        return cls(cfg.schedule, w.rate(0) if w else cfg.optim.lr, warmup=w)

    def update(self, epoch: int, val_error: float | None) -> Cut | None:
        """Feed the end of ``epoch`` (and its validation top-1 error, None if not validated); the
        :class:`Cut` when the rate was just changed, else None. During a warm-up the rate rises at
        each epoch end, and the rule only records the best error (its epochs at a rate count from
        the warm-up's end)."""
        r = self.rule
        w = self.warmup
        if w is not None and epoch < w.epochs:
            if val_error is not None and val_error < self.best * (1 - r.threshold):
                self.best, self.best_epoch = val_error, epoch
            old, self.lr, self.rate_epoch = self.lr, w.rate(epoch + 1), epoch + 1
            best = None if math.isinf(self.best) else self.best
            return Cut(epoch, old, self.lr, val_error, best, self.best_epoch, warmup=(epoch + 1, w.epochs))
        if r.kind == "step":
            return self._cut(epoch, val_error, epoch + 1) if epoch + 1 in r.milestones else None
        if r.kind == "constant" or val_error is None:
            return None
        if val_error < self.best * (1 - r.threshold):
            self.best, self.best_epoch = val_error, epoch
            return None
        quiet = epoch - max(self.best_epoch, self.rate_epoch - 1)  # epochs without an improvement
        at_rate = epoch - self.rate_epoch + 1
        if quiet >= r.patience and at_rate >= r.min_epochs and self.reductions < r.max_reductions:
            return self._cut(epoch, val_error)
        return None

    def _cut(self, epoch: int, val_error: float | None, milestone: int | None = None) -> Cut:
        old = self.lr
        self.lr *= self.rule.factor
        self.reductions += 1
        self.rate_epoch = epoch + 1
        best = None if math.isinf(self.best) else self.best
        return Cut(epoch, old, self.lr, val_error, best, self.best_epoch, milestone)

    def state_dict(self) -> dict[str, Any]:
        """The state as JSON (the manifest's ``schedule`` entry; ``best`` is null before any epoch)."""
        return {
            "lr": self.lr,
            "best": None if math.isinf(self.best) else self.best,
            "best_epoch": self.best_epoch,
            "rate_epoch": self.rate_epoch,
            "reductions": self.reductions,
        }

    @classmethod
    def from_state(
        cls, rule: ScheduleSection, d: dict[str, Any], epoch: int = 0, warmup: Warmup | None = None
    ) -> LRSchedule:
        """Inverse of :meth:`state_dict`, under ``rule``.

        Also reads the older ``{"lr", "best", "bad_epochs", "reductions"}``, whose ``bad_epochs``
        counted the epochs since the last improvement or cut: with ``epoch`` (the epochs completed
        at the checkpoint) that is where the best and the current rate are taken to date from.
        """
        best = math.inf if d.get("best") is None else float(d["best"])
        if "best_epoch" in d:
            best_epoch, rate_epoch = int(d["best_epoch"]), int(d["rate_epoch"])
        else:  # an old manifest: the last improvement or cut was bad_epochs epochs ago
            since = epoch - 1 - int(d["bad_epochs"])
            best_epoch, rate_epoch = since, max(0, since + 1)
        return cls(rule, float(d["lr"]), best, best_epoch, rate_epoch, int(d["reductions"]), warmup)


@dataclass(frozen=True)
class Warmup:
    """Goyal et al.'s gradual warm-up, epoch by epoch: epoch e < ``epochs`` runs at
    ``start + (peak - start) * e / epochs``, epoch ``epochs`` and after at ``peak`` (until the
    ``[schedule]`` rule cuts it). They raise the rate every iteration; here it rises at each epoch
    end, where the coordinator sets rates, so it is a function of the epoch and a resume repeats it."""

    epochs: int
    start: float
    peak: float

    def rate(self, epoch: int) -> float:
        """The rate of ``epoch`` (counted from 0)."""
        if epoch >= self.epochs:
            return self.peak
        return self.start + (self.peak - self.start) * epoch / self.epochs


def warmup_of(cfg: JobConfig) -> Warmup | None:
    """The warm-up of a resolved config: from ``optim.lr`` to ``optim.lr`` x the linear scaling
    factor over :meth:`cluster.config.JobConfig.warmup_epochs`; None when there is none (the rate
    is ``optim.lr``, or the scaled one at once when ``optim.warmup_epochs`` is 0)."""
    lr, factor = cfg.optim.lr, cfg.lr_factor()
    epochs = cfg.warmup_epochs()
    if factor == 1.0:
        return None
    return Warmup(epochs, lr, lr * factor)
