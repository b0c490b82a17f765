"""NCCL's rules, checked on CPU: the engine's real communication over every grid with S <= 4,
C in {1, 2}, R in {1, 2}, M in {1, 2, 3, 4, 8}, both schedules, training and validation, with
the ranks as threads (:func:`pipeline.verify.check_nccl_rules`); planted violations fail it; the
recording over real gloo is the same as over the threads; the checker's own rules on hand-made
recordings; and no pipeline module calls torch.distributed but through ``pipeline.dist.Comm``.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

from alexnet.config import ModelConfig
from pipeline.engine import Engine
from pipeline.grid import Grid
from pipeline.local_world import local_groups, run_threads
from pipeline.nccl_rules import OpRecord, Post, RankLog, RecordingComm, check
from pipeline.p2p import ACT, StageLink, _Post, step_plan
from pipeline.schedules import make_schedule
from pipeline.timeline import Timeline
from pipeline.verify import check_nccl_rules, compare, reference_run, run_configs, run_rank

CFG = ModelConfig.small(num_classes=10, input_size=32)
SHAPES = [f"{r}x{s}x{c}" for r, s, c in itertools.product((1, 2), (1, 2, 3, 4), (1, 2))]
MICROBATCHES = (1, 2, 3, 4, 8)
SCHEDULES = ("gpipe", "1f1b")


def _grid(shape: str, m: int, schedule: str = "gpipe") -> Grid:
    replicas = int(shape.split("x")[0])
    return Grid.parse(shape, m, 2 * replicas * m, schedule=schedule)  # 2 rows per micro-batch


@pytest.mark.parametrize("shape", SHAPES)
def test_every_grid_keeps_nccl_rules(shape):
    failures = {}
    for m, schedule in itertools.product(MICROBATCHES, SCHEDULES):
        violations = check_nccl_rules(CFG, _grid(shape, m, schedule))
        if violations:
            failures[(m, schedule)] = violations[0]
    assert failures == {}


# one variant of each of the paper's findings, over grids it allows (C = 1 only for one column)
FINDINGS = {
    "tanh": {"activation": "tanh"},
    "pool_2_2": {"pooling": "non_overlapping"},
    "no_lrn": {"lrn": False},
    "no_conv3": {"remove_blocks": ("conv3",)},  # its exchange moves to conv4
    "no_conv4": {"remove_blocks": ("conv4",)},
    "one_column": {"columns": 1},
}


@pytest.mark.parametrize("name", sorted(FINDINGS))
def test_each_findings_variant_keeps_nccl_rules(name):
    cfg = dataclasses.replace(CFG, **FINDINGS[name])
    c = cfg.columns
    failures = {}
    for shape, m, schedule in ((f"1x2x{c}", 1, "gpipe"), (f"2x3x{c}", 3, "1f1b"), (f"1x4x{c}", 4, "gpipe")):
        replicas = int(shape[0])
        grid = Grid.parse(shape, m, 2 * replicas * m, schedule=schedule, model=cfg)
        violations = check_nccl_rules(cfg, grid)
        if violations:
            failures[(shape, m, schedule)] = violations[0]
    assert failures == {}


# -- planted violations ------------------------------------------------------------------------
class _LinkEngine(Engine):
    """An engine whose P2P layer is ``link_cls`` (the plants below)."""

    link_cls: type[StageLink] = StageLink

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.link = self.link_cls(self.groups.comm, self.groups.pipeline, self.device, self.timeline)


class _UnbatchedLink(StageLink):
    """The pre-issue gloo path: every send a single isend, outside the receive's batch."""

    def _post(self, recvs):
        for op in self._deferred:
            self._pending.append(_Post([op], [self.comm.isend(op.tensor, op.peer, self.group, op.tag)]))
        self._deferred = []
        return super()._post(recvs)


class _SwappedRecvLink(StageLink):
    """Posts the receives of a message's two parts in the other order than they are sent."""

    def _recv_ops(self, *args):
        return super()._recv_ops(*args)[::-1]


class _PaddedSendLink(StageLink):
    """Sends one row more than the receiver expects."""

    def send(self, tensors, dst, mb, kind):
        super().send([torch.cat([t, t[:1]]) for t in tensors], dst, mb, kind)


class _GreedyAheadLink(StageLink):
    """Posts every next receive ahead, even from the peer this action sends to."""

    def _may_post_ahead(self, here, nxt):
        return nxt.recv_from is not None


class _MisplacedAllReduce(Engine):
    """Column 1 sums a metric over the column group before the logits gather, column 0 after it."""

    def _full_logits(self, outs):
        x = torch.ones(1)
        if self.c == 1:
            self.groups.comm.all_reduce(x, self.groups.column)
        logits = super()._full_logits(outs)
        if self.c == 0:
            self.groups.comm.all_reduce(x, self.groups.column)
        return logits


def _with_link(link_cls: type[StageLink]) -> type[Engine]:
    return type(f"Engine{link_cls.__name__}", (_LinkEngine,), {"link_cls": link_cls})


PLANTS = {
    # name: (engine class, grid, words the first violation must contain)
    "unbatched_send": (_with_link(_UnbatchedLink), _grid("1x2x1", 2, "1f1b"), "unbatched point-to-point op"),
    "swapped_receives": (_with_link(_SwappedRecvLink), _grid("1x2x1", 2), "the tags differ"),
    "shape_mismatch": (_with_link(_PaddedSendLink), _grid("1x3x2", 2), "shape or dtype differ"),
    "collective_order": (_MisplacedAllReduce, _grid("1x1x2", 1), "collective #5 on the column group"),
    "greedy_receive_ahead": (_with_link(_GreedyAheadLink), _grid("1x2x1", 2, "1f1b"), "deadlock under NCCL"),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_a_planted_violation_fails_the_check(plant):
    engine_cls, grid, words = PLANTS[plant]
    violations = check_nccl_rules(CFG, grid, engine_cls=engine_cls)
    assert violations, f"{plant}: the check passed"
    assert words in violations[0], violations[0]
    assert "rank " in violations[0] and "group" in violations[0]  # says who and where


def test_a_deadlock_is_explained_as_a_cycle():
    engine_cls, grid, _ = PLANTS["greedy_receive_ahead"]
    (msg,) = check_nccl_rules(CFG, grid, engine_cls=engine_cls)
    assert "rank 0 (replica 0, stage 0, column 0)" in msg and "rank 1" in msg, msg
    assert "queued behind" in msg and "around the cycle" in msg, msg
    assert "train step 0, micro-batch" in msg, msg


# -- the receive-ahead is there, and only where it is safe -------------------------------------
def _logs(grid: Grid, engine_cls: type[Engine] = Engine) -> list[RankLog]:
    """Every rank's recording of one step and a validation pass, ranks as threads."""

    def body(rank, world):
        groups = local_groups(world, grid, rank)
        rec = RecordingComm.install(groups)
        run_rank(CFG, grid, rank, groups, 1, 0.05, engine_cls, recorder=rec)
        return rec.log

    return run_threads(body, grid.world_size)


def _batches(log: RankLog) -> list[tuple[str, list[tuple[bool, int, int]]]]:
    """(where, [(send, peer, tag), ...]) of each point-to-point batch of a rank, in posting order."""
    return [(p.where, [(o.send, o.peer, o.tag) for o in p.p2p]) for p in log.posts if p.op == "batch"]


def test_gpipe_receives_the_next_micro_batch_before_computing_this_one():
    logs = _logs(_grid("1x2x1", 4))
    # stage 1 posts the receive of micro-batch i + 1 while still at micro-batch i (before its forward)
    recv_acts = [(w, ops) for w, ops in _batches(logs[1]) if w.startswith("train") and not ops[0][0]]
    acts = [(w, [t // 6 for _, _, t in ops]) for w, ops in recv_acts if ops[0][2] % 6 < 2]
    assert [w for w, _ in acts][1:4] == [f"train step 0, micro-batch {i}" for i in range(3)], acts
    # stage 0's last forward sends to the stage it receives the first gradient from: one batch
    mixed = [ops for _, ops in _batches(logs[0]) if len({send for send, _, _ in ops}) == 2]
    assert mixed == [[(True, 1, 18), (True, 1, 19), (False, 1, 2), (False, 1, 3)]], mixed  # act3, grad0


def test_a_receive_posted_ahead_takes_the_links_dtype_and_refuses_another():
    # GPipe, 2 stages, M = 2: stage 1's receive of micro-batch 1 goes out before micro-batch 0's forward
    sent = [torch.randn(2, 3).to(torch.bfloat16) for _ in range(2)]

    def body(rank, world):
        groups = local_groups(world, _grid("1x2x1", 2), rank)
        link = StageLink(groups.comm, groups.pipeline, torch.device("cpu"), Timeline(rank), torch.bfloat16)
        prev, nxt = (None, 1) if rank == 0 else (0, None)
        link.start(step_plan(make_schedule("gpipe", 2, 2).actions(rank), prev, nxt, [(3,)], [(3,)], 2))
        if rank == 0:
            for mb in (0, 1):
                link.flush()
                link.send([sent[mb]], 1, mb, ACT)
            link.wait_sends()
            return None
        (first,) = link.recv([(3,)], 2, 0, 0, ACT)  # the link's dtype
        with pytest.raises(AssertionError, match="as torch.bfloat16, asked for as torch.float32"):
            link.recv([(3,)], 2, 0, 1, ACT, dtype=torch.float32)
        return first

    _, first = run_threads(body, 2)
    assert first.dtype == torch.bfloat16 and torch.equal(first.view(torch.int16), sent[0].view(torch.int16))


# -- the recording is the same over real gloo and over threads ---------------------------------
def _ops(log: RankLog) -> list[tuple]:
    return [(p.group, p.members, p.op, p.p2p, p.shapes, p.dtype, p.where) for p in log.posts]


@pytest.mark.dist
def test_gloo_and_threads_record_the_same_ops_and_the_engine_matches_the_reference():
    grid = _grid("1x3x2", 1)  # the example: GPipe, M = 1, three stages of column pairs
    (results,) = run_configs(CFG, [{"grid": grid, "steps": 1, "lr": 0.05, "record": True}], timeout_s=240)
    gloo = [r["nccl_log"] for r in results]
    assert check(gloo, grid) == []
    threads = _logs(grid)
    for rank in range(grid.world_size):
        assert _ops(gloo[rank]) == _ops(threads[rank]), rank
        assert gloo[rank].program == threads[rank].program, rank
    errors = compare(CFG, reference_run(CFG, grid.global_batch, 1, 0.05), results)
    assert errors["max_rel_grad_error"] < 1e-5, errors


def test_the_threads_world_trains_like_the_reference():
    grid = _grid("2x2x2", 2, "1f1b")  # all three kinds of group: column, pipeline, data

    def body(rank, world):
        return run_rank(CFG, grid, rank, local_groups(world, grid, rank), 2, 0.05)

    errors = compare(CFG, reference_run(CFG, grid.global_batch, 2, 0.05), run_threads(body, grid.world_size))
    assert errors["max_rel_grad_error"] < 1e-5 and errors["max_rel_weight_error"] < 1e-5, errors


# -- the checker's rules on hand-made recordings -----------------------------------------------
def _batch(rank: int, i: int, *ops: tuple[bool, int, int], shape=(2, 3), dtype="float32") -> Post:
    p2p = tuple(OpRecord(send, peer, shape, dtype, tag) for send, peer, tag in ops)
    return Post(rank, i, "pipeline", (0, 1), "batch", p2p=p2p, where=f"post {i}")


def _log(rank: int, *posts: Post) -> RankLog:
    """A rank that posts ``posts`` in turn (asynchronously), then waits for each."""
    program = [("post", p.index) for p in posts] + [("wait", p.index) for p in posts]
    return RankLog(rank, list(posts), program)


def test_mutual_sends_deadlock_unless_batched_with_the_receives():
    # each rank sends to the other, then receives: as two units each, both sends wait forever
    apart = [
        _log(0, _batch(0, 0, (True, 1, 0)), _batch(0, 1, (False, 1, 1))),
        _log(1, _batch(1, 0, (True, 0, 1)), _batch(1, 1, (False, 0, 0))),
    ]
    (msg,) = check(apart)
    assert msg.startswith("deadlock") and "queued behind" in msg, msg
    together = [
        _log(0, _batch(0, 0, (True, 1, 0), (False, 1, 1))),
        _log(1, _batch(1, 0, (True, 0, 1), (False, 0, 0))),
    ]
    assert check(together) == []


def test_unmatched_and_mismatched_messages_are_named():
    extra = [
        _log(0, _batch(0, 0, (True, 1, 0)), _batch(0, 1, (True, 1, 2))),
        _log(1, _batch(1, 0, (False, 0, 0))),
    ]
    assert "posts 2 send(s) to rank 1" in check(extra)[0]
    dtype = [_log(0, _batch(0, 0, (True, 1, 0))), _log(1, _batch(1, 0, (False, 0, 0), dtype="bfloat16"))]
    assert "shape or dtype differ" in check(dtype)[0] and "bfloat16" in check(dtype)[0]


def test_collectives_must_agree_on_every_member():
    def coll(rank, i, op, shape):
        return Post(rank, i, "column", (0, 1), op, shapes=(shape,), dtype="float32", where="here")

    same = [_log(0, coll(0, 0, "all_gather", (4,))), _log(1, coll(1, 0, "all_gather", (4,)))]
    assert check(same) == []
    other = [_log(0, coll(0, 0, "all_gather", (4,))), _log(1, coll(1, 0, "all_gather", (5,)))]
    assert "collective #1 on the column group [0, 1] differs" in check(other)[0]
    missing = [_log(0, coll(0, 0, "all_reduce", (1,))), _log(1)]
    assert "rank 1 posts 0 collective(s)" in check(missing)[0]


# -- one way to torch.distributed ---------------------------------------------------------------
COMM_CALLS = {
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "all_gather",
    "all_gather_into_tensor",
    "all_reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "barrier",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "reduce",
    "send_object_list",
    "recv_object_list",
}


def _direct_calls(source: str) -> list[int]:
    """Lines of ``dist.<comm call>`` / ``torch.distributed.<comm call>`` / imported comm calls."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in COMM_CALLS:
            base = ast.unparse(node.value)
            if base in ("dist", "torch.distributed", "c10d"):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            lines += [node.lineno for a in node.names if a.name in COMM_CALLS]
    return lines


def test_only_the_comm_facade_calls_torch_distributed():
    root = Path(__file__).resolve().parents[2]
    found = {
        str(p.relative_to(root)): _direct_calls(p.read_text())
        for pkg in ("pipeline", "cluster")
        for p in sorted((root / pkg).rglob("*.py"))
        if p.name != "dist.py" or pkg != "pipeline"
    }
    assert {k: v for k, v in found.items() if v} == {}
    assert _direct_calls("import torch.distributed as dist\ndist.isend(t, 1)\n") == [2]
    assert _direct_calls("from torch.distributed import all_reduce\n") == [1]
    assert _direct_calls((root / "pipeline" / "dist.py").read_text())  # the facade itself does


# -- alexnet verify --nccl-rules ----------------------------------------------------------------
@pytest.mark.dist
def test_alexnet_verify_reports_nccl_rules_and_its_exit_code_follows(capsys, monkeypatch):
    from alexnet.cli import main

    argv = ["verify", "--grid", "1x2x1", "--microbatches", "2", "--steps", "1", "--nccl-rules"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["ok"], report["nccl_rules_ok"], report["nccl_violation"]) == (True, True, None)
    # a violation fails the command even when the gradients agree
    import pipeline.verify as verify

    monkeypatch.setattr(verify, "run_verify", lambda *a, **k: {**report, "nccl_rules_ok": False})
    assert main(argv) == 1
