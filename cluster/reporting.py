"""What the run tells its watchers: Prometheus metrics, progress lines, the history, the output files.

:class:`Reporter` is the coordinator's callback object: the state machine calls one method per
event (a transition, a chunk of steps done, a validation, a checkpoint, a failure, a restart) and
the reporter turns it into metrics (:mod:`cluster.metrics`), log lines and the :class:`History`.
:func:`write_outputs` writes the run directory's ``metrics.jsonl``, ``plots/training.png`` and
``trace.json`` at the end. :class:`TensorBoardLog` writes ``RUN/tensorboard/`` as the run goes:
the scalars of ``metrics.jsonl`` and, at each validation, conv1's kernels per column.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import fsspec

from cluster.checkpoint import CheckpointRecord, join_url
from cluster.lr_schedule import Cut
from cluster.metrics import SKIP_REASONS, STEP_PARTS, Metrics
from cluster.plan import RunPlan


@dataclass
class History:
    """Per-step and per-epoch numbers for the log, the plot and ``metrics.jsonl``."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def rewind(self, step: int) -> None:
        """Forget what steps >= ``step`` recorded (they are re-run after a restore)."""
        self.steps = [r for r in self.steps if r["step"] < step]
        self.evals = [r for r in self.evals if r["step"] <= step]

    def jsonl(self) -> str:
        """The history as JSON lines (``{"kind": "step"|"eval", ...}``)."""
        lines = [json.dumps({"kind": "step", **r}) for r in self.steps]
        lines += [json.dumps({"kind": "eval", **r}) for r in self.evals]
        return "\n".join(lines) + "\n"


def format_eta(seconds: float) -> str:
    """``1h05m`` or ``4m07s`` (``?`` when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _print(line: str) -> None:
    print(line, flush=True)  # flushed: `ray job logs` shows lines as they come


class Reporter:
    """Metrics, progress lines and history of one run, fed by the coordinator's events.

    ``batch_size`` counts images; a progress line is logged every ``log_every_steps`` steps
    (and at the run's end) with the window's throughput, loss, error, data wait and the ETA.
    """

    def __init__(
        self,
        metrics: Metrics,
        plan: RunPlan,
        batch_size: int,
        log_every_steps: int,
        log: Callable[[str], None] | None = None,
        tensorboard: TensorBoardLog | None = None,
    ) -> None:
        self.tensorboard = tensorboard
        self.metrics, self.plan, self.batch_size, self.log_every = metrics, plan, batch_size, log_every_steps
        self.log = log or _print
        self.history = History()
        self._skipped_seen: dict[str, float] = {}  # per reason, as the data workers count it
        self._data_restarts_seen = 0
        self._window: list[dict[str, Any]] = []  # step rows since the last progress line
        self._window_t = self._t_start = time.perf_counter()
        self._steps_at_start = 0

    # -- the run's start, states and failures --------------------------------------------------
    def begin(self, step: int, lr: float, state: str) -> None:
        """Export every counter and the run-level gauges from the start (0 until they happen), so
        dashboards and alerts see a series rather than no data."""
        m = self.metrics
        for name in ("images", "checkpoints", "data_worker_restarts"):
            m.inc(name, 0)
        m.inc("restarts", 0, reason="trainer_failure")
        for reason in SKIP_REASONS:
            m.inc("skipped_samples", 0, reason=reason)
        for name in ("checkpoint_duration_seconds", "checkpoint_stall_seconds", "checkpoint_bytes"):
            m.gauge(name, 0.0)
        m.gauge("total_steps", self.plan.total_steps)  # the dashboard's ETA: (total - step) / rate
        self._progress_gauges(step, lr)
        m.state(state)

    def group_started(self, step: int) -> None:
        """The trainers are up at ``step``: throughput and ETA count from here."""
        self._t_start, self._steps_at_start = time.perf_counter(), step
        self._window_t = time.perf_counter()

    def transition(self, old: str, new: str, step: int) -> None:
        """The coordinator went from state ``old`` to ``new`` at ``step``."""
        self.log(f"[coordinator] {old} -> {new} at step {step}")
        self.metrics.state(new)

    def failed(self, state: str, error: BaseException) -> None:
        """An error no restart can fix ended the run in ``state``."""
        self.log(f"[coordinator] failed in state {state}: {type(error).__name__}: {error}")

    def stop_requested(self, step: int) -> None:
        """A stop request is being served: the final checkpoint is of ``step``."""
        self.log(f"[coordinator] stop requested: final checkpoint at step {step}")

    def trainer_failure(self, count: int, step: int, error: BaseException) -> None:
        """Trainer failure number ``count`` of the run, at ``step``."""
        self.log(f"[coordinator] trainer failure {count} at step {step}: {error}")

    def restarting(
        self, count: int, max_failures: int, step: int, newest: str | None, skipped: Sequence[str] = ()
    ) -> None:
        """The group restarts at ``step`` (from checkpoint ``newest``; ``skipped``: the newer ones
        that were incomplete or corrupt, and why): later history is re-run."""
        for line in skipped:
            self.log(f"[coordinator] skipped newer checkpoint {line}")
        self.metrics.inc("restarts", reason="trainer_failure")
        self.history.rewind(step)
        self._skipped_seen, self._data_restarts_seen = {}, 0  # the new data workers count from 0
        self.log(
            f"[coordinator] restart {count} of at most faults.max_failures={max_failures}: "
            "restarting the trainer group from "
            + (f"checkpoint {newest} (step {step})" if newest else "step 0 (no checkpoint yet)")
        )

    def non_finite(self, loss: float) -> None:
        """A NaN/inf loss is exported before the run fails (the AlexNetLossNaN alert)."""
        self.metrics.gauge("loss", loss, split="train")

    # -- training and validation -------------------------------------------------------------
    def steps(self, results: list[dict[str, Any]], step: int, lr: float) -> None:
        """Steps up to ``step`` done (one reduced result each): the history and the step metrics."""
        for r in results:
            row = {k: v for k, v in r.items() if not isinstance(v, dict | list)}
            row["lr"] = lr
            self.history.steps.append(row)
            self._window.append(row)
        self.metrics.inc("images", self.batch_size * len(results))
        if self.tensorboard is not None:
            self.tensorboard.steps(self.history.steps[-len(results) :], self.batch_size)
        self._progress_gauges(step, lr)
        self._step_gauges(results[-1])

    def _progress_gauges(self, step: int, lr: float) -> None:
        m = self.metrics
        m.gauge("step", step)
        m.gauge("epoch", step // self.plan.steps_per_epoch)
        m.gauge("learning_rate", lr)

    def _step_gauges(self, last: dict[str, Any]) -> None:
        """The last step's loss, error and time split (per stage and column) as gauges."""
        m = self.metrics
        if math.isfinite(last.get("loss", math.nan)):
            m.gauge("loss", last["loss"], split="train")
        for key in ("top1_error", "top5_error"):
            if key in last:
                m.gauge(key + "_ratio", last[key], split="train", crops="train")
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

    def data(self, stats: dict[str, Any]) -> None:
        """The data workers' counters (:meth:`cluster.coordinator.TrainerGroup.data_stats`): queue
        depths, decode rate, and newly skipped samples and worker restarts (counted and logged)."""
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

    def progress(self, step: int, lr: float) -> None:
        """A progress line every ``log_every_steps`` steps and at the run's end."""
        if len(self._window) >= self.log_every or step >= self.plan.total_steps:
            self._log_progress(step, lr)

    def _log_progress(self, step: int, lr: float) -> None:
        now, w = time.perf_counter(), self._window
        ips = len(w) * self.batch_size / max(now - self._window_t, 1e-9)
        self.metrics.gauge("images_per_second", ips)
        losses = [r["loss"] for r in w if math.isfinite(r.get("loss", math.nan))]
        loss = sum(losses) / len(losses) if losses else math.nan
        err = [r["top1_error"] for r in w if "top1_error" in r]
        top1 = sum(err) / len(err) if err else math.nan
        step_s = sum(r.get("step_s", 0.0) for r in w)
        wait = sum(r.get("data_wait_s", 0.0) for r in w)
        rate = (step - self._steps_at_start) / max(now - self._t_start, 1e-9)
        eta = (self.plan.total_steps - step) / rate if rate > 0 else math.inf
        self.log(
            f"step {step}/{self.plan.total_steps} epoch {step // self.plan.steps_per_epoch} | "
            f"loss {loss:.4f} | top-1 err {top1:.3f} | lr {lr:.4g} | "
            f"{ips:.1f} img/s | data wait {100 * wait / max(step_s, 1e-9):.1f}% | "
            f"ETA {format_eta(eta)}"
        )
        self._window, self._window_t = [], now

    def evaluated(
        self, epoch: int, step: int, lr: float, res: dict[str, float], reduced: bool, seconds: float
    ) -> None:
        """Validation of ``epoch`` (at ``step``; ``lr`` after the LR rule saw it) done."""
        m = self.metrics
        if math.isfinite(res.get("loss", math.nan)):
            m.gauge("loss", res["loss"], split="val")
        for k in ("top1", "top5"):
            m.gauge(f"{k}_error_ratio", res[f"{k}_error"], split="val", crops="center")
            if f"{k}_error_10crop" in res:
                m.gauge(f"{k}_error_ratio", res[f"{k}_error_10crop"], split="val", crops="10crop")
        self.history.evals.append({"epoch": epoch, "step": step, "lr": lr, **res})
        if self.tensorboard is not None:
            self.tensorboard.evaluated(self.history.evals[-1])
        ten = (
            f", 10-crop top-1 {res['top1_error_10crop']:.3f} top-5 {res['top5_error_10crop']:.3f}"
            if "top1_error_10crop" in res
            else ""
        )
        self.log(
            f"epoch {epoch} validation: top-1 err {res['top1_error']:.3f} top-5 err {res['top5_error']:.3f}"
            f"{ten} ({int(res['samples'])} images, {seconds:.1f}s)"
            + (f"; learning rate divided -> {lr:.4g}" if reduced else "")
        )

    @property
    def draws_kernels(self) -> bool:
        """Whether :meth:`kernels` wants the weights at each validation (TensorBoard is on)."""
        return self.tensorboard is not None

    def kernels(self, step: int, model: dict[str, Any]) -> None:
        """conv1's kernels at ``step`` (``model``: canonical weights), one image per column."""
        if self.tensorboard is not None:
            self.tensorboard.kernels(step, model)

    def close(self) -> None:
        """The run is over: the event files are flushed (and copied to a remote run dir)."""
        if self.tensorboard is not None:
            self.tensorboard.close()

    def lr_cut(self, cut: Cut) -> None:
        """The learning-rate rule changed the rate: the line says why
        (``lr 0.01 -> 0.001 at epoch 23: val top-1 0.452, best 0.451 at epoch 21``)."""
        self.log(f"[coordinator] {cut.describe()}")

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_saved(self, stall_s: float, written: Future) -> None:
        """A checkpoint left training after ``stall_s`` s; ``written`` completes with its record."""
        self.metrics.gauge("checkpoint_stall_seconds", stall_s)
        written.add_done_callback(self._checkpoint_written)

    def _checkpoint_written(self, fut: Future) -> None:
        if fut.exception() is not None:
            self.log(f"[coordinator] checkpoint write failed: {fut.exception()}")
            return
        rec: CheckpointRecord = fut.result()
        self.metrics.gauge("checkpoint_duration_seconds", rec.duration_s)
        self.metrics.gauge("checkpoint_bytes", rec.bytes)
        self.metrics.inc("checkpoints")

    def final_checkpoint(self, rec: CheckpointRecord | None) -> None:
        """The run's last checkpoint is on disk (``rec``: None when the run wrote none)."""
        if rec is not None:
            self.log(f"[coordinator] checkpoint {rec.url} ({rec.bytes / 1e6:.1f} MB)")

    def writer_failed(self, error: BaseException) -> None:
        """The checkpoint writer failed when the run closed it."""
        self.log(f"[coordinator] checkpoint writer: {error}")


# -- the run directory's output files ------------------------------------------------------------


class TensorBoardLog:
    """``RUN/tensorboard/`` event files (``tensorboard --logdir RUN/tensorboard``), written as the run
    goes: ``train/<key>`` for every number of a step row of ``metrics.jsonl`` (loss, errors, lr,
    step-time parts) and ``train/images_per_second``; ``val/<key>`` for each validation's;
    ``conv1/column0`` and ``conv1/column1`` images (:func:`alexnet.filters.kernel_grid`) at each
    validation. A run dir that is not local (``s3://...``) gets them at the end, written locally
    meanwhile. A restart from a checkpoint writes the re-run steps again (TensorBoard shows both)."""

    def __init__(self, run_dir: str) -> None:
        import tempfile

        from fsspec.implementations.local import LocalFileSystem
        from torch.utils.tensorboard import SummaryWriter

        fs, path = fsspec.core.url_to_fs(run_dir)
        local = isinstance(fs, LocalFileSystem)
        self.upload_to = None if local else join_url(run_dir, "tensorboard")
        self.dir = join_url(path, "tensorboard") if local else tempfile.mkdtemp(prefix="alexnet-tensorboard-")
        self.writer = SummaryWriter(self.dir)

    def steps(self, rows: list[dict[str, Any]], batch_size: int) -> None:
        """Step rows as ``metrics.jsonl`` has them."""
        for r in rows:
            for k, v in _numbers(r).items():
                self.writer.add_scalar(f"train/{k}", v, r["step"])
            if r.get("step_s", 0) > 0:
                self.writer.add_scalar("train/images_per_second", batch_size / r["step_s"], r["step"])

    def evaluated(self, row: dict[str, Any]) -> None:
        """One validation row as ``metrics.jsonl`` has it."""
        for k, v in _numbers(row).items():
            self.writer.add_scalar(f"val/{k}", v, row["step"])

    def kernels(self, step: int, model: dict[str, Any]) -> None:
        """conv1's kernels per column (canonical weights ``conv1.C.weight``) as images."""
        from alexnet.filters import kernel_grid

        for c in (c for c in (0, 1) if f"conv1.{c}.weight" in model):  # the one-column net has one
            img = kernel_grid(model[f"conv1.{c}.weight"])
            self.writer.add_image(f"conv1/column{c}", img, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        """Flush and close; a remote run dir gets the files now."""
        self.writer.close()
        if self.upload_to is not None:
            fs, path = fsspec.core.url_to_fs(self.upload_to)
            fs.put(self.dir.rstrip("/") + "/", path, recursive=True)


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a history row, its step (the x axis) left out."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def plot_history(history: History) -> bytes:
    """PNG of train/val loss, top-1 error and learning rate over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, evals = history.steps, history.evals
    x = [r["step"] + 1 for r in steps]
    ex = [e["step"] for e in evals]
    fig, ax = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax[0].plot(x, [r["loss"] for r in steps], lw=0.8, label="train (per step)")
    if evals:
        ax[0].plot(ex, [e["loss"] for e in evals], "o-", label="val")
    ax[0].set_ylabel("cross-entropy loss")
    ax[0].legend()
    ax[1].plot(x, [r["top1_error"] for r in steps], lw=0.8, label="train top-1")
    if evals:
        ax[1].plot(ex, [e["top1_error"] for e in evals], "o-", label="val top-1 (center)")
        ax[1].plot(ex, [e["top5_error"] for e in evals], "s-", label="val top-5 (center)")
        ten = [e for e in evals if "top1_error_10crop" in e]  # validations that ran the 10-crop pass
        if ten:
            tx, ty = [e["step"] for e in ten], [e["top1_error_10crop"] for e in ten]
            ax[1].plot(tx, ty, "^--", label="val top-1 (10-crop)")
    ax[1].set_ylabel("error")
    ax[1].set_ylim(0, 1)
    ax[1].legend()
    ax[2].plot(x, [r["lr"] for r in steps])
    ax[2].set_yscale("log")
    ax[2].set_ylabel("learning rate")
    ax[2].set_xlabel("step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to a local path or fsspec URL, creating its directory."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def write_outputs(run_dir: str, history: History, trace: dict[str, Any] | None) -> dict[str, str]:
    """Write the run's history (``metrics.jsonl``), its plot and the Chrome trace; their URLs by kind."""
    files: dict[str, str] = {}
    if trace is not None:
        files["trace"] = join_url(run_dir, "trace.json")
        write_bytes(files["trace"], json.dumps(trace).encode())
    files["metrics"] = join_url(run_dir, "metrics.jsonl")
    write_bytes(files["metrics"], history.jsonl().encode())
    if history.steps:
        files["plot"] = join_url(run_dir, "plots", "training.png")
        write_bytes(files["plot"], plot_history(history))
    files["checkpoints"] = join_url(run_dir, "checkpoints")
    return files
