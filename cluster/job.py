"""The training job (``alexnet train``): what the driver does, top to bottom, in :func:`run_training`.

Before Ray starts, check everything a user can get wrong (a ``ValueError`` each, exit code 2):
the config and the dataset (:mod:`cluster.plan`: a val split when the run validates, every shard
on disk), the run directory (a writable directory), the checkpoint to resume from (the newest
complete one, or ``--from-checkpoint``; an incompatible one is refused: :mod:`cluster.manifest`),
and the metrics endpoint, which is served from then on, so its port stays the run's. Write the
resolved config into the run directory (``config.toml``, which ``--config`` reruns). Then attach
to the Ray cluster (``RAY_ADDRESS``, as under ``ray job submit``) or start an embedded local one;
run the coordinator (:mod:`cluster.coordinator`), which on SIGTERM / ``ray job
stop`` checkpoints and stops; at the end write the history, the plot and the Chrome trace into
the run directory (:mod:`cluster.reporting`) and print where everything is.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import posixpath
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from cluster.checkpoint import join_url, latest_checkpoint
from cluster.config import JobConfig
from cluster.coordinator import FAILED, FINISHED, Coordinator
from cluster.manifest import Preprocess, ResumePoint, load_resume
from cluster.metrics import Metrics
from cluster.plan import RunPlan, plan_run
from cluster.reporting import Reporter, TensorBoardLog, write_bytes, write_outputs
from cluster.run import Run, resolve_grid, resolve_run
from cluster.scaling import Resources

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
        """0 finished, 143 stopped on request (after a complete checkpoint), 1 failed."""
        if self.state != FINISHED:
            return 1
        return EXIT_STOPPED if self.stopped else 0


def run_training(
    cfg: JobConfig,
    data_url: str,
    run_dir: str,
    resume: bool = False,
    preset: str | None = None,
    group_factory: Callable[[Run], Any] | None = None,
    on_coordinator: Callable[[Coordinator], None] | None = None,
    from_checkpoint: str | None = None,
    init_from: str | None = None,
) -> JobResult:
    """Run (or resume) one training job to the end; see the module docstring.

    ``from_checkpoint`` (``--from-checkpoint``, with ``resume``): continue from that checkpoint
    instead of the newest in ``run_dir``; the run writes into ``run_dir`` either way.
    ``init_from`` (``--init-from``): a fresh run starts from that checkpoint's weights
    (:mod:`cluster.finetune`); with ``resume``, only when ``run_dir`` has no checkpoint yet.
    ``group_factory(run)`` builds the trainer group of the resolved run (default: Ray actors);
    ``on_coordinator(coord)`` is called once it exists (tests use it to stop a run or scrape).
    """
    # Everything a user can get wrong is checked before Ray starts (a ValueError: exit 2)
    if from_checkpoint is not None and not resume:
        raise ValueError(f"--from-checkpoint {from_checkpoint} continues a run: add --resume")
    cfg = cfg.for_data(data_url)  # model.input_size from the stored images when unset
    cfg = choose_cluster_grid(cfg)  # grid.shape "auto": from the cluster's resources, read once, here
    plan, index = plan_run(cfg, data_url)
    check_run_dir(run_dir)
    point = _resume_point(run_dir, resume, cfg, plan, from_checkpoint)
    if point is not None:  # a resumed run reads the epoch as the streams its checkpoints record
        plan = point.resumed_plan(cfg, plan)
    init = _init_weights(init_from, cfg, index.classes) if init_from is not None and point is None else None
    run = resolve_run(cfg, data_url, plan)  # what every actor takes as it is
    write_bytes(join_url(run_dir, "config.toml"), cfg.to_toml().encode())  # `--config` it to rerun
    name = run_dir.rstrip("/").rsplit("/", 1)[-1] or "run"
    metrics = Metrics(run=name)
    metrics_url = _serve_metrics(metrics, cfg, plan, name, preset)  # bound now, so the port stays ours
    try:
        init_ray(cfg, plan)
        group = (group_factory or _ray_group)(run)
    except BaseException:
        metrics.close()
        raise
    report = Reporter(
        metrics, plan, cfg.global_batch, cfg.train.log_every_steps, tensorboard=TensorBoardLog(run_dir)
    )
    coord = Coordinator(
        run, group, run_dir, report, resume=point, preprocess=Preprocess.of(cfg, index), init=init
    )
    del point, init  # the coordinator loads the tensors into the group
    trace = _drive(coord, group, metrics, cfg.metrics.trace_steps, on_coordinator)
    report.close()
    return _finish(coord, report, run_dir, trace, metrics_url)


def _finish(
    coord: Coordinator, report: Reporter, run_dir: str, trace: Any, metrics_url: str | None
) -> JobResult:
    """Write the run's outputs (history, plot, trace) and print and return its result."""
    state = coord.state
    error = None if coord.error is None else f"{type(coord.error).__name__}: {coord.error}"
    try:
        files = write_outputs(run_dir, report.history, trace)
    except OSError as e:  # the run's checkpoints are what matters; say what is missing, no traceback
        files, state = {}, FAILED
        lost = f"metrics.jsonl, the plot and the trace could not be written to --run-dir {run_dir} ({e})"
        error = f"{error}; {lost}" if error else lost
    res = JobResult(
        state, coord.step_no, coord.stop_requested.is_set(), _latest(run_dir), files, error, metrics_url
    )
    _print_result(res)
    return res


def check_run_dir(run_dir: str) -> None:
    """``--run-dir`` is a directory that exists or can be created, and can be written: checked by
    creating it and writing (and removing) a probe file, so a read-only mount fails here too."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    if fs.isfile(root):
        raise ValueError(
            f"--run-dir {run_dir} is a file: give a directory (a new one, or the run's to --resume)"
        )
    try:
        fs.makedirs(root, exist_ok=True)
        probe = f"{root.rstrip('/')}/.alexnet-write-test"
        with fs.open(probe, "wb") as f:
            f.write(b"")
        fs.rm(probe)
    except OSError as e:  # a parent that is a file (NotADirectoryError, FileExistsError), permissions
        parent = next((q for q in _parents(root) if fs.isfile(q)), None)
        why = f"{parent} is a file" if parent else (e.strerror or str(e))
        raise ValueError(
            f"--run-dir {run_dir}: cannot create or write it ({why}): choose a directory you may "
            "write (a local path, a shared mount or an fsspec URL)"
        ) from None


def _parents(path: str) -> Iterator[str]:
    while posixpath.dirname(path.rstrip("/")) not in (path.rstrip("/"), ""):
        path = posixpath.dirname(path.rstrip("/"))
        yield path


def _latest(run_dir: str) -> str | None:
    """The newest complete checkpoint for the summary (None also when the storage cannot be read)."""
    try:
        return latest_checkpoint(run_dir)
    except OSError:
        return None


def _resume_point(
    run_dir: str, resume: bool, cfg: JobConfig, plan: RunPlan, from_checkpoint: str | None
) -> ResumePoint | None:
    """Where the run starts (:func:`cluster.manifest.load_resume` decides), said in a line."""
    point, skipped = load_resume(run_dir, cfg, plan, from_checkpoint, resume)
    for line in skipped:
        print(f"[alexnet] --resume: skipped newer checkpoint {line}", flush=True)
    if point is None and resume:
        print(f"[alexnet] --resume: no complete checkpoint in {run_dir}; starting from step 0", flush=True)
    elif point is not None:
        into = f", writing into {run_dir}" if from_checkpoint is not None else ""
        print(f"[alexnet] resuming from {point.url} (step {point.step}){into}", flush=True)
    return point


# The first Ray release with token authentication (RAY_AUTH_MODE=token), which every config in
# deploy/ turns on; pyproject.toml requires it. (Ray turns it on by default for a local ray.init()
# from 2.59, for every cluster from 2.61.)
RAY_TOKEN_AUTH = "2.52"
AUTH_FIX = (
    "start every node with RAY_AUTH_MODE=token (deploy/ray-cluster.yaml and deploy/kuberay do; "
    "`ray get-auth-token --generate` makes the token) and export RAY_AUTH_MODE=token where you submit"
)


def check_ray_version(version: str) -> None:
    """Refuse a Ray older than :data:`RAY_TOKEN_AUTH`: it has no token authentication, so a cluster
    deployed from deploy/ could not be reached and a local one would run without it."""
    from packaging.version import Version

    if Version(version) < Version(RAY_TOKEN_AUTH):
        raise ValueError(
            f"ray {version} is installed, but alexnet needs ray>={RAY_TOKEN_AUTH}, the first with token "
            f"authentication (which deploy/ turns on): pip install -U 'ray[default]>={RAY_TOKEN_AUTH}' "
            "(and the same version on the cluster)"
        )


def auth_warning(mode: str, where: str) -> str | None:
    """The warning for a Ray whose token authentication is ``mode`` (``"token"``: none)."""
    if mode == "token":
        return None
    return (
        f"[alexnet] warning: {where} runs without token authentication (RAY_AUTH_MODE={mode}): anyone "
        f"who reaches a node's ports can submit tasks to it, i.e. run code there; {AUTH_FIX}"
    )


def cluster_auth_mode(dashboard_url: str | None) -> str:
    """``"token"`` or ``"disabled"``: the cluster's own answer (its dashboard's public
    ``/api/authentication_mode``), else this driver's mode, which the cluster just accepted."""
    import urllib.request

    from ray._raylet import AuthenticationMode, get_authentication_mode

    if dashboard_url:
        url = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
        try:
            with urllib.request.urlopen(f"{url}/api/authentication_mode", timeout=5) as r:
                return str(json.load(r)["authentication_mode"])
        except (OSError, ValueError, KeyError):
            pass  # no dashboard reachable from here: the driver's own mode is the best evidence
    return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"


def _local_auth_on() -> str:
    """Token authentication for the embedded local Ray, unless the environment chose a mode
    (``RAY_AUTH_MODE``); returns the mode it runs with. Ray before 2.59 starts a local Ray without it."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None:
        os.environ["RAY_AUTH_MODE"] = mode = "token"  # inherited by the raylet, the GCS, every worker
        _refresh_ray_config()
    return mode


def _refresh_ray_config() -> None:
    """Make this process's cached RayConfig read ``RAY_AUTH_MODE`` again: it was read at import, and
    without this ray.init writes no token (~/.ray/auth_token) and the GCS it starts aborts."""
    from ray._raylet import Config

    Config.initialize("")


def _init_weights(init_from: str, cfg: JobConfig, classes) -> dict:
    """``--init-from``'s starting weights (checked before Ray starts), each decision printed."""
    from cluster.finetune import init_weights

    state, lines = init_weights(init_from, cfg, classes)
    for line in lines:
        print(f"[alexnet] {line}", flush=True)
    return state


def choose_cluster_grid(cfg: JobConfig) -> JobConfig:
    """``grid.shape = "auto"`` chosen for the cluster the run will use (:func:`cluster.run.resolve_grid`),
    the choice printed: the run's first line (a study's, for all its runs). An explicit shape is
    returned as it is."""
    if not cfg.grid.is_auto:
        return cfg
    cfg, lines = resolve_grid(cfg, cluster_resources())
    for line in lines:
        print(f"[alexnet] {line}", flush=True)
    return cfg


def cluster_resources() -> Resources:
    """What the run's cluster has: the one in ``RAY_ADDRESS`` (attached to now, as :func:`init_ray`
    would; or the Ray this process already joined), else this machine, which the embedded local Ray
    will be."""
    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        _attach_ray()
        return Resources.from_ray_nodes(ray.nodes(), "the Ray cluster")
    return Resources.this_machine()


def _attach_ray() -> None:
    """Join the cluster in ``RAY_ADDRESS`` (a warning when its token authentication is off)."""
    import ray

    check_ray_version(ray.__version__)
    if ray.is_initialized():
        return
    ctx = ray.init(log_to_driver=True)
    warning = auth_warning(
        cluster_auth_mode(ctx.dashboard_url), f"the Ray cluster at {ctx.address_info['gcs_address']}"
    )
    if warning:
        print(warning, flush=True)


def init_ray(cfg: JobConfig, plan: RunPlan) -> None:
    """Attach to the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it; a warning when its
    token authentication is off) or start a local one, with token authentication on."""
    import ray

    check_ray_version(ray.__version__)
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        _attach_ray()
        return
    warning = auth_warning(_local_auth_on(), "the embedded local Ray")
    if warning:
        print(warning, flush=True)
    # Embedded local Ray: logical CPUs are a scheduling count, so reserve enough for the grid
    # and the data workers even on a 2-core laptop (the processes share the real cores).
    need = cfg.grid.world_size * cfg.grid.cpus_per_rank + plan.data_workers
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, math.ceil(need)),
        include_dashboard=False,
        log_to_driver=True,
    )


def _ray_group(run: Run):
    from cluster.group import RayTrainerGroup  # imported once Ray is up

    return RayTrainerGroup(run)


def _serve_metrics(
    metrics: Metrics, cfg: JobConfig, plan: RunPlan, name: str, preset: str | None
) -> str | None:
    """Start the Prometheus endpoint (``metrics.port`` -1: none), export the run's facts, print
    the run's header line; returns the endpoint's URL."""
    url = None
    if cfg.metrics.port >= 0:
        try:
            port = metrics.serve(cfg.metrics.port, cfg.metrics.addr)
        except OSError as e:
            raise _unservable(cfg.metrics.port, cfg.metrics.addr, e) from None
        url = f"http://{cfg.metrics.addr}:{port}/metrics"
    metrics.info(
        grid=cfg.grid.shape,
        preset=preset or "",
        device=cfg.train.device,
        model=cfg.model.variant,
        classes=cfg.model.num_classes,
        batch=cfg.global_batch,
    )
    r, s, c = cfg.grid.dims
    print(
        f"[alexnet] run {name}: grid {cfg.grid.shape} ({r} replica(s) x {s} stage(s) x {c} column(s)), "
        f"{cfg.describe_batch()}; {plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps, "
        f"{plan.data_workers} data workers" + (f"; metrics at {url}" if url else ""),
        flush=True,
    )
    return url


def _unservable(port: int, addr: str, e: OSError) -> ValueError:
    """The error for a metrics endpoint that cannot listen on ``addr:port``, by cause."""
    if e.errno == errno.EADDRINUSE:
        return ValueError(
            f"metrics.port={port} (--metrics-port): {addr}:{port} is already in use (another run or "
            "program): choose another port, --metrics-port 0 for any free one, or -1 for no endpoint"
        )
    if e.errno == errno.EACCES:
        return ValueError(
            f"metrics.port={port} (--metrics-port): not allowed to listen on it ({e.strerror}): "
            "use a port >= 1024, or 0 for any free one"
        )
    return ValueError(
        f"metrics.addr={addr!r}: cannot listen on {addr}:{port} ({e.strerror or e}): use an address "
        'of this machine ("0.0.0.0": all of them, "127.0.0.1": this machine only)'
    )


def _drive(coord: Coordinator, group, metrics: Metrics, trace_steps: int, on_coordinator) -> dict | None:
    """Run the coordinator to its end (stoppable by signal); the timeline trace of a finished run."""
    trace = None
    with _stop_on_signals(coord):
        try:
            if on_coordinator is not None:
                on_coordinator(coord)
            if coord.run() == FINISHED and trace_steps > 0:
                try:
                    trace = group.trace(trace_steps)
                except Exception as e:  # the trace is a diagnostic: never fail a finished run for it
                    print(f"[alexnet] no timeline trace: {e}", flush=True)
        finally:
            group.shutdown()
            metrics.close()
    return trace


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler(signum, frame)`` on SIGTERM (``ray job stop``) and SIGINT (Ctrl-C) while the block
    runs, the previous handlers back after it; nothing in a thread other than the main one (only it
    can take signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop_on_signals(coord: Coordinator) -> contextlib.AbstractContextManager[None]:
    """SIGTERM and Ctrl-C: finish the chunk, checkpoint, exit (a second Ctrl-C interrupts at once)."""

    def on_signal(signum, frame):
        if coord.stop_requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        print(f"[alexnet] {signal.Signals(signum).name}: checkpointing, then exiting", flush=True)
        coord.request_stop()

    return on_stop_signals(on_signal)


def _print_result(res: JobResult) -> None:
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
