"""Point-to-point traffic between neighbouring pipeline stages: one rank's sends and receives.

The engine hands this layer what to send (activations forward, their gradients back, the
validation headers) and what it expects to receive; the layer decides how the transfers are
posted. The rules it keeps, on every backend (NCCL's; gloo is more permissive):

* **every post is exactly one** ``batch_isend_irecv``: the sends queued since the last post
  (an action's outputs, queued after its compute) together with the receive the next action
  needs, unless that receive was posted ahead (below: then each goes alone). NCCL matches
  the n-th send to a peer with the peer's n-th receive on the same communicator, in the order
  both sides post, and ignores tags; a batch is matched as a unit (Megatron's
  ``send_forward_recv_backward`` pairing, also what ``torch.distributed.pipelining`` posts).
  Gloo's ``batch_isend_irecv`` is the same ops posted one by one, and returns one work per op:
  waiting every work of a batch is what makes it safe there (pytorch #132644 was
  ``torch.distributed.pipelining`` waiting only the last of them), so both backends run this
  one code path;
* **receive-ahead** (overlap): the receive of the next action is posted before the current
  action computes, so the transfer runs behind the compute instead of on the critical path,
  *except* when the current action sends to the same peer. A receive posted ahead stands on
  the communicator before this action's sends; if the peer needs those sends before it can send
  what we receive (1F1B's F(i) -> B(j) against the peer's B(j) -> F(i)), neither side's batch
  could ever complete. Those receives go out with the sends instead, as one batch;
* **a receive's buffer takes the sender's dtype and shape**: in training both sides know the
  shapes (the geometry) and the dtype (the step's precision: :attr:`StageLink.dtype`); in
  validation the rows vary, so each message is preceded by a header ``(rows, more, dtype)``.

Messages are told apart by ``(micro-batch, kind, part)``, folded into the tag (for gloo and for
the checker's messages; NCCL ignores it). :mod:`pipeline.nccl_rules` checks the ops this layer
posts against NCCL's rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.dist import P2P, Comm
from pipeline.timeline import Timeline

ACT, GRAD, HEAD = 0, 1, 2  # message kinds: activations, their gradients, validation headers
KIND_NAMES = ("activations", "gradients", "header")
# dtypes a validation header can name (its third field is the index here)
HEADER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def tag(mb: int, kind: int, part: int) -> int:
    """The tag of part ``part`` (< 2: one per held column) of a ``kind`` message of micro-batch ``mb``."""
    return (mb * 3 + kind) * 2 + part


def untag(t: int) -> tuple[int, int, int]:
    """``tag``'s inverse: (micro-batch, kind, part)."""
    rest, part = divmod(t, 2)
    mb, kind = divmod(rest, 3)
    return mb, kind, part


@dataclass(frozen=True)
class Transfer:
    """What one action of a training step receives (``recv_from`` None: nothing) and where it
    sends its outputs (``send_to`` None: nowhere); ranks are global."""

    recv_from: int | None
    shapes: tuple[tuple[int, ...], ...]  # per part (held column), without the rows
    rows: int
    mb: int
    kind: int  # ACT or GRAD
    send_to: int | None


def step_plan(
    actions: Sequence,
    prev: int | None,
    next_: int | None,
    in_shapes: Sequence[Sequence[int]],
    out_shapes: Sequence[Sequence[int]],
    rows: int,
) -> list[Transfer]:
    """One :class:`Transfer` per action of a stage's schedule (``pipeline.schedules.Action``):
    a forward receives activations from ``prev`` and sends to ``next_``, a backward receives
    gradients from ``next_`` and sends to ``prev``."""
    ins, outs = tuple(map(tuple, in_shapes)), tuple(map(tuple, out_shapes))
    return [
        Transfer(prev, ins, rows, a.mb, ACT, next_)
        if a.kind == "F"
        else Transfer(next_, outs, rows, a.mb, GRAD, prev)
        for a in actions
    ]


class _Post:
    """One posted batch: its works, which of them a wait on the receives needs, the buffers.

    Each work is waited once: a second ``wait()`` on a gloo receive waits for another message."""

    def __init__(self, ops: list[P2P], works: list) -> None:
        self.ops, self.unwaited = ops, list(works)
        if len(works) == len(ops):  # one work per op (gloo)
            self.recv_works = [w for w, op in zip(works, ops, strict=True) if not op.send]
        else:  # one work for the batch (NCCL): waiting a receive waits it all
            self.recv_works = list(works)
        self.bufs = [op.tensor for op in ops if not op.send]

    def wait_recvs(self) -> list[Tensor]:
        self._wait(self.recv_works)
        return self.bufs

    def wait_all(self) -> None:
        self._wait(list(self.unwaited))

    def _wait(self, works: list) -> None:
        for w in works:
            if any(w is u for u in self.unwaited):
                w.wait()
                self.unwaited = [u for u in self.unwaited if u is not w]


class StageLink:
    """This rank's sends to and receives from the neighbouring stages of its pipeline group.

    Per action the engine calls exactly one of :meth:`recv` or :meth:`flush` before computing
    (that is how the layer follows the step's plan, :meth:`start`), then :meth:`send` for its
    outputs; :meth:`wait_sends` ends the step.
    """

    def __init__(
        self,
        comm: Comm,
        group,
        device: torch.device,
        timeline: Timeline,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.comm, self.group, self.device, self.timeline = comm, group, device, timeline
        self.dtype = dtype  # of training messages: the step's activation dtype (bf16 under autocast)
        self.receive_ahead = True  # False: every receive waits for its action (bench/pipeline.py's baseline)
        self.start(None)

    def start(self, plan: Sequence[Transfer] | None) -> None:
        """Begin a step (or a validation pass: ``plan`` None, nothing is received ahead); forget
        what a step that raised left behind."""
        self._plan, self._action = (list(plan) if plan else None), 0
        self._deferred: list[P2P] = []  # sends not yet posted
        self._pending: list[_Post] = []  # posts whose sends may not be complete
        self._ahead: dict[tuple[int, int, int], _Post] = {}  # (src, mb, kind) -> receive posted ahead

    def send(self, tensors: list[Tensor], dst: int, mb: int, kind: int) -> None:
        """Queue ``tensors`` (one per held column) for ``dst``; they go out with the next post."""
        for k, t in enumerate(tensors):
            self._deferred.append(P2P(True, t.detach().contiguous(), dst, tag(mb, kind, k)))

    def recv(
        self,
        shapes: Sequence[Sequence[int]],
        rows: int,
        src: int,
        mb: int,
        kind: int,
        dtype: torch.dtype | None = None,
    ) -> list[Tensor]:
        """Receive one tensor of ``(rows, *shape)`` per shape from ``src`` (``dtype`` None: the
        link's): post the queued sends with this receive as one batch, or, if the receive was
        posted ahead, post the sends alone first; then wait for it."""
        dtype = dtype or self.dtype
        with self.timeline.span("recv", f"recv{'AGH'[kind]}{mb}"):
            post = self._ahead.pop((src, mb, kind), None)
            if post is None:
                post = self._post(self._recv_ops(shapes, rows, src, mb, kind, dtype))
            else:
                # posted ahead in the link's dtype: a caller's other dtype would mean a buffer that
                # does not match what the peer sends (set the link's dtype to the step's instead)
                assert all(b.dtype == dtype for b in post.bufs), (
                    f"receive of {KIND_NAMES[kind]} {mb} from rank {src} was posted ahead as "
                    f"{post.bufs[0].dtype}, asked for as {dtype}: StageLink.dtype must be the step's"
                )
                self._post([])  # our sends must not wait behind the receive
            bufs = post.wait_recvs()
        self._next_action(src, mb, kind)
        return bufs

    def flush(self) -> None:
        """Post the queued sends (an action with nothing to receive)."""
        self._post([])
        self._next_action(None, None, None)

    def wait_sends(self) -> None:
        """Post the queued sends and wait until every send of the step has completed."""
        with self.timeline.span("send_wait"):
            self._post([])
            for post in self._pending:
                post.wait_all()
        self._pending.clear()
        assert not self._ahead, f"receives posted ahead were never taken: {sorted(self._ahead)}"

    # -- validation: messages with a header ---------------------------------------------------
    def send_headed(self, tensors: list[Tensor], dst: int, mb: int, more: bool) -> None:
        """Queue a header ``(rows, more, dtype)`` and then ``tensors`` (same rows and dtype) for ``dst``."""
        code = HEADER_DTYPES.index(tensors[0].dtype)
        head = torch.tensor([[tensors[0].shape[0], int(more), code]], dtype=torch.int64, device=self.device)
        self.send([head], dst, mb, HEAD)
        self.send(tensors, dst, mb, ACT)

    def recv_headed(self, shapes: Sequence[Sequence[int]], src: int, mb: int) -> tuple[list[Tensor], bool]:
        """Receive what :meth:`send_headed` sent: the tensors (rows and dtype from the header), more."""
        (head,) = self.recv([(3,)], 1, src, mb, HEAD, dtype=torch.int64)
        rows, more, code = head[0].tolist()  # the one host read per message (rows size the buffers)
        return self.recv(shapes, rows, src, mb, ACT, dtype=HEADER_DTYPES[code]), bool(more)

    # -- internals ----------------------------------------------------------------------------
    def _recv_ops(self, shapes, rows: int, src: int, mb: int, kind: int, dtype) -> list[P2P]:
        dtype = dtype or self.dtype
        return [
            P2P(False, torch.empty((rows, *shape), dtype=dtype, device=self.device), src, tag(mb, kind, k))
            for k, shape in enumerate(shapes)
        ]

    def _post(self, recvs: list[P2P]) -> _Post | None:
        """Post the deferred sends and the receives ``recvs`` as one batch (nothing: no post)."""
        ops, self._deferred = self._deferred + recvs, []
        if not ops:
            return None
        post = _Post(ops, self.comm.batch_isend_irecv(ops, self.group))
        if any(op.send for op in ops):
            self._pending.append(post)
        return post

    def _next_action(self, src, mb, kind) -> None:
        """The current action has its input: check it against the plan, then post the next
        action's receive ahead unless this action sends to that same peer (module docstring)."""
        if self._plan is None:
            return
        i, plan = self._action, self._plan
        here = plan[i]
        want = (here.recv_from, here.mb, here.kind) if here.recv_from is not None else (None, None, None)
        assert want == (src, mb, kind), f"plan action {i} is {here}; the engine received {(src, mb, kind)}"
        self._action += 1
        if i + 1 < len(plan) and self._may_post_ahead(here, plan[i + 1]):
            nxt = plan[i + 1]
            ops = self._recv_ops(nxt.shapes, nxt.rows, nxt.recv_from, nxt.mb, nxt.kind, None)
            self._ahead[(nxt.recv_from, nxt.mb, nxt.kind)] = self._post(ops)

    def _may_post_ahead(self, here: Transfer, nxt: Transfer) -> bool:
        """Whether the next action's receive may go out before this action computes: it has one,
        and this action does not send to that peer (the cycle in the module docstring)."""
        return self.receive_ahead and nxt.recv_from is not None and nxt.recv_from != here.send_to
