"""Ranks as threads of one process, talking through memory: a stand-in for torch.distributed.

For the NCCL checker (:mod:`pipeline.nccl_rules`), which runs the real :class:`pipeline.engine.Engine`
over ~160 grids: a gloo world per grid costs seconds to spawn (a torch import per rank, sockets);
here each rank is a thread and its groups are :class:`LocalGroup` handles served by
:class:`LocalComm`, which has the methods of :class:`pipeline.dist.Comm`.

The semantics are gloo's (the permissive ones: NCCL's rules are checked afterwards on the
recording): a send is copied at once and never blocks; a receive takes the oldest message from
its peer with its tag; the k-th collective call of each member of a group meets the other
members' k-th. A mismatched collective or message (another op, shape or dtype) leaves zeros
where its result would be, so that the run goes on and the checker can say what was wrong. When
every live thread waits for something no other thread can still provide, every wait raises
:class:`LocalDeadlock` at once instead of hanging.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.dist import P2P, Groups
from pipeline.grid import Grid

SAFETY_TIMEOUT_S = 300.0  # a wait longer than this is a bug in the world, not a deadlock of the ranks


class LocalDeadlock(RuntimeError):
    """Every live rank of the local world waits for a message or collective that cannot come."""


@dataclass(frozen=True)
class LocalGroup:
    """A group of the local world: its global ranks, in group-rank order."""

    ranks: tuple[int, ...]


class _Slot:
    """The k-th collective of a group: each member's (op name, payload) as it joins."""

    def __init__(self, size: int) -> None:
        self.size, self.joined, self.read = size, {}, 0


class LocalWorld:
    """The shared state of one run: mailboxes, collective slots, who is waiting."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.cond = threading.Condition()
        self.mail: dict[tuple, deque[Tensor]] = defaultdict(deque)  # (group, src, dst, tag) -> messages
        self.slots: dict[tuple[LocalGroup, int], _Slot] = {}
        self.calls: dict[tuple[LocalGroup, int], int] = defaultdict(int)  # (group, rank) -> calls so far
        self.alive = world_size
        self.waiting: set[int] = set()  # ranks in a wait since the last progress
        self.dead: str | None = None

    # -- waiting -----------------------------------------------------------------------------
    def wait_until(self, rank: int, ready: Callable[[], bool], then: Callable[[], None], what: str) -> None:
        """Block until ``ready()``, then ``then()`` (both under :attr:`cond`); raise LocalDeadlock
        when no rank can move any more."""
        deadline = time.monotonic() + SAFETY_TIMEOUT_S
        with self.cond:
            while not ready():
                if self.dead is None:
                    self.waiting.add(rank)
                    if len(self.waiting) >= self.alive:
                        self.dead = f"every live rank waits; rank {rank} for {what}"
                        self.cond.notify_all()
                if self.dead is not None:
                    raise LocalDeadlock(self.dead)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {rank} waited {SAFETY_TIMEOUT_S:.0f} s for {what}")
                self.cond.wait(timeout=1.0)
            self.waiting.discard(rank)
            then()

    def progress(self) -> None:
        """Something changed (call holding ``cond``): every waiter looks again before it counts."""
        self.waiting.clear()
        self.cond.notify_all()

    def finish(self) -> None:
        """A rank's thread ends (its waits will never be answered by it)."""
        with self.cond:
            self.alive -= 1
            self.progress()


class _Done:
    """The work of an operation that completed when it was posted (a send)."""

    def wait(self) -> bool:
        return True


class _Pending:
    """The work of an operation that completes in :meth:`wait`: ``ready`` then ``finish``."""

    def __init__(self, world: LocalWorld, rank: int, ready, finish, what: str) -> None:
        self.world, self.rank, self.ready, self.finish, self.what = world, rank, ready, finish, what
        self.done = False

    def wait(self) -> bool:
        if not self.done:
            self.world.wait_until(self.rank, self.ready, self.finish, self.what)
            self.done = True
        return True


def _fits(dst: Tensor, src: Tensor) -> bool:
    return dst.shape == src.shape and dst.dtype == src.dtype


class LocalComm:
    """One rank's :class:`pipeline.dist.Comm` in a :class:`LocalWorld` (see the module docstring)."""

    backend = "local"  # neither gloo nor nccl: the exchange sends whole messages, as on NCCL

    def __init__(self, world: LocalWorld, rank: int) -> None:
        self.world, self.rank = world, rank

    def ranks(self, group: LocalGroup) -> tuple[int, ...]:
        return group.ranks

    # -- point to point ----------------------------------------------------------------------
    def batch_isend_irecv(self, ops: Sequence[P2P], group: LocalGroup) -> list:
        return [self._p2p(op, group) for op in ops]

    def isend(self, tensor: Tensor, peer: int, group: LocalGroup, tag: int = 0):
        return self._p2p(P2P(True, tensor, peer, tag), group)

    def irecv(self, tensor: Tensor, peer: int, group: LocalGroup, tag: int = 0):
        return self._p2p(P2P(False, tensor, peer, tag), group)

    def _p2p(self, op: P2P, group: LocalGroup):
        w = self.world
        if op.send:
            with w.cond:
                w.mail[(group, self.rank, op.peer, op.tag)].append(op.tensor.detach().clone())
                w.progress()
            return _Done()
        with w.cond:
            box = w.mail[(group, op.peer, self.rank, op.tag)]

        def finish() -> None:
            msg = box.popleft()
            op.tensor.copy_(msg) if _fits(op.tensor, msg) else op.tensor.zero_()
            w.progress()

        return _Pending(
            w, self.rank, lambda: bool(box), finish, f"a message from rank {op.peer} (tag {op.tag})"
        )

    # -- collectives -------------------------------------------------------------------------
    def all_gather(self, outs: list[Tensor], x: Tensor, group: LocalGroup) -> None:
        def result(joined: dict) -> None:
            parts = [joined[r] for r in group.ranks]
            for o, (name, p) in zip(outs, parts, strict=True):
                o.copy_(p) if name == "all_gather" and _fits(o, p) else o.zero_()

        self._collective(group, "all_gather", x.detach().clone(), result).wait()

    def reduce_scatter(self, out: Tensor, parts: list[Tensor], group: LocalGroup) -> None:
        me = group.ranks.index(self.rank)

        def result(joined: dict) -> None:
            mine = [(name, p[me]) for name, p in (joined[r] for r in group.ranks)]
            ok = all(name == "reduce_scatter" and _fits(out, p) for name, p in mine)
            out.copy_(torch.stack([p for _, p in mine]).sum(0)) if ok else out.zero_()

        self._collective(group, "reduce_scatter", [p.detach().clone() for p in parts], result).wait()

    def all_reduce(self, t: Tensor, group: LocalGroup, async_op: bool = False):
        def result(joined: dict) -> None:
            parts = [joined[r] for r in group.ranks]
            ok = all(name == "all_reduce" and _fits(t, p) for name, p in parts)
            t.copy_(torch.stack([p for _, p in parts]).sum(0)) if ok else t.zero_()

        work = self._collective(group, "all_reduce", t.detach().clone(), result)
        return work if async_op else work.wait()

    def _collective(self, group: LocalGroup, name: str, payload: Any, result) -> _Pending:
        """Join this rank's next collective on ``group``; the work applies ``result`` once all have."""
        w = self.world
        with w.cond:
            k = w.calls[(group, self.rank)]
            w.calls[(group, self.rank)] = k + 1
            slot = w.slots.setdefault((group, k), _Slot(len(group.ranks)))
            slot.joined[self.rank] = (name, payload)
            w.progress()

        def finish() -> None:
            result(slot.joined)
            slot.read += 1
            if slot.read == slot.size:
                del w.slots[(group, k)]

        what = f"collective #{k} ({name}) of group {list(group.ranks)}"
        return _Pending(w, self.rank, lambda: len(slot.joined) == slot.size, finish, what)


def local_groups(world: LocalWorld, grid: Grid, rank: int) -> Groups:
    """Rank ``rank``'s :class:`pipeline.dist.Groups` of ``grid`` in ``world`` (as init_distributed's)."""

    def own(lists: list[list[int]]) -> LocalGroup | None:
        mine = next(g for g in lists if rank in g)
        return LocalGroup(tuple(mine)) if len(mine) > 1 else None

    return Groups(
        grid=grid,
        rank=rank,
        backend=LocalComm.backend,
        timeout_s=SAFETY_TIMEOUT_S,
        column=own(grid.column_groups()),
        pipeline=own(grid.pipeline_groups()),
        data=own(grid.data_groups()),
        comm=LocalComm(world, rank),
        device=torch.device("cpu"),
    )


def run_threads(fn: Callable[[int, LocalWorld], Any], world_size: int) -> list[Any]:
    """``fn(rank, world)`` on one thread per rank of a fresh world; results by rank.

    Raises the first rank's error that is not a consequence of another's (a LocalDeadlock is one
    only when some rank failed otherwise), naming the rank."""
    world = LocalWorld(world_size)
    results: list[Any] = [None] * world_size
    errors: dict[int, BaseException] = {}

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank, world)
        except BaseException as e:  # reported below, with the rank
            errors[rank] = e
        finally:
            world.finish()

    threads = [
        threading.Thread(target=body, args=(r,), name=f"rank-{r}", daemon=True) for r in range(world_size)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        causes = {r: e for r, e in errors.items() if not isinstance(e, LocalDeadlock)} or errors
        rank = min(causes)
        raise RuntimeError(f"rank {rank}: {type(causes[rank]).__name__}: {causes[rank]}") from causes[rank]
    return results
