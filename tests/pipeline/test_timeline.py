"""The timeline's clocks: spans stay unresolved marks until one read per chunk (what lets CUDA events
time a GPU step without a wait inside it), the same events and totals whichever clock."""

from __future__ import annotations

import pytest
import torch

from pipeline.timeline import CudaClock, HostClock, Timeline, clock_for, totals


class DeviceLikeClock:
    """A clock like :class:`CudaClock`: marks are opaque until resolved, and resolving waits
    (counted). Each mark is a tick of a counter, one tick = 1 ms."""

    def __init__(self) -> None:
        self.ticks, self.waits = 0, 0

    def mark(self) -> int:
        self.ticks += 1
        return self.ticks

    def resolve(self, spans):
        self.waits += 1
        return [(1e9 + a * 1e3, (b - a) * 1e3) for a, b in spans]


def test_a_chunk_of_steps_is_resolved_with_one_wait():
    clock = DeviceLikeClock()
    tl = Timeline(3, (0, 1, 1), clock=clock)
    for step in (10, 11, 12):
        tl.clear(step)
        with tl.span("step"):
            tl.mb = 0
            with tl.span("forward", "F0"), tl.span("exchange", "gather"):
                pass
            tl.mb = None
    assert clock.waits == 0 and tl.events == []  # nothing resolved inside the steps
    by_step = tl.read()
    assert clock.waits == 1
    assert sorted(by_step) == [10, 11, 12]
    ev = by_step[11]
    # nested spans are recorded as they close: exchange, forward, step
    assert [e["name"] for e in ev] == ["gather", "F0", "step"]
    assert [e["dur"] for e in ev] == [1e3, 3e3, 5e3]  # ticks: step 1..6, forward 2..5, exchange 3..4
    assert ev[0]["mb"] == 0 and ev[2]["mb"] is None
    assert {(e["rank"], e["replica"], e["stage"], e["column"], e["step"]) for e in ev} == {(3, 0, 1, 1, 11)}
    assert tl.events == by_step[12] and tl.totals["forward"] == pytest.approx(3e-3)
    assert tl.read() == {} and clock.waits == 2  # read again: nothing new


def test_discarded_spans_never_reach_a_read():
    tl = Timeline(0, clock=DeviceLikeClock())
    tl.clear(1)
    with tl.span("forward"):
        pass
    tl.clear(2)
    with tl.span("forward"):
        pass
    tl.discard(2)  # a step that raised
    assert list(tl.read()) == [1]


def test_host_clock_events_are_wall_clock_microseconds():
    import time

    tl = Timeline(0)
    assert isinstance(tl.clock, HostClock)
    tl.clear(0)
    t0 = time.time() * 1e6
    with tl.span("optimizer"):
        time.sleep(0.01)
    (e,) = tl.read()[0]
    assert abs(e["ts"] - t0) < 5e5 and 9e3 < e["dur"] < 5e5
    assert totals([e])["optimizer"] == pytest.approx(e["dur"] / 1e6)
    assert totals([e])["recv"] == 0.0


def test_cuda_devices_get_event_clocks():
    assert isinstance(clock_for(torch.device("cuda", 1)), CudaClock)  # built without touching CUDA
    assert isinstance(clock_for(torch.device("cpu")), HostClock) and isinstance(clock_for(None), HostClock)
