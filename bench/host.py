"""The host's cost per step: the engine's step against a bare loop of the same model and rule.

At sizes where compute is negligible (the small net at batch 2, one thread), what is left of a
step is host work: Python, dispatch, autograd's bookkeeping. The bare loop is the shortest
correct training loop of the same function (:class:`alexnet.model.FusedAlexNet`, the same
update rule from :func:`alexnet.optim.make_optimizer`, the same keyed dropout); the engine's
step adds the schedule, the P2P layer, the timeline's spans, the gradient hooks and the scoring.

(a) ``m1``, ``m4``: the engine's 1x1x1 step at M = 1 and M = 4 against the bare loop over the
    same micro-batches (at M = 4 it accumulates the four micro-batches' gradients, one update);
    interleaved rounds, medians. Overhead in ms per step and per micro-batch.
(b) ``grid``: a 2-rank grid (``1x2x1`` on gloo: two stages, the P2P path) at M = 1 and 4, its
    step against the same bare loop run in rank 0's process between the engine's rounds.
(c) ``profile``: cProfile of the engine's and the bare loop's step at M = 1, the functions and ops
    with the most self time beyond the bare loop's (``profile_m1_vs_bare``: this found the
    engine's CPU layout); of the engine's steps (1x1x1 at M = 4, and rank 0 of the grid):
    self time per area of the engine's own Python (schedule, P2P, hooks, timeline, scoring,
    the engine's body, the model's Python) and of torch (ops, autograd), in ms per step
    (cProfile's own cost inflates Python-heavy areas: read shares, not absolute times).
(d) ``compile``: ``train.compile = "on"`` against eager at the negligible size and at the
    paper's batch (128, the small net on CPU), steady step times apart and the first steps'
    compile time apart.

    .venv/bin/python bench/host.py                      # everything (several minutes on CPU)
    .venv/bin/python bench/host.py --skip grid,compile  # (a) and (c) only
    git show REV:pipeline/engine.py > /tmp/engine_before.py
    .venv/bin/python bench/host.py --against /tmp/engine_before.py   # (a) also for that version

With ``--against`` (a) also times that version's engine in the same rounds (``before_*``), its
imports resolved to this tree's other modules.

The last line is one JSON object; its ``ratio`` is the engine's step time over the bare loop's
at M = 1 (1.0 = no host overhead).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from alexnet.config import ModelConfig  # noqa: E402
from alexnet.layers import StepContext  # noqa: E402
from alexnet.model import FusedAlexNet  # noqa: E402
from alexnet.optim import make_optimizer  # noqa: E402
from pipeline.dist import Comm, Groups  # noqa: E402
from pipeline.engine import Engine, EngineConfig  # noqa: E402
from pipeline.grid import Grid  # noqa: E402
from pipeline.verify import random_batch  # noqa: E402

LR = 0.001
Step = Callable[[int], None]

# where a profiled function's file puts its self time
AREAS = (
    ("pipeline/schedules.py", "schedule"),
    ("pipeline/p2p.py", "p2p"),
    ("pipeline/timeline.py", "timeline"),
    ("pipeline/exchange.py", "exchange"),
    ("pipeline/dist.py", "dist"),
    ("pipeline/engine.py", "engine"),
    ("alexnet/scoring.py", "scoring"),
    ("alexnet/optim.py", "optimizer_python"),
    ("alexnet/model.py", "model_python"),
    ("alexnet/layers.py", "model_python"),
    ("torch/autograd", "torch_autograd"),
    ("torch/optim", "torch_optim"),
    ("torch/distributed", "torch_distributed"),
)
HOOK_FUNCS = ("_hook", "pack", "unpack", "_release")  # the engine's gradient and saved-tensor hooks


def one_rank_groups(grid: Grid) -> Groups:
    """Groups of a one-rank grid: no process group needed."""
    return Groups(grid, 0, "gloo", 60.0, None, None, None, Comm("gloo"), torch.device("cpu"))


def engine_class(path: str) -> type:
    """The ``Engine`` of another version of ``pipeline/engine.py`` (``--against``; its imports
    resolve to this tree's other modules)."""
    spec = importlib.util.spec_from_file_location("_engine_against", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--against {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.Engine


def engine_step(
    cfg: ModelConfig, batch: int, m: int, compile: str = "off", cls: type = Engine
) -> tuple[Engine, Step]:
    """A 1x1x1 engine at M = ``m`` and its step on fixed data (read back once per round, as the
    trainer reads once per chunk: :meth:`Engine.read_steps`)."""
    grid = Grid.parse("1x1x1", microbatches=m, global_batch=batch)
    kw = {"compile": compile} if compile != "off" else {}  # an older engine has no such setting
    config = getattr(sys.modules[cls.__module__], "EngineConfig", None)
    if config is not None:  # the engine takes its settings as one EngineConfig (since f2d00c0)
        eng = cls(cfg, grid, 0, one_rank_groups(grid), config(device=torch.device("cpu"), **kw))
    else:  # an engine from before: keyword arguments
        eng = cls(cfg, grid, 0, one_rank_groups(grid), device=torch.device("cpu"), **kw)
    x, y = random_batch(cfg, batch, 0)

    def step(s: int) -> None:
        eng.submit_step(s, LR, x, y)

    return eng, step


def bare_step(cfg: ModelConfig, batch: int, m: int) -> Step:
    """The bare loop's step: FusedAlexNet, the paper's rule, M micro-batches accumulated, one update."""
    model = FusedAlexNet(cfg).train()
    opt = make_optimizer(model.named_parameters(), "paper", LR, 0.9, 5e-4)
    x, y = random_batch(cfg, batch, 0)
    xs = x.contiguous(memory_format=FusedAlexNet.memory_format).split(batch // m)
    ys, rows = y.split(batch // m), torch.arange(batch).split(batch // m)

    def step(s: int) -> None:
        opt.zero_grad(set_to_none=True)
        for xi, yi, ri in zip(xs, ys, rows, strict=True):
            loss = F.cross_entropy(model(xi, StepContext(cfg.seed, s, ri)), yi, reduction="sum") / batch
            loss.backward()
        opt.step()

    return step


def interleaved(fns: dict[str, Step], steps: int, rounds: int, warmup: int, after=None) -> dict[str, float]:
    """Median seconds per step of each function over ``rounds`` interleaved rounds (the order
    alternates, so a slow spell of the shared machine hits both); ``after(name)`` ends a round."""
    for name, fn in fns.items():
        for s in range(warmup):
            fn(s)
        if after:
            after(name)
    times: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            for s in range(steps):
                fns[name](warmup + r * steps + s)
            if after:
                after(name)
            times[name].append((time.perf_counter() - t0) / steps)
    return {n: statistics.median(t) for n, t in times.items()}


def _read(engines: dict[str, Engine]) -> Callable[[str], None]:
    def after(name: str) -> None:
        if name in engines:
            engines[name].read_steps()

    return after


def engine_vs_bare(
    cfg: ModelConfig, batch: int, m: int, steps: int, rounds: int, before: type | None
) -> dict:
    """(a) at M = ``m``: seconds per step of both, the ratio, the overhead per step and per
    micro-batch; with ``before`` (another version's Engine) the same for it, in the same rounds."""
    eng, ours = engine_step(cfg, batch, m)
    fns, engines = {"engine": ours, "bare": bare_step(cfg, batch, m)}, {"engine": eng}
    if before is not None:
        engines["before"], fns["before"] = engine_step(cfg, batch, m, cls=before)
    med = interleaved(fns, steps, rounds, 3, _read(engines))
    out = {}
    for name in engines:
        over = med[name] - med["bare"]
        prefix = "" if name == "engine" else "before_"
        out |= {
            f"{prefix}engine_ms": round(med[name] * 1e3, 3),
            f"{prefix}ratio": round(med[name] / med["bare"], 3),
            f"{prefix}overhead_ms_per_step": round(over * 1e3, 3),
            f"{prefix}overhead_ms_per_microbatch": round(over * 1e3 / m, 3),
        }
    out["bare_ms"] = round(med["bare"] * 1e3, 3)
    return out


def _second(kv: tuple[str, float]) -> float:
    return -kv[1]


def _area(filename: str, func: str) -> str:
    f = filename.replace("\\", "/")
    if f.endswith("pipeline/engine.py") and func in HOOK_FUNCS:
        return "hooks"
    for suffix, area in AREAS:
        if suffix in f:
            return area
    return "torch_ops_and_builtins"


def _profile(step: Step, steps: int, first: int) -> pstats.Stats:
    prof = cProfile.Profile()
    prof.enable()
    for s in range(steps):
        step(first + s)
    prof.disable()
    return pstats.Stats(prof)


def _self_ms(st: pstats.Stats, steps: int) -> dict[str, float]:
    """Self time per function, ms per step, keyed ``file:function`` (torch's builtins by name)."""
    out: dict[str, float] = {}
    for (filename, _line, func), (_cc, _nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        key = f"{Path(filename).name}:{func}"
        out[key] = out.get(key, 0.0) + tt * 1e3 / steps
    return out


def profile_vs_bare(ours: Step, bare: Step, steps: int) -> dict[str, float]:
    """The functions (ops included) on which the engine's step spends the most self time beyond the
    bare loop's, ms per step: where the overhead is, whether the engine's Python or the ops it
    runs differently (a layout, an extra copy)."""
    a, b = _self_ms(_profile(ours, steps, 1000), steps), _self_ms(_profile(bare, steps, 1000), steps)
    extra = {k: a.get(k, 0.0) - b.get(k, 0.0) for k in set(a) | set(b)}
    top = sorted(extra.items(), key=_second)[:12]
    return {"engine_ms": round(sum(a.values()), 3), "bare_ms": round(sum(b.values()), 3)} | {
        k: round(v, 3) for k, v in top
    }


def profile_steps(step: Step, steps: int, first: int = 1000) -> dict:
    """cProfile of ``steps`` calls of ``step``: self time per area (ms per step) and the engine's
    own functions with the most cumulative time."""
    st = _profile(step, steps, first)
    areas: dict[str, float] = {}
    own: list[tuple[float, str]] = []
    for (filename, _line, func), (_cc, _nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        area = _area(filename, func)
        areas[area] = areas.get(area, 0.0) + tt
        if "pipeline/" in filename or "alexnet/" in filename:
            own.append((ct, f"{Path(filename).parent.name}/{Path(filename).name}:{func}"))
    total = sum(areas.values())
    return {
        "ms_per_step": round(total * 1e3 / steps, 3),
        "self_ms_per_step": {a: round(t * 1e3 / steps, 3) for a, t in sorted(areas.items(), key=_second)},
        "top_cumulative_ms_per_step": {n: round(t * 1e3 / steps, 3) for t, n in sorted(own)[::-1][:12]},
    }


def _grid_worker(
    rank: int, world: int, port: int, cfg: ModelConfig, batch: int, m: int, steps: int, rounds: int
):  # noqa: E501
    import torch.distributed as dist

    from pipeline.dist import destroy, init_distributed

    grid = Grid.parse("1x2x1", microbatches=m, global_batch=batch)
    groups = init_distributed(grid, rank, "127.0.0.1", port, backend="gloo", timeout_s=600)
    try:
        eng = Engine(cfg, grid, rank, groups, EngineConfig())
        x, y = random_batch(cfg, batch, 0)
        bare = bare_step(cfg, batch, m) if rank == 0 else None

        def run_engine(first: int, n: int) -> float:
            dist.barrier()
            t0 = time.perf_counter()
            for s in range(first, first + n):
                eng.submit_step(s, LR, x, y)
            eng.read_steps()
            dist.barrier()
            return (time.perf_counter() - t0) / n

        def run_bare(first: int, n: int) -> float | None:
            dist.barrier()  # rank 1 waits here while rank 0 runs the bare loop alone
            t = None
            if bare is not None:
                t0 = time.perf_counter()
                for s in range(first, first + n):
                    bare(s)
                t = (time.perf_counter() - t0) / n
            dist.barrier()
            return t

        run_engine(0, 3)
        run_bare(0, 3)
        e_t, b_t = [], []
        for r in range(rounds):
            first = 3 + r * steps
            pair = (run_engine, run_bare) if r % 2 == 0 else (run_bare, run_engine)
            for fn in pair:
                t = fn(first, steps)
                (e_t if fn is run_engine else b_t).append(t)
        out = {"engine_s": statistics.median(e_t)}
        if rank == 0:
            out["bare_s"] = statistics.median(b_t)
            prof_steps = max(steps, 10)

            def profiled(s: int) -> None:
                eng.submit_step(s, LR, x, y)

            dist.barrier()
            out["profile"] = profile_steps(profiled, prof_steps, 10_000)
            eng.read_steps()
        else:
            dist.barrier()
            for s in range(10_000, 10_000 + max(steps, 10)):
                eng.submit_step(s, LR, x, y)
            eng.read_steps()
        return out
    finally:
        destroy()


def grid_vs_bare(cfg: ModelConfig, batch: int, steps: int, rounds: int) -> dict:
    """(b): the 1x2x1 grid on gloo at M = 1 and 4 against the bare loop (rank 0's process)."""
    from pipeline.launch import spawn_ranks

    out = {}
    for m in (1, 4):
        r0, r1 = spawn_ranks(_grid_worker, 2, (cfg, batch, m, steps, rounds), timeout_s=900)
        eng_s = max(r0["engine_s"], r1["engine_s"])
        over = eng_s - r0["bare_s"]
        out[f"m{m}"] = {
            "engine_ms": round(eng_s * 1e3, 3),
            "bare_ms": round(r0["bare_s"] * 1e3, 3),
            "ratio": round(eng_s / r0["bare_s"], 3),
            "overhead_ms_per_step": round(over * 1e3, 3),
            "overhead_ms_per_microbatch": round(over * 1e3 / m, 3),
            "profile_rank0": r0["profile"],
        }
    return out


def compiled_vs_eager(cfg: ModelConfig, batch: int, steps: int, rounds: int) -> dict:
    """(d) at ``batch``: steady seconds per step of train.compile on and off, and the first two
    steps' extra time (the compilation: the first builds the graphs, the second may recompile)."""
    engines, fns, first = {}, {}, {}
    for mode in ("off", "on"):
        eng, fn = engine_step(cfg, batch, 1, compile=mode)
        t0 = time.perf_counter()
        fn(0)
        fn(1)
        eng.read_steps()
        first[mode] = time.perf_counter() - t0
        engines[mode], fns[mode] = eng, fn
    med = interleaved(fns, steps, rounds, 1, _read(engines))
    return {
        "batch": batch,
        "eager_ms": round(med["off"] * 1e3, 3),
        "compiled_ms": round(med["on"] * 1e3, 3),
        "speedup": round(med["off"] / med["on"], 3),
        "compile_s": round(first["on"] - 2 * med["on"], 2),
        "first_two_steps_s": {k: round(v, 2) for k, v in first.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="global batch (M = 4 needs a multiple of 4)")
    p.add_argument("--steps", type=int, default=20, help="steps per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--paper-batch", type=int, default=128, help="(d)'s second size")
    p.add_argument("--against", default=None, help="another version's pipeline/engine.py, timed as before")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: grid, compile, profile")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.small(num_classes=10, input_size=32)
    before = engine_class(args.against) if args.against else None
    out: dict = {"batch": args.batch, "threads": args.threads, "torch": torch.__version__}
    for m in (1, 4):
        out[f"m{m}"] = engine_vs_bare(cfg, args.batch, m, args.steps, args.rounds, before)
        print(f"# M={m}: {out[f'm{m}']}", file=sys.stderr, flush=True)
    out["ratio"] = out["m1"]["ratio"]
    if "profile" not in skip:
        _, step = engine_step(cfg, args.batch, 1)
        bare = bare_step(cfg, args.batch, 1)
        for s in range(3):
            step(s)
            bare(s)
        out["profile_m1_vs_bare"] = profile_vs_bare(step, bare, max(args.steps, 20))
        print(f"# profile M=1, engine - bare: {out['profile_m1_vs_bare']}", file=sys.stderr, flush=True)
        _, step = engine_step(cfg, args.batch, 4)
        for s in range(3):
            step(s)
        out["profile_m4"] = profile_steps(step, max(args.steps, 20))
        print(f"# profile M=4: {out['profile_m4']}", file=sys.stderr, flush=True)
    if "grid" not in skip:
        out["grid_1x2x1"] = grid_vs_bare(cfg, args.batch, args.steps, args.rounds)
        print(f"# grid: {out['grid_1x2x1']}", file=sys.stderr, flush=True)
    if "compile" not in skip:
        out["compile"] = {
            "negligible": compiled_vs_eager(cfg, args.batch, args.steps, args.rounds),
            "paper_batch": compiled_vs_eager(cfg, args.paper_batch, max(2, args.steps // 10), 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
