"""Point-to-point traffic between neighbouring pipeline stages: one rank's sends and receives.

The engine hands this layer what to send (activations forward, their gradients back, the
validation headers) and what it expects to receive; the layer decides how the transfers are
posted. A send is deferred to the rank's next post and goes out together with that post's
receives (Megatron's ``send_forward_recv_backward`` pairing).

On NCCL the pair goes in one ``batch_isend_irecv``: two neighbours that each send, then receive,
from one another (1F1B's steady state) would otherwise deadlock on NCCL's per-pair stream. On
gloo, whose ``batch_isend_irecv`` can hang (pytorch #132644), each send is an ``isend`` and the
receive blocking: the path the CPU tests run.

Messages are told apart by ``(micro-batch, kind, part)``, folded into the tag; NCCL ignores tags,
so the order in which both sides post is what matches them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.timeline import Timeline

ACT, GRAD, HEAD = 0, 1, 2  # message kinds: activations, their gradients, validation headers


def tag(mb: int, kind: int, part: int) -> int:
    """The tag of part ``part`` (< 2: one per held column) of a ``kind`` message of micro-batch ``mb``."""
    return (mb * 3 + kind) * 2 + part


class StageLink:
    """This rank's sends to and receives from the neighbouring stages of its pipeline group."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        backend: str,
        device: torch.device,
        timeline: Timeline,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.group, self.backend, self.device, self.timeline = group, backend, device, timeline
        self.dtype = dtype  # of training messages: the step's activation dtype (bf16 under autocast)
        self._deferred: list[tuple[Tensor, int, int]] = []  # sends not yet posted: (tensor, dst, tag)
        self._pending: list[tuple[Tensor, dist.Work]] = []  # sends posted, maybe not complete

    def reset(self) -> None:
        """Forget sends left over from a step that raised."""
        self._deferred, self._pending = [], []

    def send(self, tensors: list[Tensor], dst: int, mb: int, kind: int) -> None:
        """Queue ``tensors`` (one per held column) for ``dst``; they go out with the next post."""
        for k, t in enumerate(tensors):
            self._deferred.append((t.detach().contiguous(), dst, tag(mb, kind, k)))

    def recv(
        self,
        shapes: list[tuple[int, ...]],
        rows: int,
        src: int,
        mb: int,
        kind: int,
        dtype: torch.dtype | None = None,
    ) -> list[Tensor]:
        """Post the queued sends and receive one tensor of ``(rows, *shape)`` per shape from ``src``;
        ``dtype``: the sender's (None: the link's, the step's activation dtype)."""
        dtype = dtype or self.dtype
        bufs = [torch.empty((rows, *shape), device=self.device, dtype=dtype) for shape in shapes]
        with self.timeline.span("recv", f"recv{'AGH'[kind]}{mb}"):
            self._post([(b, src, tag(mb, kind, k)) for k, b in enumerate(bufs)])
        return bufs

    def flush(self) -> None:
        """Post the queued sends (an action with nothing to receive)."""
        self._post([])

    def wait_sends(self) -> None:
        """Post the queued sends and wait until every send of the step has completed."""
        with self.timeline.span("send_wait"):
            self._post([])
            for _, work in self._pending:
                work.wait()
        self._pending.clear()

    def _post(self, recvs: list[tuple[Tensor, int, int]]) -> None:
        """Post the deferred sends and the receives ``(buffer, src, tag)``; wait for the receives."""
        sends, self._deferred = self._deferred, []
        pg = self.group
        if self.backend == "nccl" and sends and recvs:
            ops = [dist.P2POp(dist.isend, t, dst, pg, tg) for t, dst, tg in sends]
            ops += [dist.P2POp(dist.irecv, b, src, pg, tg) for b, src, tg in recvs]
            # NCCL coalesces the batch into ONE work (not one per op): wait on every work
            # returned, or the receive buffers could be read before NCCL has filled them
            for w in dist.batch_isend_irecv(ops):
                w.wait()
            return
        for t, dst, tg in sends:
            self._pending.append((t, dist.isend(t, dst=dst, group=pg, tag=tg)))
        for b, src, tg in recvs:
            dist.recv(b, src=src, group=pg, tag=tg)
