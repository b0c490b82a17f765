"""A stand-in for a running coordinator: cluster.metrics.Metrics with every metric set and moving.

The real job sets the event counters (restarts, skipped samples) only when the event happens;
this process sets all of them, so the Prometheus test can check every dashboard query against
real series, not only its ``or vector(0)`` fallback.

    python -m tests.deploy.standin_exporter [--port P] [--ray-gpus]   # prints the bound port(s), then serves
"""

from __future__ import annotations

import argparse
import sys
import time

from cluster.metrics import STEP_PARTS, Metrics


def fill(m: Metrics, step: int) -> None:
    """Set every metric for ``step`` of a 2-stage, 2-column run with 2 data workers."""
    m.gauge("step", step)
    m.gauge("total_steps", 10_000)
    m.gauge("epoch", step // 50)
    m.inc("images", 32)
    m.gauge("images_per_second", 300.0 + step % 7)
    m.gauge("learning_rate", 0.01)
    for split in ("train", "val"):
        m.gauge("loss", 2.3 - 0.001 * step, split=split)
    for crops, split in (("train", "train"), ("center", "val"), ("10crop", "val")):
        m.gauge("top1_error_ratio", 0.9 - 0.001 * step, split=split, crops=crops)
        m.gauge("top5_error_ratio", 0.5 - 0.001 * step, split=split, crops=crops)
    for stage in ("0", "1"):
        m.gauge("pipeline_bubble_ratio", 0.2, stage=stage)
        for column in ("0", "1"):
            for i, part in enumerate(STEP_PARTS):
                m.gauge("step_time_seconds", 0.01 * (i + 1), part=part, stage=stage, column=column)
    m.gauge("step_seconds", 0.15)
    for worker in ("0", "1"):
        m.gauge("data_queue_depth_batches", 3, worker=worker)
    m.gauge("decode_images_per_second", 900.0)
    m.inc("skipped_samples", 1, reason="corrupt")
    m.gauge("checkpoint_duration_seconds", 0.4)
    m.gauge("checkpoint_stall_seconds", 0.02)
    m.gauge("checkpoint_bytes", 5e6)
    m.inc("checkpoints")
    m.inc("restarts", reason="trainer_failure")
    m.inc("data_worker_restarts")


# Ray's per-node GPU gauges (its reporter agent's names, exported with the prefix ray_): what the
# dashboard's GPU panels query. Ray only exports them on nodes with GPUs, so a CPU test serves them
# itself, with the label names Ray's reporter agent gives them.
RAY_GPU_GAUGES = ("node_gpus_utilization", "node_gram_used", "node_gram_available")


def serve_ray_gpus(port: int = 0) -> int:
    """Serve Ray's GPU gauges for two GPUs of one node (memory in MiB, as Ray reports it); the port."""
    from prometheus_client import CollectorRegistry, Gauge, start_http_server
    from ray.dashboard.consts import GPU_TAG_KEYS
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    registry = CollectorRegistry()
    labels = list(dict.fromkeys([*GPU_TAG_KEYS, "SessionName"]))
    values = {"node_gpus_utilization": 87.0, "node_gram_used": 30_000.0, "node_gram_available": 50_000.0}
    for name in RAY_GPU_GAUGES:
        assert name in METRICS_GAUGES, f"Ray no longer exports {name}"
        g = Gauge(f"ray_{name}", name, labels, registry=registry)
        for i in ("0", "1"):
            tags = {"ip": "10.0.0.2", "RayNodeType": "worker", "IsHeadNode": "false", "GpuIndex": i}
            tags.update(GpuDeviceName="NVIDIA H100", GpuUuid=f"GPU-{i}", SessionName="standin")
            g.labels(**{k: tags.get(k, "") for k in labels}).set(values[name])
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    return server.server_address[1]


def main(argv: list[str] | None = None) -> int:
    """Serve until killed, advancing one step every 0.2 s; with --ray-gpus, Ray's GPU gauges too."""
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--run", default="standin")
    p.add_argument("--ray-gpus", action="store_true", help="also serve Ray's GPU gauges; print its port")
    args = p.parse_args(argv)
    m = Metrics(run=args.run)
    m.info(grid="1x2x2", preset="demo", device="cpu", model="small")
    m.state("running")
    fill(m, 0)
    port = m.serve(args.port)
    ray_port = serve_ray_gpus() if args.ray_gpus else ""
    print(port, ray_port, flush=True)
    step = 0
    while True:
        time.sleep(0.2)
        step += 1
        fill(m, step)


if __name__ == "__main__":
    sys.exit(main())
