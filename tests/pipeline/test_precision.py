"""Precision, backend flags and deterministic mode as plain functions, then on one-rank engines
(a 1x1x1 grid needs no process group): dtypes, master weights, the fused path, host reads."""

from __future__ import annotations

import pytest
import torch

from alexnet.config import ModelConfig
from pipeline.dist import Comm, Groups
from pipeline.engine import Engine, EngineConfig
from pipeline.grid import Grid
from pipeline.precision import (
    DETERMINISTIC_ENV,
    activation_dtype,
    autocast_dtype,
    configure_backends,
    deterministic_env,
    resolve_precision,
)
from pipeline.syncs import count_host_syncs
from pipeline.verify import TOLERANCE, random_batch, reference_run

CFG = ModelConfig.small(num_classes=10, input_size=32, dropout=0.5)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object: nothing touches CUDA


def test_auto_is_bf16_on_a_gpu_that_has_it_and_fp32_elsewhere():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", CUDA, bf16_ok=True) == "bf16"
    assert resolve_precision("auto", CUDA, bf16_ok=False) == "fp32"  # a V100: no surprise fp16
    for name in ("fp32", "tf32", "bf16", "fp16"):
        assert resolve_precision(name, CPU) == name


def test_bf16_on_a_gpu_without_it_names_the_key_and_suggests_fp16():
    with pytest.raises(ValueError, match=r"train\.precision='bf16'.*use train\.precision=fp16"):
        resolve_precision("bf16", CUDA, bf16_ok=False)
    with pytest.raises(ValueError, match=r"train\.precision='half'"):
        resolve_precision("half", CPU)


def test_dtypes_of_each_precision():
    assert [autocast_dtype(p) for p in ("fp32", "tf32", "bf16", "fp16")] == [
        None,
        None,
        torch.bfloat16,
        torch.float16,
    ]
    assert activation_dtype("fp32") == activation_dtype("tf32") == torch.float32
    assert activation_dtype("bf16") == torch.bfloat16


def test_deterministic_env_pins_cublas_and_nccl_but_keeps_what_the_user_set():
    assert deterministic_env({}) == DETERMINISTIC_ENV
    assert DETERMINISTIC_ENV["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")  # cuBLAS's two choices
    assert deterministic_env({"NCCL_ALGO": "Tree"}) == {
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
        "NCCL_PROTO": "Simple",
    }


@pytest.fixture
def restore_backends():
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
    )
    yield
    m, c, b, d, alg = saved
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = b, d
    torch.use_deterministic_algorithms(alg)


def test_backend_flags_follow_precision_and_determinism(restore_backends):
    configure_backends(CUDA, "tf32", deterministic=False, cudnn_benchmark=True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark
    configure_backends(CUDA, "fp32", deterministic=True, cudnn_benchmark=False)
    # fp32 means fp32: torch's own default lets cuDNN convolutions use TF32
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled()
    configure_backends(CPU, "fp32", deterministic=False, cudnn_benchmark=True)
    assert not torch.backends.cudnn.benchmark  # only on CUDA
    with pytest.raises(ValueError, match=r"train\.cudnn_benchmark=on with train\.deterministic=true"):
        configure_backends(CUDA, "fp32", deterministic=True, cudnn_benchmark=True)


# -- one-rank engines -------------------------------------------------------------------------
def _solo_groups(grid: Grid) -> Groups:
    """The groups of a one-rank world on CPU (no process group needed)."""
    return Groups(grid, 0, "gloo", 30.0, None, None, None, Comm("gloo"), CPU)


def _engine(precision: str = "fp32", m: int = 2, **kw) -> Engine:
    grid = Grid.parse("1x1x1", microbatches=m, global_batch=8)
    return Engine(CFG, grid, 0, _solo_groups(grid), EngineConfig(device=CPU, precision=precision, **kw))


def _train(engine: Engine, steps: int = 2, lr: float = 0.05) -> list[dict]:
    return [engine.step(s, lr, *random_batch(CFG, 8, s)) for s in range(steps)]


def _rel(a: torch.Tensor, b) -> float:
    b = torch.as_tensor(b)
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_a_rank_holding_both_columns_runs_fused_and_matches_the_per_column_reference():
    reference = reference_run(CFG, 8, 2, 0.05)
    for fused in (True, False):
        eng = _engine(fused=fused)
        assert eng.stage.fused is fused
        for step, ref in enumerate(reference):
            eng.step(step, 0.05, *random_batch(CFG, 8, step))
            for k, g in eng.grads().items():
                assert _rel(g, ref["grads"][k]) < TOLERANCE, (fused, step, k)
            for k, w in eng.state_dict()["model"].items():
                assert _rel(w, ref["weights"][k]) < TOLERANCE, (fused, step, k)
    # canonical names either way: a fused rank's state loads into a per-column one
    assert sorted(_engine(fused=True).state_dict()["model"]) == sorted(reference[0]["grads"])


def _scaled(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = random_batch(CFG, 8, step)
    return images / 8, labels  # inputs of order 1 for the chance-loss start


def test_bf16_keeps_fp32_master_weights_and_computes_the_fp32_gradient():
    fp32, bf16 = _engine("fp32"), _engine("bf16")
    l32, l16 = fp32.step(0, 0.01, *_scaled(0))["loss"], bf16.step(0, 0.01, *_scaled(0))["loss"]
    assert bf16.autocast_dtype == torch.bfloat16 and bf16.act_dtype == torch.bfloat16
    for p in bf16.stage.parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
    assert all(b.dtype == torch.float32 for b in bf16.state_dict()["optimizer"].values())
    assert l16 == pytest.approx(l32, rel=1e-2)
    g32, g16 = fp32.grads(), bf16.grads()
    assert 0 < _rel(g16["fc8.0.weight"], g32["fc8.0.weight"]) < 0.05  # bf16 really ran, and is close
    for k in g32:  # deep in the net bf16's rounding flips ReLUs, but every gradient points the same way
        cos = torch.nn.functional.cosine_similarity(g16[k].flatten(), g32[k].flatten(), dim=0)
        assert cos > 0.7, (k, float(cos))


def test_bf16_training_lowers_the_loss():
    eng = _engine("bf16")
    images, labels = _scaled(0)
    losses = [eng.step(s, 0.03, images, labels)["loss"] for s in range(12)]  # one batch, learnt
    # from the chance loss (ln 10) a quarter off in 12 steps; dropout keeps it noisy: the last three
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


def test_fp16_scales_the_loss_and_skips_a_step_whose_gradients_overflow():
    import torch.distributed as dist

    from pipeline.dist import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        eng = _engine("fp16")
        assert eng.scaler is not None
        taken, step = False, 0
        while not taken and step < 8:  # from 2**16 the scale backs off until the gradients fit
            before = eng.state_dict()["model"]["fc8.0.weight"]
            eng.step(step, 0.001, *_scaled(step))
            taken, step = not torch.equal(before, eng.state_dict()["model"]["fc8.0.weight"]), step + 1
        assert taken
        # the skipped steps left the momentum as it was
        assert all(torch.isfinite(v).all() for v in eng.state_dict()["optimizer"].values())
        before = eng.state_dict()["model"]
        scale = float(eng.scaler.get_scale())
        p = next(iter(eng.stage.parameters()))
        hook = p.register_hook(lambda g: g * float("inf"))  # this step's gradients overflow
        eng.step(step, 0.001, *_scaled(step))
        hook.remove()
        after = eng.state_dict()["model"]
        assert all(torch.equal(before[k], after[k]) for k in before)  # the step was skipped
        assert float(eng.scaler.get_scale()) == scale * 0.5  # and the scale backed off
    finally:
        dist.destroy_process_group()


class PlantedSync(Engine):
    """Reads the loss on the host inside the step, as the old engine's metrics did."""

    def _loss(self, logits, labels):
        loss, ce = super()._loss(logits, labels)
        float(ce)
        return loss, ce


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_step_reads_nothing_from_the_device_and_a_chunk_reads_once(precision):
    eng = _engine(precision, m=2)
    with count_host_syncs() as in_steps:
        for s in range(3):
            eng.submit_step(s, 0.05, *random_batch(CFG, 8, s))
    assert in_steps.count == 0, in_steps.ops
    with count_host_syncs() as in_read:
        reports = eng.read_steps()
    assert in_read.count == 1, in_read.ops  # the three steps' scores in one copy
    assert [r.step for r in reports] == [0, 1, 2]
    assert all(r.metrics["samples"] == 8 and r.metrics["step_s"] > 0 for r in reports)


def test_the_host_read_counter_sees_a_planted_read():
    grid = Grid.parse("1x1x1", microbatches=2, global_batch=8)
    eng = PlantedSync(CFG, grid, 0, _solo_groups(grid), EngineConfig(device=CPU))
    with count_host_syncs() as syncs:
        eng.submit_step(0, 0.05, *random_batch(CFG, 8, 0))
    assert syncs.count == 2  # one per micro-batch
    assert syncs.ops == ["aten._local_scalar_dense.default"] * 2
    with count_host_syncs() as syncs:
        torch.tensor([1, 2])  # a tensor from host data (a host-to-device copy on a GPU)
        torch.zeros(2).tolist()
    assert syncs.count == 2


def test_submitted_steps_read_together_equal_steps_read_one_by_one():
    one_by_one, chunked = _engine(), _engine()
    expected = _train(one_by_one, steps=3)
    for s in range(3):
        chunked.submit_step(s, 0.05, *random_batch(CFG, 8, s))
    chunked.infer(random_batch(CFG, 8, 9)[0])  # validation between steps and the read loses nothing
    reports = chunked.read_steps()
    for want, got in zip(expected, reports, strict=True):
        assert got.metrics["loss"] == want["loss"] and got.metrics["top5"] == want["top5"]
        cats = [e["cat"] for e in got.events]
        assert (
            cats.count("forward") == 2
            and cats.count("step") == 1
            and all(e["step"] == got.step for e in got.events)
        )
        assert got.metrics["step_s"] == pytest.approx(
            sum(e["dur"] for e in got.events if e["cat"] == "step") / 1e6
        )
    assert chunked.read_steps() == []
