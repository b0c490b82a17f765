"""The suite's streams under pytest-xdist (tests/streams.py): which tests run on which Ray, the
order the workers sort them in, and the units the controller's scheduler deals."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests import conftest, streams


class _Item:
    """What :func:`tests.conftest.ray_kind` and the sort read of a collected test."""

    def __init__(self, nodeid: str, fixtures: tuple[str, ...] = (), marks: tuple[str, ...] = ()) -> None:
        self.nodeid, self.fixturenames, self._marks = nodeid, fixtures, marks

    def get_closest_marker(self, name: str):
        return SimpleNamespace(name=name) if name in self._marks else None


ITEMS = [
    _Item("tests/a.py::test_pure"),
    _Item("tests/a.py::test_on_a_cluster", ("ray_local_shutdown", "tmp_path")),
    _Item("tests/a.py::test_reference", ("reference",)),  # the reference run needs the local Ray
    _Item(conftest.GPU_CHECK),
    _Item("tests/b.py::test_marked", marks=("ray",)),
    _Item("tests/b.py::test_pure_too", ("tmp_path",)),
]


def test_ray_kind_tells_the_local_ray_clusters_of_their_own_and_none():
    kinds = {item.nodeid: conftest.ray_kind(item) for item in ITEMS}
    assert kinds == {
        "tests/a.py::test_pure": None,
        "tests/a.py::test_on_a_cluster": streams.CLUSTERS,
        "tests/a.py::test_reference": streams.LOCAL,
        conftest.GPU_CHECK: None,
        "tests/b.py::test_marked": streams.LOCAL,
        "tests/b.py::test_pure_too": None,
    }


def _sorted(worker: bool, tmp_path, monkeypatch) -> list[str]:
    monkeypatch.setenv(streams.ENV, str(tmp_path / "units.json"))
    config = SimpleNamespace(workerinput={}) if worker else SimpleNamespace()
    items = list(ITEMS)
    conftest.pytest_collection_modifyitems(config, items)
    return [item.nodeid for item in items]


def test_a_worker_sorts_local_ray_then_none_gpu_check_first_then_clusters(tmp_path, monkeypatch):
    assert _sorted(True, tmp_path, monkeypatch) == [
        "tests/a.py::test_reference",
        "tests/b.py::test_marked",
        conftest.GPU_CHECK,
        "tests/a.py::test_pure",
        "tests/b.py::test_pure_too",
        "tests/a.py::test_on_a_cluster",
    ]
    # what it tells the controller: the units of the Ray tests only
    assert json.loads((tmp_path / "units.json").read_text()) == {
        "tests/a.py::test_reference": streams.LOCAL,
        "tests/b.py::test_marked": streams.LOCAL,
        "tests/a.py::test_on_a_cluster": streams.CLUSTERS,
    }


def test_a_plain_run_keeps_the_files_order_clusters_last(tmp_path, monkeypatch):
    order = _sorted(False, tmp_path, monkeypatch)
    assert order == [item.nodeid for item in ITEMS if item is not ITEMS[1]] + [ITEMS[1].nodeid]
    assert not (tmp_path / "units.json").exists()


def test_the_scheduler_deals_each_ray_stream_as_one_unit_in_the_workers_order(tmp_path, monkeypatch):
    pytest.importorskip("xdist")
    from xdist.scheduler import LoadScopeScheduling

    order = _sorted(True, tmp_path, monkeypatch)
    option = SimpleNamespace(loadscopereorder=True)
    config = SimpleNamespace(option=option, getvalue=lambda name: {"tx": ["2*popen"]}[name])  # -n 2
    sched = streams.scheduler(config)
    assert isinstance(sched, LoadScopeScheduling)
    assert config.option.loadscopereorder is False  # the biggest unit first would put CLUSTERS first
    units = [sched._split_scope(nodeid) for nodeid in order]
    assert units == [streams.LOCAL, streams.LOCAL, *order[2:5], streams.CLUSTERS]
