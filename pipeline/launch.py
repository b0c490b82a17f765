"""Run a function in N fresh local processes (one per rank) with a deadline.

For the CPU tests, ``alexnet verify`` and the benchmarks: fresh processes forked from a
forkserver that has imported torch (``torch.multiprocessing``'s forkserver context), results
returned through a queue, and every process killed if any rank fails or the deadline passes, so
a broken collective is an error here, never a hang.

Why a forkserver and not spawn: a spawned rank imports torch itself, ~2 s of CPU per rank (an
8-rank grid spends 16 s of CPU before its first step); a rank forked from the server starts with
torch imported. The server is a clean process (no threads, no CUDA, no Ray), started once per
parent with the parent's environment then; each rank takes the parent's environment of the call
(as a spawned one would) before it runs.
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from pipeline.dist import free_port


class RankFailed(RuntimeError):
    """A rank raised; the message holds its traceback."""


# imported once, by the forkserver: every rank forked from it starts with them
PRELOAD = ["torch", "torch.distributed"]


def _child(fn, rank: int, world_size: int, port: int, args: tuple, q, threads: int, env: dict) -> None:
    import torch

    os.environ.clear()  # the caller's environment, not the one the forkserver was started with
    os.environ.update(env)
    torch.set_num_threads(threads)
    try:
        q.put((rank, True, fn(rank, world_size, port, *args)))
    except BaseException:
        q.put((rank, False, traceback.format_exc()))


def spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout_s: float = 120.0,
    threads: int = 1,
    may_exit: frozenset[int] = frozenset(),
) -> list[Any]:
    """Call ``fn(rank, world_size, port, *args)`` in ``world_size`` processes; return results by rank.

    ``fn`` must be importable (module level) and return something picklable. ``port`` is a
    free TCP port for the rendezvous. Raises :class:`RankFailed` with the first failing
    rank's traceback, or ``TimeoutError`` after ``timeout_s``; in both cases every rank is
    killed first. Ranks in ``may_exit`` may exit without a result (tests of dead peers):
    their result is None.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (the first call)
    q = ctx.Queue()
    port = free_port()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    env = dict(os.environ)
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, args, q, threads, env), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        _collect(procs, q, results, timeout_s, may_exit)
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) + len(may_exit) >= world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        q.close()
    return [results.get(r) for r in range(world_size)]


def _collect(
    procs: list, q: Any, results: dict[int, Any], timeout_s: float, may_exit: frozenset[int]
) -> None:
    """Fill ``results`` (rank -> value) from ``q`` until every rank has reported, or exited if it
    may; raise on a failed rank, a rank gone without a result, or the deadline."""
    world_size = len(procs)
    dead_since: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < world_size:
        if all(r in results or (r in may_exit and procs[r].exitcode is not None) for r in range(world_size)):
            return
        left = deadline - time.monotonic()
        if left <= 0:
            missing = sorted(set(range(world_size)) - set(results))
            raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:.0f} s")
        try:
            rank, ok, payload = q.get(timeout=min(left, 1.0))
        except queue.Empty:
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r not in results and r not in may_exit and p.exitcode is not None:
                    dead_since.setdefault(r, now)
                    if now - dead_since[r] > 2.0:  # its result, if any, had time to arrive
                        raise RankFailed(f"rank {r} exited (code {p.exitcode}) without a result") from None
            continue
        if not ok:
            raise RankFailed(f"rank {rank} failed:\n{payload}")
        results[rank] = payload
