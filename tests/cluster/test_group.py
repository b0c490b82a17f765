"""The trainer group's pure parts: failure classification by exception type, data consumers."""

from __future__ import annotations

import ray.exceptions
import torch.distributed

from cluster.data import consumer_ids
from cluster.faults import classify
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


def test_each_rank_sees_its_nodes_gpus_and_takes_the_one_ray_assigned():
    import pytest

    from cluster.group import shared_visible_devices
    from cluster.rank import device_index

    where = [
        {"node": "a", "gpus": ["2"]},
        {"node": "a", "gpus": ["0"]},
        {"node": "b", "gpus": ["1"]},
        {"node": "a", "gpus": ["10"]},
    ]
    visible = shared_visible_devices(where)
    assert visible == ["0,2,10", "0,2,10", "1", "0,2,10"]  # numeric order, per node
    assert [device_index(v, w["gpus"]) for v, w in zip(visible, where, strict=True)] == [1, 0, 0, 2]
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES='0,1' lacks this rank's GPU 3"):
        device_index("0,1", ["3"])
