"""Trainer actors (one per grid rank, running the engine) and the Ray trainer group the coordinator drives.

:class:`TrainerActor` is a Ray actor holding one :class:`pipeline.engine.Engine`. It pulls its own
batches from the data workers (stage-0 ranks the images and lighting of their replica's rows,
last-stage ranks the labels), converts uint8 -> float on its device (mean subtraction and PCA
lighting: :func:`alexnet.data.transforms.to_model_input`) and runs ``steps`` engine steps per
call, so the coordinator makes one Ray call per rank per chunk of steps.

:class:`RayTrainerGroup` implements :class:`cluster.coordinator.TrainerGroup`: it reserves the
placement group (one bundle per trainer rank, plus one per data worker), starts the actors,
chooses the rendezvous (rank 0's node and a free port there), fans calls out and aggregates the
per-rank results into one dict per step. A cluster too small for the grid is a ``ValueError``
after ``grid.placement_timeout_s``, never an endless wait.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import time
import warnings
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import JobConfig, from_dict
from cluster.coordinator import RunPlan, TrainerDied
from cluster.placement import PlacementPlan, plan_placement

# Where a value in a rank's step result is meaningful (engine keys; the rest are timings)
_LAST_STAGE_KEYS = ("loss", "top1", "top5")


def _device(cfg: JobConfig) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if cfg.grid.gpus_per_rank > 0 and torch.cuda.is_available() else "cpu"
    return torch.device("cuda", 0) if want == "cuda" else torch.device("cpu")


class TrainerActor:
    """One grid rank: its engine, its data client, its timeline. Created by :class:`RayTrainerGroup`."""

    def __init__(self, rank: int, cfg: dict, plan: dict, data_url: str, kill_step: int = -1) -> None:
        # batches arrive as read-only numpy views of the object store; we only read them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.cfg = from_dict(cfg)
        self.rank, self.plan, self.data_url = rank, RunPlan(**plan), data_url
        threads = self.cfg.train.threads_per_rank or max(1, int(self.cfg.grid.cpus_per_rank))
        torch.set_num_threads(threads)
        self.grid = self.cfg.grid.to_grid(self.cfg.optim.batch_size)
        self.r, self.s, self.c = self.grid.coords(rank)
        self.first, self.last = self.s == 0, self.s == self.grid.stages - 1
        self.device = _device(self.cfg)
        self.kill_step = kill_step
        self.engine = None
        self.data = None  # cluster.data.DataClient
        self.consumer = -1
        self._ahead: tuple[int, Any] | None = None  # (step, ObjectRef) of the batch requested early
        self._events: collections.deque = collections.deque(maxlen=max(1, self.cfg.metrics.trace_steps))

    def rendezvous(self) -> tuple[str, int]:
        """This node's IP and a port free on it (called on rank 0: the process-group master)."""
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def ping(self) -> int:
        return self.rank

    def setup(self, master_addr: str, master_port: int, data, consumer: int) -> None:
        """Join the process groups, build the engine; ``data`` is the :class:`cluster.data.DataClient`
        and ``consumer`` this rank's consumer id for it (-1: this rank reads no batches)."""
        from alexnet.data.index import DatasetIndex
        from pipeline.dist import init_distributed
        from pipeline.engine import Engine

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
        )
        self.index = DatasetIndex.load(self.data_url)
        self.mean = self.index.mean_tensor(self.cfg.model.input_size, self.cfg.data.mean).to(self.device)
        self.data, self.consumer = data, consumer

    def load(self, state: dict) -> None:
        self.engine.load_state_dict(state)

    def state_dict(self) -> dict:
        st = self.engine.state_dict()
        return {k: {n: t.cpu() for n, t in d.items()} for k, d in st.items()}

    def _inputs(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        images = labels = None
        if self.first:
            u8 = torch.from_numpy(batch["images"]).to(self.device, non_blocking=True)
            light = torch.from_numpy(batch["lighting"]).to(self.device)
            images = _to_model_input(u8, light, self.mean, self.cfg.data.input_scale)
        if self.last:
            labels = torch.from_numpy(batch["labels"]).to(self.device)
        return images, labels

    def train(self, first_step: int, steps: int, lr: float) -> list[dict[str, float]]:
        """Steps ``first_step .. first_step + steps - 1``; one result dict per step (engine keys +
        ``data_wait_s``)."""
        out = []
        R = self.grid.replicas
        for t in range(first_step, first_step + steps):
            if t == self.kill_step:
                os._exit(1)  # fault injection (faults.kill_rank / kill_step): die abruptly
            t0 = time.perf_counter()
            batch = self._batch(t, R) if self.consumer >= 0 else None
            images, labels = self._inputs(batch) if batch is not None else (None, None)
            if t == self.cfg.faults.nan_step and images is not None:
                images = images * math.nan  # fault injection (faults.nan_step): this step's loss is NaN
            wait = time.perf_counter() - t0
            res = dict(self.engine.step(t, lr, images, labels))
            if self.cfg.train.record_keys and self.first and self.c == 0 and batch is not None:
                res["keys"] = list(batch["keys"])  # debug: the samples this replica consumed
            res["data_wait_s"] = wait
            res["step_s"] = res.get("step_s", 0.0) + wait
            self._events.append(list(self.engine.timeline.events))
            out.append(res)
        return out

    def run_direct(self, first_step: int, steps: int, lr: float) -> float:
        """Benchmark baseline: ``steps`` engine steps on one fixed in-memory batch (no data workers,
        no Ray calls between steps); returns the seconds they took."""
        g, m = self.grid, self.cfg.model
        gen = torch.Generator().manual_seed(self.r)
        u8 = torch.randint(0, 256, (g.replica_batch, 3, m.input_size, m.input_size), generator=gen)
        images = _to_model_input(
            u8.to(torch.uint8).to(self.device),
            torch.zeros(g.replica_batch, 3),
            self.mean,
            self.cfg.data.input_scale,
        )
        labels = torch.randint(0, m.num_classes, (g.replica_batch,), generator=gen).to(self.device)
        t0 = time.perf_counter()
        for t in range(first_step, first_step + steps):
            self.engine.step(t, lr, images if self.first else None, labels if self.last else None)
        return time.perf_counter() - t0

    def _batch(self, t: int, replicas: int) -> dict:
        """Batch rows of step ``t``; the request for step t+1 goes out now, so its round trip to the
        data worker overlaps this step's compute (the worker keeps a batch until every consumer
        asked for a later one, so an early request never loses data). Only stage 0 asks for pixels.

        On a cold start (no request for ``t`` in flight) the t+1 request waits until batch t has
        arrived: the data worker is a threaded actor, so with one worker two requests sent back to
        back could be served out of order and t+1 would release t before t was fetched."""
        ahead = self._ahead[1] if self._ahead is not None and self._ahead[0] == t else None
        ref = (
            ahead
            if ahead is not None
            else self.data.get_ref(t, self.r, replicas, self.consumer, images=self.first)
        )
        if ahead is not None:
            self._request_ahead(t + 1, replicas)
        try:
            batch = ray.get(ref, timeout=self.data.timeout_s + 30)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"rank {self.rank}: no data for step {t} in {self.data.timeout_s + 30:.0f}s"
            ) from None
        if ahead is None:
            self._request_ahead(t + 1, replicas)
        return batch

    def _request_ahead(self, t: int, replicas: int) -> None:
        if t < self.plan.total_steps:  # the data workers produce nothing past the run's end
            self._ahead = (t, self.data.get_ref(t, self.r, replicas, self.consumer, images=self.first))

    def evaluate(self, ten_crop: bool, max_samples: int) -> dict[str, float]:
        """Validation of this replica's share: hit counts (last stage) for center crop and 10-crop."""
        from torch.nn import functional as F

        # Every rank of the replica walks the same val stream, so all call infer() once per batch
        # (later stages need no batch count); only stage 0 uses the images, the last the labels.
        totals = collections.Counter()
        for crop in ("center", "ten") if ten_crop else ("center",):
            for batch in self._val(crop, max_samples):
                images = labels = None
                if self.first:
                    u8 = torch.from_numpy(batch["images"]).to(self.device)
                    if crop == "ten":  # (b, 10, 3, S, S) -> (10 b, 3, S, S), crop-major
                        u8 = u8.transpose(0, 1).flatten(0, 1)
                    zeros = torch.zeros(u8.shape[0], 3, device=self.device)
                    images = _to_model_input(u8, zeros, self.mean, self.cfg.data.input_scale)
                logits = self.engine.infer(images)
                if not self.last:
                    continue
                labels = torch.from_numpy(batch["labels"]).to(self.device)
                b = labels.shape[0]
                if crop == "ten":
                    probs = F.softmax(logits.float(), dim=1).view(10, b, -1).mean(0)
                    logits = probs.log()
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                hit = top == labels[:, None]
                totals[f"{crop}_top1"] += float(hit[:, 0].sum())
                totals[f"{crop}_top5"] += float(hit.any(1).sum())
                totals[f"{crop}_n"] += b
                if crop == "center":
                    totals["loss_sum"] += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        return dict(totals)

    def _val(self, crop: str, max_samples: int):
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
        from pipeline.dist import destroy

        destroy()


def _to_model_input(u8, lighting, mean, scale: float):
    from alexnet.data.transforms import to_model_input

    return to_model_input(u8, lighting, mean, scale)


FAILURE_GRACE_S = 3.0  # after a rank fails, how long to collect the others' errors before giving up


def _call(refs: list, timeout_s: float | None, what: str) -> list:
    """``ray.get`` in 1 s slices (the driver's signal handlers keep running), failures -> TrainerDied.

    As soon as one rank fails, the others get ``FAILURE_GRACE_S`` to report, then the call gives up:
    peers of a dead rank may sit in a collective until its timeout, and the caller tears the group
    down anyway. Every rank's error is reported, root causes first (a dead or raising rank before
    the peers whose collectives broke because of it).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending, done_refs, give_up = list(refs), [], None
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        done_refs += done
        now = time.monotonic()
        if give_up is None and any(_failed(r) for r in done):
            give_up = now + FAILURE_GRACE_S
        if give_up is not None and now > give_up:
            break
        if deadline is not None and pending and now > deadline:
            raise TrainerDied(f"{what}: no answer from {len(pending)} rank(s) within {timeout_s:.0f}s")
    if give_up is None:
        try:
            return ray.get(refs)
        except ray.exceptions.RayError:
            pass
    errors, user_errors = [], []
    for i, ref in enumerate(refs):
        if ref not in done_refs:
            errors.append((True, i, f"rank {i}: no answer (blocked on a failed peer)"))
            continue
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            text = _short(e)
            # a peer's collective failing because a rank died is a consequence, not a cause
            secondary = not isinstance(e, ray.exceptions.RayActorError) and any(
                w in text
                for w in ("Timed out", "timed out", "Connection closed", "Connection reset", "Read error")
            )
            errors.append((secondary, i, f"rank {i}: {type(e).__name__}: {text}"))
            if isinstance(getattr(e, "cause", None), ValueError):
                user_errors.append(e.cause)
    if user_errors:  # a setting or the data is wrong: restarting would fail the same way
        raise ValueError(str(user_errors[0]))
    errors.sort()
    raise TrainerDied(f"{what}: " + "; ".join(e[2] for e in errors))


def _failed(ref) -> bool:
    try:
        ray.get(ref, timeout=0)
        return False
    except ray.exceptions.GetTimeoutError:
        return False
    except ray.exceptions.RayError:
        return True


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:300] if text else type(e).__name__


class RayTrainerGroup:
    """The trainer ranks and data workers of one run, as Ray actors in one placement group."""

    def __init__(self, cfg: JobConfig, plan: RunPlan, data_url: str) -> None:
        self.cfg, self.plan, self.data_url = cfg, plan, data_url
        self.grid = cfg.grid.to_grid(cfg.optim.batch_size)
        self.actors: list = []
        self.pg = self.data_pg = None
        self.plan_pg: PlacementPlan | None = None
        self.pool = None
        self.start_step = 0
        self._restarts_seen = 0
        self._kill_armed = cfg.faults.kill_rank >= 0 and cfg.faults.kill_step >= 0
        self._kill_data_armed = cfg.faults.kill_data_worker >= 0 and cfg.faults.kill_data_step >= 0

    # -- resources ------------------------------------------------------------------------
    def bundles(self) -> list[dict[str, float]]:
        """What each trainer rank needs, in rank order."""
        g = self.cfg.grid
        rank = {"CPU": g.cpus_per_rank}
        if g.gpus_per_rank > 0:
            rank["GPU"] = g.gpus_per_rank
        return [dict(rank) for _ in range(self.grid.world_size)]

    def placement(self) -> PlacementPlan:
        """The trainers' placement-group layout (cluster/placement.py) for the alive nodes."""
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        return plan_placement(self.grid, self.bundles()[0], nodes)

    def data_bundles(self) -> list[dict[str, float]]:
        """One bundle per data worker (a group of their own, so trainers and data workers can start
        at the same time without one taking the other's bundle)."""
        return [{"CPU": 1.0} for _ in range(self.plan.data_workers)]

    def _reserve(self) -> None:
        bundles = self.bundles()
        # a replica's ranks in one bundle (one node) where a node can hold it, replicas spread;
        # else a stage's columns per bundle, packed (cluster/placement.py)
        self.plan_pg = self.placement()
        self.pg = placement_group(self.plan_pg.bundles, strategy=self.plan_pg.strategy)
        self.data_pg = placement_group(self.data_bundles(), strategy="PACK")
        timeout = self.cfg.grid.placement_timeout_s
        groups = [self.pg.ready(), self.data_pg.ready()]
        ready, _ = ray.wait(groups, num_returns=2, timeout=timeout)
        if len(ready) < 2:
            self._release()
            need = collections.Counter()
            for b in bundles + self.data_bundles():
                need.update(b)
            have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            raise ValueError(
                f"the cluster cannot hold grid.shape={self.cfg.grid.shape!r} "
                f"({self.grid.world_size} trainer ranks x {bundles[0]}) plus data.workers="
                f"{self.plan.data_workers}: needs {dict(need)} in total, the cluster has {have} "
                f"(waited grid.placement_timeout_s={timeout:g}s). Use a smaller grid.shape or "
                "grid.cpus_per_rank / grid.gpus_per_rank, fewer data.workers, or add nodes."
            )

    def _strategy(self, bundle: int, pg=None) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(pg or self.pg, placement_group_bundle_index=bundle)

    def _release(self) -> None:
        for pg in (self.pg, self.data_pg):
            if pg is not None:
                with contextlib.suppress(Exception):
                    remove_placement_group(pg)
        self.pg = self.data_pg = None

    # -- TrainerGroup -----------------------------------------------------------------------
    def start(self, step: int, data_positions: list[dict] | None) -> None:
        self.start_step = step
        self._reserve()
        world, g = self.grid.world_size, self.cfg.grid
        actor_cls = ray.remote(TrainerActor)
        f = self.cfg.faults
        self.actors = [
            actor_cls.options(
                num_cpus=g.cpus_per_rank,
                num_gpus=g.gpus_per_rank,
                scheduling_strategy=self._strategy(self.plan_pg.bundle_of_rank[rank]),
                max_concurrency=1,
            ).remote(
                rank,
                self.cfg.to_dict(),
                self.plan.__dict__,
                self.data_url,
                f.kill_step if self._kill_armed and rank == f.kill_rank else -1,
            )
            for rank in range(world)
        ]
        # the trainers' processes start while the data workers do (DataPool waits for its own)
        self.pool = self._start_data(data_positions)
        consumers = self.consumer_ids()
        addr, port = _call([self.actors[0].rendezvous.remote()], 120, "rendezvous")[0]
        client = self.pool.client()
        refs = [a.setup.remote(addr, port, client, consumers.get(i, -1)) for i, a in enumerate(self.actors)]
        _call(refs, g.collective_timeout_s + 60, "setup")

    def consumer_ids(self) -> dict[int, int]:
        """Rank -> data consumer id, for the ranks that read batches (stage 0: images, last: labels)."""
        g = self.grid
        readers = [
            g.rank_of(r, s, c)
            for r in range(g.replicas)
            for s in sorted({0, g.stages - 1})
            for c in range(g.columns)
        ]
        return {rank: i for i, rank in enumerate(readers)}

    def _start_data(self, positions: list[dict] | None):
        from alexnet.data.reader import ReaderSpec
        from cluster.data import DataPool

        d, spe = self.cfg.data, self.plan.steps_per_epoch
        spec = ReaderSpec(
            self.data_url,
            self.cfg.optim.batch_size,
            self.cfg.model.input_size,
            workers=d.workers,
            seed=d.seed,
            shuffle_buffer=d.shuffle_buffer,
        )
        start_epoch = self.start_step // spe
        if positions is not None and len(positions) != d.workers:
            positions = None  # a new worker count: allowed only at an epoch end (checked before start)
        return DataPool(
            spec,
            consumers=len(self.consumer_ids()),
            prefetch=d.prefetch,
            positions=positions,
            start_epoch=start_epoch,
            end_step=self.plan.total_steps,
            timeout_s=self.cfg.grid.collective_timeout_s,
            options={"scheduling_strategy": self._strategy(-1, self.data_pg)},
        )

    def load(self, model, optimizer) -> None:
        state = ray.put({"model": model, "optimizer": optimizer})
        _call([a.load.remote(state) for a in self.actors], 600, "load")

    def submit(self, first_step: int, steps: int, lr: float) -> tuple[int, int, list]:
        refs = [a.train.remote(first_step, steps, lr) for a in self.actors]
        f = self.cfg.faults
        if self._kill_data_armed and first_step <= f.kill_data_step < first_step + steps:
            # fault injection: the worker's process dies abruptly while the chunk that reaches
            # step kill_data_step runs; Ray restarts it and it resumes its stream
            self._kill_data_armed = False
            ray.kill(self.pool.workers[f.kill_data_worker], no_restart=False)
        return first_step, steps, refs

    def collect(self, handle: tuple[int, int, list]) -> list[dict[str, Any]]:
        first_step, steps, refs = handle
        try:
            per_rank = _call(refs, None, f"train steps {first_step}..{first_step + steps - 1}")
        except TrainerDied:
            self._kill_armed = False  # an injected fault fires once
            raise
        return [self._aggregate(first_step + i, [r[i] for r in per_rank]) for i in range(steps)]

    def train(self, first_step: int, steps: int, lr: float) -> list[dict[str, Any]]:
        """``collect(submit(...))``: one chunk, synchronously."""
        return self.collect(self.submit(first_step, steps, lr))

    def _aggregate(self, step: int, ranks: list[dict[str, float]]) -> dict[str, Any]:
        g, B = self.grid, self.cfg.optim.batch_size
        last = [g.rank_of(r, g.stages - 1, 0) for r in range(g.replicas)]
        loss = sum(ranks[i]["loss"] for i in last) / len(last)
        top1 = sum(ranks[i]["top1"] for i in last)
        top5 = sum(ranks[i]["top5"] for i in last)
        out: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "top1_error": 1.0 - top1 / B,
            "top5_error": 1.0 - top5 / B,
            "step_s": max(x["step_s"] for x in ranks),
            "data_wait_s": max(x["data_wait_s"] for x in ranks),
        }
        parts, bubble = {}, {}
        for s in range(g.stages):
            for c in range(g.columns):
                x = ranks[g.rank_of(0, s, c)]
                parts[(s, c)] = {k: x[k] for k in x if k.endswith("_s")}
            waits = [ranks[g.rank_of(0, s, c)] for c in range(g.columns)]
            bubble[s] = sum(x["pipeline_wait_s"] / max(x["step_s"], 1e-9) for x in waits) / len(waits)
        out["parts"], out["bubble"] = parts, bubble
        if self.cfg.train.record_keys:  # each replica's stage-0 column-0 rank holds its rows' keys
            out["keys"] = [k for r in range(g.replicas) for k in ranks[g.rank_of(r, 0, 0)].get("keys", [])]
        for k in ("compute_s", "exchange_s", "pipeline_wait_s", "optimizer_s"):
            out[k] = max(x.get(k, 0.0) for x in ranks)
        return out

    def evaluate(self, ten_crop: bool, max_samples: int) -> dict[str, float]:
        res = _call([a.evaluate.remote(ten_crop, max_samples) for a in self.actors], None, "evaluate")
        g = self.grid
        tot = collections.Counter()
        for r in range(g.replicas):
            tot.update(res[g.rank_of(r, g.stages - 1, 0)])
        n = max(tot["center_n"], 1)
        out = {
            "top1_error": 1 - tot["center_top1"] / n,
            "top5_error": 1 - tot["center_top5"] / n,
            "loss": tot["loss_sum"] / n,
            "samples": float(tot["center_n"]),
        }
        if ten_crop:
            n10 = max(tot["ten_n"], 1)
            out["top1_error_10crop"] = 1 - tot["ten_top1"] / n10
            out["top5_error_10crop"] = 1 - tot["ten_top5"] / n10
        return out

    def state(self, step: int):
        from cluster.checkpoint import merge_rank_states

        g = self.grid
        replica0 = [self.actors[g.rank_of(0, s, c)] for s in range(g.stages) for c in range(g.columns)]
        states = _call([a.state_dict.remote() for a in replica0], 600, "state_dict")
        model, optimizer = merge_rank_states(states)
        return model, optimizer, self.pool.state(step)

    def data_stats(self) -> dict[str, Any]:
        try:
            return self.pool.stats() if self.pool is not None else {}
        except (ray.exceptions.RayError, TimeoutError):
            return {}  # metrics are best effort; a dead worker is handled by its restart

    def trace(self, steps: int) -> dict[str, Any] | None:
        from pipeline.timeline import chrome_trace

        if steps <= 0 or not self.actors:
            return None
        events = _call([a.trace_events.remote(steps) for a in self.actors], 60, "trace")
        return chrome_trace(dict(enumerate(events)))

    def shutdown(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):  # already dead: nothing to release
                ray.kill(a, no_restart=True)
        if self.pool is not None:
            with contextlib.suppress(Exception):
                self.pool.shutdown()
        self.actors, self.pool = [], None
        self._release()
