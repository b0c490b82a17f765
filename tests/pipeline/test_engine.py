"""Engine behaviour beyond the equivalence matrix: inference, state dicts, activation memory
under both schedules, the Chrome trace, input refusals, and timeouts on dead or stuck peers."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from alexnet.config import ModelConfig
from alexnet.model import TwoColumnAlexNet
from pipeline.dist import destroy, init_distributed
from pipeline.engine import Engine, EngineConfig
from pipeline.grid import Grid
from pipeline.launch import RankFailed, spawn_ranks
from pipeline.timeline import bubble_fraction, chrome_trace

pytestmark = pytest.mark.dist

CFG = ModelConfig.small(num_classes=11, input_size=32)  # odd: unequal logit halves
CPU = torch.device("cpu")


def _perturbed_reference() -> TwoColumnAlexNet:
    model = TwoColumnAlexNet(CFG)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _batch(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, 32, 32, generator=gen), torch.randint(
        0, CFG.num_classes, (rows,), generator=gen
    )


def _misc_worker(rank: int, world_size: int, port: int) -> dict:
    grid = Grid.parse("1x2x2", microbatches=2, global_batch=4)
    groups = init_distributed(grid, rank, "127.0.0.1", port, backend="gloo", timeout_s=30)
    out: dict = {}
    try:
        eng = Engine(CFG, grid, rank, groups, EngineConfig(device=CPU))
        # wrong inputs are refused before any communication
        try:
            eng.step(0, 0.1, torch.zeros(3, 3, 32, 32) if eng.first else None, None)
        except ValueError as e:
            out["refusal"] = str(e)
        # the full model's state loads; this rank's slice comes back
        ref = _perturbed_reference()
        full = {
            "model": ref.state_dict(),
            "optimizer": {k: torch.full_like(v, 0.5) for k, v in ref.state_dict().items()},
        }
        eng.load_state_dict(full)
        mine = eng.state_dict()
        out["keys"] = sorted(mine["model"])
        out["state_err"] = max(float((v - full["model"][k]).abs().max()) for k, v in mine["model"].items())
        out["momentum"] = sorted({float(v.unique()[0]) for v in mine["optimizer"].values()})
        # inference: 5 rows in micro-batches of at most 2
        images, _ = _batch(5, seed=1)
        logits = eng.infer(images if eng.first else None)
        out["logits"] = None if logits is None else logits.numpy()
        # activation memory and traces under both schedules (M = 4, S = 2)
        for sched in ("gpipe", "1f1b"):
            g = Grid.parse("1x2x2", microbatches=4, global_batch=8, schedule=sched)
            e = Engine(CFG, g, rank, groups, EngineConfig(device=CPU, track_memory=True))
            images, labels = _batch(8, seed=2)
            m = e.step(0, 0.01, images if e.first else None, labels if e.last else None)
            out[f"mem_{sched}"] = m["activation_peak_bytes"]
            out[f"events_{sched}"] = e.timeline.events
    finally:
        destroy()
    return out


@pytest.fixture(scope="module")
def misc():
    return spawn_ranks(_misc_worker, 4, timeout_s=180)


def test_inputs_are_refused_with_a_clear_error(misc):
    assert "stage 0) needs images of shape (4, 3, 32, 32)" in misc[0]["refusal"]
    assert "needs labels of shape (4,), got None" in misc[2]["refusal"]


def test_state_dict_slices_and_loads(misc):
    ref_keys = TwoColumnAlexNet(CFG).state_dict().keys()
    grid = Grid.parse("1x2x2", microbatches=2, global_batch=4)
    for rank, res in enumerate(misc):
        _, s, c = grid.coords(rank)
        expected = sorted(
            k for k in ref_keys if k.split(".")[0] in grid.stage_blocks(s) and k.split(".")[1] == str(c)
        )
        assert res["keys"] == expected
        assert res["state_err"] == 0.0
        assert res["momentum"] == [0.5]
    union = sorted(k for res in misc for k in res["keys"])
    assert union == sorted(ref_keys)


def test_infer_equals_the_reference_in_eval_mode(misc):
    ref = _perturbed_reference().eval()
    images, _ = _batch(5, seed=1)
    with torch.no_grad():
        expected = ref(images).numpy()
    assert misc[0]["logits"] is None and misc[1]["logits"] is None
    for rank in (2, 3):
        got = misc[rank]["logits"]
        assert got.shape == (5, 11)
        # float summation order differs (batch of 2 vs 5, other split): compare as a whole
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5
        assert (got.argmax(1) == expected.argmax(1)).all()


def test_1f1b_holds_at_most_half_the_activations_of_gpipe_on_stage_0(misc):
    for rank in (0, 1):  # stage 0: 1F1B holds 2 micro-batches, GPipe 4
        ratio = misc[rank]["mem_1f1b"] / misc[rank]["mem_gpipe"]
        assert 0.3 < ratio <= 0.55, ratio
    for rank in (2, 3):  # last stage: both hold one micro-batch at a time under 1F1B
        assert misc[rank]["mem_1f1b"] < misc[rank]["mem_gpipe"]


def test_chrome_trace_is_valid_json_with_one_track_per_rank(misc, tmp_path):
    events = {rank: res["events_1f1b"] for rank, res in enumerate(misc)}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(chrome_trace(events)))
    trace = json.loads(path.read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1, 2, 3}
    assert {(e["pid"], e["tid"]) for e in spans} == {(r, 0) for r in range(4)}  # one track each
    names = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"]
    assert sorted(e["pid"] for e in names) == [0, 1, 2, 3]
    assert all(e["ts"] >= 0 and e["dur"] >= 0 for e in spans)
    for rank in range(4):
        mine = [e["name"] for e in spans if e["pid"] == rank]
        assert sum(n.startswith("F") for n in mine) == 4 and sum(n.startswith("B") for n in mine) == 4
        # stage 0 (conv1-2) has no exchange; stage 1 gathers before conv3, fc6-8 and the logits
        assert mine.count("gather") == (0 if rank < 2 else 4 * 5), mine
    assert any(e["cat"] == "recv" for e in spans)
    bubbles = bubble_fraction(events)
    assert set(bubbles) == {0, 1}
    assert all(0.0 <= b < 1.0 for b in bubbles.values())


def _peer_worker(rank: int, world_size: int, port: int, mode: str) -> dict | None:
    grid = Grid.parse("1x2x1", microbatches=2, global_batch=4)
    groups = init_distributed(grid, rank, "127.0.0.1", port, backend="gloo", timeout_s=3)
    eng = Engine(CFG, grid, rank, groups, EngineConfig(device=CPU))
    if rank == 1:
        if mode == "dies":
            os._exit(3)
        time.sleep(5)  # stuck (longer than the 3 s timeout): never takes part
        return None
    images, _ = _batch(4, seed=0)
    t0 = time.monotonic()
    try:
        eng.step(0, 0.1, images, None)
    except Exception as e:  # whatever the backend raises: it must raise, and in time
        return {"error": f"{type(e).__name__}: {e}"[:300], "after_s": time.monotonic() - t0}
    return {"error": None, "after_s": time.monotonic() - t0}


@pytest.mark.parametrize("mode", ["dies", "stuck"])
def test_a_dead_or_stuck_peer_is_an_error_within_the_timeout(mode):
    res = spawn_ranks(_peer_worker, 2, (mode,), timeout_s=60, may_exit=frozenset({1}))
    assert res[0]["error"], res[0]  # it raised: a hang would end in spawn_ranks' timeout instead
    assert res[0]["after_s"] < 45, res[0]  # the 3 s group timeout; the bound says "not a hang" only


def test_launcher_reports_a_failing_rank():
    with pytest.raises(RankFailed, match="ZeroDivisionError"):
        spawn_ranks(_failing_worker, 2, timeout_s=30)


def _failing_worker(rank: int, world_size: int, port: int) -> None:
    if rank == 1:
        1 / 0  # noqa: B018
    time.sleep(20)  # rank 0 would wait for it: the launcher must kill it
