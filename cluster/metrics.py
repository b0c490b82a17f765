"""Every Prometheus metric the coordinator exports, declared in one place.

Names carry the ``alexnet_`` prefix and their unit; each has a description. One
:class:`Metrics` object per coordinator owns its own registry (so tests and several runs
in one process never collide) and serves it on one HTTP endpoint. The Grafana dashboard
and alert rules in ``deploy/`` query exactly these names (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Info, start_http_server

# the coordinator's states (cluster.coordinator); new ones are appended, names are never changed
STATES = (
    "starting",
    "running",
    "recovering",
    "checkpointing",
    "finished",
    "failed",
    "evaluating",
    "finishing",
)
# label values of alexnet_step_time_seconds{part}: the engine's <part>_s timings plus data_wait_s
STEP_PARTS = ("compute", "exchange", "pipeline_wait", "data_wait", "optimizer", "grad_sync")
# label values of alexnet_skipped_samples_total{reason}: an undecodable image, a record without jpg
# or cls, a record lost to a truncated tar, a record in a shard that cannot be opened at all
SKIP_REASONS = ("corrupt", "missing", "truncated", "unreadable")


@dataclass(frozen=True)
class MetricSpec:
    """Name (without prefix), kind, description and label names of one metric."""

    name: str
    kind: str  # "gauge", "counter", "enum" or "info"
    doc: str
    labels: tuple[str, ...] = ("run",)


SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("images_per_second", "gauge", "Training throughput over the last logging window, images/s."),
    MetricSpec("images", "counter", "Training images consumed (use rate() for throughput)."),
    MetricSpec("step", "gauge", "Global optimizer step reached."),
    MetricSpec(
        "total_steps",
        "gauge",
        "Steps the run will have done at its end (--steps, or the epochs' steps): with step, the ETA.",
    ),
    MetricSpec("epoch", "gauge", "Current epoch (0-based)."),
    MetricSpec(
        "loss",
        "gauge",
        "Cross-entropy loss: train (last step, mean over the global batch) or val.",
        ("run", "split"),
    ),
    MetricSpec(
        "top1_error_ratio",
        "gauge",
        "Top-1 error, 0..1; crops is 'center' or '10crop' for val, 'train' for train.",
        ("run", "split", "crops"),
    ),
    MetricSpec(
        "top5_error_ratio", "gauge", "Top-5 error, 0..1; crops as for top1.", ("run", "split", "crops")
    ),
    MetricSpec("learning_rate", "gauge", "Current SGD learning rate."),
    MetricSpec(
        "step_time_seconds",
        "gauge",
        "Wall time of the last step split into parts "
        "(compute, exchange, pipeline_wait, data_wait, optimizer, grad_sync: the optimizer update "
        "alone and the gradient all-reduce across replicas), per pipeline stage and column.",
        ("run", "part", "stage", "column"),
    ),
    MetricSpec("step_seconds", "gauge", "Wall time of the last whole training step."),
    MetricSpec(
        "pipeline_bubble_ratio",
        "gauge",
        "Per-stage idle fraction of the last step: the time a stage's ranks waited on pipeline "
        "receives (pipeline_wait) over their step time, mean over its columns (replica 0), 0..1.",
        ("run", "stage"),
    ),
    MetricSpec(
        "data_queue_depth_batches",
        "gauge",
        "Batches prefetched and ready in a data worker.",
        ("run", "worker"),
    ),
    MetricSpec(
        "decode_images_per_second", "gauge", "Images decoded and augmented per second by all data workers."
    ),
    MetricSpec(
        "skipped_samples",
        "counter",
        "Samples skipped as corrupt, truncated or unreadable.",
        ("run", "reason"),
    ),
    MetricSpec(
        "checkpoint_duration_seconds", "gauge", "Time to write the last checkpoint (background write)."
    ),
    MetricSpec(
        "checkpoint_stall_seconds", "gauge", "Time training stood still for the last checkpoint (host copy)."
    ),
    MetricSpec("checkpoint_bytes", "gauge", "Size of the last checkpoint written."),
    MetricSpec("checkpoints", "counter", "Checkpoints written."),
    MetricSpec("restarts", "counter", "Trainer-group restarts after a failure.", ("run", "reason")),
    MetricSpec("data_worker_restarts", "counter", "Data workers replaced after a failure."),
    MetricSpec("state", "enum", "Coordinator state (see cluster.coordinator)."),
    MetricSpec("state_transitions", "counter", "Coordinator state transitions.", ("run", "to_state")),
    MetricSpec("run", "info", "Static facts of the run: grid, preset, device, model."),
)

PREFIX = "alexnet_"


def exported_names() -> set[str]:
    """The metric family names as Prometheus sees them (counters gain ``_total``)."""
    names = set()
    for s in SPECS:
        base = PREFIX + s.name
        names.add(base + "_total" if s.kind == "counter" else base + "_info" if s.kind == "info" else base)
    return names


class Metrics:
    """The coordinator's metrics, bound to one run label.

    ``m.get("loss").labels(run=..., split="train").set(x)``; :meth:`gauge` / :meth:`inc` are
    shortcuts that fill in the run label.
    """

    def __init__(self, run: str, registry: CollectorRegistry | None = None) -> None:
        self.run = run
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._m = {}
        for s in SPECS:
            name = PREFIX + s.name
            if s.kind == "gauge":
                self._m[s.name] = Gauge(name, s.doc, s.labels, registry=self.registry)
            elif s.kind == "counter":
                self._m[s.name] = Counter(name, s.doc, s.labels, registry=self.registry)
            elif s.kind == "enum":
                self._m[s.name] = Enum(name, s.doc, s.labels, states=list(STATES), registry=self.registry)
            else:
                self._m[s.name] = Info(name, s.doc, s.labels, registry=self.registry)
        self._server = None

    def get(self, name: str):
        """The prometheus_client object of metric ``name`` (without prefix)."""
        return self._m[name]

    def gauge(self, name: str, value: float, **labels: str) -> None:
        """Set gauge ``name`` (the run label filled in)."""
        self._m[name].labels(run=self.run, **labels).set(value)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` to counter ``name`` (the run label filled in)."""
        self._m[name].labels(run=self.run, **labels).inc(amount)

    def state(self, state: str) -> None:
        """The coordinator entered ``state``: the enum and the transition counter."""
        self._m["state"].labels(run=self.run).state(state)
        self.inc("state_transitions", to_state=state)

    def info(self, **facts: str) -> None:
        """The run's static facts (``alexnet_run_info``)."""
        self._m["run"].labels(run=self.run).info({k: str(v) for k, v in facts.items()})

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint (port 0 picks a free one); returns the bound port."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def close(self) -> None:
        """Stop the HTTP endpoint, if serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
