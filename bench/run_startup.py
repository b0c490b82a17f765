"""A run's start-up on the embedded local Ray: where the seconds before step 0 go.

Two demo runs (1x2x2, the given data workers, 10 steps, no validation) one after the other on one
local Ray, each phase timed from the driver: reserving the placement group, starting the data
workers (the trainers' processes start meanwhile), the trainers' set-up (process groups, engine,
feed), the steps, the end. The second run is the steady case (Ray's own start is paid once).

    .venv/bin/python bench/run_startup.py [--workers 2] [--steps 10]

To compare two versions, run it in a checkout of each on the same machine, one after the other
(bench/RESULTS.md "A run's start-up"): a fresh process per version, so no shared import state.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, before bench/ itself


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="data.workers (default 2, the demo's)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()

    import ray

    from alexnet.data.writer import build_synthetic
    from cluster import group
    from cluster.config import load_config
    from cluster.job import run_training

    marks: list[tuple[str, float]] = []

    def timed(owner, name: str, label: str) -> None:
        f = getattr(owner, name)

        def wrapper(*a, **k):
            marks.append((f"{label} begins", time.monotonic()))
            try:
                return f(*a, **k)
            finally:
                marks.append((f"{label} ends", time.monotonic()))

        setattr(owner, name, wrapper)

    # the driver-side calls that bracket each phase (cluster/group.py)
    timed(group, "start_pool", "data workers")
    timed(group.RayTrainerGroup, "start", "start")

    root = Path(tempfile.mkdtemp(prefix="startup"))
    build_synthetic(360, str(root / "data"), shard_size=50, workers=1, progress=False)
    ray.init(
        address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    sets = {
        "train.steps": args.steps,
        "train.steps_per_call": 2,
        "checkpoint.every_steps": 4,
        "eval.every_epochs": 0,
        "metrics.port": -1,
        "metrics.trace_steps": 0,
        "data.workers": args.workers,
    }
    try:
        for i in range(args.runs):
            marks.clear()
            t0 = time.monotonic()
            res = run_training(
                load_config(preset="demo", overrides=sets), str(root / "data"), str(root / f"r{i}")
            )
            t_end = time.monotonic()
            at = dict(marks)
            row = {
                "run": i,
                "state": res.state,
                "to_step_0_s": round(at["start ends"] - t0, 2),
                "data_workers_and_trainer_processes_s": round(
                    at["data workers ends"] - at["data workers begins"], 2
                ),
                "trainer_setup_s": round(at["start ends"] - at["data workers ends"], 2),
                "steps_and_end_s": round(t_end - at["start ends"], 2),
                "total_s": round(t_end - t0, 2),
            }
            print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
