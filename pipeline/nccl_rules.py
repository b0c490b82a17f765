"""NCCL's matching rules, checked on a recording of the engine's real communication.

A CPU run on gloo proves little about NCCL by itself: gloo matches messages by tag and lets
every operation progress on its own, NCCL does neither. :class:`RecordingComm` stands in for a
rank's :class:`pipeline.dist.Comm` (over real gloo, or over :mod:`pipeline.local_world`'s
threads), records every point-to-point op and collective the rank posts and when it waits, and
:func:`check` verifies the ranks' recordings against what NCCL does:

1. **ops on one communicator complete in posting order on every member**: a communicator is a
   queue per rank; nothing posted on it starts before what was posted before it has completed;
2. **point-to-point ops match by order, tags ignored**: the n-th send from A to B on a
   communicator meets B's n-th receive from A on it. Where the two tags differ, gloo (which
   matches by tag) and NCCL would deliver different messages: a violation;
3. **a batch is matched as a unit**: a ``batch_isend_irecv`` completes when each of its ops has
   met its partner (which must be in the batch at the head of the partner's queue), and what
   is queued behind it waits for all of it;
4. **a send's shape and dtype equal its receive's**, and a collective's op, shapes and dtype
   agree on every member (NCCL moves bytes: a difference corrupts data or hangs);
5. **no unbatched point-to-point op** (``isend`` / ``irecv``): outside a batch, NCCL may put it
   on a communicator of its own, ordered with nothing else.

Deadlock is found by simulating progress over the recorded per-rank programs: a rank posts in
turn and blocks where it waited; an op completes when it and its partner are both at the head of
their queues (rule 1, 3), a collective when every member's is. A program that cannot finish is
reported as a chain of who waits for whom, ending in the cycle. Every violation names the ranks
(with their grid coordinates), the op, the communicator and the step / micro-batch.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from pipeline.dist import P2P, Groups
from pipeline.grid import Grid
from pipeline.p2p import KIND_NAMES, untag
from pipeline.timeline import Timeline


@dataclass(frozen=True)
class OpRecord:
    """One point-to-point op as posted: direction, peer (global rank), shape, dtype, tag."""

    send: bool
    peer: int
    shape: tuple[int, ...]
    dtype: str
    tag: int


@dataclass(frozen=True)
class Post:
    """One thing a rank posted on a communicator: a batch of point-to-point ops, a single one
    (``isend`` / ``irecv``), or a collective with its tensors' shapes (input, then outputs)."""

    rank: int
    index: int  # the rank's n-th post
    group: str  # "column", "pipeline" or "data"
    members: tuple[int, ...]  # global ranks of the communicator
    op: str  # "batch", "isend", "irecv", "all_gather", "reduce_scatter", "all_reduce"
    p2p: tuple[OpRecord, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    dtype: str = ""
    where: str = ""  # "train step 0, micro-batch 2", "validation"

    @property
    def comm(self) -> tuple[str, tuple[int, ...]]:
        return self.group, self.members

    @property
    def is_p2p(self) -> bool:
        return self.op in ("batch", "isend", "irecv")


@dataclass
class RankLog:
    """A rank's recording: its posts, and its program (``("post", i)`` / ``("wait", i)`` in order)."""

    rank: int
    posts: list[Post] = field(default_factory=list)
    program: list[tuple[str, int]] = field(default_factory=list)


class _RecordedWork:
    """A work whose first wait is written into the program of its post's rank."""

    def __init__(self, work, log: RankLog, index: int, waited: set[int]) -> None:
        self.work, self.log, self.index, self.waited = work, log, index, waited

    def wait(self, *args, **kwargs):
        if self.index not in self.waited:
            self.waited.add(self.index)
            self.log.program.append(("wait", self.index))
        return self.work.wait(*args, **kwargs)


class RecordingComm:
    """A :class:`pipeline.dist.Comm` that records into :attr:`log` what it passes on to ``inner``.

    :meth:`install` puts one in place of a :class:`pipeline.dist.Groups`' comm (before the
    engine is built); :meth:`follow` takes the step and micro-batch of each op from the engine's
    timeline; :attr:`phase` names what runs ("train", "validation").
    """

    def __init__(self, inner, groups: Groups) -> None:
        self.inner, self.backend = inner, inner.backend
        kinds = ("column", "pipeline", "data")
        self.names = {id(getattr(groups, n)): n for n in kinds if getattr(groups, n) is not None}
        self.log = RankLog(groups.rank)
        self.phase, self._timeline = "train", None
        self._waited: set[int] = set()

    @classmethod
    def install(cls, groups: Groups) -> RecordingComm:
        rec = cls(groups.comm, groups)
        groups.comm = rec
        return rec

    def follow(self, timeline: Timeline) -> None:
        self._timeline = timeline

    def ranks(self, group) -> tuple[int, ...]:
        return self.inner.ranks(group)

    # -- recorded calls ----------------------------------------------------------------------
    def batch_isend_irecv(self, ops: Sequence[P2P], group) -> list:
        i = self._post(group, "batch", p2p=tuple(_op(o) for o in ops))
        return [self._work(w, i) for w in self.inner.batch_isend_irecv(ops, group)]

    def isend(self, tensor: Tensor, peer: int, group, tag: int = 0):
        i = self._post(group, "isend", p2p=(_op(P2P(True, tensor, peer, tag)),))
        return self._work(self.inner.isend(tensor, peer, group, tag), i)

    def irecv(self, tensor: Tensor, peer: int, group, tag: int = 0):
        i = self._post(group, "irecv", p2p=(_op(P2P(False, tensor, peer, tag)),))
        return self._work(self.inner.irecv(tensor, peer, group, tag), i)

    def all_gather(self, outs: list[Tensor], x: Tensor, group) -> None:
        self._blocking(group, "all_gather", x, outs)
        self.inner.all_gather(outs, x, group)

    def reduce_scatter(self, out: Tensor, parts: list[Tensor], group) -> None:
        self._blocking(group, "reduce_scatter", out, parts)
        self.inner.reduce_scatter(out, parts, group)

    def all_reduce(self, t: Tensor, group, async_op: bool = False):
        if not async_op:
            self._blocking(group, "all_reduce", t, [])
            return self.inner.all_reduce(t, group)
        i = self._post(group, "all_reduce", shapes=(tuple(t.shape),), dtype=_dtype(t))
        return self._work(self.inner.all_reduce(t, group, async_op=True), i)

    # -- internals ----------------------------------------------------------------------------
    def _where(self) -> str:
        tl = self._timeline
        if self.phase != "train" or tl is None:
            return self.phase
        return f"train step {tl.step}" + (f", micro-batch {tl.mb}" if tl.mb is not None else "")

    def _post(self, group, op: str, **fields) -> int:
        i = len(self.log.posts)
        members = tuple(self.inner.ranks(group))
        name = self.names.get(id(group), "unnamed")
        self.log.posts.append(Post(self.log.rank, i, name, members, op, where=self._where(), **fields))
        self.log.program.append(("post", i))
        return i

    def _blocking(self, group, op: str, x: Tensor, more: list[Tensor]) -> None:
        shapes = (tuple(x.shape), *(tuple(t.shape) for t in more))
        i = self._post(group, op, shapes=shapes, dtype=_dtype(x))
        self._waited.add(i)
        self.log.program.append(("wait", i))

    def _work(self, work, i: int) -> _RecordedWork:
        return _RecordedWork(work, self.log, i, self._waited)


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _op(o: P2P) -> OpRecord:
    return OpRecord(o.send, o.peer, tuple(o.tensor.shape), _dtype(o.tensor), o.tag)


# -- the check -------------------------------------------------------------------------------
OpKey = tuple[int, int, int]  # (rank, post index, op index in the post)


class _Namer:
    """Words for ranks, posts and ops (ranks with their grid coordinates when the grid is known)."""

    def __init__(self, logs: Sequence[RankLog], grid: Grid | None) -> None:
        self.posts = {log.rank: log.posts for log in logs}
        self.grid = grid

    def rank(self, r: int) -> str:
        if self.grid is None:
            return f"rank {r}"
        rep, s, c = self.grid.coords(r)
        return f"rank {r} (replica {rep}, stage {s}, column {c})"

    @staticmethod
    def comm(p: Post) -> str:
        return f"the {p.group} group {list(p.members)}"

    @staticmethod
    def message(op: OpRecord, short: bool = False) -> str:
        mb, kind, part = untag(op.tag)
        what = KIND_NAMES[kind] if kind < len(KIND_NAMES) else "message"
        if short:
            return f"{what} of mb {mb} part {part}"
        return f"{what} of micro-batch {mb}, part {part} (tag {op.tag}), {op.shape} {op.dtype}"

    def op(self, key: OpKey) -> str:
        r, i, k = key
        o = self.posts[r][i].p2p[k]
        way = f"send to rank {o.peer}" if o.send else f"receive from rank {o.peer}"
        return f"{way} of {self.message(o)}"

    def post(self, p: Post, subject: int | None = None) -> str:
        """The post in words; "its post" when ``subject`` (the rank the sentence is about) posted it."""
        if p.is_p2p:
            ops = ", ".join(
                f"{'send to' if o.send else 'receive from'} {o.peer} {self.message(o, short=True)}"
                for o in p.p2p
            )
            body = f"{p.op} [{ops}]"
        else:
            body = f"{p.op} of {p.shapes[0]} {p.dtype}"
        owner = "its" if subject == p.rank else f"{self.rank(p.rank)}'s"
        return f"{owner} post #{p.index} on {self.comm(p)}, {body} ({p.where})"


def _unbatched(logs: Sequence[RankLog], name: _Namer) -> list[str]:
    for log in logs:
        for p in log.posts:
            if p.op in ("isend", "irecv"):
                return [
                    f"unbatched point-to-point op: {name.post(p)}. On NCCL a single {p.op} outside "
                    "batch_isend_irecv may run on a communicator of its own, in no order with the "
                    "batches: post it in the action's batch (pipeline.p2p.StageLink)"
                ]
    return []


def _match_p2p(logs: Sequence[RankLog], name: _Namer) -> tuple[dict[OpKey, OpKey], list[str]]:
    """Pair each send with the receive NCCL gives it (same communicator and pair, same position)."""
    sends: dict[tuple, list[OpKey]] = defaultdict(list)  # (comm, src, dst) -> sends in posting order
    recvs: dict[tuple, list[OpKey]] = defaultdict(list)  # (comm, src, dst) -> receives in posting order
    for log in logs:
        for p in log.posts:
            for k, o in enumerate(p.p2p):
                pair = (p.comm, log.rank, o.peer) if o.send else (p.comm, o.peer, log.rank)
                (sends if o.send else recvs)[pair].append((log.rank, p.index, k))
    pairs: dict[OpKey, OpKey] = {}
    errors = []
    for key in sorted(set(sends) | set(recvs), key=lambda k: (k[1], k[2], k[0])):
        ss, rs = sends.get(key, []), recvs.get(key, [])
        for n, (s, r) in enumerate(zip(ss, rs, strict=False)):
            pairs[s], pairs[r] = r, s
            err = _pair_error(name, s, r, n)
            if err:
                errors.append(err)
                break
        else:
            if len(ss) != len(rs):
                errors.append(_count_error(name, key, ss, rs))
    return pairs, errors


def _pair_error(name: _Namer, s: OpKey, r: OpKey, n: int) -> str | None:
    so, ro = name.posts[s[0]][s[1]].p2p[s[2]], name.posts[r[0]][r[1]].p2p[r[2]]
    sp, rp = name.posts[s[0]][s[1]], name.posts[r[0]][r[1]]
    head = (
        f"{name.rank(s[0])}'s send #{n + 1} to rank {r[0]} on {name.comm(sp)} "
        f"({name.message(so)}; {sp.where}) "
        f"meets, in NCCL's order, {name.rank(r[0])}'s receive #{n + 1} from rank {s[0]} "
        f"({name.message(ro)}; {rp.where})"
    )
    if (so.shape, so.dtype) != (ro.shape, ro.dtype):
        return (
            f"{head}: shape or dtype differ, so NCCL would corrupt the data or hang; the receive's "
            "buffer must take the sender's shape and dtype"
        )
    if so.tag != ro.tag:
        return (
            f"{head}: the tags differ, and NCCL ignores tags, so the data lands in the wrong buffer "
            "(gloo matches by tag and hides it); post sends and receives between two ranks in the "
            "same order on both sides"
        )
    return None


def _count_error(name: _Namer, key: tuple, ss: list[OpKey], rs: list[OpKey]) -> str:
    _, src, dst = key
    p = name.posts[(ss or rs)[0][0]][(ss or rs)[0][1]]
    first = ss[len(rs)] if len(ss) > len(rs) else rs[len(ss)]
    fp = name.posts[first[0]][first[1]]
    return (
        f"{name.rank(src)} posts {len(ss)} send(s) to rank {dst} on {name.comm(p)} but "
        f"{name.rank(dst)} posts {len(rs)} receive(s) from rank {src}: the first without a partner is "
        f"{name.op(first)} ({fp.where}), which NCCL never completes"
    )


def _match_collectives(
    logs: Sequence[RankLog], name: _Namer
) -> tuple[dict[tuple[int, int], list], list[str]]:
    """Group the k-th collective of every member of a communicator; report the first disagreement."""
    per: dict[tuple, dict[int, list[Post]]] = defaultdict(lambda: defaultdict(list))
    for log in logs:
        for p in log.posts:
            if not p.is_p2p:
                per[p.comm][log.rank].append(p)
    groups: dict[tuple[int, int], list] = {}
    errors = []
    for comm in sorted(per):
        lists = [per[comm].get(m, []) for m in comm[1]]
        for k, row in enumerate(zip(*lists, strict=False)):
            for p in row:
                groups[(p.rank, p.index)] = [(q.rank, q.index) for q in row]
            a = row[0]
            b = next((q for q in row if (q.op, q.shapes, q.dtype) != (a.op, a.shapes, a.dtype)), None)
            if b is not None:
                errors.append(
                    f"collective #{k + 1} on {name.comm(a)} differs between members: {name.post(a)}; "
                    f"{name.post(b)}. Every member must post the same collectives in the same order, "
                    "with the same shapes and dtype"
                )
                break
        else:
            counts = [len(x) for x in lists]
            if len(set(counts)) > 1:
                short = min(range(len(lists)), key=counts.__getitem__)
                extra = next(x for x in lists if len(x) > counts[short])[counts[short]]
                errors.append(
                    f"{name.rank(comm[1][short])} posts {counts[short]} collective(s) on {name.comm(extra)}, "
                    f"others more: {name.post(extra)} waits for it forever"
                )
    return groups, errors


def check(
    logs: Sequence[RankLog], grid: Grid | None = None, failed: dict[int, BaseException] | None = None
) -> list[str]:
    """The violations of NCCL's rules (module docstring) in the ranks' recordings, the first the
    most basic; [] when the communication is NCCL-safe. ``grid`` adds coordinates to the ranks.

    ``failed``: ranks whose run raised (their recordings stop there). What the recordings show is
    reported first, then the failures; the progress simulation is skipped (it would only report
    the ranks that waited for the failed one).
    """
    name = _Namer(logs, grid)
    errors = _unbatched(logs, name)
    pairs, p2p_errors = _match_p2p(logs, name)
    colls, coll_errors = _match_collectives(logs, name)
    errors += p2p_errors + coll_errors
    if failed:
        return errors + [f"{name.rank(r)} raised {type(e).__name__}: {e}" for r, e in sorted(failed.items())]
    return errors + _Simulation(logs, pairs, colls, name).run()


class _Simulation:
    """NCCL's progress over the recorded programs (module docstring): who can still move."""

    def __init__(self, logs, pairs: dict[OpKey, OpKey], colls: dict, name: _Namer) -> None:
        self.logs, self.pairs, self.colls, self.name = {g.rank: g for g in logs}, pairs, colls, name
        self.pc = dict.fromkeys(self.logs, 0)
        self.queues: dict[tuple[int, tuple], deque[int]] = defaultdict(deque)  # (rank, comm) -> posts
        self.left: dict[tuple[int, int], set] = {}  # (rank, post) -> ops not yet matched ("c": collective)
        self.done: set[tuple[int, int]] = set()

    def run(self) -> list[str]:
        while self._advance() | self._match() | self._retire():
            pass
        stuck = [r for r, log in self.logs.items() if self.pc[r] < len(log.program)]
        queued = [key for key, q in self.queues.items() if q]
        if not stuck and not queued:
            return []
        return [self._explain(stuck, queued)]

    def _post(self, r: int, i: int) -> Post:
        return self.logs[r].posts[i]

    def _advance(self) -> bool:
        """Let every rank post until it reaches a wait for something not yet complete."""
        moved = False
        for r, log in self.logs.items():
            while self.pc[r] < len(log.program):
                what, i = log.program[self.pc[r]]
                if what == "post":
                    p = log.posts[i]
                    self.queues[(r, p.comm)].append(i)
                    self.left[(r, i)] = set(range(len(p.p2p))) if p.is_p2p else {"c"}
                elif (r, i) not in self.done:
                    break
                self.pc[r] += 1
                moved = True
        return moved

    def _at_head(self, r: int, i: int) -> bool:
        q = self.queues.get((r, self._post(r, i).comm))
        return bool(q) and q[0] == i

    def _match(self) -> bool:
        """Complete the ops whose partners are at the head of their queues too."""
        moved = False
        for (r, _), q in list(self.queues.items()):
            if not q:
                continue
            i = q[0]
            for k in list(self.left[(r, i)]):
                if k == "c":
                    members = self.colls.get((r, i), [])
                    if len(members) == len(self._post(r, i).members) and all(
                        self._at_head(m, j) for m, j in members
                    ):
                        for m, j in members:
                            self.left[(m, j)].discard("c")
                        moved = True
                    continue
                partner = self.pairs.get((r, i, k))
                if partner and self._at_head(partner[0], partner[1]):
                    self.left[(r, i)].discard(k)
                    self.left[(partner[0], partner[1])].discard(partner[2])
                    moved = True
        return moved

    def _retire(self) -> bool:
        moved = False
        for (r, _), q in self.queues.items():
            while q and not self.left[(r, q[0])]:
                self.done.add((r, q.popleft()))
                moved = True
        return moved

    # -- the report ---------------------------------------------------------------------------
    def _explain(self, stuck: list[int], queued: list) -> str:
        """Follow who waits for whom from the first stuck rank, until the chain closes."""
        if stuck:
            r = min(stuck)
            cur = (r, self.logs[r].program[self.pc[r]][1])
            steps = [f"{self.name.rank(r)} waits for {self.name.post(self._post(*cur), r)}"]
        else:
            r, comm = min(queued)
            cur = (r, self.queues[(r, comm)][0])
            steps = [f"{self.name.post(self._post(*cur))} never completes"]
        seen = {cur}
        for _ in range(12):
            cur, step = self._blocker(*cur)
            if step:
                steps.append(step)
            if cur is None:
                break
            if cur in seen:
                steps.append("and so on around the cycle: no rank can move")
                break
            seen.add(cur)
        return (
            "deadlock under NCCL's rules (in-order communicators, batches matched as units): "
            + "; ".join(steps)
            + ". Post each receive after, or in the same batch as, the sends its peer needs first"
        )

    def _blocker(self, r: int, i: int) -> tuple[tuple[int, int] | None, str]:
        """What post (rank, index) keeps post ``i`` of rank ``r`` from completing, and why in words."""
        p, name = self._post(r, i), self.name
        q = self.queues.get((r, p.comm))
        if q is None or i not in q:
            w = self.logs[r].program[self.pc[r]][1]
            return (r, w), f"{name.rank(r)} has not posted it yet: it waits for its post #{w}"
        if q[0] != i:
            return (r, q[0]), f"which is queued behind {name.post(self._post(r, q[0]))}"
        for k in sorted(x for x in self.left[(r, i)] if x != "c"):
            partner = self.pairs.get((r, i, k))
            if partner is None:
                return None, f"its {name.op((r, i, k))} has no partner at all"
            m, j, _ = partner
            return (m, j), f"its {name.op((r, i, k))} needs {name.post(self._post(m, j))}"
        members = self.colls.get((r, i), [])
        for m, j in members:
            if not self._at_head(m, j):
                return (m, j), f"it needs {name.post(self._post(m, j))}"
        return None, "some member never posts this collective"
