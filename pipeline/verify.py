"""``alexnet verify``: the distributed engine against the local two-column reference.

Runs a few steps of :class:`pipeline.engine.Engine` on random data for a grid, and the
same steps with :class:`alexnet.model.TwoColumnAlexNet` (exchange = concatenation) and the
same SGD in one process, then compares each rank's gradients and weights with the
reference's slice:

* ``max_rel_grad_error``: max over steps and parameters of ||g - g_ref|| / ||g_ref||;
* ``max_rel_weight_error``: the same for the weights after each step;
* ``max_rel_update_error``: the same for the total change w_final - w_initial (stricter:
  it is not diluted by the unchanged part of the weights).

The reference is :func:`alexnet.train_local.train_local` (the one-process training loop) on
:func:`random_batch` data; :func:`run_rank` is what one rank does once its groups exist, and
:func:`run_verify` launches the ranks as local processes with gloo.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from typing import Any

import numpy as np
import torch

from alexnet.config import VARIANTS, ModelConfig
from alexnet.model import TwoColumnAlexNet
from alexnet.train_local import train_local
from pipeline import dist as pdist
from pipeline.engine import Engine
from pipeline.grid import Grid, parse_shape
from pipeline.launch import spawn_ranks
from pipeline.schedules import SCHEDULE_CLASSES

TOLERANCE = 1e-5


def random_batch(
    cfg: ModelConfig, global_batch: int, step: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch of random images (B, 3, S, S) and labels (B,); same on every rank."""
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    images = torch.randn(global_batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    labels = torch.randint(0, cfg.num_classes, (global_batch,), generator=gen)
    return images, labels


def reference_run(
    cfg: ModelConfig,
    global_batch: int,
    steps: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> list[dict[str, Any]]:
    """The local two-column reference trained ``steps`` steps on :func:`random_batch` data: per step
    its grads and updated weights (numpy, canonical keys) and its loss."""
    out = []
    batch = functools.partial(random_batch, cfg, global_batch)
    for _, model, loss in train_local(cfg, batch, steps, lr, momentum=momentum, weight_decay=weight_decay):
        grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
        weights = {k: p.detach().numpy().copy() for k, p in model.named_parameters()}
        out.append({"grads": grads, "weights": weights, "loss": loss})
    return out


def run_rank(
    cfg: ModelConfig,
    grid: Grid,
    rank: int,
    groups: pdist.Groups,
    steps: int,
    lr: float,
    engine_cls: type[Engine] = Engine,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """One rank's side of the check: ``steps`` engine steps on :func:`random_batch` data.

    Returns per step this rank's grads and weights (numpy, canonical keys), its metrics,
    and the last step's timeline events.
    """
    device = device or torch.device("cpu")
    engine = engine_cls(cfg, grid, rank, groups, device=device)
    r = engine.r
    rows = slice(r * grid.replica_batch, (r + 1) * grid.replica_batch)
    out: dict[str, Any] = {"steps": [], "metrics": []}
    for step in range(steps):
        images, labels = random_batch(cfg, grid.global_batch, step)
        metrics = engine.step(
            step,
            lr,
            images[rows].to(device) if engine.first else None,
            labels[rows].to(device) if engine.last else None,
        )
        out["metrics"].append(metrics)
        out["steps"].append(
            {
                "grads": {k: v.cpu().numpy() for k, v in engine.grads().items()},
                "weights": {k: v.cpu().numpy() for k, v in engine.state_dict()["model"].items()},
            }
        )
    out["events"] = engine.timeline.events
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def compare(cfg: ModelConfig, reference: list[dict], rank_results: list[dict[str, Any]]) -> dict[str, float]:
    """Max relative errors of the ranks' grads / weights / total update against the reference.

    Every parameter of the model must be covered by some rank (a missing one is an error).
    """
    init = {k: p.detach().numpy() for k, p in TwoColumnAlexNet(cfg).named_parameters()}
    g_err = w_err = u_err = 0.0
    seen: set[str] = set()
    for res in rank_results:
        for step, (mine, ref) in enumerate(zip(res["steps"], reference, strict=True)):
            for k, g in mine["grads"].items():
                g_err = max(g_err, _rel(g, ref["grads"][k]))
            for k, w in mine["weights"].items():
                w_err = max(w_err, _rel(w, ref["weights"][k]))
                if step == len(reference) - 1:
                    u_err = max(u_err, _rel(w - init[k], ref["weights"][k] - init[k]))
            seen |= set(mine["grads"])
    missing = set(init) - seen
    if missing:
        raise AssertionError(f"no rank reported gradients for {sorted(missing)}")
    return {"max_rel_grad_error": g_err, "max_rel_weight_error": w_err, "max_rel_update_error": u_err}


def _worker(rank: int, world_size: int, port: int, cfg: ModelConfig, configs: list[dict], timeout_s: float):
    """Spawned rank: one process group for the grid shape, then each config (grid, engine class) in turn."""
    grids = [Grid.from_dict(c["grid"]) for c in configs]
    groups = pdist.init_distributed(grids[0], rank, "127.0.0.1", port, backend="gloo", timeout_s=timeout_s)
    try:
        return [
            run_rank(cfg, g, rank, groups, c["steps"], c["lr"], c.get("engine_cls", Engine))
            for g, c in zip(grids, configs, strict=True)
        ]
    finally:
        pdist.destroy()


def run_configs(
    cfg: ModelConfig, configs: list[dict], timeout_s: float = 120.0, collective_timeout_s: float = 60.0
) -> list[list[dict[str, Any]]]:
    """Run several configs that share one grid shape in ONE set of local processes (spawning
    is the slow part on a small machine). A config: ``{"grid": Grid, "steps": int, "lr": float,
    "engine_cls": optional Engine subclass}``. Returns ``[config][rank] -> run_rank result``."""
    shapes = {c["grid"].shape for c in configs}
    if len(shapes) != 1:
        raise ValueError(f"run_configs needs one grid shape per call, got {sorted(shapes)}")
    wire = [{**c, "grid": c["grid"].to_dict()} for c in configs]
    per_rank = spawn_ranks(
        _worker, configs[0]["grid"].world_size, (cfg, wire, collective_timeout_s), timeout_s=timeout_s
    )
    return [[per_rank[r][i] for r in range(len(per_rank))] for i in range(len(configs))]


def run_verify(
    cfg: ModelConfig, grid: Grid, steps: int = 2, lr: float = 0.05, timeout_s: float = 300.0
) -> dict[str, Any]:
    """The whole check on local processes: engine vs reference; returns the errors and a verdict."""
    t0 = time.perf_counter()
    (results,) = run_configs(cfg, [{"grid": grid, "steps": steps, "lr": lr}], timeout_s=timeout_s)
    errors = compare(cfg, reference_run(cfg, grid.global_batch, steps, lr), results)
    ok = errors["max_rel_grad_error"] < TOLERANCE and errors["max_rel_weight_error"] < TOLERANCE
    return {
        "grid": grid.shape,
        "microbatches": grid.microbatches,
        "schedule": grid.schedule,
        "cuts": list(grid.cuts or ()),
        "global_batch": grid.global_batch,
        "steps": steps,
        **errors,
        "tolerance": TOLERANCE,
        "ok": ok,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def cmd_verify(args: argparse.Namespace) -> int:
    """``alexnet verify``: print the JSON report; exit 1 if an error is over the tolerance."""
    cfg = ModelConfig.for_variant(args.variant, args.num_classes, args.input_size)
    replicas, stages, columns = parse_shape(args.grid)
    m = args.microbatches
    batch = args.batch or 2 * m * replicas
    cuts = tuple(args.cuts.split(",")) if args.cuts else None
    grid = Grid(replicas, stages, columns, m, batch, cuts, args.schedule)
    report = run_verify(cfg, grid, steps=args.steps, lr=args.lr, timeout_s=args.timeout)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check the distributed engine against the one-process reference")
    p.add_argument("--grid", default="2x2x2", help="replicas x stages x columns, e.g. 2x2x2")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument(
        "--schedule", choices=sorted(SCHEDULE_CLASSES), default="1f1b", help="micro-batch order of each stage"
    )
    p.add_argument(
        "--cuts", default="", help="first block of stages 1..S-1, comma-separated (default: balanced)"
    )
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=0, help="global batch (default 2 x replicas x microbatches)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--variant", choices=VARIANTS, default="small")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before the check is abandoned")
    p.set_defaults(func=cmd_verify)


SUBCOMMANDS = [add_verify]
