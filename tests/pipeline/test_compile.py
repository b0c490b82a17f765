"""``train.compile``: the stage compiled (Inductor, C++ on CPU) trains the same function as eager.

One test compiles (about a minute on two busy cores: the smallest net and batch that still run
the real stage code, the fused 1x1x1 path with LRN and keyed dropout); the others are instant:
the refusal, and ``"cudagraphs"``'s mode and per-step mark with ``torch.compile`` recorded (no
GPU: the CUDA case asks :func:`pipeline.engine.compile_mode` as if on CUDA; on CPU the setting
makes the very call ``"on"`` makes, so it trains as the compiled test shows)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch._dynamo.utils as dynamo_utils

import pipeline.engine as engine_mod
from alexnet.config import ModelConfig
from pipeline.dist import Comm, Groups
from pipeline.engine import Engine, EngineConfig, compile_mode
from pipeline.grid import Grid
from pipeline.verify import random_batch

CFG = ModelConfig.small(num_classes=10, input_size=32, dropout=0.5)
STEPS, BATCH, LR = 20, 4, 0.001
# Per-step losses agree to ~1e-7 at the first step (float32: Inductor sums in another order); the
# net is small and trained at batch 4, so later steps amplify that rounding (measured: ~1e-5 by
# step 3, up to 8e-3 by step 20). A wrong graph (a missing dropout mask, another LRN) is off by
# far more than this from the first step on.
FIRST_STEP_RTOL, RTOL = 1e-5, 3e-2


def _engine(compile: str, shape: str = "1x1x1", microbatches: int = 1) -> Engine:
    grid = Grid.parse(shape, microbatches=microbatches, global_batch=BATCH)
    groups = Groups(grid, 0, "gloo", 60.0, None, None, None, Comm("gloo"), torch.device("cpu"))
    return Engine(CFG, grid, 0, groups, EngineConfig(compile=compile))


def _losses(eng: Engine) -> list[float]:
    out = []
    for s in range(STEPS):
        eng.submit_step(s, LR, *random_batch(CFG, BATCH, s))
    for report in eng.read_steps():
        out.append(report.metrics["loss"])
    return out


def test_train_compile_refuses_an_unknown_value():
    with pytest.raises(ValueError, match=r"train.compile='yes': use one of \('off', 'on', 'cudagraphs'\)"):
        _engine("yes")


def test_cudagraphs_is_reduce_overhead_on_cuda_only():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert compile_mode("cudagraphs", cuda) == "reduce-overhead"
    assert compile_mode("cudagraphs", cpu) is None  # CUDA graphs need CUDA: "on"'s call
    assert compile_mode("on", cuda) is None and compile_mode("on", cpu) is None


class _Recorder:
    """Stands for torch.compile (returns the function itself, so the step runs eagerly) and
    ``cudagraph_mark_step_begin``; records what the engine asked of them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.compiled: list[tuple[str, dict]] = []
        self.marks = 0
        monkeypatch.setattr(torch, "compile", self.compile)
        monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", self.mark)

    def compile(self, fn, **kw):
        self.compiled.append((getattr(fn, "__qualname__", type(fn).__name__), kw))
        return fn

    def mark(self) -> None:
        self.marks += 1


def _as_if_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "compile_mode", lambda s, d: compile_mode(s, torch.device("cuda")))


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "as-if-cuda"])
def test_cudagraphs_compiles_with_its_mode_and_marks_each_step_once(monkeypatch, caplog, cuda, one_thread):
    if cuda:
        _as_if_on_cuda(monkeypatch)
    monkeypatch.setattr(engine_mod, "_CPU_GRAPHS_NOTED", [])  # the once-per-process note, afresh
    calls = {}
    for setting in ("on", "cudagraphs"):
        rec = _Recorder(monkeypatch)
        with caplog.at_level(logging.WARNING, logger="alexnet.engine"):
            eng = _engine(setting, microbatches=2)  # GPipe: both forwards before their backwards
            for s in range(2):
                eng.submit_step(s, LR, *random_batch(CFG, BATCH, s))
        eng.read_steps()
        calls[setting] = (rec.compiled, rec.marks)
    # "on": torch's default mode, no marks, wherever it runs
    assert calls["on"] == ([("Stage.run", {"mode": None})], 0)
    if cuda:  # Inductor with CUDA graph trees; one generation per optimizer step, not per micro-batch
        assert calls["cudagraphs"] == ([("Stage.run", {"mode": "reduce-overhead"})], 2)
        assert not caplog.records
    else:  # the very call "on" makes, and one line in the log
        assert calls["cudagraphs"] == calls["on"]
        assert [r.getMessage() for r in caplog.records] == [
            "train.compile=cudagraphs on cpu: CUDA graphs need CUDA; compiling as 'on'"
        ]


def test_with_one_column_per_rank_each_block_is_compiled_with_the_mode(monkeypatch):
    _as_if_on_cuda(monkeypatch)
    rec = _Recorder(monkeypatch)
    eng = _engine("cudagraphs", shape="1x1x2")  # rank 0 of two columns: built, never stepped
    assert len([b for bs in eng.stage.values() for b in bs.values()]) == 8  # conv1 .. fc8, one column
    assert [kw for _, kw in rec.compiled] == [{"mode": "reduce-overhead"}] * 8


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_stage_trains_like_eager_over_20_steps():
    torch.manual_seed(0)
    eager = _losses(_engine("off"))
    dynamo_utils.counters.clear()
    torch._dynamo.reset()
    torch.manual_seed(0)
    compiled = _losses(_engine("on"))
    stats, breaks = dynamo_utils.counters["stats"], dynamo_utils.counters["graph_break"]
    # it did compile: the stage in graphs, broken only where the dropout keys are drawn
    assert stats["unique_graphs"] >= 1
    assert all("dropout_masks" in reason for reason in breaks), list(breaks)
    assert abs(compiled[0] - eager[0]) <= FIRST_STEP_RTOL * abs(eager[0])
    for s, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert abs(b - a) <= RTOL * abs(a), (s, a, b)
