"""Counting the host reads of device data: what makes a CPU wait for a GPU.

On a GPU every read of a tensor's value by the host (``.item()``, ``float(t)``, ``bool(t)``,
``.tolist()``, ``.cpu()``, ``.numpy()``) and every tensor built from host data
(``torch.tensor([...], device=...)``) waits for the device, so the host can no longer run ahead
and queue the next kernels. :func:`count_host_syncs` counts them on any device, CPU included,
so a test on CPU can hold a training step to zero; on a GPU
``torch.cuda.set_sync_debug_mode("error")`` is the direct check (``bench/gpu_check.py``).

Counted: the dispatcher's ``_local_scalar_dense`` (every scalar read) and ``lift_fresh`` (a tensor
from Python data), copies between devices, and the methods that leave the dispatcher
(``Tensor.tolist``, ``Tensor.numpy``, ``Tensor.cpu``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR_READS = {"aten._local_scalar_dense.default", "aten.lift_fresh.default"}
_COPIES = {"aten._to_copy.default", "aten.copy_.default"}
_METHODS = ("tolist", "numpy", "cpu")


class HostSyncs(TorchDispatchMode):
    """The host reads seen while active: ``count`` and ``ops`` (the op or method of each)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    @property
    def count(self) -> int:
        return len(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in _SCALAR_READS or (name in _COPIES and _crosses_devices(name, args, kwargs)):
            self.ops.append(name)
        return func(*args, **kwargs)


def _crosses_devices(name: str, args: tuple, kwargs: dict) -> bool:
    """A copy between a device and the host (``_to_copy(x, device=...)``, ``dst.copy_(src)``)."""
    if name == "aten._to_copy.default":
        dst = kwargs.get("device")
        return dst is not None and torch.device(dst).type != args[0].device.type
    return args[0].device.type != args[1].device.type


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """``with count_host_syncs() as syncs: ...`` then ``syncs.count``: host reads in the body."""
    mode = HostSyncs()
    originals = {m: getattr(torch.Tensor, m) for m in _METHODS}

    def counted(method: str):
        def wrapper(self, *args, **kwargs):
            mode.ops.append(f"Tensor.{method}")
            return originals[method](self, *args, **kwargs)

        return wrapper

    for m in _METHODS:
        setattr(torch.Tensor, m, counted(m))
    try:
        with mode:
            yield mode
    finally:
        for m, f in originals.items():
            setattr(torch.Tensor, m, f)
