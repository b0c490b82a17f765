"""The coordinator: the job's control loop as an explicit state machine with one step function.

States (``cluster.metrics.STATES``)::

    starting ──> running ⇄ checkpointing ──> finished
        │           │  ↑
        │           v  │
        └──────> recovering ──> failed (also from any state on an unrecoverable error)

* ``starting``: start the trainer group (placement group, trainer and data actors, process
  groups) and restore the checkpoint to resume from, if any;
* ``running``: one call trains a *chunk* of steps (``train.steps_per_call``, never across an
  epoch end or a due checkpoint): the trainers pull their own batches, so the coordinator makes
  one Ray call per rank per chunk, not per step or micro-batch. At an epoch end it validates and
  applies the learning-rate schedule;
* ``checkpointing``: gather the state into host memory (the only stall) and hand it to the
  background writer; then back to ``running``, or ``finished`` at the end / after SIGTERM;
* ``recovering``: a trainer died (:class:`TrainerDied`: an actor's process or node is gone, or a
  collective failed or timed out): tear the whole group down, wait for a checkpoint write in
  flight, then ``starting`` again (new actors, placed wherever the cluster has room) from the
  newest complete checkpoint with its exact data position; the history is rewound to it. Each
  failure is logged and counted (``alexnet_restarts_total``); failure ``max_failures + 1`` is
  ``failed`` with every failure listed;
* ``finished`` / ``failed``: terminal. Anything but :class:`TrainerDied` is not retried: a
  ``ValueError`` (a setting, the data, a grid the cluster cannot hold) or :class:`NonFiniteLoss`
  (a NaN/inf loss, found before the step is recorded or checkpointed, so every checkpoint on
  disk is from before it).

Every transition is a log line (``[coordinator] running -> recovering at step 6``) and is exported
(``alexnet_state``, ``alexnet_state_transitions_total{to_state}``).

:meth:`Coordinator.step` performs exactly one transition, so tests drive the loop step by step
with a fake :class:`TrainerGroup` (see ``tests/cluster/test_coordinator.py``).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from cluster.checkpoint import Checkpoint, CheckpointManager, latest_checkpoint, load_checkpoint, rng_state
from cluster.config import JobConfig, ScheduleSection
from cluster.metrics import STEP_PARTS, Metrics

STARTING, RUNNING, CHECKPOINTING, RECOVERING, FINISHED, FAILED = (
    "starting",
    "running",
    "checkpointing",
    "recovering",
    "finished",
    "failed",
)
TERMINAL = (FINISHED, FAILED)


class TrainerDied(RuntimeError):
    """A trainer (or its process group) failed; the group must be restarted to continue."""


class NonFiniteLoss(RuntimeError):
    """A step's loss was NaN or infinite: the run stops (restarting would replay the same numbers)."""


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
        """Wait for a submitted chunk; one aggregated metrics dict per step (TrainerDied on failure)."""

    def evaluate(self, ten_crop: bool, max_samples: int) -> dict[str, float]:
        """Validation: top1_error, top5_error, (top1|top5)_error_10crop, loss, samples."""

    def state(self, step: int) -> tuple[dict[str, Tensor], dict[str, Tensor], list[dict]]:
        """Full model and optimizer state (host memory) and the data positions resuming at ``step``."""

    def data_stats(self) -> dict[str, Any]:
        """queue_depth (list per worker), decode_images_per_second, skipped ({reason: total})."""

    def trace(self, steps: int) -> dict[str, Any] | None:
        """Chrome trace of the last ``steps`` recorded steps, or None."""

    def shutdown(self) -> None:
        """Stop every actor and release the resources (idempotent)."""


@dataclass
class PlateauSchedule:
    """The paper's rule: divide the rate by 10 when validation error stops improving, at most N times.

    Plain data, so it round-trips through the checkpoint manifest as JSON.
    """

    lr: float
    best: float = math.inf
    bad_epochs: int = 0
    reductions: int = 0

    def update(self, val_error: float, cfg: ScheduleSection) -> bool:
        """Feed one epoch's validation top-1 error; True when the rate was just reduced."""
        if cfg.kind == "constant":
            return False
        if val_error < self.best - cfg.threshold:
            self.best, self.bad_epochs = val_error, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= cfg.patience and self.reductions < cfg.max_reductions:
            self.lr *= cfg.factor
            self.reductions += 1
            self.bad_epochs = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "best": None if math.isinf(self.best) else self.best,
            "bad_epochs": self.bad_epochs,
            "reductions": self.reductions,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> PlateauSchedule:
        best = math.inf if d.get("best") is None else float(d["best"])
        return cls(float(d["lr"]), best, int(d["bad_epochs"]), int(d["reductions"]))


@dataclass(frozen=True)
class RunPlan:
    """Sizes of the run derived from the config and the dataset index."""

    steps_per_epoch: int
    total_steps: int
    train_samples: int
    val_samples: int
    data_workers: int


@dataclass
class History:
    """Per-step and per-epoch numbers for the log, the plot and ``metrics.jsonl``."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    keys: dict[int, list[str]] = field(default_factory=dict)  # step -> sample keys (train.record_keys)

    def rewind(self, step: int) -> None:
        """Forget what steps >= ``step`` recorded (they are re-run after a restore)."""
        self.steps = [r for r in self.steps if r["step"] < step]
        self.evals = [r for r in self.evals if r["step"] <= step]
        self.keys = {s: k for s, k in self.keys.items() if s < step}


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Coordinator:
    """Drives one training run. ``run()`` loops :meth:`step` until ``finished`` or ``failed``.

    ``resume`` is a loaded checkpoint (or None for a fresh run). ``log`` receives the progress
    lines (default: print, flushed, so ``ray job logs`` shows them as they come).
    """

    def __init__(
        self,
        cfg: JobConfig,
        group: TrainerGroup,
        plan: RunPlan,
        run_dir: str,
        metrics: Metrics | None = None,
        resume: Checkpoint | None = None,
        log: Callable[[str], None] | None = None,
        extra_meta: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.group, self.plan, self.run_dir = cfg, group, plan, run_dir
        self.metrics = metrics or Metrics(run="run")
        self.log = log or (lambda line: print(line, flush=True))
        self.extra_meta = extra_meta or {}
        self.ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep, cfg.checkpoint.background)
        self.state = STARTING
        self.step_no = 0
        self.schedule = PlateauSchedule(cfg.optim.lr)
        self.positions: list[dict] | None = None
        self.resume = resume
        self.failures: list[str] = []
        self.error: BaseException | None = None
        self.history = History()
        self.stop_requested = threading.Event()
        self._final = False
        self._inflight: tuple[int, int, Any] | None = None  # (first step, steps, group handle)
        self._last_ckpt_step = -1
        self._skipped_seen: dict[str, float] = {}
        self._data_restarts_seen = 0
        self._t_start = time.perf_counter()
        self._steps_at_start = 0
        self._window: list[dict[str, Any]] = []
        self._window_t = time.perf_counter()
        if resume is not None:
            self._restore_counters(resume)
        self._init_metrics()
        self.metrics.state(STARTING)

    def _init_metrics(self) -> None:
        """Export every counter and the run-level gauges from the start (0 until they happen), so
        dashboards and alerts see a series rather than no data."""
        m = self.metrics
        for name in ("images", "checkpoints", "data_worker_restarts"):
            m.inc(name, 0)
        m.inc("restarts", 0, reason="trainer_failure")
        for reason in ("corrupt", "missing", "truncated", "unreadable"):  # cluster.data.SKIP_REASONS
            m.inc("skipped_samples", 0, reason=reason)
        for name in ("checkpoint_duration_seconds", "checkpoint_stall_seconds", "checkpoint_bytes"):
            m.gauge(name, 0.0)
        m.gauge("step", self.step_no)
        m.gauge("epoch", self.step_no // self.plan.steps_per_epoch)
        m.gauge("learning_rate", self.schedule.lr)

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
            CHECKPOINTING: self._checkpointing,
            RECOVERING: self._recovering,
        }[self.state]
        try:
            new = handler()
        except TrainerDied as e:
            new = self._on_failure(e)
        except Exception as e:  # anything else is not recoverable: record it and stop
            self.error = e
            self.log(f"[coordinator] failed in state {self.state}: {type(e).__name__}: {e}")
            new = FAILED
        if new != self.state:
            self.log(f"[coordinator] {self.state} -> {new} at step {self.step_no}")
            self.metrics.state(new)
            self.state = new
        if new in TERMINAL:
            self._close(new)
        return new

    def request_stop(self) -> None:
        """SIGTERM / ``ray job stop``: finish the current chunk, checkpoint, exit."""
        self.stop_requested.set()

    # -- states ----------------------------------------------------------------------------

    def _starting(self) -> str:
        self.group.start(self.step_no, self.positions)
        if self.resume is not None:
            self.group.load(self.resume.model, self.resume.optimizer)
            self.resume = None  # its tensors are no longer needed in the driver
        self._t_start, self._steps_at_start = time.perf_counter(), self.step_no
        self._window_t = time.perf_counter()
        return RUNNING

    def _running(self) -> str:
        if self._inflight is None:
            if self.stop_requested.is_set():
                self.log(f"[coordinator] stop requested: final checkpoint at step {self.step_no}")
                self._final = True
                return CHECKPOINTING
            if self.step_no >= self.plan.total_steps:
                self._final = True
                return CHECKPOINTING
            self._inflight = self._submit(self.step_no)
        first, n, handle = self._inflight
        self._inflight = None
        end = first + n
        if not self.stop_requested.is_set() and not self._boundary(end):
            # Look-ahead: the next chunk is queued on the trainers before this one is collected, so
            # they go on training while the driver aggregates, logs and exports metrics.
            self._inflight = self._submit(end)
        results = self.group.collect(handle)
        self.step_no = end
        self._record(results)
        spe = self.plan.steps_per_epoch
        if self.step_no % spe == 0:
            epoch = self.step_no // spe - 1  # the epoch just completed
            every = self.cfg.eval.every_epochs
            if every and (epoch + 1) % every == 0:
                self._evaluate(epoch)
            if self.cfg.checkpoint.at_epoch_end:
                return CHECKPOINTING
        every = self.cfg.checkpoint.every_steps
        if every and self.step_no % every == 0:
            return CHECKPOINTING
        return RUNNING

    def _boundary(self, step: int) -> bool:
        """Whether something happens between chunks at ``step``: an epoch end, a checkpoint, the end."""
        every = self.cfg.checkpoint.every_steps
        return (
            step >= self.plan.total_steps
            or step % self.plan.steps_per_epoch == 0
            or bool(every and step % every == 0)
        )

    def _submit(self, step: int) -> tuple[int, int, Any]:
        n = self._chunk(step)
        return step, n, self.group.submit(step, n, self.schedule.lr)

    def _checkpointing(self) -> str:
        if self.step_no != self._last_ckpt_step:
            self._save_checkpoint()
        if self._final:
            rec = self.ckpt.wait(timeout=self.cfg.checkpoint.stop_timeout_s)
            if rec is not None:
                self.log(f"[coordinator] checkpoint {rec.url} ({rec.bytes / 1e6:.1f} MB)")
            return FINISHED
        return RUNNING

    def _recovering(self) -> str:
        self._inflight = None  # its results died with the group
        self.group.shutdown()
        self.metrics.inc("restarts", reason="trainer_failure")
        self.ckpt.wait()  # a write in flight completes first: it may be the newest checkpoint
        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            self.step_no, self.positions = 0, None
            self.schedule = PlateauSchedule(self.cfg.optim.lr)
            self.resume = None
        else:
            self.resume = load_checkpoint(latest)
            self._restore_counters(self.resume)
        self.history.rewind(self.step_no)
        self._skipped_seen, self._data_restarts_seen = {}, 0  # the new data workers count from 0
        self.log(
            f"[coordinator] restart {len(self.failures)} of at most faults.max_failures="
            f"{self.cfg.faults.max_failures}: restarting the trainer group from "
            + (f"checkpoint {latest} (step {self.step_no})" if latest else "step 0 (no checkpoint yet)")
        )
        return STARTING

    def _on_failure(self, e: BaseException) -> str:
        self.failures.append(f"step {self.step_no}: {e}")
        self.log(f"[coordinator] trainer failure {len(self.failures)} at step {self.step_no}: {e}")
        if len(self.failures) > self.cfg.faults.max_failures:
            self.error = RuntimeError(
                f"{len(self.failures)} trainer failures exceed faults.max_failures="
                f"{self.cfg.faults.max_failures}:\n  " + "\n  ".join(self.failures)
            )
            return FAILED
        return RECOVERING

    # -- pieces ----------------------------------------------------------------------------

    def _chunk(self, s: int) -> int:
        """Steps in the call starting at step ``s``: up to steps_per_call, stopping at an epoch end,
        a due checkpoint and the end of the run (so those happen exactly at their step)."""
        limits = [self.cfg.train.steps_per_call, self.plan.total_steps - s]
        spe = self.plan.steps_per_epoch
        limits.append(spe - s % spe)
        every = self.cfg.checkpoint.every_steps
        if every:
            limits.append(every - s % every)
        return max(1, min(limits))

    def _restore_counters(self, ck: Checkpoint) -> None:
        m = ck.manifest
        self.step_no = int(m["step"])
        self._last_ckpt_step = self.step_no
        self.schedule = PlateauSchedule.from_state(m["schedule"])
        self.positions = m.get("data", {}).get("positions")

    def _save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        model, optimizer, positions = self.group.state(self.step_no)
        meta = {
            "step": self.step_no,
            "epoch": self.step_no // self.plan.steps_per_epoch,
            "epoch_complete": self.step_no % self.plan.steps_per_epoch == 0,
            "schedule": self.schedule.state_dict(),
            "data": {
                "workers": self.plan.data_workers,
                "positions": positions,
                "steps_per_epoch": self.plan.steps_per_epoch,
            },
            "config": self.cfg.to_dict(),
            "rng": {"seed": self.cfg.train.seed, **rng_state()},
            **self.extra_meta,
        }
        fut = self.ckpt.save(self.step_no, model, optimizer, meta, copy=False)
        stall = time.perf_counter() - t0
        self._last_ckpt_step = self.step_no
        self.metrics.gauge("checkpoint_stall_seconds", stall)
        fut.add_done_callback(self._checkpoint_done)

    def _checkpoint_done(self, fut) -> None:
        if fut.exception() is not None:
            self.log(f"[coordinator] checkpoint write failed: {fut.exception()}")
            return
        rec = fut.result()
        self.metrics.gauge("checkpoint_duration_seconds", rec.duration_s)
        self.metrics.gauge("checkpoint_bytes", rec.bytes)
        self.metrics.inc("checkpoints")

    def _record(self, results: list[dict[str, Any]]) -> None:
        """Per-step results -> history, Prometheus, and a log line every log_every_steps."""
        m, B = self.metrics, self.cfg.optim.batch_size
        self._check_finite(results)
        for r in results:
            if "keys" in r:
                self.history.keys[r["step"]] = list(r["keys"])
            row = {k: v for k, v in r.items() if not isinstance(v, dict | list)}
            row["lr"] = self.schedule.lr
            self.history.steps.append(row)
            self._window.append(row)
        last = results[-1]
        now = time.perf_counter()
        images = B * len(results)
        m.inc("images", images)
        m.gauge("step", self.step_no)
        m.gauge("epoch", self.step_no // self.plan.steps_per_epoch)
        m.gauge("learning_rate", self.schedule.lr)
        if math.isfinite(last.get("loss", math.nan)):
            m.gauge("loss", last["loss"], split="train")
        for key in ("top1_error", "top5_error"):
            if key in last:
                m.get(key + "_ratio").labels(run=m.run, split="train", crops="train").set(last[key])
        m.gauge("step_seconds", last.get("step_s", 0.0))
        for (stage, column), parts in last.get("parts", {}).items():
            for part in STEP_PARTS:
                if part + "_s" in parts:
                    m.gauge(
                        "step_time_seconds",
                        parts[part + "_s"],
                        part=part,
                        stage=str(stage),
                        column=str(column),
                    )
        for stage, frac in last.get("bubble", {}).items():
            m.gauge("pipeline_bubble_ratio", frac, stage=str(stage))
        self._data_metrics()
        if len(self._window) >= self.cfg.train.log_every_steps or self.step_no >= self.plan.total_steps:
            self._log_progress(now)

    def _check_finite(self, results: list[dict[str, Any]]) -> None:
        """Stop at the first NaN/inf loss, before anything is recorded or checkpointed: the weights
        are poisoned from that step on, and every checkpoint on disk is from before it."""
        for r in results:
            loss = r.get("loss", 0.0)
            if math.isfinite(loss):
                continue
            self.metrics.gauge("loss", loss, split="train")  # for the AlexNetLossNaN alert
            self.ckpt.wait()  # a write in flight is from before this step: let it complete
            latest = latest_checkpoint(self.run_dir)
            where = (
                f"the newest complete checkpoint is {latest} (step {int(latest.rsplit('-', 1)[-1])})"
                if latest
                else "no checkpoint was written yet"
            )
            injected = " (injected by faults.nan_step)" if r["step"] == self.cfg.faults.nan_step else ""
            raise NonFiniteLoss(
                f"loss is {loss} at step {r['step']}{injected}: training diverged; stopped without "
                f"writing a checkpoint. {where}. Continue with --resume and a lower optim.lr, or check "
                "the data"
            )

    def _data_metrics(self) -> None:
        stats = self.group.data_stats()
        m = self.metrics
        for w, depth in enumerate(stats.get("queue_depth", [])):
            m.gauge("data_queue_depth_batches", depth, worker=str(w))
        if "decode_images_per_second" in stats:
            m.gauge("decode_images_per_second", stats["decode_images_per_second"])
        for reason, total in stats.get("skipped", {}).items():
            delta = total - self._skipped_seen.get(reason, 0)
            if delta > 0:
                m.inc("skipped_samples", delta, reason=reason)
                self._skipped_seen[reason] = total
                self.log(
                    f"[data] {int(delta)} more sample(s) skipped ({reason}; {int(total)} in all): "
                    "the data workers' log names the shard and the samples"
                )
        delta = stats.get("restarts", 0) - self._data_restarts_seen
        if delta > 0:
            m.inc("data_worker_restarts", delta)
            self._data_restarts_seen += delta

    def _log_progress(self, now: float) -> None:
        w = self._window
        dt = max(now - self._window_t, 1e-9)
        ips = len(w) * self.cfg.optim.batch_size / dt
        self.metrics.gauge("images_per_second", ips)
        losses = [r["loss"] for r in w if math.isfinite(r.get("loss", math.nan))]
        loss = sum(losses) / len(losses) if losses else math.nan
        err = [r["top1_error"] for r in w if "top1_error" in r]
        top1 = sum(err) / len(err) if err else math.nan
        step_s = sum(r.get("step_s", 0.0) for r in w)
        wait = sum(r.get("data_wait_s", 0.0) for r in w)
        rate = (self.step_no - self._steps_at_start) / max(now - self._t_start, 1e-9)
        eta = (self.plan.total_steps - self.step_no) / rate if rate > 0 else math.inf
        spe = self.plan.steps_per_epoch
        self.log(
            f"step {self.step_no}/{self.plan.total_steps} epoch {self.step_no // spe} | "
            f"loss {loss:.4f} | top-1 err {top1:.3f} | lr {self.schedule.lr:.4g} | "
            f"{ips:.1f} img/s | data wait {100 * wait / max(step_s, 1e-9):.1f}% | "
            f"ETA {format_eta(eta)}"
        )
        self._window, self._window_t = [], now

    def _evaluate(self, epoch: int) -> None:
        t0 = time.perf_counter()
        res = self.group.evaluate(self.cfg.eval.ten_crop, self.cfg.eval.max_samples)
        m = self.metrics
        if math.isfinite(res.get("loss", math.nan)):
            m.gauge("loss", res["loss"], split="val")
        for k in ("top1", "top5"):
            m.get(f"{k}_error_ratio").labels(run=m.run, split="val", crops="center").set(res[f"{k}_error"])
            if f"{k}_error_10crop" in res:
                m.get(f"{k}_error_ratio").labels(run=m.run, split="val", crops="10crop").set(
                    res[f"{k}_error_10crop"]
                )
        reduced = self.schedule.update(res["top1_error"], self.cfg.schedule)
        row = {"epoch": epoch, "step": self.step_no, "lr": self.schedule.lr, **res}
        self.history.evals.append(row)
        ten = (
            f", 10-crop top-1 {res['top1_error_10crop']:.3f} top-5 {res['top5_error_10crop']:.3f}"
            if "top1_error_10crop" in res
            else ""
        )
        self.log(
            f"epoch {epoch} validation: top-1 err {res['top1_error']:.3f} top-5 err {res['top5_error']:.3f}"
            f"{ten} ({int(res['samples'])} images, {time.perf_counter() - t0:.1f}s)"
            + (f"; learning rate divided -> {self.schedule.lr:.4g}" if reduced else "")
        )

    def _close(self, state: str) -> None:
        try:
            self.ckpt.close(timeout=self.cfg.checkpoint.stop_timeout_s)
        except Exception as e:  # a failed final write must not hide the run's own outcome
            self.log(f"[coordinator] checkpoint writer: {e}")
            if state == FINISHED:
                self.error = e
                self.state = FAILED

    def history_jsonl(self) -> str:
        """The run's history as JSON lines (``{"kind": "step"|"eval", ...}``)."""
        lines = [json.dumps({"kind": "step", **r}) for r in self.history.steps]
        lines += [json.dumps({"kind": "eval", **r}) for r in self.history.evals]
        return "\n".join(lines) + "\n"
