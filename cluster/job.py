"""The training job (``alexnet train``) and offline evaluation (``alexnet eval``), end to end.

``run_training`` is what the driver does, top to bottom: validate the config and the dataset
before any actor starts; find the checkpoint to resume from (and refuse an incompatible one);
attach to the Ray cluster (``RAY_ADDRESS``, as under ``ray job submit``) or start an embedded
local one; serve the metrics; run the coordinator; on SIGTERM / ``ray job stop`` checkpoint and
exit; at the end write the plot, the history and the Chrome trace into the run directory and
print where everything is.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import fsspec

from cluster.checkpoint import Checkpoint, latest_checkpoint, list_checkpoints, load_checkpoint
from cluster.config import JobConfig
from cluster.coordinator import FINISHED, Coordinator, RunPlan
from cluster.metrics import Metrics

EXIT_STOPPED = 143  # 128 + SIGTERM: stopped on request, after a complete checkpoint


@dataclass
class JobResult:
    """What a finished (or stopped, or failed) run left behind."""

    state: str
    step: int
    stopped: bool
    checkpoint: str | None
    files: dict[str, str]
    error: str | None = None
    metrics_url: str | None = None

    @property
    def exit_code(self) -> int:
        if self.state != FINISHED:
            return 1
        return EXIT_STOPPED if self.stopped else 0


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def plan_run(cfg: JobConfig, data_url: str) -> tuple[RunPlan, Any]:
    """Check the dataset against the config and size the run (steps per epoch, total steps)."""
    from alexnet.data.index import DatasetIndex

    try:
        index = DatasetIndex.load(data_url)
    except FileNotFoundError:
        raise ValueError(
            f"--data {data_url}: no dataset.json there; build shards with `alexnet shards` "
            "(or `alexnet shards --synthetic N` for the demo data)"
        ) from None
    if index.num_classes != cfg.model.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but the dataset at {data_url} has "
            f"{index.num_classes} classes: --set model.num_classes={index.num_classes}"
        )
    if index.size < cfg.model.input_size:
        raise ValueError(
            f"model.input_size={cfg.model.input_size} is larger than the stored images ({index.size} px); "
            f"use --set model.input_size=<= {index.size}"
        )
    n_train, B = index.count("train"), cfg.optim.batch_size
    spe = n_train // B
    if spe < 1:
        raise ValueError(f"optim.batch_size={B} exceeds the {n_train} training images: use a smaller batch")
    if cfg.data.workers > spe:
        raise ValueError(
            f"data.workers={cfg.data.workers} exceeds the {spe} batches per epoch: use fewer workers"
        )
    total = cfg.train.steps or cfg.train.epochs * spe
    val = index.count("val") if "val" in index.meta.get("splits", {}) else 0
    return RunPlan(spe, total, n_train, val, cfg.data.workers), index


def check_resume(ck: Checkpoint, cfg: JobConfig, plan: RunPlan) -> None:
    """Refuse a checkpoint this run cannot continue exactly (model, batch, data position)."""
    saved = ck.manifest.get("config", {})
    if saved.get("model") != cfg.to_dict()["model"]:
        raise ValueError(
            f"{ck.url}: saved with model {saved.get('model')}, this run has {cfg.to_dict()['model']}; "
            "resume with the same [model] section (or start a new --run-dir)"
        )
    b_saved = saved.get("optim", {}).get("batch_size")
    if b_saved != cfg.optim.batch_size:
        raise ValueError(
            f"{ck.url}: saved with optim.batch_size={b_saved}, this run has {cfg.optim.batch_size}; "
            f"the data position is counted in batches: --set optim.batch_size={b_saved}"
        )
    data = ck.manifest.get("data", {})
    w_saved = data.get("workers")
    at_epoch_end = ck.step % plan.steps_per_epoch == 0
    if w_saved != cfg.data.workers and not at_epoch_end:
        raise ValueError(
            f"{ck.url}: step {ck.step} is inside an epoch, whose sample order belongs to data.workers="
            f"{w_saved}; resume with --set data.workers={w_saved} (another worker count is possible "
            "from a checkpoint at an epoch end)"
        )


def init_ray(cfg: JobConfig, plan: RunPlan) -> None:
    """Attach to the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    # Embedded local Ray: logical CPUs are a scheduling count, so reserve enough for the grid
    # and the data workers even on a 2-core laptop (the processes share the real cores).
    need = cfg.grid.world_size * cfg.grid.cpus_per_rank + plan.data_workers
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, math.ceil(need)),
        include_dashboard=False,
        log_to_driver=True,
    )


def _write_bytes(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def plot_history(coord: Coordinator) -> bytes:
    """PNG of train/val loss, top-1 error and learning rate over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = coord.history.steps
    evals = coord.history.evals
    x = [r["step"] + 1 for r in steps]
    fig, ax = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax[0].plot(x, [r["loss"] for r in steps], lw=0.8, label="train (per step)")
    if evals:
        ax[0].plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="val")
    ax[0].set_ylabel("cross-entropy loss")
    ax[0].legend()
    ax[1].plot(x, [r["top1_error"] for r in steps], lw=0.8, label="train top-1")
    if evals:
        ex = [e["step"] for e in evals]
        ax[1].plot(ex, [e["top1_error"] for e in evals], "o-", label="val top-1 (center)")
        ax[1].plot(ex, [e["top5_error"] for e in evals], "s-", label="val top-5 (center)")
        if "top1_error_10crop" in evals[0]:
            ax[1].plot(ex, [e["top1_error_10crop"] for e in evals], "^--", label="val top-1 (10-crop)")
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


def _install_stop_handler(coord: Coordinator) -> dict:
    """SIGTERM (``ray job stop``) and Ctrl-C: finish the chunk, checkpoint, exit (main thread only).

    Returns the previous handlers, to restore when the run ends."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum, frame):
        if coord.stop_requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        print(f"[alexnet] {signal.Signals(signum).name}: checkpointing, then exiting", flush=True)
        coord.request_stop()

    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}


def run_training(
    cfg: JobConfig,
    data_url: str,
    run_dir: str,
    resume: bool = False,
    preset: str | None = None,
    group_factory=None,
    on_coordinator=None,
) -> JobResult:
    """Run (or resume) one training job to the end; see the module docstring.

    ``group_factory(cfg, plan, data_url)`` builds the trainer group (default: Ray actors);
    ``on_coordinator(coord)`` is called once it exists (tests use it to stop a run or scrape).
    """
    plan, _index = plan_run(cfg, data_url)
    ck = None
    if resume:
        found = latest_checkpoint(run_dir)
        if found is None:
            print(
                f"[alexnet] --resume: no complete checkpoint in {run_dir}; starting from step 0", flush=True
            )
        else:
            ck = load_checkpoint(found)
            check_resume(ck, cfg, plan)
            print(f"[alexnet] resuming from {found} (step {ck.step})", flush=True)
    elif list_checkpoints(run_dir):
        raise ValueError(
            f"--run-dir {run_dir} already holds checkpoints: pass --resume to continue that run, "
            "or choose a new --run-dir"
        )
    init_ray(cfg, plan)
    from cluster.trainer import RayTrainerGroup

    group = (group_factory or RayTrainerGroup)(cfg, plan, data_url)
    name = run_dir.rstrip("/").rsplit("/", 1)[-1] or "run"
    metrics = Metrics(run=name)
    metrics_url = None
    if cfg.metrics.port >= 0:
        port = metrics.serve(cfg.metrics.port, cfg.metrics.addr)
        metrics_url = f"http://{cfg.metrics.addr}:{port}/metrics"
    r, s, c = cfg.grid.dims
    metrics.info(
        grid=cfg.grid.shape, preset=preset or "", device=cfg.train.device, model=cfg.model.variant,
        classes=cfg.model.num_classes, batch=cfg.optim.batch_size,
    )  # fmt: skip
    print(
        f"[alexnet] run {name}: grid {cfg.grid.shape} ({r} replica(s) x {s} stage(s) x {c} column(s)), "
        f"batch {cfg.optim.batch_size}, {plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps, "
        f"{plan.data_workers} data workers" + (f"; metrics at {metrics_url}" if metrics_url else ""),
        flush=True,
    )
    extra = {"grid": group.grid.to_dict()} if hasattr(group, "grid") else {}
    coord = Coordinator(cfg, group, plan, run_dir, metrics, resume=ck, extra_meta=extra)
    del ck
    previous = _install_stop_handler(coord)
    if on_coordinator is not None:
        on_coordinator(coord)
    files: dict[str, str] = {}
    try:
        state = coord.run()
        if state == FINISHED and cfg.metrics.trace_steps > 0:
            try:
                trace = group.trace(cfg.metrics.trace_steps)
            except Exception as e:  # the trace is a diagnostic: never fail a finished run for it
                print(f"[alexnet] no timeline trace: {e}", flush=True)
                trace = None
            if trace is not None:
                files["trace"] = _join(run_dir, "trace.json")
                _write_bytes(files["trace"], json.dumps(trace).encode())
    finally:
        group.shutdown()
        metrics.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    files["metrics"] = _join(run_dir, "metrics.jsonl")
    _write_bytes(files["metrics"], coord.history_jsonl().encode())
    if coord.history.steps:
        files["plot"] = _join(run_dir, "plots", "training.png")
        _write_bytes(files["plot"], plot_history(coord))
    latest = latest_checkpoint(run_dir)
    files["checkpoints"] = _join(run_dir, "checkpoints")
    res = JobResult(
        coord.state,
        coord.step_no,
        coord.stop_requested.is_set(),
        latest,
        files,
        None if coord.error is None else f"{type(coord.error).__name__}: {coord.error}",
        metrics_url,
    )
    _report(res, coord)
    return res


def _report(res: JobResult, coord: Coordinator) -> None:
    if res.state != FINISHED:
        print(f"[alexnet] run FAILED at step {res.step}: {res.error}", flush=True)
    elif res.stopped:
        print(
            f"[alexnet] stopped at step {res.step}; continue with the same command plus --resume", flush=True
        )
    else:
        print(f"[alexnet] finished at step {res.step}", flush=True)
    print(f"[alexnet] latest checkpoint: {res.checkpoint}", flush=True)
    for k in ("checkpoints", "metrics", "plot", "trace"):
        if k in res.files:
            print(f"[alexnet] {k}: {res.files[k]}", flush=True)


# -- offline evaluation ------------------------------------------------------------------------


def evaluate_checkpoint(
    checkpoint: str, data_url: str, batch_size: int = 0, max_samples: int = 0, ten_crop: bool = True
) -> dict[str, float]:
    """Center-crop and 10-crop top-1/top-5 error of a checkpoint on the val split (one process).

    Runs the fused execution (the same weights as any grid's, canonical keys) on CPU or the
    local GPU. ``checkpoint`` may be a run directory (its newest complete checkpoint).
    """
    import torch
    from torch.nn import functional as F

    from alexnet.data.index import DatasetIndex
    from alexnet.data.reader import val_batches
    from alexnet.data.transforms import to_model_input
    from alexnet.model import FusedAlexNet
    from cluster.config import from_dict

    ck = load_checkpoint(checkpoint)
    cfg = from_dict(ck.manifest["config"])
    mcfg = cfg.model_config()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = FusedAlexNet(mcfg)
    model.load_state_dict(ck.model)
    model.to(device).eval()
    index = DatasetIndex.load(data_url)
    if index.num_classes != mcfg.num_classes:
        raise ValueError(
            f"--data {data_url} has {index.num_classes} classes, the checkpoint's model {mcfg.num_classes}"
        )
    mean = index.mean_tensor(mcfg.input_size, cfg.data.mean).to(device)
    bs = batch_size or cfg.eval.batch_size or cfg.optim.batch_size
    out: dict[str, float] = {}
    for crop in ("center", "ten") if ten_crop else ("center",):
        hits1 = hits5 = n = 0
        for batch in val_batches(data_url, bs, mcfg.input_size, crop=crop, index=index):
            u8 = torch.from_numpy(batch["images"]).to(device)
            labels = torch.from_numpy(batch["labels"]).to(device)
            b = labels.shape[0]
            if crop == "ten":
                u8 = u8.transpose(0, 1).flatten(0, 1)  # (10 b, 3, S, S), crop-major
            x = to_model_input(u8, torch.zeros(u8.shape[0], 3, device=device), mean, cfg.data.input_scale)
            with torch.no_grad():
                logits = model(x).float()
            if crop == "ten":
                logits = F.softmax(logits, 1).view(10, b, -1).mean(0)
            top = logits.topk(min(5, logits.shape[1]), 1).indices
            hit = top == labels[:, None]
            hits1 += int(hit[:, 0].sum())
            hits5 += int(hit.any(1).sum())
            n += b
            if max_samples and n >= max_samples:
                break
        suffix = "" if crop == "center" else "_10crop"
        out[f"top1_error{suffix}"] = 1 - hits1 / max(n, 1)
        out[f"top5_error{suffix}"] = 1 - hits5 / max(n, 1)
        out["samples"] = n
    out["step"] = ck.step
    return out
