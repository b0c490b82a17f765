"""The column exchange: an all-gather over the column group, with autograd.

Forward: every column rank contributes its part (B, n_c, ...) and gets the concatenation
along dim 1, column 0 first. Backward: each rank's gradient of the full tensor is summed
over the column group and each rank keeps the slice of its own part (a reduce-scatter),
because every column consumes the full tensor with its own weights.

Written as a small autograd Function rather than ``_functional_collectives``'s
``all_gather_single_autograd`` because (a) gloo is slow for big messages (measured on this
machine: ~2.5 ms/MB up to 4 MB per rank, ~7-9 ms/MB at 8-16 MB), so large gathers are sent
in chunks; (b) the two logit halves differ in size when num_classes is odd (padded here);
(c) the time spent is recorded for the timeline and the step's exchange_s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alexnet.config import ModelConfig
from alexnet.model import BlockSpec, geometry, net_columns, previous_block
from pipeline.dist import Comm
from pipeline.timeline import Timeline

GLOO_CHUNK_BYTES = 4 << 20  # per rank and message; see the module docstring


def _chunks(n: int, step: int | None) -> list[tuple[int, int]]:
    if not step or n <= step:
        return [(0, n)]
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _pad_dim1(x: Tensor, size: int) -> Tensor:
    if x.shape[1] == size:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, size - x.shape[1]]
    return F.pad(x, pad)


class _GatherColumns(torch.autograd.Function):
    """(B, sizes[index], ...) on each rank -> (B, sum(sizes), ...) on every rank."""

    @staticmethod
    def forward(ctx, x: Tensor, comm: Comm, group, index: int, sizes: tuple[int, ...], chunk_bytes, tl):
        ctx.comm, ctx.group, ctx.index, ctx.sizes, ctx.tl = comm, group, index, sizes, tl
        ctx.chunk = chunk_bytes // x.element_size() if chunk_bytes else None  # in elements of x's dtype
        width = max(sizes)
        xp = _pad_dim1(x, width).contiguous()
        flat = xp.view(-1)
        outs = [torch.empty_like(flat) for _ in sizes]  # one padded part per column
        with tl.span("exchange", "gather"):
            for a, b in _chunks(flat.numel(), ctx.chunk):
                comm.all_gather([o[a:b] for o in outs], flat[a:b], group)
        parts = [o.view(xp.shape)[:, :n] for o, n in zip(outs, sizes, strict=True)]
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sizes, width = ctx.sizes, max(ctx.sizes)
        parts = [_pad_dim1(g, width).contiguous().view(-1) for g in torch.split(grad, list(sizes), dim=1)]
        out = torch.empty_like(parts[0])
        with ctx.tl.span("exchange", "gather_grad"):
            for a, b in _chunks(out.numel(), ctx.chunk):
                ctx.comm.reduce_scatter(out[a:b], [p[a:b] for p in parts], ctx.group)
        shape = (grad.shape[0], width, *grad.shape[2:])
        return out.view(shape)[:, : sizes[ctx.index]], None, None, None, None, None, None


class ColumnExchange:
    """The ``Exchange`` of one column rank (C = 2): ``exchange(spec, [own part]) -> full``.

    ``logits(part)`` gathers the fc8 halves into the full logits. ``chunk_bytes`` None
    picks 4 MiB chunks on gloo and unchunked messages on other backends; the collectives go
    through ``comm`` (:class:`pipeline.dist.Comm`), whatever the dtype of the parts.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        comm: Comm,
        group,
        column: int,
        timeline: Timeline,
        chunk_bytes: int | None = None,
    ) -> None:
        self.cfg, self.comm, self.group, self.column, self.timeline = cfg, comm, group, column, timeline
        if chunk_bytes is None and comm.backend == "gloo":
            chunk_bytes = GLOO_CHUNK_BYTES
        self.chunk_bytes = chunk_bytes

    def gather(self, x: Tensor, sizes: tuple[int, ...]) -> Tensor:
        args = (self.comm, self.group, self.column, sizes, self.chunk_bytes, self.timeline)
        return _GatherColumns.apply(x, *args)

    def __call__(self, spec: BlockSpec, parts: list[Tensor]) -> Tensor:
        (x,) = parts  # one column per rank
        prev = previous_block(self.cfg, spec.name)
        return self.gather(x, tuple(geometry(self.cfg, prev, c).out[0] for c in net_columns(self.cfg)))

    def logits(self, part: Tensor) -> Tensor:
        """(B, fc8_split[c]) -> (B, num_classes), column 0's logits first."""
        return self.gather(part, self.cfg.fc8_split)
