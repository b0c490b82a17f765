"""The coordinator: the job's control loop as an explicit state machine with one step function.

States (``cluster.metrics.STATES``)::

    starting ──> running <──> evaluating, checkpointing
                 (any of these three) ──> finishing ──> finished
    any state ── a trainer died ──> recovering ──> starting
    any state ── the restart budget is spent, or any other error ──> failed

* ``starting``: start the trainer group (placement groups, trainer and data actors, process
  groups) and load the checkpoint to resume from, if any;
* ``running``: one call trains a *chunk* of steps (``train.steps_per_call``, never past an epoch
  end, a due checkpoint or the run's end: :class:`cluster.plan.Milestones`): the trainers pull
  their own batches, so the coordinator makes one Ray call per rank per chunk, not per step;
* ``evaluating``: validation at an epoch end (every ``eval.every_epochs``; the 10-crop pass when
  :class:`cluster.plan.Milestones` says it is due), then the learning-rate
  rule (:class:`cluster.lr_schedule.LRSchedule`; at an epoch end without validation ``running``
  feeds it the epoch alone), each cut logged with its evidence;
* ``checkpointing``: gather the state into host memory (the only stall) and hand it to the
  background writer;
* ``finishing``: at the run's end, or after a stop request (SIGTERM, ``ray job stop``) once the
  chunks in flight are done: the final checkpoint, waited for (``checkpoint.stop_timeout_s``);
* ``recovering``: a trainer died (:class:`cluster.faults.TrainerDied`: an actor's process or node
  is gone, or a collective failed or timed out): tear the whole group down, wait for a checkpoint
  write in flight, then ``starting`` again (new actors, placed wherever the cluster has room) from
  the newest complete checkpoint with its exact data position; the history is rewound to it.
  Failure ``faults.max_failures + 1`` is ``failed``, with every failure listed;
* ``finished`` / ``failed``: terminal. Anything but a dead trainer is not retried: a
  ``ValueError`` (a setting, the data, a grid the cluster cannot hold) or
  :class:`cluster.faults.NonFiniteLoss` (found before the step is recorded or checkpointed, so
  every checkpoint on disk is from before it).

After each state's work, :meth:`Coordinator._next` picks the next state from what is due at the
step reached; it is the only place that does. Failure policy (:class:`cluster.faults.FailurePolicy`),
checkpoint management (:class:`cluster.manifest.RunCheckpoints`) and metrics and logs
(:class:`cluster.reporting.Reporter`) are objects the coordinator calls. Every transition is a log
line (``[coordinator] running -> recovering at step 6``) and is exported (``alexnet_state``,
``alexnet_state_transitions_total{to_state}``). :meth:`Coordinator.step` performs exactly one
transition, so tests drive the loop step by step with a fake :class:`TrainerGroup`.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from torch import Tensor

from cluster.faults import CheckpointWriteFailed, DataLossBound, FailurePolicy, TrainerDied, checkpoint_crash
from cluster.lr_schedule import Cut, LRSchedule, warmup_of
from cluster.manifest import Preprocess, ResumePoint, RunCheckpoints
from cluster.metrics import Metrics
from cluster.plan import Milestones
from cluster.reporting import Reporter
from cluster.run import Run

STARTING, RUNNING, EVALUATING, CHECKPOINTING, FINISHING, RECOVERING, FINISHED, FAILED = (
    "starting",
    "running",
    "evaluating",
    "checkpointing",
    "finishing",
    "recovering",
    "finished",
    "failed",
)
TERMINAL = (FINISHED, FAILED)


class TrainerGroup(Protocol):
    """What the coordinator needs from the trainer ranks and data workers (Ray or fake)."""

    def start(self, step: int, data_positions: list[dict] | None) -> None:
        """Reserve resources, start trainers and data workers (at ``data_positions``, or at the start
        of ``step``'s epoch when None), init the process groups."""

    def load(self, model: dict[str, Tensor], optimizer: dict[str, Tensor]) -> None:
        """Give every rank the full canonical state; each takes its own slice."""

    def submit(self, first_step: int, steps: int, lr: float) -> Any:
        """Start steps ``first_step .. first_step + steps - 1`` on every rank; returns a handle.
        A second submit before the first is collected queues behind it (chunks run in order)."""

    def collect(self, handle: Any) -> list[dict[str, Any]]:
        """Wait for a submitted chunk; one reduced result dict per step (TrainerDied on failure)."""

    def evaluate(self, ten_crop: bool, max_samples: int) -> dict[str, float]:
        """Validation: top1_error, top5_error, loss, samples; with ``ten_crop`` (the 10-crop pass
        is due) also (top1|top5)_error_10crop."""

    def snapshot(self, step: int) -> tuple[dict[str, Tensor], dict[str, Tensor], list[dict]]:
        """Full model and optimizer state (host memory) and the data positions resuming at ``step``."""

    def data_stats(self) -> dict[str, Any]:
        """queue_depth (list per worker), decode_images_per_second, skipped ({reason: total}), restarts."""

    def trace(self, steps: int) -> dict[str, Any] | None:
        """Chrome trace of the last ``steps`` recorded steps, or None."""

    def shutdown(self) -> None:
        """Stop every actor and release the resources (idempotent)."""


class Coordinator:
    """Drives one training run. ``run()`` loops :meth:`step` until ``finished`` or ``failed``.

    ``resume``: where the run continues (None for a fresh run), already checked for this run
    (:func:`cluster.manifest.load_resume`). ``report`` receives the events (default: metrics under
    the run label ``run``, progress lines printed). ``preprocess``: what the checkpoints record
    for inference (None: checkpoints that only resume, as the fake-group tests write). ``init``:
    the weights a fresh run starts from (``--init-from``), loaded again by a restart from step 0.
    """

    def __init__(
        self,
        run: Run,
        group: TrainerGroup,
        run_dir: str,
        report: Reporter | None = None,
        resume: ResumePoint | None = None,
        preprocess: Preprocess | None = None,
        init: dict[str, Tensor] | None = None,
    ) -> None:
        cfg, plan = run.cfg, run.plan
        self.cfg, self.group, self.plan = cfg, group, plan
        self.milestones = Milestones.of(cfg, plan)
        self.report = report or Reporter(
            Metrics(run="run"), plan, cfg.global_batch, cfg.train.log_every_steps
        )
        self.checkpoints = RunCheckpoints(
            run_dir,
            cfg.checkpoint,
            plan,
            cfg.to_dict(),
            run.grid.to_dict(),
            preprocess,
            checkpoint_crash(cfg.faults),
        )
        self.policy = FailurePolicy(cfg.faults)
        self.data_loss = DataLossBound(cfg.data.max_skipped_fraction, plan.steps_per_epoch * cfg.global_batch)
        self.init = init
        self._snap: tuple[int, Any] | None = None  # (step, group.snapshot(step)), see _snapshot
        self.state = STARTING
        self.error: BaseException | None = None
        self.stop_requested = threading.Event()
        self._inflight: tuple[int, int, Any] | None = None  # (first step, steps, group handle)
        self._resume_from(resume)
        self.report.begin(self.step_no, self.lr_schedule.lr, STARTING)

    def _resume_from(self, point: ResumePoint | None) -> None:
        """The run's position: step, LR rule, data positions and the tensors still to load into the
        group, from ``point`` (its validation and checkpoint at that step are done), or a fresh
        start at step 0."""
        rule = self.cfg.schedule
        if point is None:
            self.step_no, self.positions = 0, None
            self.lr_schedule = LRSchedule.for_run(self.cfg)
        else:
            m = point.manifest
            self.step_no, self.positions = m.step, m.positions_for(self.plan.streams)
            self.lr_schedule = LRSchedule.from_state(rule, m.lr_schedule, m.epoch, warmup_of(self.cfg))
        self.to_load = None if point is None else point.checkpoint
        self._snap = None  # the group's state is the restored one now
        # what was due at the restored step is done: it was validated before it was checkpointed
        self._evaluated_step = self.checkpoints.last_step = -1 if point is None else self.step_no

    # -- the state machine ---------------------------------------------------------------
    def run(self) -> str:
        """Step until a terminal state; returns it."""
        while self.state not in TERMINAL:
            self.step()
        return self.state

    def step(self) -> str:
        """Perform one transition from the current state; returns the new state."""
        handler = {
            STARTING: self._starting,
            RUNNING: self._running,
            EVALUATING: self._evaluating,
            CHECKPOINTING: self._checkpointing,
            FINISHING: self._finishing,
            RECOVERING: self._recovering,
        }[self.state]
        try:
            self.checkpoints.check_writes()  # a failed background write fails the run here, at once
            new = handler()
        except TrainerDied as e:
            new = self._on_failure(e)
        except Exception as e:  # anything else is not recoverable: record it and stop
            self.error = e
            self.report.failed(self.state, e)
            new = FAILED
        self._enter(new)
        if new in TERMINAL:
            self._close()
        return self.state

    def _enter(self, new: str) -> None:
        if new != self.state:
            self.report.transition(self.state, new, self.step_no)
            self.state = new

    def request_stop(self) -> None:
        """SIGTERM / ``ray job stop``: finish the chunks in flight, checkpoint, exit."""
        self.stop_requested.set()

    def _next(self) -> str:
        """The state after the current one's work: what is due at the step reached and not done."""
        due = self.milestones.at(self.step_no)
        if due.evaluate and self._evaluated_step < self.step_no:
            return EVALUATING
        if self._inflight is None and (due.end or self.stop_requested.is_set()):
            if self.stop_requested.is_set():
                self.report.stop_requested(self.step_no)
            return FINISHING
        if due.checkpoint and self.checkpoints.last_step < self.step_no:
            return CHECKPOINTING
        return RUNNING

    # -- states ----------------------------------------------------------------------------
    def _starting(self) -> str:
        self.group.start(self.step_no, self.positions)
        if self.to_load is not None:
            self.group.load(self.to_load.model, self.to_load.optimizer)
            self.to_load = None  # its tensors are no longer needed in the driver
        elif self.init is not None and self.step_no == 0:  # kept: a restart before any checkpoint
            self.group.load(self.init, {})
        self.report.group_started(self.step_no)
        return self._next()

    def _running(self) -> str:
        self._snap = None  # a snapshot is of one step: not held in memory while training goes on
        if self._inflight is None:
            nxt = self._next()  # a stop may have come in since the last state
            if nxt != RUNNING:
                return nxt
            self._inflight = self._submit(self.step_no)
        first, n, handle = self._inflight
        self._inflight = None
        end = first + n
        if not self.stop_requested.is_set() and not self.milestones.at(end).boundary:
            # Look-ahead: the next chunk is queued on the trainers before this one is collected, so
            # they go on training while the driver reduces, logs and exports metrics.
            self._inflight = self._submit(end)
        results = self.group.collect(handle)
        bad = self.policy.first_non_finite(results)
        if bad is not None:  # before anything is recorded or checkpointed: the weights are poisoned
            self.step_no = end
            self.report.non_finite(bad["loss"])
            raise self.policy.non_finite_error(bad, self.checkpoints.newest())
        self.report.steps(results, end, self.lr_schedule.lr)
        self.step_no = end  # once its steps are recorded: a watcher of step_no sees their metrics
        stats = self.group.data_stats()
        self.report.data(stats)
        self.report.progress(end, self.lr_schedule.lr)
        self.data_loss.check(stats.get("lost", {}))  # early: an epoch fails once it has lost too much
        due = self.milestones.at(end)
        if due.epoch_end and not due.evaluate:  # the LR rule sees every epoch end, validated or not
            self._lr_rule(None)
        return self._next()

    def _submit(self, step: int) -> tuple[int, int, Any]:
        n = self.milestones.chunk(step)
        return step, n, self.group.submit(step, n, self.lr_schedule.lr)

    def _evaluating(self) -> str:
        t0 = time.perf_counter()
        ten_crop = self.milestones.at(self.step_no).ten_crop  # eval.ten_crop and due at this epoch
        res = self.group.evaluate(ten_crop, self.cfg.eval.max_samples)
        cut = self._lr_rule(res["top1_error"])
        self._evaluated_step = self.step_no
        seconds, lr = time.perf_counter() - t0, self.lr_schedule.lr
        self.report.evaluated(self._epoch_done(), self.step_no, lr, res, cut is not None, seconds)
        if self.report.draws_kernels:  # the snapshot is kept for a checkpoint at this step
            self.report.kernels(self.step_no, self._snapshot()[0])
        if cut is not None:
            self.report.lr_cut(cut)
        return self._next()

    def _epoch_done(self) -> int:
        return self.step_no // self.plan.steps_per_epoch - 1  # the epoch just completed, from 0

    def _lr_rule(self, val_error: float | None) -> Cut | None:
        """Feed the epoch just completed to the LR rule; a cut without validation is logged here."""
        cut = self.lr_schedule.update(self._epoch_done(), val_error)
        if cut is not None and val_error is None:
            self.report.lr_cut(cut)
        return cut

    def _checkpointing(self) -> str:
        self._checkpoint()
        return self._next()

    def _checkpoint(self) -> None:
        t0 = time.perf_counter()
        model, optimizer, positions = self._snapshot()
        self._snap = None
        written = self.checkpoints.save(
            self.step_no, model, optimizer, positions, self.lr_schedule.state_dict()
        )
        self.report.checkpoint_saved(time.perf_counter() - t0, written)

    def _snapshot(self) -> tuple[dict[str, Tensor], dict[str, Tensor], list[dict]]:
        """The group's state at the current step, taken once per step (validation's kernels and the
        checkpoint at that step share it)."""
        if self._snap is None or self._snap[0] != self.step_no:
            self._snap = (self.step_no, self.group.snapshot(self.step_no))
        return self._snap[1]

    def _finishing(self) -> str:
        # a write that failed within checkpoint.max_failed_writes is tried again: the last must succeed
        if self.checkpoints.last_step < self.step_no or self.checkpoints.failing:
            self._checkpoint()
        self.report.final_checkpoint(self.checkpoints.wait(timeout=self.cfg.checkpoint.stop_timeout_s))
        return FINISHED

    def _recovering(self) -> str:
        self._inflight = None  # its results died with the group
        self.group.shutdown()
        # the newest complete checkpoint (a write in flight completes first: it may be the newest)
        point, skipped = self.checkpoints.load_newest()
        self._resume_from(point)
        newest = None if point is None else point.url
        self.report.restarting(
            len(self.policy.failures), self.cfg.faults.max_failures, self.step_no, newest, skipped
        )
        return STARTING

    def _on_failure(self, e: TrainerDied) -> str:
        self.report.trainer_failure(len(self.policy.failures) + 1, self.step_no, e)
        if self.policy.trainer_died(self.step_no, e):
            return RECOVERING
        self.error = self.policy.exhausted()
        return FAILED

    def _close(self) -> None:
        try:
            self.checkpoints.close(timeout=self.cfg.checkpoint.stop_timeout_s)
        except Exception as e:  # a failed final write must not hide the run's own outcome
            if self.state == FINISHED:
                self.report.writer_failed(e)
                self.error = e
                self._enter(FAILED)
            elif not isinstance(self.error, CheckpointWriteFailed):  # else: that is the run's error
                self.report.writer_failed(e)
