"""Numerics of a rank's training: precision, the process-wide backend flags, deterministic mode.

``precision`` (the config's ``train.precision``):

* ``fp32``: float32 everywhere, TF32 off on CUDA (torch's default lets cuDNN convolutions use
  TF32, which is not fp32);
* ``tf32``: float32 tensors, TF32 tensor-core math in CUDA matmuls and convolutions (Ampere and
  later; on CPU the same as fp32);
* ``bf16``: autocast to bfloat16 (master weights, gradients and optimizer state stay float32);
* ``fp16``: autocast to float16 plus a dynamic loss scale (:func:`loss_scaler`);
* ``auto``: bf16 on a CUDA device with native bf16, else fp32 (CPU, pre-Ampere GPUs).

Deterministic mode (``train.deterministic``): deterministic cuDNN and cuBLAS kernels
(``CUBLAS_WORKSPACE_CONFIG``), ``torch.use_deterministic_algorithms``, no cuDNN benchmarking,
and NCCL's algorithm and protocol pinned, so the same run on the same GPUs gives the same bits.
The environment half (:func:`deterministic_env`) must be in place before CUDA initialises and
before the process group starts: the rank sets it first thing in its setup.
"""

from __future__ import annotations

import os

import torch

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
# train.compile: each rank's stage compiled between exchange points; "cudagraphs" also replays it
# as CUDA graphs on CUDA (Inductor's mode="reduce-overhead"; on CPU it runs as "on")
COMPILE_CHOICES = ("off", "on", "cudagraphs")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}

# what deterministic mode puts in a rank's environment (a value the user set is kept):
# cuBLAS's fixed-size workspace (its documented condition for reproducible GEMMs), and NCCL's
# ring algorithm with the simple protocol (the reduction order then depends on the ranks only)
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_ALGO": "Ring", "NCCL_PROTO": "Simple"}


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA: compute capability 8.0+; CPU: yes)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True


def resolve_precision(name: str, device: torch.device, bf16_ok: bool | None = None) -> str:
    """The concrete precision of ``name`` on ``device``; ``bf16_ok`` overrides the device query.

    ``auto`` is bf16 where the device has it, else fp32. ``bf16`` on a GPU without it (V100,
    T4) is a ``ValueError`` naming the key and the fix: silently emulated bf16 is many times
    slower, and a run should fail at once rather than crawl.
    """
    if name not in PRECISIONS:
        raise ValueError(f"train.precision={name!r}: use one of {PRECISIONS}")
    ok = bf16_supported(device) if bf16_ok is None else bf16_ok
    if name == "auto":
        return "bf16" if device.type == "cuda" and ok else "fp32"
    if name == "bf16" and not ok:
        card = torch.cuda.get_device_name(device) if device.type == "cuda" and bf16_ok is None else "this GPU"
        raise ValueError(
            f"train.precision='bf16': {card} has no native bfloat16 (compute capability < 8.0); "
            "use train.precision=fp16 (loss-scaled half precision) or fp32"
        )
    return name


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: no autocast)."""
    return _AUTOCAST.get(precision)


def activation_dtype(precision: str) -> torch.dtype:
    """The dtype of what crosses stage boundaries and column exchanges under ``precision``."""
    return _AUTOCAST.get(precision, torch.float32)


def deterministic_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables deterministic mode adds to ``environ`` (default ``os.environ``): those of
    :data:`DETERMINISTIC_ENV` it does not set already."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in DETERMINISTIC_ENV.items() if k not in env}


def configure_backends(
    device: torch.device, precision: str, deterministic: bool, cudnn_benchmark: bool
) -> None:
    """Set the process-wide flags a rank's training depends on (one engine per process).

    TF32 only for ``tf32``; ``cudnn_benchmark`` (let cuDNN time its algorithms per shape: CUDA
    only, and never with ``deterministic``, which also pins the algorithms); deterministic
    algorithms when asked. Call after :func:`deterministic_env` is in the environment.
    """
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if deterministic and cudnn_benchmark:
        raise ValueError(
            "train.cudnn_benchmark=on with train.deterministic=true: benchmarking picks cuDNN "
            "algorithms by timing, so two runs may differ; use train.cudnn_benchmark=auto or off"
        )
    torch.backends.cudnn.benchmark = cudnn_benchmark and device.type == "cuda"
    torch.backends.cudnn.deterministic = deterministic
    # Only a change: torch's setter imports Inductor (and Dynamo, sympy: ~3.5 s of CPU per process)
    # to copy the flag into Inductor's config, which the default, non-deterministic run never needs
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        torch.use_deterministic_algorithms(deterministic)


def loss_scaler(precision: str, device: torch.device):
    """fp16's dynamic loss scale, agreed by every rank of the world (None for other precisions).

    The scale multiplies the last stage's loss; gradients flow back through every stage scaled
    by it. Before the update each rank checks its own gradients for inf/NaN and the flags are
    summed over the whole world (one all-reduce), so every rank skips the same steps and keeps
    the same scale. torch's ``ShardedGradScaler`` does exactly that over a process group. The
    paper's update rule (``alexnet.optim``) is not a fused optimizer, so the scaler reads the flag
    on the host once per fp16 step (bf16, tf32 and fp32 steps read nothing).
    """
    if precision != "fp16":
        return None
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    scaler = ShardedGradScaler(device=device.type, process_group=None)  # None: the default (world) group
    # a rank that never computes the loss still unscales: give it the scale tensor now
    scaler.scale(torch.zeros((), device=device))
    return scaler
