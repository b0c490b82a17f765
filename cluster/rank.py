"""The trainer actor: one grid rank's process, holding one :class:`pipeline.engine.Engine`.

It pulls its own batches from the data workers through a :class:`cluster.feed.Feed` (stage-0 ranks
the images and lighting of their replica's rows, decoded on their device when the workers ship
JPEG bytes; last-stage ranks the labels), fetched, pinned and copied a step or two ahead, and runs
``steps`` engine steps per call, so the coordinator makes one Ray call per rank per chunk of steps.
:class:`cluster.group.RayTrainerGroup` starts these actors and reduces their results.
"""

from __future__ import annotations

import collections
import os
import socket
import warnings
from collections.abc import Sequence
from typing import Any

import ray
import torch

from cluster.evaluate import ValScore
from cluster.faults import RankFaults
from cluster.run import Run
from cluster.val import ValClient


def _device(run: Run, gpu_index: int | None) -> torch.device:
    """The rank's device: the GPU at ``gpu_index`` of the visible ones (Ray's pick), or the CPU."""
    if run.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"grid.gpus_per_rank={run.cfg.grid.gpus_per_rank} but this rank's node has no usable CUDA "
            'GPU: run on GPU nodes, or use train.device="cpu"'
        )
    return torch.device("cuda", gpu_index or 0)


def device_index(visible: str, gpu_ids: Sequence[Any]) -> int:
    """Index of this rank's GPU (the first Ray assigned it, ``gpu_ids``) among ``visible`` (the
    node's ``CUDA_VISIBLE_DEVICES``): the device number torch gives it, as Ray Train picks it."""
    order = [v.strip() for v in visible.split(",") if v.strip()]
    mine = str(gpu_ids[0]) if gpu_ids else None
    if mine not in order:
        raise RuntimeError(
            f"CUDA_VISIBLE_DEVICES={visible!r} lacks this rank's GPU {mine}: was it overridden?"
        )
    return order.index(mine)


class TrainerActor:
    """One grid rank: its engine, its data client, its timeline. Created by the trainer group."""

    def __init__(self, rank: int, run: Run, faults: RankFaults) -> None:
        # batches arrive as read-only numpy views of the object store; we only read them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.run, self.cfg, self.plan, self.grid = run, run.cfg, run.plan, run.grid
        self.rank, self.data_url, self.faults = rank, run.data_url, faults
        threads = self.cfg.train.threads_per_rank or max(1, int(self.cfg.grid.cpus_per_rank))
        torch.set_num_threads(threads)
        self.r, self.s, self.c = self.grid.coords(rank)
        self.first, self.last = self.s == 0, self.s == self.grid.stages - 1
        # chosen in setup(): CUDA must not initialise before share_visible_devices() has run
        self.device: torch.device | None = None
        self.gpu_index: int | None = None
        self.engine = None
        self.data = None  # cluster.data.DataClient
        self.consumer = -1
        self.feed = None  # the step's inputs: cluster.feed.Feed or NoFeed, faults injected (setup)
        self._events: collections.deque = collections.deque(maxlen=max(1, self.cfg.metrics.trace_steps))

    def rendezvous(self) -> tuple[str, int]:
        """This node's IP and a port free on it (called on rank 0: the process-group master)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def gpu_assignment(self) -> dict[str, Any]:
        """This actor's node and the GPU ids Ray assigned it (for :meth:`share_visible_devices`)."""
        return {"node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def share_visible_devices(self, visible: str) -> int:
        """See every GPU of the node (``CUDA_VISIBLE_DEVICES=visible``) and take the one Ray assigned
        this rank: returns its index. Ray gives each actor only its own GPU; NCCL, when every rank
        sees its node's GPUs, can map peers and use NVLink/NVSwitch paths directly (Ray Train does
        the same). Must run before CUDA initialises in this process."""
        assert not torch.cuda.is_initialized(), "CUDA started before the GPUs were shared"
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
        self.gpu_index = device_index(visible, ray.get_gpu_ids())
        return self.gpu_index

    def setup(self, master_addr: str, master_port: int, data, consumer: int) -> None:
        """Join the process groups, build the engine; ``data`` is the :class:`cluster.data.DataClient`
        and ``consumer`` this rank's consumer id for it (-1: this rank reads no batches)."""
        from alexnet.data.index import DatasetIndex
        from pipeline.dist import init_distributed
        from pipeline.engine import Engine, EngineConfig
        from pipeline.precision import configure_backends, deterministic_env, resolve_precision

        t = self.cfg.train
        if t.deterministic:  # before CUDA (cuBLAS) and the process groups (NCCL) read them
            os.environ.update(deterministic_env())
        self.device = _device(self.run, self.gpu_index)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # bf16 on a GPU without it: fail before joining; then this process's backend flags, once
        precision = resolve_precision(t.precision, self.device)
        cuda = self.device.type == "cuda"
        configure_backends(self.device, precision, t.deterministic, t.benchmark_cudnn(cuda))
        groups = init_distributed(
            self.grid,
            self.rank,
            master_addr,
            master_port,
            self.run.backend,
            self.cfg.grid.collective_timeout_s,
        )
        o = self.cfg.optim
        config = EngineConfig(
            self.device,
            o.momentum,
            o.weight_decay,
            o.rule,
            precision,
            None,
            t.lrn_kernel,
            t.compile,
            frozen=t.freeze,
        )
        self.engine = Engine(self.run.model, self.grid, self.rank, groups, config)
        self.index = DatasetIndex.load(self.data_url)
        self.mean = self.index.mean_tensor(self.run.model.input_size, self.cfg.data.mean).to(self.device)
        self.data, self.consumer = data, consumer
        from cluster.feed import Feed, FeedSpec, NoFeed

        feed = NoFeed()
        if consumer >= 0:
            spec = FeedSpec(
                consumer,
                self.r,
                self.grid.replicas,
                images=self.first,
                labels=self.last,
                input_size=self.run.model.input_size,
                scale=self.cfg.data.input_scale,
            )
            feed = Feed(data, spec, self.device, self.mean, self.plan.total_steps)
        self.feed = self.faults.inputs(feed)

    def load(self, state: dict) -> None:
        """Take this rank's slice of the full canonical ``{"model": ..., "optimizer": ...}`` state."""
        self.engine.load_state_dict(state)

    def state_dict(self) -> dict:
        """This rank's slice of the model and optimizer state, on the host."""
        st = self.engine.state_dict()
        return {k: {n: t.cpu() for n, t in d.items()} for k, d in st.items()}

    def train(self, first_step: int, steps: int, lr: float) -> list[dict[str, float]]:
        """Steps ``first_step .. first_step + steps - 1``; one result dict per step (engine keys +
        ``data_wait_s``). The device is read once, after the last step of the chunk.

        ``data_wait_s`` is a timeline span around taking the step's inputs from the feed: on CPU
        the host's wait; on a GPU the device's (how long the device sat idle for it: the feed
        works ahead, so a batch made while the previous step ran costs nothing).
        ``corrupt_decoded``: the keys of the rows of this rank's batch that did not decode on the
        device."""
        from pipeline.timeline import totals

        tl, corrupt = self.engine.timeline, []
        for t in range(first_step, first_step + steps):
            tl.clear(t)
            with tl.span("data_wait"):
                fed = self.feed.get(t)
            self.engine.submit_step(t, lr, fed.images, fed.labels)
            corrupt.append(list(fed.corrupt_keys))
        out = []
        for report, bad in zip(self.engine.read_steps(), corrupt, strict=True):
            res = dict(report.metrics)
            res["corrupt_decoded"] = bad
            res["data_wait_s"] = totals(report.events)["data_wait"]
            res["step_s"] = res.get("step_s", 0.0) + res["data_wait_s"]
            self._events.append(report.events)
            out.append(res)
        return out

    def evaluate(self, val: ValClient, pass_id: int, crop: str) -> dict[str, dict[str, float]]:
        """Score this replica's share of val pass ``pass_id`` (decoded by the data workers, read
        through ``val``): ``{crop: ValScore totals}``, meaningful on the last stage."""
        # Every rank of the replica reads every one of its batches (stage 0 the pixels, the others
        # the small labels object), so all skip an empty batch together and call infer() once per
        # non-empty one: later stages need no batch count.
        score = ValScore((crop,))
        for batch in val.batches(pass_id, self.r, images=self.first):
            if batch.n == 0:  # every sample of it was unusable (skipped and counted by the worker)
                continue
            images = None
            if self.first:
                images = batch.model_input(self.mean, self.cfg.data.input_scale, self.device)
            logits = self.engine.infer(images)
            if self.last:
                score.add(crop, logits, torch.from_numpy(batch.labels).to(self.device))
        return score.totals()

    def trace_events(self, steps: int) -> list[dict]:
        """Timeline events of the last ``steps`` steps this rank ran."""
        return [e for step_events in list(self._events)[-steps:] for e in step_events]

    def shutdown(self) -> None:
        """Leave the process groups."""
        from pipeline.dist import destroy

        if self.feed is not None:
            self.feed.close()
        destroy()
