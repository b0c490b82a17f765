"""Process groups of the grid: init, the three kinds of subgroup, teardown, and :class:`Comm`, the
one object through which the engine calls torch.distributed. Every group has a timeout.

A dead or stuck peer makes a collective or a receive raise after ``timeout_s`` (gloo raises
at once when the peer's socket closes) instead of hanging the job: the runtime above
catches the error and restarts the trainer group.

**Eager groups.** On NCCL the default group is created with ``device_id=`` (the rank's CUDA
device), which makes NCCL build its communicator at once instead of at the first operation.
What this relies on in torch 2.14 (``torch/distributed/distributed_c10d.py``): ``new_group``
without a ``device_id`` takes the default group's ``bound_device_id`` (``_new_group_with_tag``),
so every subgroup made here is bound to the same device, split from the default communicator
(``_get_split_source``) and connected eagerly (``eager_connect_single_device``) when it is
created. With an eagerly initialised group, NCCL's point-to-point ops run on the group's own
communicator rather than on a lazily created 2-rank one keyed by the rank pair (pytorch/pytorch
#129140, #129147, #154132); the P2P layer also posts every transfer as one ``batch_isend_irecv``,
the form that uses the group's communicator in either case (pytorch/pytorch #160342). Eager
creation also meets ``batch_isend_irecv``'s other rule: a batch that is a group's first call
must involve every rank of the group (its docstring; pytorch/pytorch #74701), which the first
batch of a pipeline group of S >= 3 stages (stages 0 and 1 only) would break on a lazy group. torch
accepts a ``device_id`` only for an accelerator, and gloo has no lazy communicator to avoid, so
gloo groups are created without one: one code path, the device a parameter.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.grid import Grid

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class P2P:
    """One point-to-point op of a batch: send ``tensor`` to ``peer``, or receive into it from
    ``peer`` (a global rank). ``tag`` tells messages apart on gloo; NCCL ignores it."""

    send: bool
    tensor: Tensor
    peer: int
    tag: int = 0


class Comm:
    """The torch.distributed calls the engine may make, and nothing else: point-to-point batches
    (and torch's single ops, which the engine does not use), the three collectives, on the groups
    of :class:`Groups`.

    One object so that a recording (:mod:`pipeline.nccl_rules`) or an in-process world of
    threads (:mod:`pipeline.local_world`) can stand in for it; no other module of ``pipeline``
    calls torch.distributed's communication functions (a test holds it to that).
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def ranks(self, group: dist.ProcessGroup) -> tuple[int, ...]:
        """The global ranks of ``group``, in group-rank order."""
        return tuple(dist.get_process_group_ranks(group))

    def batch_isend_irecv(self, ops: Sequence[P2P], group: dist.ProcessGroup) -> list[dist.Work]:
        """Post ``ops`` as one batch. NCCL returns ONE work for the whole batch (it coalesces
        them), gloo one per op in order; waiting every work returned waits the batch."""
        p2p = [dist.P2POp(dist.isend if o.send else dist.irecv, o.tensor, o.peer, group, o.tag) for o in ops]
        return dist.batch_isend_irecv(p2p)

    def isend(self, tensor: Tensor, peer: int, group: dist.ProcessGroup, tag: int = 0) -> dist.Work:
        """A single (unbatched) send. The engine posts none: on NCCL a single op outside a batch may
        run on a communicator of its own (module docstring), and the checker refuses it."""
        return dist.isend(tensor, dst=peer, group=group, tag=tag)

    def irecv(self, tensor: Tensor, peer: int, group: dist.ProcessGroup, tag: int = 0) -> dist.Work:
        """A single (unbatched) receive; see :meth:`isend`."""
        return dist.irecv(tensor, src=peer, group=group, tag=tag)

    def all_gather(self, outs: list[Tensor], x: Tensor, group: dist.ProcessGroup) -> None:
        """``outs[i]`` <- member i's ``x`` (blocking)."""
        dist.all_gather(outs, x, group=group)

    def reduce_scatter(self, out: Tensor, parts: list[Tensor], group: dist.ProcessGroup) -> None:
        """``out`` <- the sum over members of their ``parts[my group rank]`` (blocking)."""
        dist.reduce_scatter(out, parts, group=group)

    def all_reduce(self, t: Tensor, group: dist.ProcessGroup, async_op: bool = False) -> dist.Work | None:
        """``t`` <- the sum of every member's ``t``; with ``async_op`` a work to wait on."""
        return dist.all_reduce(t, group=group, async_op=async_op)


@dataclass
class Groups:
    """This rank's process groups. A group is ``None`` where it would hold only this rank."""

    grid: Grid
    rank: int
    backend: str
    timeout_s: float
    column: dist.ProcessGroup | None  # same (r, s): the exchange all-gathers
    pipeline: dist.ProcessGroup | None  # same (r, c): P2P between consecutive stages
    data: dist.ProcessGroup | None  # same (s, c): gradient sums across replicas
    comm: Comm  # the calls on them
    device: torch.device  # the device the groups are bound to (cpu for gloo)


def free_port() -> int:
    """A TCP port that was free a moment ago (for local launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _subgroup(lists: list[list[int]], timeout: datetime.timedelta, backend: str) -> dist.ProcessGroup | None:
    """Create every group in ``lists`` (all ranks must call this in the same order); return ours.
    Each inherits the default group's bound device (eager on NCCL; see the module docstring)."""
    if len(lists[0]) == 1:
        return None  # a group of one needs no communicator
    own, _ = dist.new_subgroups_by_enumeration(lists, timeout=timeout, backend=backend)
    return own


def _device_and_backend(device: torch.device | None, backend: str | None) -> tuple[torch.device, str]:
    """The rank's device and backend. None and None: the current CUDA device and "nccl" when CUDA
    is available, else the CPU and "gloo"; a backend alone picks its device, a device alone its
    backend. NCCL without a CUDA device is refused."""
    cuda = torch.cuda.is_available() and backend in (None, "nccl")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    device = torch.device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and (device.type != "cuda" or device.index is None):
        raise ValueError(
            f"backend='nccl' needs this rank's CUDA device with its index (e.g. cuda:0), got {device}: "
            "pass the device, or use backend 'gloo' on the CPU (grid.backend = 'gloo' or 'auto')"
        )
    return device, backend


def init_distributed(
    grid: Grid,
    rank: int,
    master_addr: str,
    master_port: int,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device: torch.device | None = None,
) -> Groups:
    """Initialise the default process group (TCP rendezvous at master_addr:master_port) and
    the column, pipeline and data-parallel groups of ``grid``; return this rank's groups.

    ``device`` is the rank's device, ``backend`` None picks "nccl" for a CUDA device, else
    "gloo" (both None: CUDA's current device when there is one, else the CPU). On CUDA the
    device becomes the current one; on NCCL every group is bound to it (eager; module docstring).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s}: must be positive (seconds before a dead peer is an error)")
    device, backend = _device_and_backend(device, backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's batched P2P hangs without it (batch_isend_irecv's note)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=grid.world_size,
        timeout=timeout,
        device_id=device if backend == "nccl" else None,  # eager: see the module docstring
    )
    return Groups(
        grid=grid,
        rank=rank,
        backend=backend,
        timeout_s=timeout_s,
        column=_subgroup(grid.column_groups(), timeout, backend),
        pipeline=_subgroup(grid.pipeline_groups(), timeout, backend),
        data=_subgroup(grid.data_groups(), timeout, backend),
        comm=Comm(backend),
        device=device,
    )


def destroy() -> None:
    """Tear down every process group of this process (no-op if none)."""
    if dist.is_initialized():
        dist.destroy_process_group()
