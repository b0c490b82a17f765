"""The trainer group's pure parts: failure classification by exception type, data consumers."""

from __future__ import annotations

import ray.exceptions
import torch.distributed

from cluster.group import classify, consumer_ids
from pipeline.grid import Grid


def _raised(cause: BaseException) -> ray.exceptions.RayTaskError:
    """What ray.get raises when an actor method raised ``cause``."""
    return ray.exceptions.RayTaskError("TrainerActor.train", "Traceback (most recent call last): ...", cause)


def test_failures_are_classified_by_type():
    assert classify(ray.exceptions.ActorDiedError()) == "cause"  # the process or its node is gone
    assert classify(_raised(ValueError("data.workers=9: ..."))) == "user"
    assert classify(_raised(RuntimeError("CUDA out of memory"))) == "cause"
    assert classify(_raised(TimeoutError("rank 3: no data for step 7 in 330s"))) == "cause"
    # NCCL and torch's store raise DistError subclasses: a collective that failed because of a peer
    aborted = torch.distributed.DistBackendError("NCCL communicator was aborted")
    assert classify(_raised(aborted)) == "consequence"
    assert classify(_raised(torch.distributed.DistStoreError("wait timeout"))) == "consequence"
    # gloo raises plain RuntimeErrors: only their text says a peer went away
    reset = "[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:9130: Connection reset by peer"
    assert classify(_raised(RuntimeError(reset))) == "consequence"
    timed_out = "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"
    assert classify(_raised(RuntimeError(timed_out))) == "consequence"


def test_consumers_are_the_first_and_last_stages():
    grid = Grid.parse("2x3x2", microbatches=3, global_batch=12)  # ranks (r * 3 + s) * 2 + c
    assert consumer_ids(grid) == {0: 0, 1: 1, 4: 2, 5: 3, 6: 4, 7: 5, 10: 6, 11: 7}
    one_stage = Grid.parse("1x1x2", microbatches=1, global_batch=2)
    assert consumer_ids(one_stage) == {0: 0, 1: 1}  # stage 0 is the last stage: read once
