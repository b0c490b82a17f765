"""The P2P layer on real gloo: every post one ``batch_isend_irecv`` works for each pattern the
engine posts (mutual exchange in one batch, send-only and receive-only batches, receives posted
ahead along a chain, both schedules), and a receive's buffer takes the sender's dtype: a bf16
send arrives as bf16 with the same bits, in training (the link's dtype) and in validation (the
header's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.dist import destroy, init_distributed
from pipeline.grid import Grid
from pipeline.p2p import ACT, GRAD, StageLink, step_plan
from pipeline.schedules import make_schedule
from pipeline.timeline import Timeline

pytestmark = pytest.mark.dist

BIG = (256, 1024)  # 1 MiB of float32 per message: more than a socket buffer holds at once
STAGES, M = 3, 4


def _payload(seed: int, shape=BIG, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _emulate(link: StageLink, s: int, schedule: str, dtype: torch.dtype = torch.float32) -> list[float]:
    """A stage's actions as the engine calls the link, with "compute" = add 1: forwards pass
    x + 1 on, the last stage turns x into the gradient, backwards pass g + 1 back, all in
    ``dtype`` (the link's, so receives posted ahead take it too). Returns the gradients stage 0
    receives, per micro-batch (each a constant tensor)."""
    link.dtype = dtype
    prev, nxt = (s - 1 if s > 0 else None), (s + 1 if s < STAGES - 1 else None)
    actions = make_schedule(schedule, STAGES, M).actions(s)
    link.start(step_plan(actions, prev, nxt, [BIG[1:]], [BIG[1:]], BIG[0]))
    held, got = {}, {}
    for a in actions:
        if a.kind == "F":
            if prev is None:
                link.flush()
                x = torch.full(BIG, float(a.mb), dtype=dtype)
            else:
                (x,) = link.recv([BIG[1:]], BIG[0], prev, a.mb, ACT)
            held[a.mb] = x + 1
            if nxt is not None:
                link.send([held[a.mb]], nxt, a.mb, ACT)
        else:
            if nxt is None:
                link.flush()
                g = held.pop(a.mb)
            else:
                (g,) = link.recv([BIG[1:]], BIG[0], nxt, a.mb, GRAD)
                got[a.mb] = float(g[0, 0])
                assert g.dtype == dtype and bool((g == g[0, 0]).all())
            if prev is not None:
                link.send([g + 1], prev, a.mb, GRAD)
    link.wait_sends()
    link.dtype = torch.float32
    return [got.get(i, float("nan")) for i in range(M)]


def _bits(t: torch.Tensor) -> tuple[torch.dtype, np.ndarray]:
    """``t``'s dtype and bits as numpy integers (a tensor returned through the launcher's queue is
    shared by a file descriptor that dies with the rank's process)."""
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
    return t.dtype, t.view(ints[t.dtype]).numpy().copy()


def _worker(rank: int, world_size: int, port: int) -> dict:
    grid = Grid.parse(f"1x{STAGES}x1", 1, 1)
    groups = init_distributed(grid, rank, "127.0.0.1", port, backend="gloo", timeout_s=30)
    link = StageLink(groups.comm, groups.pipeline, torch.device("cpu"), Timeline(rank))
    out: dict = {}
    try:
        # a bf16 training message: the link's dtype
        link.start(None)
        if rank == 0:
            link.send([_payload(1, dtype=torch.bfloat16)], 1, 0, ACT)
            link.wait_sends()
        elif rank == 1:
            link.dtype = torch.bfloat16
            (x,) = link.recv([BIG[1:]], BIG[0], 0, 0, ACT)
            out["bf16"] = _bits(x)
            link.dtype = torch.float32
        # validation messages: rows and dtype from the header
        link.start(None)
        if rank == 0:
            link.send_headed([_payload(2, (5, 7), torch.bfloat16)], 1, 0, more=True)
            link.send_headed([_payload(3, (2, 7))], 1, 1, more=False)
            link.wait_sends()
        elif rank == 1:
            out["headed"] = [
                (_bits(xs[0]), more) for xs, more in (link.recv_headed([(7,)], 0, mb) for mb in (0, 1))
            ]
        # 1F1B's steady state: each neighbour sends to and receives from the other in one batch
        link.start(None)
        if rank < 2:
            peer = 1 - rank
            link.send([_payload(10 + rank)], peer, 0, ACT)
            (x,) = link.recv([BIG[1:]], BIG[0], peer, 0, ACT)
            link.wait_sends()
            out["mutual"] = bool(torch.equal(x, _payload(10 + peer)))
        # whole steps along the chain, receives posted ahead where the plan allows
        for schedule in ("gpipe", "1f1b"):
            out[schedule] = _emulate(link, rank, schedule)
            out[f"{schedule}-bf16"] = _emulate(link, rank, schedule, torch.bfloat16)
    finally:
        destroy()
    return out


@pytest.fixture(scope="module")
def results():
    from pipeline.launch import spawn_ranks

    return spawn_ranks(_worker, STAGES, timeout_s=180)


def test_a_bf16_send_arrives_as_bf16_with_the_same_bits(results):
    dtype, bits = results[1]["bf16"]
    assert dtype == torch.bfloat16
    assert np.array_equal(bits, _bits(_payload(1, dtype=torch.bfloat16))[1])


def test_validation_headers_carry_rows_and_dtype(results):
    (first, more0), (second, more1) = results[1]["headed"]
    assert (more0, more1) == (True, False)
    assert first[0] == torch.bfloat16 and first[1].shape == (5, 7)
    assert np.array_equal(first[1], _bits(_payload(2, (5, 7), torch.bfloat16))[1])
    assert second[0] == torch.float32 and np.array_equal(second[1], _bits(_payload(3, (2, 7)))[1])


def test_neighbours_exchange_in_one_batch(results):
    assert results[0]["mutual"] and results[1]["mutual"]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "gpipe-bf16", "1f1b-bf16"])
def test_a_step_with_receives_ahead_delivers_every_message(results, schedule):
    # micro-batch i: stage 0 sends i + 1, stage 1 i + 2, the last stage's gradient is i + 3 and
    # it sends i + 4 back; stage 1 receives that and sends i + 5 to stage 0
    assert results[1][schedule] == [i + 4.0 for i in range(M)]
    assert results[0][schedule] == [i + 5.0 for i in range(M)]
