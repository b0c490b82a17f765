"""Which ranks' numbers mean what, and their reduction to one result per step or validation.

Pure functions of the :class:`pipeline.grid.Grid`, tested without Ray:

* the loss and the top-1/top-5 hits are computed on the last stage, identically by both of its
  columns (they gather the logits): column 0 of each replica's last stage counts, replicas add up;
* timings: the step, data wait and each part are the slowest rank's; the per-stage split and the
  bubble are replica 0's (replicas run the same schedule);
* the model state: replica 0's ranks hold every parameter once (replicas are equal after the
  gradient all-reduce).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from cluster.evaluate import crop_errors
from pipeline.grid import Grid

# timings taken as the slowest rank's (the engine's <part>_s keys; data_wait_s and step_s apart)
_MAX_PARTS = ("compute_s", "exchange_s", "pipeline_wait_s", "optimizer_s", "grad_sync_s")


def scoring_ranks(grid: Grid) -> list[int]:
    """Column 0 of each replica's last stage: the ranks whose loss and hit counts are counted."""
    return [grid.rank_of(r, grid.stages - 1, 0) for r in range(grid.replicas)]


def state_ranks(grid: Grid) -> list[int]:
    """Replica 0's ranks, stage by stage: together they hold the whole model and optimizer state."""
    return [grid.rank_of(0, s, c) for s in range(grid.stages) for c in range(grid.columns)]


def reduce_step(grid: Grid, batch_size: int, step: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One step's result from every rank's (in rank order): loss and error of the global batch,
    the timings, ``parts`` per (stage, column), ``bubble`` per stage, and the keys of rows that
    did not decode on a device (``corrupt_decoded``)."""
    last = [ranks[i] for i in scoring_ranks(grid)]
    out: dict[str, Any] = {
        "step": step,
        "loss": sum(x["loss"] for x in last) / len(last),  # each replica's mean over its rows
        "top1_error": 1.0 - sum(x["top1"] for x in last) / batch_size,
        "top5_error": 1.0 - sum(x["top5"] for x in last) / batch_size,
        "step_s": max(x["step_s"] for x in ranks),
        "data_wait_s": max(x["data_wait_s"] for x in ranks),
    }
    parts, bubble = {}, {}
    for s in range(grid.stages):
        stage = [ranks[grid.rank_of(0, s, c)] for c in range(grid.columns)]
        for c, x in enumerate(stage):
            parts[(s, c)] = {k: v for k, v in x.items() if k.endswith("_s")}
        # the fraction of its step a stage waited on pipeline receives, mean over its columns
        bubble[s] = sum(x["pipeline_wait_s"] / max(x["step_s"], 1e-9) for x in stage) / len(stage)
    out["parts"], out["bubble"] = parts, bubble
    # keys of the rows that did not decode on the device (data.decode="device"): each replica's rows
    # once (its column ranks decode the same rows)
    out["corrupt_decoded"] = [
        k for r in range(grid.replicas) for k in ranks[grid.rank_of(r, 0, 0)].get("corrupt_decoded", [])
    ]
    for k in _MAX_PARTS:
        out[k] = max(x.get(k, 0.0) for x in ranks)
    return out


def reduce_eval(grid: Grid, ranks: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """A validation's result from every rank's :meth:`cluster.evaluate.ValScore.totals` (the
    scoring ranks' count; each replica scored its share of the val split): the center pass's
    errors, loss and ``samples``, and the 10-crop errors when a ``ten`` pass was scored."""
    totals: dict[str, Counter] = {}
    for i in scoring_ranks(grid):
        for crop, t in ranks[i].items():
            totals.setdefault(crop, Counter()).update(t)
    errs = crop_errors(totals)
    n = totals["center"]["n"]
    out = {
        "top1_error": errs["top1_error"],
        "top5_error": errs["top5_error"],
        "loss": totals["center"]["loss_sum"] / max(n, 1),
        "samples": float(n),
    }
    out.update({k: v for k, v in errs.items() if k.endswith("_10crop")})
    return out
