"""Process groups of the grid: init, the three kinds of subgroup, teardown. Every group has a timeout.

A dead or stuck peer makes a collective or a receive raise after ``timeout_s`` (gloo raises
at once when the peer's socket closes) instead of hanging the job: the runtime above
catches the error and restarts the trainer group.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.grid import Grid

DEFAULT_TIMEOUT_S = 300.0


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


def free_port() -> int:
    """A TCP port that was free a moment ago (for local launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _subgroup(lists: list[list[int]], timeout: datetime.timedelta, backend: str) -> dist.ProcessGroup | None:
    """Create every group in ``lists`` (all ranks must call this in the same order); return ours."""
    if len(lists[0]) == 1:
        return None  # a group of one needs no communicator
    own, _ = dist.new_subgroups_by_enumeration(lists, timeout=timeout, backend=backend)
    return own


def init_distributed(
    grid: Grid,
    rank: int,
    master_addr: str,
    master_port: int,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Groups:
    """Initialise the default process group (TCP rendezvous at master_addr:master_port) and
    the column, pipeline and data-parallel groups of ``grid``; return this rank's groups.

    ``backend`` None picks "nccl" when CUDA is available, else "gloo".
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s}: must be positive (seconds before a dead peer is an error)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=grid.world_size,
        timeout=timeout,
    )
    return Groups(
        grid=grid,
        rank=rank,
        backend=backend,
        timeout_s=timeout_s,
        column=_subgroup(grid.column_groups(), timeout, backend),
        pipeline=_subgroup(grid.pipeline_groups(), timeout, backend),
        data=_subgroup(grid.data_groups(), timeout, backend),
    )


def destroy() -> None:
    """Tear down every process group of this process (no-op if none)."""
    if dist.is_initialized():
        dist.destroy_process_group()
