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

With ``--nccl-rules`` the same run is recorded (:class:`pipeline.nccl_rules.RecordingComm` over the
real gloo calls), a validation pass (``Engine.infer``) is added, and the recording is checked
against NCCL's rules (:func:`pipeline.nccl_rules.check`): ``nccl_rules_ok`` and the first violation
(``nccl_violation``) join the report. :func:`check_nccl_rules` runs the same check with the ranks
as threads of this process (:mod:`pipeline.local_world`), cheap enough for a matrix of grids.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from typing import Any

import numpy as np
import torch

from alexnet.cli import add_model_sets
from alexnet.config import VARIANTS, ModelConfig, parse_model_sets
from alexnet.info import switches
from alexnet.model import TwoColumnAlexNet
from alexnet.train_local import train_local
from pipeline import dist as pdist
from pipeline.engine import Engine, EngineConfig
from pipeline.grid import Grid, parse_shape
from pipeline.launch import spawn_ranks
from pipeline.local_world import LocalDeadlock, local_groups, run_threads
from pipeline.nccl_rules import RankLog, RecordingComm, check
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
    recorder: RecordingComm | None = None,
) -> dict[str, Any]:
    """One rank's side of the check: ``steps`` engine steps on :func:`random_batch` data.

    Returns per step this rank's grads and weights (numpy, canonical keys), its metrics,
    and the last step's timeline events. With a ``recorder`` (installed on ``groups``), a
    validation pass of ``microbatch_size + 1`` rows follows the steps, recorded too.
    """
    engine = engine_cls(cfg, grid, rank, groups, EngineConfig(device=device or groups.device))
    if recorder is not None:
        recorder.follow(engine.timeline)
    out = _train(cfg, grid, engine, steps, lr)
    if recorder is not None:
        recorder.phase = "validation"
        images, _ = random_batch(cfg, grid.microbatch_size + 1, steps)  # a full and a partial micro-batch
        engine.infer(images.to(engine.device) if engine.first else None)
    return out


def _train(cfg: ModelConfig, grid: Grid, engine: Engine, steps: int, lr: float) -> dict[str, Any]:
    rows = slice(engine.r * grid.replica_batch, (engine.r + 1) * grid.replica_batch)
    out: dict[str, Any] = {"steps": [], "metrics": []}
    for step in range(steps):
        images, labels = random_batch(cfg, grid.global_batch, step)
        metrics = engine.step(
            step,
            lr,
            images[rows].to(engine.device) if engine.first else None,
            labels[rows].to(engine.device) if engine.last else None,
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
        return [_run_config(cfg, g, rank, groups, c) for g, c in zip(grids, configs, strict=True)]
    finally:
        pdist.destroy()


def _run_config(cfg: ModelConfig, grid: Grid, rank: int, groups: pdist.Groups, c: dict) -> dict[str, Any]:
    cfg = c.get("model") or cfg  # a config may run a variant of the model (its grid laid out for it)
    rec = RecordingComm.install(groups) if c.get("record") else None
    try:
        out = run_rank(
            cfg, grid, rank, groups, c["steps"], c["lr"], c.get("engine_cls", Engine), recorder=rec
        )
    finally:
        if rec is not None:
            groups.comm = rec.inner
    if rec is not None:
        out["nccl_log"] = rec.log
    return out


def run_configs(
    cfg: ModelConfig,
    configs: list[dict],
    timeout_s: float = 120.0,
    collective_timeout_s: float = 60.0,
    threads: bool = False,
) -> list[list[dict[str, Any]]]:
    """Run several configs that share one grid shape in ONE set of local processes (spawning
    is the slow part on a small machine). A config: ``{"grid": Grid, "steps": int, "lr": float,
    "engine_cls": optional Engine subclass, "record": optional bool, "model": optional ModelConfig
    (instead of ``cfg``)}``. Returns ``[config][rank] -> run_rank result``.

    ``threads``: the ranks as threads of this process (:mod:`pipeline.local_world`, gloo's
    semantics; one intra-op thread in all) instead of gloo processes: no torch import per rank.
    ``tests/pipeline/test_nccl_rules.py`` shows the two record the same operations and both
    train like the reference."""
    shapes = {c["grid"].shape for c in configs}
    if len(shapes) != 1:
        raise ValueError(f"run_configs needs one grid shape per call, got {sorted(shapes)}")
    world_size = configs[0]["grid"].world_size
    if threads:
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # the ranks share the process: no oversubscription
        try:
            return [
                run_threads(
                    lambda r, w, c=c: _run_config(cfg, c["grid"], r, local_groups(w, c["grid"], r), c),
                    world_size,
                )
                for c in configs
            ]
        finally:
            torch.set_num_threads(before)
    wire = [{**c, "grid": c["grid"].to_dict()} for c in configs]
    per_rank = spawn_ranks(_worker, world_size, (cfg, wire, collective_timeout_s), timeout_s=timeout_s)
    return [[per_rank[r][i] for r in range(len(per_rank))] for i in range(len(configs))]


def run_verify(
    cfg: ModelConfig,
    grid: Grid,
    steps: int = 2,
    lr: float = 0.05,
    timeout_s: float = 300.0,
    nccl_rules: bool = False,
) -> dict[str, Any]:
    """The whole check on local processes: engine vs reference; returns the errors and a verdict.
    ``nccl_rules``: the run is also recorded and checked against NCCL's rules (module docstring)."""
    t0 = time.perf_counter()
    config = {"grid": grid, "steps": steps, "lr": lr, "record": nccl_rules}
    (results,) = run_configs(cfg, [config], timeout_s=timeout_s)
    errors = compare(cfg, reference_run(cfg, grid.global_batch, steps, lr), results)
    ok = errors["max_rel_grad_error"] < TOLERANCE and errors["max_rel_weight_error"] < TOLERANCE
    report = {
        "grid": grid.shape,
        "model": switches(cfg),
        "microbatches": grid.microbatches,
        "schedule": grid.schedule,
        "cuts": list(grid.cuts or ()),
        "global_batch": grid.global_batch,
        "steps": steps,
        **errors,
        "tolerance": TOLERANCE,
        "ok": ok,
    }
    if nccl_rules:
        report.update(nccl_report(check([r["nccl_log"] for r in results], grid)))
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    return report


def nccl_report(violations: list[str]) -> dict[str, Any]:
    """The report's NCCL keys: ``nccl_rules_ok``, the first violation (None if none), their count."""
    return {
        "nccl_rules_ok": not violations,
        "nccl_violation": violations[0] if violations else None,
        "nccl_violations": len(violations),
    }


def check_nccl_rules(
    cfg: ModelConfig, grid: Grid, steps: int = 1, lr: float = 0.05, engine_cls: type[Engine] = Engine
) -> list[str]:
    """The NCCL check of ``grid`` (training steps and a validation pass) with the ranks as threads
    of this process, one intra-op thread in all; the violations, [] when none. A rank that raises
    is reported after what the recording up to there shows."""

    def rank_log(rank: int, world) -> tuple[RankLog, BaseException | None]:
        groups = local_groups(world, grid, rank)
        rec = RecordingComm.install(groups)
        try:
            run_rank(cfg, grid, rank, groups, steps, lr, engine_cls, recorder=rec)
        except Exception as e:  # the recording so far still says what went wrong first
            return rec.log, e
        return rec.log, None

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks share the process: no oversubscription
    try:
        results = run_threads(rank_log, grid.world_size)
    finally:
        torch.set_num_threads(threads)
    failed = {r: e for r, (_, e) in enumerate(results) if e is not None and not isinstance(e, LocalDeadlock)}
    return check([log for log, _ in results], grid, failed)


def cmd_verify(args: argparse.Namespace) -> int:
    """``alexnet verify``: print the JSON report; exit 1 if an error is over the tolerance (or, with
    ``--nccl-rules``, if the communication breaks one of NCCL's rules)."""
    switches = parse_model_sets(args.set)
    cfg = ModelConfig.for_variant(args.variant, args.num_classes, args.input_size, **switches)
    replicas, _, _ = parse_shape(args.grid)
    m = args.microbatches
    batch = args.batch or 2 * m * replicas
    cuts = tuple(args.cuts.split(",")) if args.cuts else None
    # refuses a grid the model cannot run on (C = 2 for the one-column net, a removed block cut at)
    grid = Grid.parse(args.grid, m, batch, cuts, args.schedule, model=cfg)
    report = run_verify(
        cfg, grid, steps=args.steps, lr=args.lr, timeout_s=args.timeout, nccl_rules=args.nccl_rules
    )
    print(json.dumps(report))
    return 0 if report["ok"] and report.get("nccl_rules_ok", True) else 1


def add_verify(sub: argparse._SubParsersAction) -> None:
    from alexnet.cli import subparser

    p = subparser(
        sub,
        "verify",
        "check the distributed engine against the one-process reference",
        "alexnet verify --grid 1x2x2 --microbatches 2 --steps 1",
    )
    p.add_argument("--grid", default="2x2x2", help="replicas x stages x columns, e.g. 2x2x2")
    p.add_argument("--microbatches", type=int, default=4, help="micro-batches per step")
    p.add_argument(
        "--schedule", choices=sorted(SCHEDULE_CLASSES), default="1f1b", help="micro-batch order of each stage"
    )
    p.add_argument(
        "--cuts", default="", help="first block of stages 1..S-1, comma-separated (default: balanced)"
    )
    p.add_argument("--steps", type=int, default=2, help="optimizer steps to compare")
    p.add_argument("--batch", type=int, default=0, help="global batch (default 2 x replicas x microbatches)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate of the compared steps")
    p.add_argument("--variant", choices=VARIANTS, default="small", help="the network: small or paper")
    p.add_argument("--num-classes", type=int, default=None, help="classes of fc8 (default: the variant's)")
    p.add_argument("--input-size", type=int, default=None, help="crop side in px (default: the variant's)")
    add_model_sets(p)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before the check is abandoned")
    p.add_argument(
        "--nccl-rules",
        action="store_true",
        help="also record the run (and a validation pass) and check it against NCCL's matching rules",
    )
    p.set_defaults(func=cmd_verify)


SUBCOMMANDS = [add_verify]
