"""Per-rank event recording, the Chrome trace of a step, and the pipeline's bubble.

An event is a plain dict (JSON-ready, so a Ray actor can return it as is)::

    {"name": "F3", "cat": "forward", "ts": 1.7e15, "dur": 812.0,       # microseconds
     "rank": 5, "replica": 1, "stage": 0, "column": 1, "mb": 3, "step": 12}

Categories: ``forward`` / ``backward`` (one per micro-batch action; the exchanges they run
are nested inside them), ``exchange`` (an all-gather or its backward), ``recv`` (blocked on
a point-to-point receive), ``send_wait`` (waiting for asynchronous sends to finish),
``grad_sync`` (waiting for the data-parallel gradient sums), ``optimizer`` (the SGD update).

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

Event = dict[str, Any]
COMPUTE_CATS = ("forward", "backward")


class Timeline:
    """Records one rank's events; ``totals`` sums seconds per category since :meth:`clear`."""

    def __init__(self, rank: int, coords: tuple[int, int, int] = (0, 0, 0)) -> None:
        self.rank, self.coords = rank, coords
        self.events: list[Event] = []
        self.totals: dict[str, float] = defaultdict(float)
        self.step = 0
        self.mb: int | None = None  # the micro-batch being worked on (tags nested events)
        # wall-clock microseconds at perf_counter() == 0, so ranks on one host share a time axis
        self._anchor_us = time.time() * 1e6 - time.perf_counter() * 1e6

    def clear(self, step: int) -> None:
        self.events, self.totals, self.step = [], defaultdict(float), step

    @contextmanager
    def span(self, cat: str, name: str | None = None) -> Iterator[None]:
        """Time the body as one event of category ``cat``, tagged with the current micro-batch."""
        mb = self.mb
        t0 = time.perf_counter()
        try:
            yield
        finally:
            t1 = time.perf_counter()
            self.totals[cat] += t1 - t0
            r, s, c = self.coords
            self.events.append(
                {
                    "name": name or cat,
                    "cat": cat,
                    "ts": self._anchor_us + t0 * 1e6,
                    "dur": (t1 - t0) * 1e6,
                    "rank": self.rank,
                    "replica": r,
                    "stage": s,
                    "column": c,
                    "mb": mb,
                    "step": self.step,
                }
            )


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
