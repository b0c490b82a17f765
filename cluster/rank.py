"""The trainer actor: one grid rank's process, holding one :class:`pipeline.engine.Engine`.

It pulls its own batches from the data workers (stage-0 ranks the images and lighting of their
replica's rows, last-stage ranks the labels), converts uint8 -> float on its device (mean
subtraction and PCA lighting: :func:`alexnet.data.transforms.to_model_input`) and runs ``steps``
engine steps per call, so the coordinator makes one Ray call per rank per chunk of steps.
:class:`cluster.group.RayTrainerGroup` starts these actors and reduces their results.
"""

from __future__ import annotations

import collections
import os
import socket
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import ray
import torch

from alexnet.data.transforms import to_model_input
from cluster.config import JobConfig, from_dict
from cluster.evaluate import ValScore, crop_kinds, val_input
from cluster.faults import RankFaults
from cluster.plan import RunPlan


def _device(cfg: JobConfig, gpu_index: int | None) -> torch.device:
    """The rank's device: the GPU at ``gpu_index`` of the visible ones (Ray's pick), or the CPU."""
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if cfg.grid.gpus_per_rank > 0 and torch.cuda.is_available() else "cpu"
    return torch.device("cuda", gpu_index or 0) if want == "cuda" else torch.device("cpu")


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

    def __init__(self, rank: int, cfg: dict, plan: dict, data_url: str, faults: RankFaults) -> None:
        # batches arrive as read-only numpy views of the object store; we only read them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.cfg = from_dict(cfg)
        self.rank, self.plan, self.data_url, self.faults = rank, RunPlan(**plan), data_url, faults
        threads = self.cfg.train.threads_per_rank or max(1, int(self.cfg.grid.cpus_per_rank))
        torch.set_num_threads(threads)
        self.grid = self.cfg.to_grid()
        self.r, self.s, self.c = self.grid.coords(rank)
        self.first, self.last = self.s == 0, self.s == self.grid.stages - 1
        # chosen in setup(): CUDA must not initialise before share_visible_devices() has run
        self.device: torch.device | None = None
        self.gpu_index: int | None = None
        self.engine = None
        self.data = None  # cluster.data.DataClient
        self.consumer = -1
        self._ahead: tuple[int, Any] | None = None  # (step, ObjectRef) of the batch requested early
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
        from pipeline.engine import Engine
        from pipeline.precision import deterministic_env, resolve_precision

        t = self.cfg.train
        if t.deterministic:  # before CUDA (cuBLAS) and the process groups (NCCL) read them
            os.environ.update(deterministic_env())
        self.device = _device(self.cfg, self.gpu_index)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        resolve_precision(t.precision, self.device)  # bf16 on a GPU without it: fail before joining
        backend = None if self.cfg.grid.backend == "auto" else self.cfg.grid.backend
        if backend is None and self.device.type == "cpu":
            backend = "gloo"
        groups = init_distributed(
            self.grid, self.rank, master_addr, master_port, backend, self.cfg.grid.collective_timeout_s
        )
        o = self.cfg.optim
        self.engine = Engine(
            self.cfg.model_config(),
            self.grid,
            self.rank,
            groups,
            device=self.device,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            rule=o.rule,
            precision=t.precision,
            deterministic=t.deterministic,
            cudnn_benchmark=t.benchmark_cudnn(self.device.type == "cuda"),
            lrn_kernel=t.lrn_kernel,
        )
        self.index = DatasetIndex.load(self.data_url)
        self.mean = self.index.mean_tensor(self.cfg.model.input_size, self.cfg.data.mean).to(self.device)
        self.data, self.consumer = data, consumer

    def load(self, state: dict) -> None:
        """Take this rank's slice of the full canonical ``{"model": ..., "optimizer": ...}`` state."""
        self.engine.load_state_dict(state)

    def state_dict(self) -> dict:
        """This rank's slice of the model and optimizer state, on the host."""
        st = self.engine.state_dict()
        return {k: {n: t.cpu() for n, t in d.items()} for k, d in st.items()}

    def _inputs(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        images = labels = None
        if self.first:
            u8 = torch.from_numpy(batch["images"]).to(self.device, non_blocking=True)
            light = torch.from_numpy(batch["lighting"]).to(self.device, non_blocking=True)
            images = to_model_input(u8, light, self.mean, self.cfg.data.input_scale)
        if self.last:
            labels = torch.from_numpy(batch["labels"]).to(self.device, non_blocking=True)
        return images, labels

    def train(self, first_step: int, steps: int, lr: float) -> list[dict[str, float]]:
        """Steps ``first_step .. first_step + steps - 1``; one result dict per step (engine keys +
        ``data_wait_s``). The device is read once, after the last step of the chunk.

        ``data_wait_s`` is a timeline span around fetching the batch: on CPU the host's wait; on
        a GPU the device's (how long the device sat idle for it: with the host running ahead, a
        fetch that overlaps the previous step's kernels costs nothing)."""
        from pipeline.timeline import totals

        tl, keys = self.engine.timeline, []
        for t in range(first_step, first_step + steps):
            self.faults.before_step(t)
            tl.clear(t)
            with tl.span("data_wait"):
                batch = self._batch(t) if self.consumer >= 0 else None
                images, labels = self._inputs(batch) if batch is not None else (None, None)
            images = self.faults.images(t, images)
            self.engine.submit_step(t, lr, images, labels)
            record = self.cfg.train.record_keys and self.first and self.c == 0 and batch is not None
            keys.append(list(batch["keys"]) if record else None)  # debug: the samples this replica consumed
        out = []
        for report, k in zip(self.engine.read_steps(), keys, strict=True):
            res = dict(report.metrics)
            if k is not None:
                res["keys"] = k
            res["data_wait_s"] = totals(report.events)["data_wait"]
            res["step_s"] = res.get("step_s", 0.0) + res["data_wait_s"]
            self._events.append(report.events)
            out.append(res)
        return out

    def _batch(self, t: int) -> dict:
        """Batch rows of step ``t``; the request for step t+1 goes out now, so its round trip to the
        data worker overlaps this step's compute (the worker keeps a batch until every consumer
        asked for a later one, so an early request never loses data). Only stage 0 asks for pixels.

        On a cold start (no request for ``t`` in flight) the t+1 request waits until batch t has
        arrived: the data worker is a threaded actor, so with one worker two requests sent back to
        back could be served out of order and t+1 would release t before t was fetched."""
        ahead = self._ahead[1] if self._ahead is not None and self._ahead[0] == t else None
        ref = ahead if ahead is not None else self._request(t)
        if ahead is not None:
            self._request_ahead(t + 1)
        try:
            batch = ray.get(ref, timeout=self.data.timeout_s + 30)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"rank {self.rank}: no data for step {t} in {self.data.timeout_s + 30:.0f}s"
            ) from None
        if ahead is None:
            self._request_ahead(t + 1)
        return batch

    def _request(self, t: int):
        return self.data.get_ref(t, self.r, self.grid.replicas, self.consumer, images=self.first)

    def _request_ahead(self, t: int) -> None:
        if t < self.plan.total_steps:  # the data workers produce nothing past the run's end
            self._ahead = (t, self._request(t))

    def evaluate(self, ten_crop: bool, max_samples: int) -> dict[str, dict[str, float]]:
        """Validation of this replica's share: :meth:`ValScore.totals` (meaningful on the last stage)."""
        # Every rank of the replica walks the same val stream, so all call infer() once per batch
        # (later stages need no batch count); only stage 0 uses the images, the last the labels.
        crops = crop_kinds(ten_crop)
        score = ValScore(crops)
        for crop in crops:
            for batch in self._val(crop, max_samples):
                images = None
                if self.first:
                    images = val_input(batch, crop, self.mean, self.cfg.data.input_scale, self.device)
                logits = self.engine.infer(images)
                if self.last:
                    score.add(crop, logits, torch.from_numpy(batch["labels"]).to(self.device))
        return score.totals()

    def _val(self, crop: str, max_samples: int) -> Iterator[dict]:
        """This replica's share of the val split (replica r of R), up to ``max_samples`` in all."""
        from alexnet.data.reader import val_batches

        bs = self.cfg.eval.batch_size or self.cfg.optim.batch_size
        limit = max_samples // self.grid.replicas if max_samples else 0
        n = 0
        for batch in val_batches(
            self.data_url, bs, self.cfg.model.input_size, crop, self.r, self.grid.replicas, index=self.index
        ):
            yield batch
            n += len(batch["labels"])
            if limit and n >= limit:
                return

    def trace_events(self, steps: int) -> list[dict]:
        """Timeline events of the last ``steps`` steps this rank ran."""
        return [e for step_events in list(self._events)[-steps:] for e in step_events]

    def shutdown(self) -> None:
        """Leave the process groups."""
        from pipeline.dist import destroy

        destroy()
