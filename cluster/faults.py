"""Faults, from the ``[faults]`` section: what the run does about a failure, and the injected ones.

* :class:`FailurePolicy` (the coordinator's): the restart budget (``faults.max_failures``) and
  the NaN rule (a non-finite loss stops the run: restarting would replay the same numbers);
* :class:`DataLossBound` (the coordinator's): ``data.max_skipped_fraction``, the share of an
  epoch the data workers may lose to bad shards and samples;
* the errors that end a run without a restart: :class:`NonFiniteLoss`, :class:`DataLoss`,
  :class:`CheckpointWriteFailed` (``checkpoint.max_failed_writes``, judged by
  :class:`cluster.manifest.RunCheckpoints`);
* :class:`FaultPlan` (the trainer group's): the injected faults of a rehearsal or a test, all off
  by default, each firing once per run; :class:`RankFaults` is its part inside one trainer rank;
* :func:`classify` and :func:`failure`: what a failed call to the trainer ranks means (a user error,
  a cause, or a consequence of a peer's failure).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch.distributed

from cluster.config import FaultsSection


class TrainerDied(RuntimeError):
    """A trainer (or its process group) failed; the group must be restarted to continue."""


class NonFiniteLoss(RuntimeError):
    """A step's loss was NaN or infinite: the run stops (restarting would replay the same numbers)."""


class DataLoss(RuntimeError):
    """An epoch lost more of its samples to bad shards and samples than ``data.max_skipped_fraction``."""


class CheckpointWriteFailed(RuntimeError):
    """Checkpoint writes failed (disk full, permissions) beyond ``checkpoint.max_failed_writes``."""


LostKey = tuple[int, str, str]  # (epoch, shard url, reason): the data workers' ``lost`` counters


class DataLossBound:
    """``data.max_skipped_fraction``: the samples of one epoch the data workers may lose.

    Fed after each chunk with the workers' ``lost`` counters (:meth:`check`: samples per epoch,
    shard and reason, summed over the workers). Those count from zero when a worker or the
    trainer group restarts, so the bound keeps the largest count seen per key: never more than
    the epoch lost, and an epoch that loses too much fails as soon as it has, not at its end.
    """

    def __init__(self, fraction: float, epoch_samples: int) -> None:
        self.fraction, self.epoch_samples = fraction, epoch_samples
        self.lost: dict[LostKey, int] = {}

    def check(self, lost: dict[LostKey, int]) -> None:
        """Take the latest counters in; :class:`DataLoss` if an epoch they touch lost too much."""
        for key, n in lost.items():
            self.lost[key] = max(self.lost.get(key, 0), n)
        for epoch in sorted({key[0] for key in lost}):
            shards = {(url, why): n for (e, url, why), n in self.lost.items() if e == epoch}
            total = sum(shards.values())
            if total > self.fraction * self.epoch_samples:
                raise self._error(epoch, total, shards)

    def _error(self, epoch: int, total: int, shards: dict[tuple[str, str], int]) -> DataLoss:
        worst = sorted(shards.items(), key=lambda kv: (-kv[1], kv[0]))
        listed = ", ".join(f"{url} ({n} {why})" for (url, why), n in worst[:10])
        more = f" and {len(worst) - 10} more" if len(worst) > 10 else ""
        return DataLoss(
            f"epoch {epoch} lost {total} of its {self.epoch_samples} samples "
            f"({100 * total / self.epoch_samples:.1f}%), more than data.max_skipped_fraction="
            f"{self.fraction:g}, to bad shards and samples: {listed}{more}. Restore those shards from a "
            "good copy, or delete them and run the `alexnet shards` command that built them again (it "
            "rebuilds missing shards), then continue with --resume; or raise data.max_skipped_fraction"
        )


class FailurePolicy:
    """Counts trainer failures against ``faults.max_failures`` and words the run's failure errors."""

    def __init__(self, faults: FaultsSection) -> None:
        self.faults = faults
        self.failures: list[str] = []  # "step S: cause", one per trainer failure

    def trainer_died(self, step: int, error: BaseException) -> bool:
        """Record a trainer failure at ``step``; True while the budget allows a restart."""
        self.failures.append(f"step {step}: {error}")
        return len(self.failures) <= self.faults.max_failures

    def exhausted(self) -> RuntimeError:
        """The run's error once the budget is spent: every failure, one per line."""
        return RuntimeError(
            f"{len(self.failures)} trainer failures exceed faults.max_failures="
            f"{self.faults.max_failures}:\n  " + "\n  ".join(self.failures)
        )

    @staticmethod
    def first_non_finite(results: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The first step result whose loss is NaN or infinite (None: all finite)."""
        return next((r for r in results if not math.isfinite(r.get("loss", 0.0))), None)

    def non_finite_error(self, result: dict[str, Any], newest: tuple[int, str] | None) -> NonFiniteLoss:
        """The error for a non-finite ``result``; ``newest`` is the (step, url) of the newest
        complete checkpoint, all of which are from before it (it is found before any is written)."""
        where = (
            f"the newest complete checkpoint is {newest[1]} (step {newest[0]})"
            if newest
            else "no checkpoint was written yet"
        )
        step = result["step"]
        injected = " (injected by faults.nan_step)" if step == self.faults.nan_step else ""
        return NonFiniteLoss(
            f"loss is {result['loss']} at step {step}{injected}: training diverged; stopped without "
            f"writing a checkpoint. {where}. Continue with --resume and a lower optim.lr, or check "
            "the data"
        )


@dataclass(frozen=True)
class RankFaults:
    """The faults injected inside one trainer rank (-1: off)."""

    kill_step: int = -1  # the rank's process exits abruptly when it reaches this step
    nan_step: int = -1  # this step's images become NaN (so its loss is NaN)

    def inputs(self, feed: Any) -> Any:
        """``feed`` (a :class:`cluster.feed.Feed` or :class:`cluster.feed.NoFeed`) as the rank's
        step loop reads it, the one place faults enter a step: asking for ``kill_step``'s inputs
        kills the process abruptly, as a crash or a lost node would; ``nan_step``'s images are all
        NaN. The feed itself when nothing is injected."""
        return feed if self == RankFaults() else _FaultyFeed(feed, self)


class _FaultyFeed:
    """A feed with :class:`RankFaults` injected (see :meth:`RankFaults.inputs`)."""

    def __init__(self, feed: Any, faults: RankFaults) -> None:
        self.feed, self.faults = feed, faults

    def get(self, step: int) -> Any:
        if step == self.faults.kill_step:
            os._exit(1)
        fed = self.feed.get(step)
        if step == self.faults.nan_step and fed.images is not None:
            fed = dataclasses.replace(fed, images=fed.images * math.nan)
        return fed

    def close(self) -> None:
        self.feed.close()


class FaultPlan:
    """The injected faults of ``[faults]``, read where they are injected; each fires once per run.

    ``kill_rank``/``kill_step``: grid rank R's process exits at step K (not again once the group
    was restarted); ``kill_data_worker``/``kill_data_step``: data worker W's process is killed
    while the chunk reaching step K runs (Ray restarts it); ``nan_step``: NaN images at step K.
    """

    def __init__(self, faults: FaultsSection) -> None:
        self.faults = faults
        self._rank_armed = faults.kill_rank >= 0 and faults.kill_step >= 0
        self._data_armed = faults.kill_data_worker >= 0 and faults.kill_data_step >= 0

    def for_rank(self, rank: int) -> RankFaults:
        """The faults rank ``rank``'s actor injects (started after :meth:`trainer_failed`: no kill)."""
        f = self.faults
        kill = f.kill_step if self._rank_armed and rank == f.kill_rank else -1
        return RankFaults(kill, f.nan_step)

    def trainer_failed(self) -> None:
        """A trainer failure happened: the injected kill (if it was the cause) has fired."""
        self._rank_armed = False

    def data_worker_to_kill(self, first_step: int, steps: int) -> int | None:
        """The data worker to kill while steps ``first_step .. first_step + steps - 1`` run, if any."""
        f = self.faults
        if self._data_armed and first_step <= f.kill_data_step < first_step + steps:
            self._data_armed = False
            return f.kill_data_worker
        return None


def checkpoint_crash(faults: FaultsSection) -> Callable[[int], None] | None:
    """``faults.kill_in_checkpoint_step``: the hook the checkpoint writer runs between a checkpoint's
    tensor files and its manifest, which SIGKILLs this process (the driver) at that step, as a crash
    mid-write would (None: off)."""
    if faults.kill_in_checkpoint_step < 0:
        return None

    def crash(step: int) -> None:
        if step == faults.kill_in_checkpoint_step:
            os.kill(os.getpid(), signal.SIGKILL)

    return crash


# -- failures of calls to the trainer ranks -------------------------------------------------------

# A rank whose collective or point-to-point op failed because a peer died is a consequence, not a
# cause. NCCL (and torch's own store and network errors) raise torch.distributed.DistError; gloo
# raises a plain RuntimeError (torch 2.14: "[gloo/transport/tcp/pair.cc] Read error ...: Connection
# reset by peer", "[.../unbound_buffer.cc] Timed out waiting ... for recv"), so for gloo only the
# message tells. (A rank whose own fault surfaces as a DistError, e.g. an NCCL error on its GPU, is
# listed among the consequences, in rank order; a dead actor always comes first.)
_GLOO_PEER_LOST = ("Timed out", "timed out", "Connection closed", "Connection reset", "Read error")


def classify(error: ray.exceptions.RayError) -> str:
    """``"user"`` (a ValueError: a setting or the data), ``"cause"`` (an actor died, or a rank
    raised on its own) or ``"consequence"`` (a rank's collective failed because a peer did)."""
    if isinstance(error, ray.exceptions.RayActorError):
        return "cause"  # the actor's process or node is gone
    cause = getattr(error, "cause", None)  # RayTaskError: what the actor method raised
    if isinstance(cause, ValueError):
        return "user"
    if isinstance(cause, torch.distributed.DistError):
        return "consequence"
    if isinstance(cause, RuntimeError) and any(w in str(cause) for w in _GLOO_PEER_LOST):
        return "consequence"
    return "cause"


def failure(refs: list, done_refs: list, what: str) -> Exception:
    """The error of a failed call to the ranks (``refs``; ``done_refs`` those that answered): a
    ValueError of a rank, else :class:`TrainerDied` listing every rank's error, causes first."""
    errors = []  # (is a consequence, rank, text)
    for i, ref in enumerate(refs):
        if ref not in done_refs:
            errors.append((True, i, f"rank {i}: no answer (blocked on a failed peer)"))
            continue
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            kind = classify(e)
            if kind == "user":
                return ValueError(str(e.cause))
            errors.append((kind == "consequence", i, f"rank {i}: {type(e).__name__}: {_short(e)}"))
    errors.sort()
    return TrainerDied(f"{what}: " + "; ".join(e[2] for e in errors))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:300] if text else type(e).__name__
