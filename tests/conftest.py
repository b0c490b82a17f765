"""Shared test set-up.

* deterministic torch per test;
* ``ray_local``: ONE local Ray per test session, started on first use (8 logical CPUs on
  the 2-core machine) and shut down at the end. Tests that need Ray take this fixture;
  tests that need their own cluster (ray.cluster_utils.Cluster, ray start) must not run
  while it is up: mark them and shut it down first via ``ray_local_shutdown``.
* under pytest-xdist (``make test``: ``-n 2``) the tests on the session's local Ray run in one
  worker, in order, and the other tests beside them in the other worker, the tests on clusters
  of their own last (:mod:`tests.streams`, :func:`ray_kind`).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests import streams

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray starts its workers (every actor: trainer ranks, data workers) at nice 15, for a cluster where
# they are the only load. On a shared test machine two CPU-bound processes at nice 0 then take ~95 %
# of the CPU and a test's actors run ~20x slower (measured: 4 % CPU each). At nice 0 they get their
# fair share: the suite is as steady on a loaded machine as its timeouts assume. Every Ray a test
# starts (ray.init, Cluster, `ray start`, a CLI's) inherits this from the environment.
os.environ.setdefault("RAY_worker_niceness", "0")
# Every Ray the suite starts runs with token authentication, as the product's embedded one does,
# and with one token of the suite's own (not ~/.ray/auth_token, the user's): set here, before any
# module imports Ray (which reads the mode once), in the process that starts the others, so that
# under pytest-xdist both workers' Rays and the processes they start agree. Otherwise a process
# that has not itself started an embedded run (which turns the mode on in its own environment)
# cannot reach a cluster it starts, whose GCS takes the token it finds on disk. The tests of the
# authentication itself (test_ray_auth.py, test_ray_job.py) set their own.
_TOKEN_FILE = None
if not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ):
    import secrets
    import tempfile

    _fd, _TOKEN_FILE = tempfile.mkstemp(prefix="ray-auth-token-")
    os.write(_fd, secrets.token_hex(32).encode())
    os.close(_fd)
    os.environ["RAY_AUTH_TOKEN_PATH"] = _TOKEN_FILE
os.environ.setdefault("RAY_AUTH_MODE", "token")


def pytest_configure(config):
    """In the process that starts the others (pytest-xdist's controller, or the one process of a
    plain run): compile the project once (:func:`_compile_project`), and under pytest-xdist name
    the file through which the workers tell the controller which tests have a Ray (the workers
    inherit the environment)."""
    if hasattr(config, "workerinput"):
        return
    _compile_project()
    if config.getoption("numprocesses", None):
        import tempfile

        fd, path = tempfile.mkstemp(prefix="ray-stream-", suffix=".json")
        os.close(fd)
        os.environ[streams.ENV] = path


def pytest_unconfigure(config):
    """Remove the files :func:`pytest_configure` and this module made."""
    if not hasattr(config, "workerinput") and streams.ENV in os.environ:
        os.unlink(os.environ.pop(streams.ENV))
    if _TOKEN_FILE is not None:  # this process made it (the workers inherit its name)
        os.unlink(_TOKEN_FILE)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent without it
def pytest_xdist_make_scheduler(config, log):
    """The streams of :mod:`tests.streams`."""
    return streams.scheduler(config, log)


def _compile_project():
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


# the longest test without a Ray (~30 s of one core): first in its worker under pytest-xdist
GPU_CHECK = "tests/test_gpu_check.py::test_gpu_check_runs_every_section_on_cpu_without_ray_or_webdataset"


# The fixtures through which a test starts or uses a Ray (``item.fixturenames`` is the closure, so
# a fixture that takes one of these counts too).
RAY_FIXTURES = frozenset({"ray_local", "ray_local_shutdown", "reference", "_ray_finalizer"})


def ray_kind(item: pytest.Item) -> str | None:
    """Which Ray ``item`` runs on: :data:`tests.streams.CLUSTERS` (its own: it takes
    ``ray_local_shutdown``), :data:`tests.streams.LOCAL` (the session's: marked ``ray`` or asking
    for a Ray fixture) or None (none)."""
    names = getattr(item, "fixturenames", ())
    if "ray_local_shutdown" in names:
        return streams.CLUSTERS
    if item.get_closest_marker("ray") is not None or RAY_FIXTURES.intersection(names):
        return streams.LOCAL
    return None


def pytest_collection_modifyitems(config, items):
    """The order, and the streams.

    * The tests that shut the session's local Ray down (for clusters of their own) run after the
      tests on the local Ray, in their order: the local Ray then starts once per session, not
      again after each of them (~6 s of Ray's own start each time).
    * Under pytest-xdist (:mod:`tests.streams`): the tests on the local Ray first, as one unit of
      work; then the tests without a Ray, one by one, the GPU check's CPU run first; then the
      tests on clusters of their own, as one unit. A plain run keeps the files' order otherwise.
    """
    xdist = hasattr(config, "workerinput")
    rank = {streams.LOCAL: 0, None: 1, streams.CLUSTERS: 2}

    def order(item: pytest.Item) -> tuple[int, bool]:
        kind = ray_kind(item)
        if not xdist:
            return (kind == streams.CLUSTERS, False)
        return (rank[kind], item.nodeid != GPU_CHECK)

    items.sort(key=order)
    if xdist and streams.ENV in os.environ:
        streams.write({item.nodeid: kind for item in items if (kind := ray_kind(item))})


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
