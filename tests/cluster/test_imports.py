"""Every module imports in a fresh Ray worker (actors hit import cycles the driver never sees)."""

from __future__ import annotations

import pkgutil

import pytest

import alexnet
import cluster
import pipeline

pytestmark = pytest.mark.ray


def _modules() -> list[str]:
    out = []
    for pkg in (alexnet, pipeline, cluster):
        out += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return sorted(out)


def test_every_module_imports_in_a_ray_worker(ray_local):
    @ray_local.remote(num_cpus=0.1)
    def import_all(names: list[str]) -> list[str]:
        import importlib

        return [importlib.import_module(n).__name__ for n in names]

    names = _modules()
    assert {"cluster.coordinator", "cluster.group", "cluster.rank"} <= set(names)
    assert ray_local.get(import_all.remote(names), timeout=100) == names


def test_the_suites_ray_workers_run_at_nice_0(ray_local):
    """Ray's default of nice 15 starves a test's actors on a loaded machine (tests/conftest.py)."""

    @ray_local.remote(num_cpus=0.1)
    class Niceness:
        def get(self) -> int:
            import os

            return os.nice(0)

    assert ray_local.get(Niceness.remote().get.remote(), timeout=120) == 0
