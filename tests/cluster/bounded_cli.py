"""Runs ``alexnet`` commands in one process on the fake trainer group (no Ray), for the tests whose
process must have bounded memory (:mod:`tests.cluster.test_hostile_checkpoints`).

``python -m tests.cluster.bounded_cli '[["eval", ...], ["train", ...]]'``: each command's output
follows a line ``=== <argv>`` and ends with ``=== rc <exit code>``; an exception escaping the
command (a traceback a user would see, or a MemoryError under the bound) is printed and its type
given as the exit code, so the next command still runs.
"""

from __future__ import annotations

import json
import sys
import traceback


def main(commands: list[list[str]]) -> None:
    """Run each command (``alexnet`` argv) in turn, with ``alexnet train`` on the fake group."""
    import cluster.job as job
    from alexnet.cli import main as cli
    from tests.cluster.test_coordinator import FakeGroup

    job.init_ray = lambda cfg, plan: None  # the driver runs for real; its trainer group is fake
    job._ray_group = lambda run: FakeGroup()
    for argv in commands:
        print(f"=== {' '.join(argv)}", flush=True)
        try:
            rc: object = cli(argv)
        except BaseException as e:  # noqa: BLE001 (the test asserts there is none)
            traceback.print_exc()
            rc = type(e).__name__
        sys.stdout.flush()
        sys.stderr.flush()
        print(f"=== rc {rc}", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
