"""``bench/host.py`` builds and steps its engines (this tree's and an ``--against`` file's) and its
bare loop: the benchmark is not in the suite (minutes), so its construction is checked here, in
well under a second (it once passed the engine keyword arguments the engine no longer took)."""

from __future__ import annotations

from pathlib import Path

import torch

from alexnet.config import ModelConfig
from bench.host import bare_step, engine_class, engine_step, interleaved

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig.small(num_classes=10, input_size=32)


def test_host_benchmark_steps_its_engines_and_its_bare_loop(one_thread):
    against = engine_class(str(ROOT / "pipeline" / "engine.py"))  # what --against loads
    ours, step = engine_step(CFG, 4, 2)  # M = 2: the bare loop accumulates over two micro-batches
    theirs, their_step = engine_step(CFG, 4, 2, cls=against)
    assert ours.grid.microbatches == theirs.grid.microbatches == 2
    times = interleaved({"engine": step, "before": their_step, "bare": bare_step(CFG, 4, 2)}, 1, 1, 1)
    assert set(times) == {"engine", "before", "bare"} and all(t > 0 for t in times.values())
    assert [r.step for r in ours.read_steps()] == [0, 1]  # the warm-up step and the round's
    assert torch.isfinite(torch.tensor([r.metrics["loss"] for r in theirs.read_steps()])).all()
