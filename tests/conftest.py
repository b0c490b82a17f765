"""Shared test set-up.

* deterministic torch per test;
* ``ray_local``: ONE local Ray per test session, started on first use (8 logical CPUs on
  the 2-core machine) and shut down at the end. Tests that need Ray take this fixture;
  tests that need their own cluster (ray.cluster_utils.Cluster, ray start) must not run
  while it is up: mark them and shut it down first via ``ray_local_shutdown``.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray starts its workers (every actor: trainer ranks, data workers) at nice 15, for a cluster where
# they are the only load. On a shared test machine two CPU-bound processes at nice 0 then take ~95 %
# of the CPU and a test's actors run ~20x slower (measured: 4 % CPU each). At nice 0 they get their
# fair share: the suite is as steady on a loaded machine as its timeouts assume. Every Ray a test
# starts (ray.init, Cluster, `ray start`, a CLI's) inherits this from the environment.
os.environ.setdefault("RAY_worker_niceness", "0")


def pytest_sessionstart(session):
    """Compile the project's modules to bytecode once, before the ~150 processes the suite starts
    (Ray actors, CLI runs, ranks) import them: where writing bytecode is off
    (``PYTHONDONTWRITEBYTECODE``, as on some CI images) each would compile every module it imports
    again (~0.2 s of CPU a process). Up-to-date files are skipped; a read-only checkout is left as
    it is."""
    import compileall
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for package in ("alexnet", "cluster", "pipeline", "tests", "bench"):
        compileall.compile_dir(root / package, quiet=2)


def pytest_collection_finish(session):
    """Start the GPU check's CPU run (``tests/test_gpu_check.py``) now, when its test was collected:
    one core for ~30 s, beside the first tests rather than alone at its turn."""
    name = "tests/test_gpu_check.py::test_gpu_check_runs_every_section_on_cpu_without_ray_or_webdataset"
    if any(item.nodeid == name for item in session.items):
        import tempfile
        from pathlib import Path

        from tests import test_gpu_check

        folder = Path(tempfile.mkdtemp(prefix="gpu_check"))
        test_gpu_check.EARLY["check"] = (test_gpu_check.start(folder), folder)


def pytest_sessionfinish(session):
    """An early GPU check whose test never ran (deselected after all, or the session stopped)."""
    from tests import test_gpu_check

    for proc, folder in test_gpu_check.EARLY.values():
        proc.kill()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """The tests that shut the session's local Ray down (for clusters of their own) run last, in
    their order: the local Ray then starts once per session, not again after each of them (~6 s
    of Ray's own start each time)."""
    items.sort(key=lambda item: "ray_local_shutdown" in getattr(item, "fixturenames", ()))


@pytest.fixture(autouse=True)
def _torch_defaults():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (as the benchmarks run, OMP_NUM_THREADS=1): a tiny net's step on
    two threads of the shared 2-core machine under load takes 10-20x longer."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_RAY = {"started": False}


@pytest.fixture(scope="session")
def _ray_finalizer():
    yield
    if _RAY["started"]:
        import ray

        ray.shutdown()


@pytest.fixture
def ray_local(_ray_finalizer):
    """The session's local Ray (started once, 8 logical CPUs)."""
    return start_ray_local()


def start_ray_local():
    """:func:`ray_local`'s Ray, for a module-scoped fixture (which cannot take a per-test one):
    take ``_ray_finalizer`` in it so the session shuts Ray down."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh local Ray, even when another cluster runs on this machine
        # (ray.init() would attach to it, e.g. the head an e2e test started, and refuse num_cpus)
        ray.init(
            address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
        _RAY["started"] = True
    return ray


@pytest.fixture
def ray_local_shutdown():
    """For tests that start their own Ray cluster: make sure the shared one is down."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _RAY["started"] = False
    yield
