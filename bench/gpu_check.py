"""The GPU check: everything about the engine on a GPU that the CPU test suite cannot prove.

One command, one JSON line at the end. On one H100/H200 it is meant to finish in under
8 minutes; ``--device cpu`` runs the same sections at tiny sizes (the smoke test of
``make test``). Every section is guarded: a failure is reported under its name (``"error"``)
and in ``failed``, and the rest still runs.

    python3 bench/gpu_check.py                 # CUDA, from the project's root (make gpu-check)
    python3 bench/gpu_check.py --device cpu    # the same on CPU, quickly

It needs only torch, torchvision, numpy and Pillow (what a bare GPU machine's python3 has): no
install step, no Ray, no webdataset (its JPEG records are made in memory), no network.

Sections (keys of the JSON):

* ``env``: torch, CUDA, the card, bf16 support, GPUs found;
* ``lrn``: gradcheck (float64) of the eager and compiled LRN on the device; each against the
  CPU's eager LRN (relative error of output and input gradient); eager vs compiled time;
* ``engine_vs_cpu``: the engine's 1x1x1 step (the fused path) on the device vs on the CPU, fp32
  with TF32 off, two steps from the same weights: relative error of loss, grads and weights;
* ``throughput``: training images/s of the engine's 1x1x1 step in fp32, tf32 and bf16 against
  torchvision's AlexNet in the same precision and layout (channels_last on CUDA), interleaved
  rounds; achieved TFLOP/s counting 3 x 2 x the forward MACs (``alexnet.info``: 4.3 GFLOP per
  trained 227 px image);
* ``syncs``: host reads per step (0 expected) in fp32 and bf16, counted
  (:mod:`pipeline.syncs`) and, on CUDA, under ``torch.cuda.set_sync_debug_mode("error")``;
* ``lrn_share``: LRN's share of a profiled step (its profiler ranges over the step's);
* ``multi_gpu``: with >= 2 GPUs, grids 1x1x2 and (with 4) 1x2x2 at M = 1 and 4 on NCCL, a few
  steps against the CPU reference (fp32); otherwise the parts skipped and why;
* ``deterministic``: ``train.deterministic`` on the device: 3 steps straight equal 2 steps, a
  state round trip into a fresh engine, and 1 more, bit for bit;
* ``decode``: the trainer side of ``data.decode = "device"``: a batch of JPEGs (256 px, as
  ``alexnet shards`` stores them) decoded and cropped on the device in one batched call (nvJPEG
  on CUDA, :func:`alexnet.data.encoded.decode_rows`): images/s, and its pixels against the CPU's
  decode of the same batch (mean and max absolute difference in uint8 levels: nvJPEG's IDCT is
  not libjpeg-turbo's, so a few levels apart is expected; the CPU path is bit-identical to the
  data workers', which the test suite proves);
* ``step_path``: the rank's per-step path without Ray, for a fixed number of steps: the feed's
  device side (:meth:`cluster.feed.Feed.place`: pinned copies on a side stream, the next step's
  placed by a second thread), the batched device decode of real 256 px JPEGs into crops, and the
  engine's step in bf16, eager (``eager``), with ``train.compile=on`` (``compiled``; its
  ``warmup_s`` holds the compilation) and, on CUDA, with ``train.compile=cudagraphs``
  (``cudagraphs``: the compiled step replayed as CUDA graphs; ``cudagraph_skips``: graphs Inductor
  left out of them, 0 expected; skipped on CPU, where the setting runs as ``on``). Per mode:
  images/s of that path against the engine alone on the same batches already on the device
  (``path_over_engine``: what the data path costs), and the engine step's host time against its
  device time (CUDA events; ``host_over_device`` > 1: the GPU waits on the host). A failure of the
  cudagraphs run alone is reported under it and as ``step_path.cudagraphs`` in ``failed``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from alexnet.config import ModelConfig  # noqa: E402
from alexnet.info import summary  # noqa: E402
from alexnet.layers import LRN_BACKWARD_RANGE, LRN_FORWARD_RANGE, local_response_norm  # noqa: E402
from bench.model import count_macs  # noqa: E402
from pipeline.dist import Comm, Groups  # noqa: E402
from pipeline.engine import Engine, EngineConfig  # noqa: E402
from pipeline.grid import Grid  # noqa: E402
from pipeline.syncs import count_host_syncs  # noqa: E402
from pipeline.verify import random_batch  # noqa: E402

CROSS_DEVICE_TOLERANCE = 1e-4  # fp32 on a GPU vs the CPU: other kernels, other summation orders


# -- harness ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (one section must not eat the session)."""

    def fire(signum, frame):
        raise TimeoutError(f"section exceeded {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Budget:
    """The whole check's time: each section gets at most its own cap and what is left of the total
    (minus a reserve), so the check ends in time even when sections hit their caps."""

    def __init__(self, total_s: float, reserve_s: float = 15.0) -> None:
        self.end, self.reserve_s = time.monotonic() + total_s, reserve_s

    def allow(self, cap_s: float) -> float:
        return min(cap_s, self.end - time.monotonic() - self.reserve_s)


def run_section(name: str, fn: Callable[[], dict], cap_s: float, budget: Budget, out: dict) -> None:
    """``out[name] = fn()``, or the error it raised (then ``name`` joins ``out["failed"]``); a part of
    the section that failed alone (its result's ``failed`` list) joins it as ``name.part``."""
    t0 = time.perf_counter()
    seconds = budget.allow(cap_s)
    if seconds < 5:
        out[name] = {"skipped": "out of time: the check's total budget is spent"}
        out["failed"].append(name)
        return
    try:
        with _deadline(seconds):
            res = fn()
    except BaseException as e:  # noqa: BLE001 - a section's failure is a result, not the end
        if isinstance(e, KeyboardInterrupt):
            raise
        res = {"error": f"{type(e).__name__}: {str(e)[:500]}", "trace": traceback.format_exc()[-1500:]}
        out["failed"].append(name)
    out["failed"].extend(f"{name}.{part}" for part in res.get("failed", []))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out[name] = res
    print(f"# {name}: {res.get('error', 'ok')} ({res['seconds']} s)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _world_of_one(device: torch.device) -> Iterator[None]:
    """A one-rank default process group for the in-process engines (what fp16's scaler reduces over)."""
    import torch.distributed as dist

    from pipeline.dist import free_port

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


class Sizes:
    """The check's sizes: the paper network at batch 128 on CUDA, the small one at 64 px on CPU."""

    def __init__(self, device: torch.device, batch: int | None) -> None:
        cuda = device.type == "cuda"
        self.cfg = ModelConfig() if cuda else ModelConfig.small(num_classes=10, input_size=64)
        self.batch = batch or (128 if cuda else 8)
        # on CPU no warm-up step: torchvision's AlexNet takes ~5 s a step in bf16 there (no bf16
        # matmul units), and the CPU figures compare nothing (the section only has to run)
        self.warmup, self.steps, self.rounds = (3, 10, 3) if cuda else (0, 1, 1)
        self.lrn_shape = (32, 96, 55, 55) if cuda else (4, 32, 15, 15)


def _engine(sizes: Sizes, device: torch.device, precision: str, **kw) -> Engine:
    """A 1x1x1 engine (one rank holding both columns: the fused path); no process group needed."""
    grid = Grid.parse("1x1x1", microbatches=1, global_batch=sizes.batch)
    groups = Groups(grid, 0, "gloo", 60.0, None, None, None, Comm("gloo"), torch.device("cpu"))
    return Engine(sizes.cfg, grid, 0, groups, EngineConfig(device=device, precision=precision, **kw))


def _batch(sizes: Sizes, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = random_batch(sizes.cfg, sizes.batch, step)
    return x.to(device), y.to(device)


# -- sections ---------------------------------------------------------------------------------
def section_env(device: torch.device) -> dict:
    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        out["card"] = torch.cuda.get_device_name(device)
        out["capability"] = list(torch.cuda.get_device_capability(device))
        out["bf16"] = torch.cuda.is_bf16_supported(including_emulation=False)
        out["gpus"] = torch.cuda.device_count()
    else:
        out["gpus"] = 0
    return out


def section_lrn(device: torch.device, sizes: Sizes, compiled_on_cpu: bool) -> dict:
    out: dict[str, Any] = {}
    kernels = ["eager"] + (["compiled"] if device.type == "cuda" or compiled_on_cpu else [])
    if "compiled" not in kernels:
        out["compiled"] = "skipped on cpu (tests/alexnet/test_layers.py checks it; --lrn-compiled runs it)"
    small = (torch.randn(2, 8, 4, 3, dtype=torch.float64, device=device) * 20).requires_grad_()
    for kernel in kernels:
        out[f"gradcheck_{kernel}"] = bool(
            torch.autograd.gradcheck(
                lambda t, kernel=kernel: local_response_norm(t, 5, 0.05, 0.75, 2.0, 2, kernel), (small,)
            )
        )
    x = torch.randn(sizes.lrn_shape).relu_().mul_(20)
    g = torch.randn_like(x)
    ref_x = x.clone().requires_grad_()
    ref = local_response_norm(ref_x, groups=2)
    ref.backward(g)
    xd, gd = x.to(device), g.to(device)
    for kernel in kernels:
        xi = xd.clone().requires_grad_()
        o = local_response_norm(xi, groups=2, kernel=kernel)
        o.backward(gd)
        out[f"{kernel}_vs_cpu_rel_error"] = max(_rel(o, ref), _rel(xi.grad, ref_x.grad))
        out[f"{kernel}_ms"] = round(_time_lrn(xd, gd, kernel, device) * 1e3, 3)
    if "compiled" in kernels:
        out["compiled_speedup"] = round(out["eager_ms"] / out["compiled_ms"], 2)
    out["shape"] = list(sizes.lrn_shape)
    out["ok"] = all(v for k, v in out.items() if k.startswith("gradcheck")) and all(
        v < 1e-5 for k, v in out.items() if k.endswith("_rel_error")
    )
    return out


def _time_lrn(x: torch.Tensor, g: torch.Tensor, kernel: str, device: torch.device, reps: int = 5) -> float:
    """Median seconds of one forward + backward."""
    times = []
    for _ in range(reps + 1):
        xi = x.clone().requires_grad_()
        _sync(device)
        t0 = time.perf_counter()
        local_response_norm(xi, groups=2, kernel=kernel).backward(g)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def section_engine_vs_cpu(device: torch.device, sizes: Sizes) -> dict:
    """Two fp32 steps of the same engine on the device and on the CPU, from the same weights."""
    runs = []
    for where in (device, torch.device("cpu")):
        eng = _engine(sizes, where, "fp32")  # LRN: compiled on CUDA, eager on the CPU
        losses = [eng.step(s, 0.01, *_batch(sizes, s, where))["loss"] for s in range(2)]
        runs.append((losses, eng.grads(), eng.state_dict()["model"]))
    (l_dev, g_dev, w_dev), (l_cpu, g_cpu, w_cpu) = runs
    out = {
        "loss_rel_error": max(abs(a - b) / abs(b) for a, b in zip(l_dev, l_cpu, strict=True)),
        "grad_rel_error": max(_rel(g_dev[k], g_cpu[k]) for k in g_cpu),
        "weight_rel_error": max(_rel(w_dev[k], w_cpu[k]) for k in w_cpu),
        "tolerance": CROSS_DEVICE_TOLERANCE,
        "losses": [round(v, 6) for v in l_dev],
    }
    out["ok"] = all(out[k] < CROSS_DEVICE_TOLERANCE for k in ("loss_rel_error", "grad_rel_error"))
    return out


def _tv_trainer(sizes: Sizes, device: torch.device, precision: str) -> Callable[[], None]:
    """One training step of torchvision's AlexNet (its own 224 px on CUDA), same precision and layout."""
    import torchvision

    size = 224 if device.type == "cuda" else sizes.cfg.input_size
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = torchvision.models.alexnet(num_classes=sizes.cfg.num_classes).to(device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(sizes.batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, sizes.cfg.num_classes, (sizes.batch,), device=device)
    dtype = {"bf16": torch.bfloat16}.get(precision)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    step.macs = count_macs(model, x)  # type: ignore[attr-defined]
    return step


def section_throughput(device: torch.device, sizes: Sizes) -> dict:
    """Engine (fused 1x1x1) vs torchvision, per precision, interleaved rounds, medians."""
    flop_ours = 6 * summary(sizes.cfg)["macs_per_image"]  # forward MACs x 2 FLOP x (fwd + 2 bwd)
    precisions = ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32", "bf16")
    out: dict[str, Any] = {"gflop_per_image": round(flop_ours / 1e9, 3), "batch": sizes.batch}
    if device.type != "cuda":
        # the smoke sizes: our small net at 64 px, torchvision's full AlexNet (its adaptive pool
        # keeps the 9216-wide fc6 at any size): the section runs, the ratio compares nothing
        out["note"] = "CPU smoke sizes (small net vs torchvision's full AlexNet): the ratio is no comparison"
    for prec in precisions:
        eng = _engine(sizes, device, prec)
        x, y = _batch(sizes, 0, device)
        state = {"step": 0}

        def ours(eng=eng, x=x, y=y, state=state) -> None:
            eng.submit_step(state["step"], 0.001, x, y)
            state["step"] += 1

        tv = _tv_trainer(sizes, device, prec)  # after the engine: the engine set this precision's flags
        times: dict[str, list[float]] = {"ours": [], "torchvision": []}
        for fn in (ours, tv):
            for _ in range(sizes.warmup):
                fn()
            eng.read_steps()
        for r in range(sizes.rounds):
            order = (
                (("ours", ours), ("torchvision", tv)) if r % 2 == 0 else (("torchvision", tv), ("ours", ours))
            )
            for name, fn in order:
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(sizes.steps):
                    fn()
                if name == "ours":
                    eng.read_steps()  # the chunk's one read, as the trainer does
                _sync(device)
                times[name].append((time.perf_counter() - t0) / sizes.steps)
        ours_s, tv_s = statistics.median(times["ours"]), statistics.median(times["torchvision"])
        out[prec] = {
            "images_per_s": round(sizes.batch / ours_s, 1),
            "torchvision_images_per_s": round(sizes.batch / tv_s, 1),
            "ratio": round(tv_s / ours_s, 3),
            "tflops": round(flop_ours * sizes.batch / ours_s / 1e12, 4),
            "torchvision_tflops": round(6 * tv.macs * sizes.batch / tv_s / 1e12, 4),
            "engine_precision": eng.precision,
        }
        del eng, tv
    return out


def section_syncs(device: torch.device, sizes: Sizes) -> dict:
    """Host reads inside a step, after warm-up (0 expected); the chunk's read is outside."""
    out: dict[str, Any] = {}
    # fp16 only on CUDA: there the fused SGD reads the inf flag on the device; on a CPU the
    # scaler's update reads it on the host, which is no wait there
    for prec in ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16"):
        eng = _engine(sizes, device, prec)
        x, y = _batch(sizes, 0, device)
        for s in range(2):
            eng.submit_step(s, 0.001, x, y)
        eng.read_steps()
        with count_host_syncs() as counted:
            eng.submit_step(2, 0.001, x, y)
        res: dict[str, Any] = {"counted": counted.count, "ops": counted.ops[:10]}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                eng.submit_step(3, 0.001, x, y)
                res["sync_debug_mode"] = "no synchronizing call"
            except RuntimeError as e:
                res["sync_debug_mode"] = f"error: {str(e)[:300]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
        eng.read_steps()
        out[prec] = res
    out["ok"] = all(
        r["counted"] == 0 and r.get("sync_debug_mode", "no").startswith("no")
        for r in out.values()
        if isinstance(r, dict)
    )
    return out


def section_lrn_share(device: torch.device, sizes: Sizes) -> dict:
    """LRN's share of one profiled step: its profiler ranges' time over the whole step's."""
    from torch.profiler import ProfilerActivity, profile, record_function

    prec = "bf16" if device.type == "cuda" else "fp32"
    eng = _engine(sizes, device, prec)
    x, y = _batch(sizes, 0, device)
    for s in range(2):
        eng.submit_step(s, 0.001, x, y)
    eng.read_steps()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof, record_function("gpu_check.step"):
        eng.submit_step(2, 0.001, x, y)
        eng.read_steps()
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    spans = {e.key: getattr(e, key) for e in prof.key_averages()}
    step = spans.get("gpu_check.step", 0.0)
    lrn = spans.get(LRN_FORWARD_RANGE, 0.0) + spans.get(LRN_BACKWARD_RANGE, 0.0)
    return {
        "precision": prec,
        "lrn_share": round(lrn / step, 4) if step else math.nan,
        "lrn_ms": round(lrn / 1e3, 3),
        "step_ms": round(step / 1e3, 3),
        "timed_by": key,
    }


def _grid_worker(rank: int, world_size: int, port: int, shape: str, m: int, batch: int, steps: int, cfg):
    from pipeline import dist as pdist
    from pipeline.verify import run_rank

    torch.cuda.set_device(rank)
    grid = Grid.parse(shape, m, batch)
    groups = pdist.init_distributed(grid, rank, "127.0.0.1", port, backend="nccl", timeout_s=120)
    try:
        return run_rank(cfg, grid, rank, groups, steps, 0.05, device=torch.device("cuda", rank))
    finally:
        pdist.destroy()


def section_multi_gpu(device: torch.device) -> dict:
    """1x1x2 and 1x2x2 at M = 1 and 4 on NCCL against the CPU reference (fp32), where the GPUs exist."""
    if device.type != "cuda":
        return {"skipped": "no GPU: 1x1x2 and 1x2x2 (M=1, M=4) on NCCL not run"}
    from pipeline.launch import spawn_ranks
    from pipeline.verify import compare, reference_run

    gpus = torch.cuda.device_count()
    cfg = ModelConfig.small(num_classes=10, input_size=32, dropout=0.5)
    batch, steps = 8, 2
    reference = reference_run(cfg, batch, steps, 0.05)
    out: dict[str, Any] = {"gpus": gpus, "tolerance": CROSS_DEVICE_TOLERANCE, "skipped": []}
    for shape in ("1x1x2", "1x2x2"):
        need = Grid.parse(shape, 1, batch).world_size
        for m in (1, 4):
            name = f"{shape}_m{m}"
            if gpus < need:
                out["skipped"].append(f"{name}: needs {need} GPUs, found {gpus}")
                continue
            results = spawn_ranks(_grid_worker, need, (shape, m, batch, steps, cfg), timeout_s=240)
            errors = compare(cfg, reference, results)
            errors["ok"] = errors["max_rel_grad_error"] < CROSS_DEVICE_TOLERANCE
            out[name] = errors
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def _deterministic_worker(rank: int, world_size: int, port: int, device_name: str, batch: int | None) -> dict:
    from pipeline.precision import configure_backends, deterministic_env, resolve_precision

    os.environ.update(deterministic_env())  # before CUDA initialises in this process
    device = torch.device(device_name)
    configure_backends(device, resolve_precision("auto", device), deterministic=True, cudnn_benchmark=False)
    sizes = Sizes(device, batch)
    straight = _engine(sizes, device, "auto")
    for s in range(3):
        straight.step(s, 0.01, *_batch(sizes, s, device))
    first = _engine(sizes, device, "auto")
    for s in range(2):
        first.step(s, 0.01, *_batch(sizes, s, device))
    resumed = _engine(sizes, device, "auto")
    resumed.load_state_dict({k: {n: t.cpu() for n, t in d.items()} for k, d in first.state_dict().items()})
    resumed.step(2, 0.01, *_batch(sizes, 2, device))
    a, b = straight.state_dict(), resumed.state_dict()
    diff = max(float((a[k][n] - b[k][n]).abs().max()) for k in a for n in a[k])
    return {"precision": straight.precision, "max_abs_diff": diff, "ok": diff == 0.0}


def section_deterministic(device: torch.device, batch: int | None) -> dict:
    """In a fresh process (the deterministic environment must precede CUDA's start)."""
    from pipeline.launch import spawn_ranks

    (res,) = spawn_ranks(_deterministic_worker, 1, (str(device), batch), timeout_s=300)
    return res


def _jpeg_batch(n: int, side: int, crop: int, seed: int = 0, classes: int = 1) -> dict:
    """An encoded batch of ``n`` generated ``side`` px JPEGs (smooth colour fields plus texture,
    quality 90, as ImageNet-like as bench/data.py's), crop ``crop``. The records are made in memory
    (what a shard's tar holds per sample), so no shard reader (webdataset) is needed."""
    import io

    import numpy as np
    from PIL import Image

    from alexnet.data.encoded import collate_encoded, draw_encoded
    from alexnet.data.records import ReaderStats

    rng = np.random.default_rng(seed)
    light = np.eye(3, dtype=np.float32)
    stats, samples = ReaderStats(), []
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        smooth = np.asarray(low.resize((side, side), Image.BICUBIC), np.float32)
        img = np.clip(smooth + rng.normal(0, 10, (side, side, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        label = str(i % classes).encode()
        rec = {"__key__": f"img{seed}_{i}", "jpg": buf.getvalue(), "cls": label, "__url__": "generated"}
        samples.append(draw_encoded(rec, seed, 0, side, crop, light, stats))
    return collate_encoded(samples, crop)


def section_decode(device: torch.device) -> dict:
    from alexnet.data.encoded import decode_rows

    cuda = device.type == "cuda"
    n, side, crop, reps = (256, 256, 227, 10) if cuda else (8, 72, 64, 2)
    batch = _jpeg_batch(n, side, crop)
    rows = slice(0, n)
    ref, ref_bad = decode_rows(batch, rows, crop, torch.device("cpu"))
    got, bad = decode_rows(batch, rows, crop, device)  # warm-up (nvJPEG's handles, the allocator)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        got, bad = decode_rows(batch, rows, crop, device)
    _sync(device)
    ips = reps * n / (time.perf_counter() - t0)
    diff = (got.cpu().int() - ref.int()).abs()
    jpeg_bytes = int(batch["jpeg"].nbytes)
    return {
        "images": n,
        "images_per_s": round(ips, 1),
        "mean_abs_diff_vs_cpu": round(float(diff.float().mean()), 4),
        "max_abs_diff_vs_cpu": int(diff.max()),
        "bad_rows": int(bad.sum()) + int(ref_bad.sum()),
        "jpeg_bytes_per_image": round(jpeg_bytes / n),
        "decoded_bytes_per_image": 3 * crop * crop,
    }


def _step_timer(device: torch.device) -> Callable[[Callable[[], None]], tuple[float, Any]]:
    """``timer(fn)``: runs ``fn``, returns (host seconds it took, the device's span of it: a pair of
    CUDA events on the current stream, or on CPU the host seconds again: there the two are one)."""

    def timer(fn: Callable[[], None]) -> tuple[float, Any]:
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        if device.type != "cuda":
            return host, host
        b.record()
        return host, (a, b)

    return timer


def _device_s(span: Any) -> float:
    return span if isinstance(span, float) else span[0].elapsed_time(span[1]) / 1e3


def _path_run(device, sizes, compile_mode: str, mines: list, steps: int) -> dict:
    """One engine (bf16) fed two ways over ``steps`` steps each, interleaved: through the feed's
    device side (pinned copies and the batched decode on the side stream, the next step's placed by
    a second thread while this one runs, as the rank's feed thread does) and alone, on the same
    batches already on the device. Host and device time per step of the engine's step itself."""
    from concurrent.futures import ThreadPoolExecutor

    from cluster.feed import Feed, FeedSpec

    crop = sizes.cfg.input_size
    scale = 1.0 if device.type == "cuda" else 1 / 64  # the small net wants small inputs (FeedSpec)
    spec = FeedSpec(0, 0, 1, images=True, labels=True, input_size=crop, scale=scale)
    mean = torch.full((3, crop, crop), 120.0, device=device)
    feed = Feed(None, spec, device, mean, end=1 << 30)
    eng = _engine(sizes, device, "bf16", compile=compile_mode)
    timer, lr = _step_timer(device), 0.001
    t0 = time.perf_counter()
    placed = [feed.ready(feed.place(i, m)) for i, m in enumerate(mines)]
    for s in range(2):  # warm-up: cuDNN's choices, the allocator; with compile on, the compilation
        eng.submit_step(s, lr, placed[s % 2].images, placed[s % 2].labels)
    eng.read_steps()
    _sync(device)
    warm_s = time.perf_counter() - t0
    step, res = 2, {"path": [], "engine": []}
    pool = ThreadPoolExecutor(1, thread_name_prefix="feed")
    for r in range(2):
        for mode in ("path", "engine") if r % 2 == 0 else ("engine", "path"):
            host, spans = [], []
            _sync(device)
            t0 = time.perf_counter()
            nxt = pool.submit(feed.place, step, mines[0]) if mode == "path" else None
            for i in range(steps):
                if mode == "path":
                    fed = feed.ready(nxt.result())
                    if i + 1 < steps:
                        m = mines[(i + 1) % 2]
                        nxt = pool.submit(feed.place, step + 1, m)
                else:
                    fed = placed[i % 2]
                h, span = timer(lambda fed=fed, step=step: eng.submit_step(step, lr, fed.images, fed.labels))
                host.append(h)
                spans.append(span)
                step += 1
            eng.read_steps()
            _sync(device)
            wall = time.perf_counter() - t0
            res[mode].append((wall, host, [_device_s(sp) for sp in spans]))
    pool.shutdown()
    n = sizes.batch
    out: dict[str, Any] = {"warmup_s": round(warm_s, 2)}
    for mode, runs in res.items():
        wall = statistics.median(w for w, _, _ in runs)
        out[f"{mode}_images_per_s"] = round(n * steps / wall, 1)
        host = statistics.median(h for _, hs, _ in runs for h in hs)
        dev = statistics.median(d for _, _, ds in runs for d in ds)
        out[f"{mode}_host_ms_per_step"] = round(host * 1e3, 3)
        out[f"{mode}_device_ms_per_step"] = round(dev * 1e3, 3)
    out["path_over_engine"] = round(out["path_images_per_s"] / out["engine_images_per_s"], 3)
    out["host_over_device"] = round(out["engine_host_ms_per_step"] / out["engine_device_ms_per_step"], 3)
    out["engine_precision"] = eng.precision
    return out


def _cudagraphs_run(device, sizes, mines: list, steps: int) -> dict:
    """:func:`_path_run` with ``train.compile=cudagraphs`` and how many graphs Inductor kept out of
    CUDA graphs (a reason per skip goes to the log: ``TORCH_LOGS=perf_hints``); on CPU a note. Its
    two warm-up steps are the graphs' warm-up (step 0, with the compilation) and their recording
    (step 1): every timed step replays them."""
    if device.type != "cuda":
        return {"skipped": "CUDA graphs need CUDA: on cpu train.compile=cudagraphs runs as 'on' ('compiled')"}
    from torch._dynamo.utils import counters

    before = counters["inductor"]["cudagraph_skips"]
    res = _path_run(device, sizes, "cudagraphs", mines, steps)
    res["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - before
    return res


def section_step_path(device: torch.device, sizes: Sizes) -> dict:
    """The rank's per-step path without Ray: the feed's device side (pinned copies on a side
    stream), the batched device decode of real 256 px JPEGs into crops, the engine's step in bf16,
    eager, with ``train.compile=on`` and (CUDA only) ``=cudagraphs``, for a fixed number of steps.
    ``path_over_engine``: that path's images/s over the engine's alone on the same batches (what the
    data path costs); ``host_over_device``: the host's time per step (launching it) over the
    device's (CUDA events) for the engine's step: above 1, the GPU waits on the host. On CPU the two
    are the same time."""
    cuda = device.type == "cuda"
    steps, side, crop = (20, 256, sizes.cfg.input_size) if cuda else (3, 256, sizes.cfg.input_size)
    classes = sizes.cfg.num_classes
    from alexnet.data.batch import Batch

    mines = []
    for seed in range(2):
        b = _jpeg_batch(sizes.batch, side, crop, seed, classes)
        mines.append(Batch(b["labels"], b["keys"], b["lighting"], encoded=b))  # this rank's rows: all
    out = {"steps": steps, "batch": sizes.batch, "jpeg_side": side, "crop": crop}
    out["eager"] = _path_run(device, sizes, "off", mines, steps)
    out["compiled"] = _path_run(device, sizes, "on", mines, steps)
    out["compiled_speedup"] = round(
        out["eager"]["engine_device_ms_per_step"] / out["compiled"]["engine_device_ms_per_step"], 3
    )
    try:  # its own failure (or the section's deadline) keeps the eager and compiled results
        out["cudagraphs"] = _cudagraphs_run(device, sizes, mines, steps)
    except Exception as e:  # noqa: BLE001 - reported as step_path.cudagraphs in "failed"
        out["cudagraphs"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(traceback.format_exc()[-1500:], file=sys.stderr)
        out["failed"] = ["cudagraphs"]
    if "engine_device_ms_per_step" in out["cudagraphs"]:
        out["cudagraphs_speedup"] = round(
            out["eager"]["engine_device_ms_per_step"] / out["cudagraphs"]["engine_device_ms_per_step"], 3
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch", type=int, default=None, help="training batch (default 128 on CUDA, 8 on CPU)")
    p.add_argument("--lrn-compiled", action="store_true", help="on CPU, also check the compiled LRN (slow)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--budget-s", type=float, default=450.0, help="the whole check's time limit (seconds)")
    args = p.parse_args()
    t0 = time.perf_counter()
    device = torch.device(args.device)
    out: dict[str, Any] = {"device": args.device, "failed": []}
    if device.type == "cuda" and not torch.cuda.is_available():
        out["failed"].append("env")
        out["env"] = {"error": "--device cuda: no CUDA device here; use --device cpu"}
        print(json.dumps(out))
        return 1
    torch.set_num_threads(args.threads)
    sizes = Sizes(device, args.batch)
    budget = Budget(args.budget_s)
    sections: list[tuple[str, Callable[[], dict], float]] = [
        ("env", lambda: section_env(device), 30),
        ("lrn", lambda: section_lrn(device, sizes, args.lrn_compiled), 150),
        ("engine_vs_cpu", lambda: section_engine_vs_cpu(device, sizes), 90),
        ("throughput", lambda: section_throughput(device, sizes), 150),
        ("syncs", lambda: section_syncs(device, sizes), 60),
        ("lrn_share", lambda: section_lrn_share(device, sizes), 45),
        ("multi_gpu", lambda: section_multi_gpu(device), 150),
        ("deterministic", lambda: section_deterministic(device, args.batch), 120),
        ("decode", lambda: section_decode(device), 60),
        # on CPU the compilation alone (Inductor's C++) takes one to several minutes on a busy machine
        # on CUDA three engines: eager, compiled, compiled with CUDA graphs (Inductor's kernels cached)
        ("step_path", lambda: section_step_path(device, sizes), 240 if device.type == "cuda" else 420),
    ]
    with _world_of_one(device):  # fp16's loss scale agrees over the (one-rank) world
        for name, fn, cap_s in sections:
            run_section(name, fn, cap_s, budget, out)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    for sec in out.values():  # the tracebacks went to stderr's summary; keep the line short
        if isinstance(sec, dict):
            trace = sec.pop("trace", None)
            if trace:
                print(trace, file=sys.stderr)
    print(json.dumps(out))
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
