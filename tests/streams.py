"""The suite's streams under pytest-xdist (``make test`` runs ``pytest -n 2``).

On 2 cores the suite is CPU-bound, but a plain run leaves ~20 % of the machine idle while the tests
with a Ray wait on their processes' starts. Two workers fill it, keeping what the suite relies on:
one Ray at a time per worker, and the session's local Ray started once.

* :data:`LOCAL`: the tests on the session's local Ray, ONE unit of work, so one worker runs all of
  them, in the suite's order (the reference run, trained once, then the tests that compare with it);
* the tests without a Ray, each a unit of its own, dealt to whichever worker is free (the other
  one, while the first runs :data:`LOCAL`);
* :data:`CLUSTERS`: the tests that start clusters of their own (``ray_local_shutdown``), ONE unit,
  queued last: the worker that takes it has no local Ray, or shuts it down first, as in a plain
  run, while the other worker's local Ray may still run beside it. Both workers' Rays take the
  authentication mode and the token the controller set (``tests/conftest.py``).

pytest-xdist's own ``--dist loadgroup`` would group tests from an ``xdist_group`` mark, but it does
so by rewriting ``item._nodeid``, which pytest 9.2 no longer reads: the mark is silently ignored and
the tests are dealt out one by one. So the workers write each Ray test's unit to a file the
controller names (:data:`ENV`), and the controller's scheduler reads it once every worker has
collected, before it hands out any test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "ALEXNET_TEST_RAY_STREAM"  # the file the workers write {nodeid: unit} of the Ray tests to
LOCAL = "ray-local"
CLUSTERS = "ray-clusters"


def write(units: dict[str, str]) -> None:
    """In a worker: record the Ray tests' units (every worker collects the same; the file is
    replaced whole, so the controller never reads half of one)."""
    path = Path(os.environ[ENV])
    tmp = path.with_name(f"{path.name}.{os.environ.get('PYTEST_XDIST_WORKER', 'w')}")
    tmp.write_text(json.dumps(units))
    tmp.replace(path)


def scheduler(config, log=None):
    """pytest-xdist's load-by-scope scheduling with the units above, in the collection's order (the
    workers sort it: :func:`tests.conftest.pytest_collection_modifyitems`). Its class is made here,
    where pytest-xdist is imported: a plain run does without it."""
    from xdist.scheduler import LoadScopeScheduling

    class _Scheduling(LoadScopeScheduling):
        def __init__(self, config, log=None) -> None:
            super().__init__(config, log)
            self._units: dict[str, str] | None = None
            # xdist would queue the biggest units first: CLUSTERS must stay last
            config.option.loadscopereorder = False

        def _split_scope(self, nodeid: str) -> str:
            if self._units is None:  # first called in schedule(), after every worker has collected
                self._units = json.loads(Path(os.environ[ENV]).read_text())
            return self._units.get(nodeid, nodeid)

    return _Scheduling(config, log)
