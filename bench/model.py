"""Training speed of the fused two-column AlexNet against torchvision's alexnet.

Both models train (forward + backward + SGD-with-momentum step) on random data of the
same batch size in the same process; the runs are interleaved (a few timed steps of one
model, then of the other, for several rounds) and the medians compared, so machine noise
hits both alike. The paper network takes 227 px crops, torchvision's its own 224 px.

Also measures the device's fp32 matmul rate in the same run (the practical ceiling for
GFLOP/s) and, with ``--lrn``, a micro-benchmark of our LRN against
``torch.nn.LocalResponseNorm`` on conv1's output shape.

    .venv/bin/python bench/model.py                      # CPU, batch 128, 2 threads
    .venv/bin/python bench/model.py --device cuda --bf16
    .venv/bin/python bench/model.py --malloc tuned     # glibc keeps freed memory (both models)
    .venv/bin/python bench/model.py --profile            # + per-op time of one step each
    .venv/bin/python bench/model.py --lrn                # LRN micro-benchmark only
    .venv/bin/python bench/model.py --engine             # the engine's step: fused vs per-column
    git show main:alexnet/model.py > /tmp/model_main.py
    .venv/bin/python bench/model.py --against /tmp/model_main.py   # + that FusedAlexNet, same rounds

``--engine`` times the training engine's step on a one-rank grid (1x1x1: the rank holds both
columns) run fused (grouped convolutions, what such a rank runs) against the same engine run per
column (the baseline), interleaved in the same way; ``ratio`` is per-column step time over fused.

``--against FILE`` times the ``FusedAlexNet`` of another version of ``alexnet/model.py`` (its
imports resolve to this tree's other modules) in the same interleaved rounds, as ``before``:
``ratio_vs_before`` is its median step time over ours (above 1: ours is faster).

The last line printed is one JSON object (``images_per_s``, ``baseline_images_per_s``,
``ratio``, ``gflops``, ``matmul_gflops``, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

# Run as a script, this file's folder comes first on sys.path and its pipeline.py would shadow the
# ``pipeline`` package (--engine imports it): drop the folder, as bench/pipeline.py does.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from alexnet.config import ModelConfig  # noqa: E402
from alexnet.info import summary  # noqa: E402
from alexnet.layers import LocalResponseNorm, StepContext  # noqa: E402
from alexnet.model import FusedAlexNet  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, n: int = 2048, seconds: float = 1.0) -> float:
    """Achieved float32 GFLOP/s of an n x n matmul loop (TF32 only with --precision tf32)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    torch.mm(a, b, out=c)  # warm-up
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=c)
        reps += 1
        if reps % 4 == 0:
            sync(device)
            if time.perf_counter() - t0 > seconds:
                break
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def tune_malloc() -> None:
    """Keep freed memory in glibc's heap instead of unmapping it (what jemalloc/tcmalloc do).

    By default every tensor over 32 MiB is a fresh mmap whose pages fault in (and are
    zeroed by the kernel) on first touch, which on a CPU costs several times the
    elementwise pass that touches them. Applies to the whole process: both models.
    """
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**62 - 1 if ctypes.sizeof(ctypes.c_long) == 8 else 2**30)
    libc.mallopt(m_top_pad, 256 << 20)


def count_macs(model: nn.Module, x: Tensor) -> int:
    """Forward multiply-accumulates of the conv and linear layers of ``model`` (one image)."""
    total = 0

    def hook(mod: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        total += mod.weight.numel() * (out[0].numel() // out.shape[1])  # per output position

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model.eval()(x[:1])
    for h in handles:
        h.remove()
    model.train()
    return total


class Trainer:
    """One model's training step on a fixed random batch."""

    def __init__(
        self,
        model: nn.Module,
        size: int,
        args: argparse.Namespace,
        device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
        keyed: bool = False,
    ) -> None:
        self.model = model.to(device, memory_format=memory_format).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(args.batch, 3, size, size, generator=g).to(device, memory_format=memory_format)
        self.y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
        self.device, self.bf16 = device, args.bf16
        self.steps = 0
        self.keyed = keyed  # our models draw dropout from the step's context; torchvision's take none
        self.rows = torch.arange(args.batch, device=device)
        # process CPU seconds per step: on a shared machine, less sensitive than wall time
        # to other processes taking the cores (though it counts OpenMP spin-waits)
        self.cpu_s: list[float] = []

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        )
        with autocast:
            if self.keyed:
                logits = self.model(self.x, StepContext(step=self.steps, sample_index=self.rows))
            else:
                logits = self.model(self.x)
            loss = F.cross_entropy(logits, self.y)
        loss.backward()
        self.opt.step()
        self.steps += 1

    def timed(self, steps: int) -> float:
        """Wall seconds per step over ``steps`` steps (CPU seconds are added to ``self.cpu_s``)."""
        sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        sync(self.device)
        self.cpu_s.append((time.process_time() - c0) / steps)
        return (time.perf_counter() - t0) / steps


def profile(trainer: Trainer, rows: int = 20) -> list[dict]:
    """Per-op self time of one training step, largest first."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        trainer.timed(1)
    key = "self_device_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:rows]
    return [{"op": e.key, "ms": round(getattr(e, key) / 1e3, 2), "calls": e.count} for e in ops]


def bench_lrn(args: argparse.Namespace, device: torch.device) -> dict:
    """Forward + backward of LRN on conv1's output (B, 96, 55, 55): ours (groups=2) vs torch's."""
    x = torch.randn(args.batch, 96, 55, 55, device=device).relu_().mul_(20).requires_grad_()
    g = torch.randn_like(x)
    ours = LocalResponseNorm(groups=2, convention="per_size")
    theirs = nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)

    def run(f: Callable[[Tensor], Tensor]) -> None:
        x.grad = None
        f(x).backward(g)

    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for f in (ours, theirs):
        run(f)  # warm-up
    for _ in range(args.rounds):
        for name, f in (("ours", ours), ("torch", theirs)):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run(f)
            sync(device)
            times[name].append((time.perf_counter() - t0) / args.steps)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "lrn_ms": round(ms["ours"], 2),
        "torch_lrn_ms": round(ms["torch"], 2),
        "lrn_speedup": round(ms["torch"] / ms["ours"], 2),
        "lrn_shape": list(x.shape),
    }


def bench_engine(args: argparse.Namespace, device: torch.device) -> dict:
    """The engine's 1x1x1 step, fused vs per-column, interleaved rounds, medians (module doc)."""
    from pipeline.dist import Comm, Groups
    from pipeline.engine import Engine, EngineConfig
    from pipeline.grid import Grid

    cfg = ModelConfig()
    grid = Grid.parse("1x1x1", microbatches=1, global_batch=args.batch)
    groups = Groups(grid, 0, "gloo", 60.0, None, None, None, Comm("gloo"), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, cfg.input_size, cfg.input_size, generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    engines = {
        name: Engine(cfg, grid, 0, groups, EngineConfig(device=device, precision=args.precision, fused=fused))
        for name, fused in (("fused", True), ("per_column", False))
    }
    steps = dict.fromkeys(engines, 0)
    wall: dict[str, list[float]] = {k: [] for k in engines}
    cpu: dict[str, list[float]] = {k: [] for k in engines}

    def run(name: str, n: int) -> None:
        for _ in range(n):
            engines[name].submit_step(steps[name], 1e-3, x, y)
            steps[name] += 1
        engines[name].read_steps()

    for name in engines:
        run(name, args.warmup)
    order = list(engines)
    for _ in range(args.rounds):
        for name in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            run(name, args.steps)
            sync(device)
            wall[name].append((time.perf_counter() - t0) / args.steps)
            cpu[name].append((time.process_time() - c0) / args.steps)
        order = order[::-1]
    med = {k: statistics.median(v) for k, v in wall.items()}
    return {
        "engine_fused_images_per_s": round(args.batch / med["fused"], 2),
        "engine_per_column_images_per_s": round(args.batch / med["per_column"], 2),
        "ratio": round(med["per_column"] / med["fused"], 3),
        "ratio_fastest": round(min(wall["per_column"]) / min(wall["fused"]), 3),
        "cpu_ratio": round(statistics.median(cpu["per_column"]) / statistics.median(cpu["fused"]), 3),
        "precision": engines["fused"].precision,
        "step_s": {k: [round(v, 3) for v in vs] for k, vs in wall.items()},
    }


def load_fused(path: str) -> type[nn.Module]:
    """``FusedAlexNet`` of the ``alexnet/model.py`` version at ``path`` (for ``--against``)."""
    spec = importlib.util.spec_from_file_location("_model_against", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--against {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.FusedAlexNet


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (medians are reported)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for both models")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "tf32", "bf16"],
        help="both models' numerics (tf32: TF32 matmuls and convolutions on CUDA); --bf16 = bf16",
    )
    p.add_argument("--engine", action="store_true", help="only the engine: fused vs per-column step")
    p.add_argument(
        "--baseline-layouts",
        default="contiguous,channels_last",
        help="torchvision runs in each of these layouts; the faster is the baseline "
        "(the fused model always runs its conv stack in channels_last)",
    )
    p.add_argument(
        "--malloc",
        default="default",
        choices=["default", "tuned"],
        help="tuned: glibc keeps freed memory (no page faults per step), for both models",
    )
    p.add_argument("--profile", action="store_true", help="add a per-op time table of one step each")
    p.add_argument("--lrn", action="store_true", help="only the LRN micro-benchmark")
    p.add_argument("--against", metavar="FILE", help="also time this alexnet/model.py's FusedAlexNet")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.bf16:
        args.precision = "bf16"
    args.bf16 = args.precision == "bf16"
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = args.precision == "tf32"

    result: dict = {"device": args.device, "threads": args.threads, "batch": args.batch}
    if device.type == "cuda":
        result["card"] = torch.cuda.get_device_name(device)
    if args.engine:
        result.update(bench_engine(args, device))
        print(json.dumps(result))
        return 0
    if args.lrn:
        result.update(bench_lrn(args, device))
        result["matmul_gflops"] = round(matmul_gflops(device), 1)
        print(json.dumps(result))
        return 0

    if args.malloc == "tuned":
        tune_malloc()
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    names = [s for s in args.baseline_layouts.split(",") if s]
    if not names or any(s not in layouts for s in names):
        raise SystemExit(f"--baseline-layouts={args.baseline_layouts!r}: use contiguous and/or channels_last")
    cfg = ModelConfig()
    fused = {"ours": FusedAlexNet}
    if args.against:
        fused["before"] = load_fused(args.against)
    trainers = {}
    for name, cls in fused.items():
        trainers[name] = t = Trainer(cls(cfg), cfg.input_size, args, device, keyed=True)
        # the fused model converts its input to channels_last itself; hand it over in that layout,
        # as torchvision's channels_last run gets its input (parameters stay contiguous)
        t.x = t.x.contiguous(memory_format=FusedAlexNet.memory_format)
    for s in names:
        model = torchvision.models.alexnet(num_classes=1000)
        trainers[f"baseline_{s}"] = Trainer(model, 224, args, device, layouts[s])
    macs = summary(cfg)["macs_per_image"]
    base_macs = count_macs(trainers[f"baseline_{names[0]}"].model, trainers[f"baseline_{names[0]}"].x)
    mm = [matmul_gflops(device)]
    for t in trainers.values():
        t.timed(args.warmup)
        t.cpu_s.clear()
    times: dict[str, list[float]] = {k: [] for k in trainers}
    order = list(trainers)
    for _ in range(args.rounds):
        for name in order:
            times[name].append(trainers[name].timed(args.steps))
        order = order[1:] + order[:1]  # rotate, so no model always follows the same one
    mm.append(matmul_gflops(device))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = min((k for k in med if k.startswith("baseline_")), key=med.get)
    step_s, base_s = med["ours"], med[best]
    flop_per_image = 2 * 3 * macs  # forward MACs x 2 FLOP x (forward + 2 backward matmuls)
    result.update(
        {
            "bf16": args.bf16,
            "precision": args.precision,
            "malloc": args.malloc,
            "images_per_s": round(args.batch / step_s, 2),
            "baseline_images_per_s": round(args.batch / base_s, 2),
            "baseline": best,
            "ratio": round(base_s / step_s, 3),
            "gflops": round(flop_per_image * args.batch / step_s / 1e9, 1),
            "baseline_gflops": round(2 * 3 * base_macs * args.batch / base_s / 1e9, 1),
            "matmul_gflops": round(max(mm), 1),
            "gmac_per_image": round(macs / 1e9, 4),
            "baseline_gmac_per_image": round(base_macs / 1e9, 4),
            # noise from other processes only ever adds time, so the fastest steps are a second,
            # less disturbed estimate on a shared machine
            "ratio_fastest": round(min(times[best]) / min(times["ours"]), 3),
            "cpu_ratio": round(
                statistics.median(trainers[best].cpu_s) / statistics.median(trainers["ours"].cpu_s), 3
            ),
            "cpu_s_per_step": {k: round(statistics.median(t.cpu_s), 3) for k, t in trainers.items()},
            "images_per_s_each": {k: round(args.batch / v, 2) for k, v in med.items()},
            "step_s": {k: [round(s, 3) for s in v] for k, v in times.items()},
        }
    )
    if args.against:
        result["ratio_vs_before"] = round(med["before"] / step_s, 3)
        result["ratio_vs_before_fastest"] = round(min(times["before"]) / min(times["ours"]), 3)
    if args.profile:
        result["profile"] = profile(trainers["ours"])
        result["baseline_profile"] = profile(trainers[best])
        for name in ("profile", "baseline_profile"):
            print(f"# {name}")
            for row in result[name]:
                print(f"  {row['ms']:9.1f} ms  {row['calls']:4d}x  {row['op']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
