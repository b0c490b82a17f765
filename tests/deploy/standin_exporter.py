"""A stand-in for a running coordinator: cluster.metrics.Metrics with every metric set and moving.

The real job sets the event counters (restarts, skipped samples) only when the event happens;
this process sets all of them, so the Prometheus test can check every dashboard query against
real series, not only its ``or vector(0)`` fallback.

    python -m tests.deploy.standin_exporter [--port P]   # prints the bound port, then serves
"""

from __future__ import annotations

import argparse
import sys
import time

from cluster.metrics import STEP_PARTS, Metrics


def fill(m: Metrics, step: int) -> None:
    """Set every metric for ``step`` of a 2-stage, 2-column run with 2 data workers."""
    m.gauge("step", step)
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


def main(argv: list[str] | None = None) -> int:
    """Serve until killed, advancing one step every 0.2 s."""
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--run", default="standin")
    args = p.parse_args(argv)
    m = Metrics(run=args.run)
    m.info(grid="1x2x2", preset="demo", device="cpu", model="small")
    m.state("running")
    fill(m, 0)
    port = m.serve(args.port)
    print(port, flush=True)
    step = 0
    while True:
        time.sleep(0.2)
        step += 1
        fill(m, step)


if __name__ == "__main__":
    sys.exit(main())
