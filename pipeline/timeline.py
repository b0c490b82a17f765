"""Per-rank event recording, the Chrome trace of a step, and the pipeline's bubble.

An event is a plain dict (JSON-ready, so a Ray actor can return it as is)::

    {"name": "F3", "cat": "forward", "ts": 1.7e15, "dur": 812.0,       # microseconds
     "rank": 5, "replica": 1, "stage": 0, "column": 1, "mb": 3, "step": 12}

Categories: ``step`` (the whole engine step; everything else nests inside it), ``forward`` /
``backward`` (one per micro-batch action; the exchanges they run are nested inside them),
``exchange`` (an all-gather or its backward), ``recv`` (blocked on a point-to-point receive),
``send_wait`` (waiting for asynchronous sends to finish), ``grad_sync`` (waiting for the
data-parallel gradient sums), ``optimizer`` (the SGD update).

Times are the host's clock on CPU and CUDA events on a GPU (:class:`CudaClock`: the device's
time, since kernels launch asynchronously), read once per :meth:`Timeline.read`. One API for
both: the clock is a parameter.

"Bubble" names two measures of a pipeline's idle time; they differ and are named apart:

* the **bubble fraction** (:func:`bubble_fraction`, from these events): per stage, the share
  of the step's flush-to-flush span in which the stage computes nothing, ``1 - (forward +
  backward time) / span``. For equal-cost stages and free communication it is the **ideal
  bubble** ``(S - 1) / (M + S - 1)`` (:func:`ideal_bubble_fraction`); ``bench/pipeline.py``
  prints the two as ``bubble_measured`` and ``bubble_theory``;
* the **pipeline wait fraction**: the engine's ``pipeline_wait_s / step_s``, the share of a
  rank's step spent blocked on receives from and sends to its neighbouring stages (what the
  job exports per stage as ``alexnet_pipeline_bubble_ratio``). It needs no event log, but it
  also counts waiting on a slower neighbour, and misses idle time spent outside a receive or
  send (after a stage's last backward, while the other stages still compute).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

Event = dict[str, Any]
COMPUTE_CATS = ("forward", "backward")


class HostClock:
    """Wall-clock marks (``perf_counter``): the time the host spent, which on a CPU is the time the
    work took."""

    def __init__(self) -> None:
        # wall-clock microseconds at perf_counter() == 0, so ranks on one host share a time axis
        self._anchor_us = time.time() * 1e6 - time.perf_counter() * 1e6

    def mark(self) -> float:
        return time.perf_counter()

    def resolve(self, spans: list[tuple[Any, Any]]) -> list[tuple[float, float]]:
        """(start as wall-clock microseconds, duration in microseconds) of each (start, end) pair."""
        return [(self._anchor_us + a * 1e6, (b - a) * 1e6) for a, b in spans]


class CudaClock:
    """CUDA events recorded on the current stream: when the device reached each mark, so a span is
    the device time of the kernels launched inside it (launches are asynchronous: host time would
    measure the launching). Reading waits for the last mark, once per :meth:`Timeline.read`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> torch.cuda.Event:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def resolve(self, spans: list[tuple[Any, Any]]) -> list[tuple[float, float]]:
        """(start, duration) in microseconds of each (start, end) event pair. Starts are anchored
        by an event recorded once the device is idle (its device time is then the host's now),
        fresh at every read, so the device and host clocks cannot drift apart."""
        if not spans:
            return []
        for _, e in reversed(spans):  # the newest first: after it the others are done (one stream)
            e.synchronize()
        now = torch.cuda.Event(enable_timing=True)
        now.record()
        now.synchronize()
        now_us = time.time() * 1e6
        return [(now_us - a.elapsed_time(now) * 1e3, a.elapsed_time(b) * 1e3) for a, b in spans]


def clock_for(device: torch.device | None) -> HostClock | CudaClock:
    """CUDA events for a CUDA device, the host's clock otherwise."""
    if device is not None and torch.device(device).type == "cuda":
        return CudaClock(torch.device(device))
    return HostClock()


class Timeline:
    """Records one rank's spans; :meth:`read` resolves them into events and per-step totals.

    Spans are marks of ``clock`` (default: :func:`clock_for` ``device``), kept unresolved until
    :meth:`read`, so on a GPU the timing costs no synchronisation inside a step: a chunk of
    steps is read once. After a read, ``events`` and ``totals`` (seconds per category) are the
    last step's.
    """

    def __init__(
        self,
        rank: int,
        coords: tuple[int, int, int] = (0, 0, 0),
        device: torch.device | None = None,
        clock: HostClock | CudaClock | None = None,
    ) -> None:
        self.rank, self.coords = rank, coords
        self.clock = clock or clock_for(device)
        self.events: list[Event] = []
        self.totals: dict[str, float] = defaultdict(float)
        self.step = 0
        self.mb: int | None = None  # the micro-batch being worked on (tags nested events)
        self._pending: list[tuple[str, str, int | None, int, Any, Any]] = []  # cat, name, mb, step, marks

    def clear(self, step: int) -> None:
        """Start recording step ``step`` (the spans of earlier steps wait for :meth:`read`)."""
        self.step = step

    def discard(self, step: int) -> None:
        """Forget the unread spans of ``step`` (a step that raised)."""
        self._pending = [p for p in self._pending if p[3] != step]

    @contextmanager
    def span(self, cat: str, name: str | None = None) -> Iterator[None]:
        """Time the body as one event of category ``cat``, tagged with the current micro-batch."""
        mb, step = self.mb, self.step
        m0 = self.clock.mark()
        try:
            yield
        finally:
            self._pending.append((cat, name or cat, mb, step, m0, self.clock.mark()))

    def read(self) -> dict[int, list[Event]]:
        """Resolve every unread span: ``{step: its events}`` in recording order (one wait on a GPU)."""
        pending, self._pending = self._pending, []
        times = self.clock.resolve([(p[4], p[5]) for p in pending])
        r, s, c = self.coords
        by_step: dict[int, list[Event]] = {}
        for (cat, name, mb, step, _, _), (ts, dur) in zip(pending, times, strict=True):
            by_step.setdefault(step, []).append(
                {
                    "name": name,
                    "cat": cat,
                    "ts": ts,
                    "dur": dur,
                    "rank": self.rank,
                    "replica": r,
                    "stage": s,
                    "column": c,
                    "mb": mb,
                    "step": step,
                }
            )
        if by_step:
            self.events = by_step[max(by_step)]
            self.totals = totals(self.events)
        return by_step


def totals(events: list[Event]) -> dict[str, float]:
    """Seconds per category of ``events`` (0.0 for a category that has none)."""
    out: dict[str, float] = defaultdict(float)
    for e in events:
        out[e["cat"]] += e["dur"] / 1e6
    return out


def chrome_trace(events_by_rank: Mapping[int, list[Event]]) -> dict[str, Any]:
    """Merge ranks' events into a Chrome trace (``json.dump`` it; open in Perfetto or
    chrome://tracing). One track per rank: process ``rank``, named by its grid coordinates."""
    all_ts = [e["ts"] for evs in events_by_rank.values() for e in evs]
    t0 = min(all_ts) if all_ts else 0.0
    out: list[dict[str, Any]] = []
    for rank in sorted(events_by_rank):
        evs = events_by_rank[rank]
        label = f"rank {rank}"
        if evs:
            e = evs[0]
            label += f" (replica {e['replica']}, stage {e['stage']}, column {e['column']})"
        out.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": label}})
        out.append(
            {"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}}
        )
        for e in evs:
            out.append(
                {
                    "ph": "X",
                    "name": e["name"],
                    "cat": e["cat"],
                    "pid": rank,
                    "tid": 0,
                    "ts": e["ts"] - t0,
                    "dur": e["dur"],
                    "args": {"mb": e["mb"], "step": e["step"]},
                }
            )
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def ideal_bubble_fraction(stages: int, microbatches: int) -> float:
    """The bubble fraction of a flushed pipeline (GPipe or 1F1B) of ``stages`` equal-cost stages
    over ``microbatches`` micro-batches with free communication: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def bubble_fraction(events_by_rank: Mapping[int, list[Event]]) -> dict[int, float]:
    """Measured bubble fraction per stage: 1 - busy / span, averaged over the stage's ranks
    and the recorded steps.

    busy = the rank's forward + backward time; span = from the first forward to the last
    backward of any rank of the same replica in the same step (the pipeline's flush to
    flush). Compare with :func:`ideal_bubble_fraction` for stages of equal cost.
    """
    windows: dict[tuple[int, int], list[float]] = {}
    for evs in events_by_rank.values():
        for e in evs:
            if e["cat"] in COMPUTE_CATS:
                key = (e["replica"], e["step"])
                w = windows.setdefault(key, [float("inf"), float("-inf")])
                w[0], w[1] = min(w[0], e["ts"]), max(w[1], e["ts"] + e["dur"])
    per_stage: dict[int, list[float]] = defaultdict(list)
    for evs in events_by_rank.values():
        busy: dict[tuple[int, int], float] = defaultdict(float)
        stage = None
        for e in evs:
            if e["cat"] in COMPUTE_CATS:
                busy[(e["replica"], e["step"])] += e["dur"]
                stage = e["stage"]
        for key, b in busy.items():
            lo, hi = windows[key]
            per_stage[stage].append(1.0 - b / (hi - lo) if hi > lo else 0.0)
    return {s: sum(v) / len(v) for s, v in sorted(per_stage.items())}
