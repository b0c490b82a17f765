"""``pipeline.launch.spawn_ranks``: ranks forked from a forkserver that has imported torch, each
running in the caller's environment of the call (as a spawned process would), not the one the
server was started with."""

from __future__ import annotations

import os

from pipeline.launch import spawn_ranks

VAR = "ALEXNET_TEST_LAUNCH_VAR"


def _report(rank: int, world_size: int, port: int) -> tuple:
    return os.environ.get(VAR), os.getppid()


def test_ranks_take_the_callers_environment_of_each_call(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    first = spawn_ranks(_report, 2, timeout_s=120)  # starts the forkserver (if not yet running)
    assert [value for value, _ in first] == [None, None]
    monkeypatch.setenv(VAR, "set after the server started")
    second = spawn_ranks(_report, 2, timeout_s=120)
    assert [value for value, _ in second] == ["set after the server started"] * 2
    monkeypatch.delenv(VAR)
    assert [value for value, _ in spawn_ranks(_report, 1, timeout_s=120)] == [None]
    # forked from the one server, not children of this process (as spawned ones would be)
    servers = {ppid for _, ppid in first + second}
    assert len(servers) == 1 and os.getpid() not in servers
