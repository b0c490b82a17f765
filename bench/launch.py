"""How long ``pipeline.launch.spawn_ranks`` takes to start ranks, against spawned processes.

``spawn_ranks`` forks each rank from a forkserver that has imported torch; the baseline is what the
ranks cost under ``spawn`` (each imports torch itself), the start method it used before. Both run
the same trivial rank function (it returns ``torch.__version__``) for ``--ranks`` ranks, ``--rounds``
times, interleaved, on this machine; the first forkserver call (which starts the server and imports
torch there) is timed on its own.

    .venv/bin/python bench/launch.py [--ranks 8] [--rounds 3]

Last line: JSON with seconds per call of each, the first call's, and ``ratio`` (forkserver over spawn).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, before bench/ itself

from pipeline import launch  # noqa: E402


def _rank(rank: int, world_size: int, port: int) -> str:
    import torch

    return torch.__version__


def _spawned(ranks: int) -> list[str]:
    """The same call with spawn's context: every rank a fresh interpreter importing torch."""
    real = launch.mp.get_context
    launch.mp.get_context = lambda method: real("spawn")  # the context spawn_ranks asks for, as spawn
    try:
        return launch.spawn_ranks(_rank, ranks, timeout_s=600)
    finally:
        launch.mp.get_context = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    launch.spawn_ranks(_rank, args.ranks, timeout_s=600)
    first = time.perf_counter() - t0
    times: dict[str, list[float]] = {"forkserver": [], "spawn": []}
    for r in range(args.rounds):
        for name in ("forkserver", "spawn") if r % 2 == 0 else ("spawn", "forkserver"):
            t0 = time.perf_counter()
            got = (
                launch.spawn_ranks(_rank, args.ranks, timeout_s=600)
                if name == "forkserver"
                else _spawned(args.ranks)
            )
            times[name].append(time.perf_counter() - t0)
            assert len(got) == args.ranks and all(got)
    fork, spawn = (statistics.median(times[k]) for k in ("forkserver", "spawn"))
    print(
        json.dumps(
            {
                "ranks": args.ranks,
                "forkserver_first_call_s": round(first, 2),
                "forkserver_s": round(fork, 2),
                "spawn_s": round(spawn, 2),
                "ratio": round(fork / spawn, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
