"""Pipeline engine benchmarks, each against a baseline measured in the same run.

(a) split vs fused: the two columns on 2 processes x 1 thread (grid 1x1x2, the column
    exchange over gloo) against FusedAlexNet in 1 process x 2 threads, same global batch;
    ratio of images/s (goal >= 0.85). Interleaved rounds; the best round's median of each.
(b) bubble: GPipe at S=2, C=1 (both columns in each stage's one process, two processes),
    M = 1, 2, 4, 8; ``bubble_measured``, the bubble fraction measured from the engine's
    timeline (``pipeline.timeline.bubble_fraction``: per stage 1 - compute time / the step's
    flush-to-flush span, mean of the two stages), against ``bubble_theory``, the ideal
    bubble (S-1)/(M+S-1) of equal-cost stages with free communication
    (``pipeline.timeline.ideal_bubble_fraction``). Neither is the job's metric
    ``alexnet_pipeline_bubble_ratio``, the share of the step a rank waits on its
    neighbours (see ``pipeline/timeline.py``). For each M the cut is chosen from per-block
    forward + backward times measured here first **at that M's micro-batch size**
    (:func:`gpipe_cut`): a block's cost is not proportional to its rows (fc6/fc7 read their
    whole weights for every micro-batch), so one cut measured on the whole batch leaves the
    stages unbalanced at large M. Each M runs twice, interleaved step by step: as the engine
    runs (the next receive posted before the current compute, ``pipeline.p2p``), and with
    ``StageLink.receive_ahead`` off, every receive posted when its action starts: the same-run
    baseline ``bubble_no_ahead``.
(c) memory: peak bytes of saved activations on stage 0 under 1F1B vs GPipe at M=8
    (goal <= 0.5x), from the engine's saved-tensor meter.

    .venv/bin/python bench/pipeline.py                   # paper network, batch 32
    .venv/bin/python bench/pipeline.py --variant small --batch 64 --steps 3   # quick

The last line printed is one JSON object with ``split_vs_fused_ratio``,
``bubble_measured``, ``bubble_no_ahead``, ``bubble_theory``, ``bubble_model`` (the bubble the chosen
block-granular cut allows with free communication, :func:`modelled_bubble`; lists for M = 1, 2, 4, 8) and
``mem_1f1b_over_gpipe``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Run as a script, this file's folder comes first on sys.path and this file (pipeline.py)
# would shadow the ``pipeline`` package: drop the folder before importing it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from alexnet.config import ModelConfig  # noqa: E402
from alexnet.layers import StepContext  # noqa: E402
from alexnet.model import BLOCK_NAMES, FusedAlexNet, Stage  # noqa: E402
from pipeline.dist import destroy, init_distributed  # noqa: E402
from pipeline.engine import Engine, EngineConfig  # noqa: E402
from pipeline.grid import Grid  # noqa: E402
from pipeline.launch import spawn_ranks  # noqa: E402
from pipeline.timeline import bubble_fraction, ideal_bubble_fraction  # noqa: E402

MICROBATCHES = (1, 2, 4, 8)
SMALL_SIZES = {"num_classes": 100, "input_size": 64}  # --variant small: the quick run's network


def model_config(variant: str) -> ModelConfig:
    """The benchmarked network: the paper's, or the small variant at :data:`SMALL_SIZES`."""
    return ModelConfig.for_variant(variant, **(SMALL_SIZES if variant == "small" else {}))


def batch(cfg: ModelConfig, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, cfg.input_size, cfg.input_size, generator=gen)
    return x, torch.randint(0, cfg.num_classes, (rows,), generator=gen)


# -- (a) -------------------------------------------------------------------------------------
def fused_step_times(cfg: ModelConfig, rows: int, steps: int, warmup: int) -> list[float]:
    """Seconds per training step of FusedAlexNet (2 threads), after ``warmup`` steps."""
    torch.set_num_threads(2)
    model = FusedAlexNet(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=5e-4)
    x, y = batch(cfg, rows)
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        ctx = StepContext(seed=0, step=step, sample_index=torch.arange(rows))
        F.cross_entropy(model(x, ctx), y).backward()
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _split_worker(rank: int, world: int, port: int, cfg: ModelConfig, rows: int, steps: int, warmup: int):
    grid = Grid.parse("1x1x2", microbatches=1, global_batch=rows)
    groups = init_distributed(grid, rank, "127.0.0.1", port, backend="gloo", timeout_s=600)
    try:
        eng = Engine(cfg, grid, rank, groups, EngineConfig())
        x, y = batch(cfg, rows)
        out = [eng.step(s, 0.001, x, y) for s in range(warmup + steps)][warmup:]
        return [{k: m[k] for k in ("step_s", "compute_s", "exchange_s", "optimizer_s")} for m in out]
    finally:
        destroy()


# -- (b), (c) --------------------------------------------------------------------------------
def block_costs(cfg: ModelConfig, rows: int, reps: int = 3) -> tuple[dict[str, float], dict[str, float]]:
    """Forward and backward seconds of each block (both columns, 1 thread) on ``rows`` images,
    the best of ``reps``. conv1's backward computes no input gradient, as on stage 0."""
    torch.set_num_threads(1)
    fwd = dict.fromkeys(BLOCK_NAMES, float("inf"))
    bwd = dict.fromkeys(BLOCK_NAMES, float("inf"))
    for _ in range(reps):
        xs = [batch(cfg, rows)[0]]
        for name in BLOCK_NAMES:
            stage = Stage(cfg, [name], (0, 1))
            ins = [x.detach().requires_grad_(name != "conv1") for x in xs]
            t0 = time.perf_counter()
            outs = stage.run(ins, ctx=StepContext(seed=0, sample_index=torch.arange(rows)))
            t1 = time.perf_counter()
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            fwd[name] = min(fwd[name], t1 - t0)
            bwd[name] = min(bwd[name], time.perf_counter() - t1)
            xs = [o.detach() for o in outs]
    return fwd, bwd


def _stage_costs(fwd: dict[str, float], bwd: dict[str, float], cut: str) -> tuple[float, ...]:
    """(F0, F1, B0, B1): one micro-batch's forward and backward cost of each stage at ``cut``."""
    i = BLOCK_NAMES.index(cut)
    f0, f1 = sum(fwd[n] for n in BLOCK_NAMES[:i]), sum(fwd[n] for n in BLOCK_NAMES[i:])
    b0, b1 = sum(bwd[n] for n in BLOCK_NAMES[:i]), sum(bwd[n] for n in BLOCK_NAMES[i:])
    return f0, f1, b0, b1


def gpipe_span(fwd: dict[str, float], bwd: dict[str, float], m: int, cut: str) -> float:
    """The modelled GPipe step over two stages at ``m`` micro-batches (free communication):
    F0 + F1 + (m-1) max(F0, F1) + B0 + B1 + (m-1) max(B0, B1)."""
    f0, f1, b0, b1 = _stage_costs(fwd, bwd, cut)
    return f0 + f1 + (m - 1) * max(f0, f1) + b0 + b1 + (m - 1) * max(b0, b1)


def gpipe_cut(fwd: dict[str, float], bwd: dict[str, float], m: int) -> str:
    """The S=2 cut with the shortest modelled GPipe step at ``m`` micro-batches.

    ``fwd``/``bwd`` are per-block costs of ONE micro-batch. Balancing forward and backward
    separately matters (:func:`gpipe_span`), because stage 0's backward skips conv1's input gradient.
    """
    return min(BLOCK_NAMES[1:], key=lambda cut: gpipe_span(fwd, bwd, m, cut))


def modelled_bubble(fwd: dict[str, float], bwd: dict[str, float], m: int, cut: str) -> float:
    """The bubble the block-granular ``cut`` allows with free communication: mean over the two
    stages of 1 - m (F_s + B_s) / span. Above (S-1)/(M+S-1) by the stages' imbalance alone; the
    measured bubble's excess over this is the pipeline's own overhead (transfers, waits)."""
    f0, f1, b0, b1 = _stage_costs(fwd, bwd, cut)
    span = gpipe_span(fwd, bwd, m, cut)
    return 1 - m * (f0 + b0 + f1 + b1) / (2 * span)


def _pipe_worker(
    rank: int,
    world: int,
    port: int,
    cfg: ModelConfig,
    rows: int,
    cuts: dict[int, str],
    steps: int,
    warmup: int,
):
    shape_grid = Grid.parse("1x2x1", microbatches=1, global_batch=rows, cuts=(cuts[1],))
    groups = init_distributed(shape_grid, rank, "127.0.0.1", port, backend="gloo", timeout_s=600)
    x, y = batch(cfg, rows)
    out: dict = {"events": {}, "events_no_ahead": {}, "mem": {}}
    try:
        for m in MICROBATCHES:
            grid = Grid.parse("1x2x1", microbatches=m, global_batch=rows, cuts=(cuts[m],), schedule="gpipe")
            eng = Engine(cfg, grid, rank, groups, EngineConfig())
            out["events"][m], out["events_no_ahead"][m] = [], []
            for s in range(warmup + steps):
                for ahead, key in ((True, "events"), (False, "events_no_ahead")):  # interleaved
                    eng.link.receive_ahead = ahead
                    eng.step(s, 0.001, x if eng.first else None, y if eng.last else None)
                    if s >= warmup:
                        out[key][m] += eng.timeline.events
        for sched in ("gpipe", "1f1b"):
            grid = Grid.parse("1x2x1", microbatches=8, global_batch=rows, cuts=(cuts[8],), schedule=sched)
            eng = Engine(cfg, grid, rank, groups, EngineConfig(track_memory=True))
            out["mem"][sched] = eng.step(0, 0.001, x if eng.first else None, y if eng.last else None)[
                "activation_peak_bytes"
            ]
        return out
    finally:
        destroy()


def _r(d: dict) -> dict:
    return {k: round(v, 4) for k, v in d.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("paper", "small"), default="paper")
    p.add_argument("--batch", type=int, default=32, help="global batch (a multiple of 8)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="interleaved fused/split rounds for (a)")
    args = p.parse_args()
    if args.batch % 8:
        raise SystemExit("--batch must be a multiple of 8 (M up to 8)")
    cfg = model_config(args.variant)
    rows, steps, warmup = args.batch, args.steps, args.warmup

    # (a) interleaved rounds of fused and split; per round the median step, then the best
    # round of each (the machine is shared: the best round is the least disturbed one)
    fused_rounds, split_rounds, split_runs = [], [], []
    for _ in range(args.rounds):
        fused_rounds.append(statistics.median(fused_step_times(cfg, rows, steps, warmup)))
        split_runs = spawn_ranks(_split_worker, 2, (cfg, rows, steps, warmup), timeout_s=1800)
        split_rounds.append(statistics.median(max(r[i]["step_s"] for r in split_runs) for i in range(steps)))
    fused_ips, split_ips = rows / min(fused_rounds), rows / min(split_rounds)
    exch = statistics.median(r["exchange_s"] for run in split_runs for r in run)
    print(
        f"(a) fused {fused_ips:.1f} img/s (2 threads), split {split_ips:.1f} img/s (2 x 1 thread)", flush=True
    )

    # (b) for each M, the balanced cut from per-block costs measured at its micro-batch size
    cuts, shares, model = {}, {}, {}
    for m in MICROBATCHES:
        fwd, bwd = block_costs(cfg, rows // m)
        cuts[m] = cut = gpipe_cut(fwd, bwd, m)
        model[m] = round(modelled_bubble(fwd, bwd, m, cut), 4)
        cost = {n: fwd[n] + bwd[n] for n in BLOCK_NAMES}
        shares[m] = round(sum(cost[n] for n in BLOCK_NAMES[: BLOCK_NAMES.index(cut)]) / sum(cost.values()), 3)
        print(
            f"(b) M={m}: per-block fwd s {_r(fwd)}, bwd s {_r(bwd)}; cut at {cut} (modelled bubble "
            f"{model[m]})",
            flush=True,
        )
    runs = spawn_ranks(_pipe_worker, 2, (cfg, rows, cuts, steps, warmup), timeout_s=3600)
    measured, no_ahead, theory = [], [], []
    for m in MICROBATCHES:
        stages = bubble_fraction({rank: runs[rank]["events"][m] for rank in range(2)})
        base = bubble_fraction({rank: runs[rank]["events_no_ahead"][m] for rank in range(2)})
        measured.append(round(sum(stages.values()) / len(stages), 4))
        no_ahead.append(round(sum(base.values()) / len(base), 4))
        theory.append(round(ideal_bubble_fraction(2, m), 4))
        print(
            f"    M={m}: bubble per stage {_r(stages)} (no receive-ahead: {_r(base)}), theory {theory[-1]}",
            flush=True,
        )
    mem = runs[0]["mem"]  # rank 0 = stage 0
    print(
        f"(c) stage-0 saved activations: gpipe {mem['gpipe'] / 2**20:.1f} MiB, "
        f"1f1b {mem['1f1b'] / 2**20:.1f} MiB"
    )
    print(
        json.dumps(
            {
                "split_vs_fused_ratio": round(split_ips / fused_ips, 4),
                "split_images_per_s": round(split_ips, 2),
                "fused_images_per_s": round(fused_ips, 2),
                "split_exchange_s_median": round(exch, 4),
                "bubble_measured": measured,
                "bubble_no_ahead": no_ahead,
                "bubble_theory": theory,
                "bubble_model": [model[m] for m in MICROBATCHES],
                "bubble_max_abs_diff": round(
                    max(abs(a - b) for a, b in zip(measured, theory, strict=True)), 4
                ),
                "cuts": [cuts[m] for m in MICROBATCHES],
                "stage0_cost_share": [shares[m] for m in MICROBATCHES],
                "mem_1f1b_over_gpipe": round(mem["1f1b"] / mem["gpipe"], 4),
                "mem_gpipe_bytes": int(mem["gpipe"]),
                "mem_1f1b_bytes": int(mem["1f1b"]),
                "variant": args.variant,
                "batch": rows,
                "steps": steps,
            }
        )
    )


if __name__ == "__main__":
    main()
