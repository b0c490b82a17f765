"""The paper's two-column network: one block list, executed locally or fused.

The network is eight blocks (``BLOCKS``); each has one half per column and says where
its input comes from: the image (conv1), the column's own previous block, or **both**
columns (conv3, fc6, fc7, fc8: the paper's exchange points). The same list runs as

* :class:`Stage`: any contiguous run of blocks for any subset of the columns, with the
  exchange supplied by the caller (concatenation here, an all-gather in ``pipeline/``);
* :class:`TwoColumnAlexNet`: all blocks, both columns, exchange = concatenation. The
  reference, and the owner of the canonical state-dict names ``{block}.{column}.weight``;
* :class:`FusedAlexNet`: both columns as grouped convolutions and single matmuls on one
  device. Its state dict uses the canonical names too, so weights move freely.

fc8 is split into two halves of ``num_classes / 2`` logits, one per column, each reading
both columns' fc7 (4096 inputs). The original code kept one 1000-way layer on the first
GPU; the split computes the same function with the same parameter count and keeps the
columns symmetric (each rank does the same work); the halves are concatenated for the
softmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alexnet.config import ModelConfig
from alexnet.layers import (
    LocalResponseNorm,
    SeededDropout,
    StepContext,
    dropout_masks,
    relu_local_response_norm_,
)

COLUMNS = (0, 1)


@dataclass(frozen=True)
class BlockSpec:
    """One block of the paper's network (its section 3.5 and figure 2): what each column computes
    and where its input comes from. The three executions all read these flags."""

    name: str
    index: int
    kind: str  # "conv" or "fc"
    input: str  # "image", "own" or "both" (an exchange point)
    lrn: bool = False
    pool: bool = False
    relu: bool = True
    dropout: bool = False
    bias_one: bool = False  # the paper initialises these biases to 1

    @property
    def exchange(self) -> bool:
        """Its input is both columns' outputs (gathered across the columns)."""
        return self.input == "both"

    @property
    def grouped(self) -> bool:
        """Each column reads only its own column's maps (a ``groups=2`` convolution when fused)."""
        return self.input == "own"


BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec("conv1", 0, "conv", "image", lrn=True, pool=True),
    BlockSpec("conv2", 1, "conv", "own", lrn=True, pool=True, bias_one=True),
    BlockSpec("conv3", 2, "conv", "both"),
    BlockSpec("conv4", 3, "conv", "own", bias_one=True),
    BlockSpec("conv5", 4, "conv", "own", pool=True, bias_one=True),
    BlockSpec("fc6", 5, "fc", "both", dropout=True, bias_one=True),
    BlockSpec("fc7", 6, "fc", "both", dropout=True, bias_one=True),
    BlockSpec("fc8", 7, "fc", "both", relu=False),
)
BLOCK_NAMES: tuple[str, ...] = tuple(b.name for b in BLOCKS)
BLOCK_BY_NAME: dict[str, BlockSpec] = {b.name: b for b in BLOCKS}

# exchange(spec, parts) -> the full tensor: every column's part concatenated along dim 1,
# column 0 first. ``parts`` are the parts this process holds, in column order.
Exchange = Callable[[BlockSpec, list[Tensor]], Tensor]


def concat_exchange(spec: BlockSpec, parts: list[Tensor]) -> Tensor:
    """The exchange when every column is in this process: a concatenation."""
    return torch.cat(parts, dim=1)


@dataclass(frozen=True)
class LayerGeometry:
    """Per-column shapes of one block: its weight, its conv arguments and its output."""

    weight_shape: tuple[int, ...]
    stride: int
    padding: int
    conv_out: tuple[int, ...]  # (C, H, W) before pooling, or (units,)
    out: tuple[int, ...]  # after pooling


def geometry(cfg: ModelConfig, name: str, column: int) -> LayerGeometry:
    """Shapes of block ``name`` in ``column`` (per column, as in the paper's figure 2)."""
    c1, c2, c3, c4, c5 = cfg.conv_channels
    s1, p1, p2, p5 = cfg.spatial_sizes()
    k2 = cfg.conv2_kernel
    table = {
        "conv1": (
            (c1, cfg.in_channels, cfg.conv1_kernel, cfg.conv1_kernel),
            cfg.conv1_stride,
            cfg.conv1_padding,
            (c1, s1, s1),
            (c1, p1, p1),
        ),
        "conv2": ((c2, c1, k2, k2), 1, k2 // 2, (c2, p1, p1), (c2, p2, p2)),
        "conv3": ((c3, 2 * c2, 3, 3), 1, 1, (c3, p2, p2), (c3, p2, p2)),
        "conv4": ((c4, c3, 3, 3), 1, 1, (c4, p2, p2), (c4, p2, p2)),
        "conv5": ((c5, c4, 3, 3), 1, 1, (c5, p2, p2), (c5, p5, p5)),
        "fc6": ((cfg.fc_units, 2 * c5 * p5 * p5), 1, 0, (cfg.fc_units,), (cfg.fc_units,)),
        "fc7": ((cfg.fc_units, 2 * cfg.fc_units), 1, 0, (cfg.fc_units,), (cfg.fc_units,)),
    }
    if name == "fc8":
        n = cfg.fc8_split[column]
        return LayerGeometry((n, 2 * cfg.fc_units), 1, 0, (n,), (n,))
    w, stride, pad, conv_out, out = table[name]
    return LayerGeometry(w, stride, pad, conv_out, out)


def _lrn(cfg: ModelConfig, groups: int = 1, kernel: str = "eager") -> LocalResponseNorm:
    """The paper's LRN with the config's constants; ``groups=2`` normalises each column's half apart."""
    return LocalResponseNorm(
        cfg.lrn_size, cfg.lrn_alpha, cfg.lrn_beta, cfg.lrn_k, cfg.lrn_convention, groups, kernel
    )


def _init_std(cfg: ModelConfig, spec: BlockSpec, weight_shape: tuple[int, ...]) -> float:
    """The std of one block's initial weights: ``fc8_init_std`` for the logits layer (no ReLU
    follows it, and small logits start the softmax near uniform), else ``init_std``; 0 means He
    (sqrt(2 / fan_in), which keeps a ReLU layer's activations at its input's scale)."""
    std = cfg.init_std if spec.relu else cfg.fc8_init_std
    if std > 0:
        return std
    return math.sqrt(2.0 / math.prod(weight_shape[1:]))  # He: fan_in of one output unit


def init_column_params(cfg: ModelConfig, name: str, column: int) -> tuple[Tensor, Tensor]:
    """The initial (weight, bias) of one column of one block (see :class:`ModelConfig`).

    The paper's: weights ~ N(0, 0.01), biases 1 in conv2, conv4, conv5, fc6, fc7 and 0
    elsewhere; the small variant's: He weights with biases 0, fc8 ~ N(0, 0.01). Drawn from a
    generator keyed by (seed, block, column), so any split of the model into stages and ranks
    starts from the same weights.
    """
    spec, geo = BLOCK_BY_NAME[name], geometry(cfg, name, column)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + spec.index * 16 + column)
    w = torch.empty(geo.weight_shape).normal_(0.0, _init_std(cfg, spec, geo.weight_shape), generator=gen)
    b = torch.full((geo.weight_shape[0],), cfg.init_bias if spec.bias_one else 0.0)
    return w, b


class ColumnBlock(nn.Module):
    """One column's half of one block: conv or linear, then ReLU, LRN, pool, dropout as the paper."""

    def __init__(self, cfg: ModelConfig, name: str, column: int, lrn_kernel: str = "eager") -> None:
        super().__init__()
        self.spec, self.column = BLOCK_BY_NAME[name], column
        self.geo = geometry(cfg, name, column)
        w, b = init_column_params(cfg, name, column)
        self.weight, self.bias = nn.Parameter(w), nn.Parameter(b)
        self.lrn = _lrn(cfg, kernel=lrn_kernel) if self.spec.lrn else None
        self.drop = SeededDropout(cfg.dropout, self.spec.index, column) if self.spec.dropout else None

    def forward(self, x: Tensor, ctx: StepContext | None) -> Tensor:
        """This column's input -> its output; ``ctx`` keys the dropout masks (training mode)."""
        if self.spec.kind == "conv":
            x = F.conv2d(x, self.weight, self.bias, self.geo.stride, self.geo.padding)
        else:
            x = F.linear(x.flatten(1), self.weight, self.bias)
        if self.spec.relu:
            x = F.relu(x, inplace=True)
        if self.lrn is not None:
            x = self.lrn(x)
        if self.spec.pool:
            x = F.max_pool2d(x, 3, 2)
        if self.drop is not None:
            x = self.drop(x, ctx)
        return x


class Stage(nn.ModuleDict):
    """A contiguous run of blocks for a subset of the columns.

    Parameters are named ``{block}.{column}.weight`` / ``.bias`` whatever the subset, so a
    stage's state dict is a slice of :class:`TwoColumnAlexNet`'s.

    ``fused`` (both columns only): run them as :class:`FusedAlexNet` does, both columns' maps in
    one tensor, grouped (conv2, conv4, conv5) or output-stacked (conv1, conv3) convolutions and
    the exchanges free; the parameters stay per column (the weights are stacked per forward: a
    few MB for the convolutions). The fc blocks stay two GEMMs on the same input: stacking
    their weights would copy fc6's 151 MB every micro-batch, more traffic than the GEMMs' own.
    ``lrn_kernel``: see :func:`alexnet.layers.local_response_norm`.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        blocks: Sequence[str],
        columns: Sequence[int],
        fused: bool = False,
        lrn_kernel: str = "eager",
    ) -> None:
        names = [b.name for b in BLOCKS if b.name in set(blocks)]
        if list(blocks) != names or not names:
            raise ValueError(f"blocks {list(blocks)} are not a contiguous run of {BLOCK_NAMES}")
        first = BLOCK_NAMES.index(names[0])
        if BLOCK_NAMES[first : first + len(names)] != tuple(names):
            raise ValueError(f"blocks {list(blocks)} are not a contiguous run of {BLOCK_NAMES}")
        if not columns or any(c not in COLUMNS for c in columns) or sorted(set(columns)) != list(columns):
            raise ValueError(f"columns {list(columns)}: use (0,), (1,) or (0, 1)")
        if fused and tuple(columns) != COLUMNS:
            raise ValueError(f"a fused stage holds both columns, got columns {list(columns)}")
        super().__init__(
            {n: nn.ModuleDict({str(c): ColumnBlock(cfg, n, c, lrn_kernel) for c in columns}) for n in names}
        )
        self.cfg, self.block_names, self.columns = cfg, tuple(names), tuple(columns)
        self.fused, self.lrn_kernel = fused, lrn_kernel

    def run(
        self,
        xs: list[Tensor],
        exchange: Exchange = concat_exchange,
        ctx: StepContext | None = None,
    ) -> list[Tensor]:
        """Run the blocks. ``xs``: the image as ``[x]`` if the stage starts at conv1, else one
        tensor per held column (in column order). Returns one tensor per held column.

        ``ctx`` keys the dropout masks: required in training mode when the stage holds fc6 or fc7
        (and dropout > 0), since a fixed default would draw the same masks every step.
        """
        if self.fused:
            return self._run_fused(xs, ctx)
        for name in self.block_names:
            spec = BLOCK_BY_NAME[name]
            if spec.input == "image":
                ins = [xs[0]] * len(self.columns)  # both columns see the whole image
            elif spec.exchange:
                ins = [exchange(spec, xs)] * len(self.columns)
            else:
                ins = xs
            xs = [self[name][str(c)](x, ctx) for c, x in zip(self.columns, ins, strict=True)]
        return xs

    forward = run

    # -- fused execution: both columns' maps side by side in one tensor, column 0 first -----------
    def _run_fused(self, xs: list[Tensor], ctx: StepContext | None) -> list[Tensor]:
        """:meth:`run` with both columns in one tensor; the same numbers up to float summation order.

        An exchange is the identity here (the tensor already holds both columns), so the caller's
        ``exchange`` is not consulted.
        """
        first = BLOCK_BY_NAME[self.block_names[0]]
        x = xs[0] if first.input == "image" else torch.cat(xs, dim=1)  # (B, both columns' maps, ...)
        keep = self._fused_keep(x.shape[0], x.device, ctx)
        for name in self.block_names:
            spec = BLOCK_BY_NAME[name]
            x = self._fused_conv(x, spec) if spec.kind == "conv" else self._fused_fc(x, spec, keep.get(name))
        sizes = [geometry(self.cfg, self.block_names[-1], c).out[0] for c in COLUMNS]
        return list(x.split(sizes, dim=1))  # one tensor per column, as the per-column path returns

    def _fused_conv(self, x: Tensor, spec: BlockSpec) -> Tensor:
        halves = [self[spec.name][str(c)] for c in COLUMNS]
        weight = torch.cat([h.weight for h in halves])  # (out0 + out1, in per group, k, k)
        bias = torch.cat([h.bias for h in halves])
        geo = halves[0].geo
        x = F.conv2d(x, weight, bias, geo.stride, geo.padding, 1, 2 if spec.grouped else 1)
        if spec.lrn:
            lrn = halves[0].lrn
            # the conv output is a temporary: ReLU in place, folded into LRN's autograd node;
            # groups=2 keeps each column's window inside its own maps
            x = relu_local_response_norm_(x, lrn.size, lrn.alpha, lrn.beta, lrn.k, 2, self.lrn_kernel)
        elif spec.relu:
            x = F.relu(x, inplace=True)
        return F.max_pool2d(x, 3, 2) if spec.pool else x

    def _fused_fc(self, x: Tensor, spec: BlockSpec, keep: Tensor | None) -> Tensor:
        x = x.flatten(1)
        x = torch.cat([F.linear(x, h.weight, h.bias) for h in (self[spec.name][str(c)] for c in COLUMNS)], 1)
        if spec.relu:
            x = F.relu(x, inplace=True)
        if keep is None:
            return x
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.cfg.dropout))  # SeededDropout's op order

    def _fused_keep(self, batch: int, device: torch.device, ctx: StepContext | None) -> dict[str, Tensor]:
        """Keep-masks (B, 2 * fc_units) of the stage's dropout blocks, columns side by side, from one
        hash pass; the bits of the per-column :class:`SeededDropout`. Empty when none are drawn."""
        drop = [BLOCK_BY_NAME[n] for n in self.block_names if BLOCK_BY_NAME[n].dropout]
        if not drop or not self.training or self.cfg.dropout == 0.0:
            return {}
        ctx = StepContext.required(ctx, "dropout")
        pairs = [(s.index, c) for s in drop for c in COLUMNS]
        keep = dropout_masks(ctx, pairs, batch, self.cfg.fc_units, self.cfg.dropout, device)  # (B, 2L, U)
        keep = keep.unflatten(1, (len(drop), len(COLUMNS)))
        return {s.name: keep[:, i].flatten(1) for i, s in enumerate(drop)}


class TwoColumnAlexNet(Stage):
    """Both columns in one process, exchange = concatenation: the reference execution."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__(cfg or ModelConfig(), BLOCK_NAMES, COLUMNS)

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> Tensor:  # type: ignore[override]
        """(B, 3, S, S) images -> (B, num_classes) logits; ``ctx`` as in :meth:`Stage.run`."""
        return torch.cat(self.run([x], concat_exchange, ctx), dim=1)


# ---------------------------------------------------------------------------------------------
# Fused execution
# ---------------------------------------------------------------------------------------------


def column_sizes(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """Output rows (dim 0 of weight and bias) of each column in block ``name``."""
    return tuple(geometry(cfg, name, c).weight_shape[0] for c in COLUMNS)  # type: ignore[return-value]


def columns_to_fused(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Canonical ``{block}.{c}.{w|b}`` tensors -> fused ``{block}.{w|b}`` (concatenated on dim 0).

    Works for anything shaped like the parameters (weights, momentum buffers).
    """
    out = {}
    for name in BLOCK_NAMES:
        for p in ("weight", "bias"):
            out[f"{name}.{p}"] = torch.cat([state[f"{name}.{c}.{p}"] for c in COLUMNS], dim=0)
    return out


def fused_to_columns(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`columns_to_fused`."""
    out = {}
    for name in BLOCK_NAMES:
        sizes = column_sizes(cfg, name)
        for p in ("weight", "bias"):
            for c, part in zip(COLUMNS, torch.split(state[f"{name}.{p}"], sizes, dim=0), strict=True):
                out[f"{name}.{c}.{p}"] = part
    return out


class _Params(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)


class FusedAlexNet(nn.Module):
    """Both columns as grouped convolutions and single matmuls: the fast one-device path.

    The forward is a loop over ``BLOCKS``: a block whose input is its own column's maps
    (conv2, conv4, conv5) is a ``groups=2`` convolution (each column reads its own half);
    the others (conv1, conv3, the fc layers) read all inputs, so the columns' weights are
    simply stacked on the output dimension. LRN runs with ``groups=2`` so its window never
    crosses from one column's maps into the other's. ``state_dict()`` and
    ``load_state_dict()`` speak the canonical per-column names.
    """

    # Layout of the conv stack's activations. channels_last (NHWC) lets oneDNN (CPU) and
    # cuDNN (GPU) run the convolutions, grouped ones above all, without reordering to and
    # from their native layouts; LRN and max-pool work in either. Parameters stay contiguous
    # (state dicts and safetensors want that); only activations change layout.
    memory_format: torch.memory_format = torch.channels_last

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        canonical = {}
        for name in BLOCK_NAMES:
            for c in COLUMNS:
                canonical[f"{name}.{c}.weight"], canonical[f"{name}.{c}.bias"] = init_column_params(
                    cfg, name, c
                )
        fused = columns_to_fused(canonical)
        for name in BLOCK_NAMES:
            self.add_module(name, _Params(fused[f"{name}.weight"], fused[f"{name}.bias"]))
        self.lrn = _lrn(cfg, groups=len(COLUMNS))
        assert all(s.relu for s in BLOCKS if s.lrn), "_conv folds the ReLU before each LRN into it"
        # conv2d's (stride, padding, groups) per conv block; both columns share stride and padding
        self._conv_args = {
            s.name: (geometry(cfg, s.name, 0).stride, geometry(cfg, s.name, 0).padding, 2 if s.grouped else 1)
            for s in BLOCKS
            if s.kind == "conv"
        }
        self.register_state_dict_post_hook(FusedAlexNet._to_canonical)
        self.register_load_state_dict_pre_hook(FusedAlexNet._from_canonical)

    @staticmethod
    def _to_canonical(module: FusedAlexNet, state: dict, prefix: str, local_metadata) -> None:
        own = {k[len(prefix) :]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        for k, v in fused_to_columns(module.cfg, own).items():
            state[prefix + k] = v

    def _from_canonical(self, state: dict, prefix: str, *args) -> None:
        keys = [f"{prefix}{n}.{c}.{p}" for n in BLOCK_NAMES for c in COLUMNS for p in ("weight", "bias")]
        if all(k in state for k in keys):
            own = {k[len(prefix) :]: state.pop(k) for k in keys}
            for k, v in columns_to_fused(own).items():
                state[prefix + k] = v

    def _conv(self, x: Tensor, spec: BlockSpec) -> Tensor:
        """Convolution, ReLU (with the paper's LRN fused behind it) and max-pool, as ``spec`` says."""
        p = getattr(self, spec.name)
        stride, padding, groups = self._conv_args[spec.name]
        x = F.conv2d(x, p.weight, p.bias, stride, padding, 1, groups)
        if spec.lrn:
            lrn = self.lrn
            # ReLU + LRN in one autograd node (the conv output is a temporary; conv's backward
            # does not read it), groups=2 so the window never crosses from one column to the other
            x = relu_local_response_norm_(x, lrn.size, lrn.alpha, lrn.beta, lrn.k, lrn.groups)
        elif spec.relu:
            x = F.relu(x, inplace=True)
        return F.max_pool2d(x, 3, 2) if spec.pool else x

    def _fc(self, x: Tensor, spec: BlockSpec, keep: Tensor | None) -> Tensor:
        """Linear, ReLU where ``spec`` has one, then dropout with the scaled keep-mask ``keep``."""
        p = getattr(self, spec.name)
        x = F.linear(x.flatten(1), p.weight, p.bias)
        if spec.relu:
            x = F.relu(x, inplace=True)
        return x if keep is None else x * keep

    def _dropout_keep(self, x: Tensor, ctx: StepContext | None) -> dict[str, Tensor]:
        """Scaled keep-masks of the dropout blocks (fc6, fc7), (B, 2 * fc_units) each, columns side
        by side; empty when no dropout is drawn (eval mode, or dropout 0).

        Both layers and both columns come from one hash pass (:func:`dropout_masks`); the
        bits are those of the per-column :func:`dropout_mask` the local model uses.
        """
        drop = [s for s in BLOCKS if s.dropout]
        if not self.training or self.cfg.dropout == 0.0:
            return {}
        ctx = StepContext.required(ctx, "FusedAlexNet")
        pairs = [(s.index, c) for s in drop for c in COLUMNS]
        b, p = x.shape[0], self.cfg.dropout
        keep = dropout_masks(ctx, pairs, b, self.cfg.fc_units, p, x.device)  # (B, 2 * layers, U)
        keep = keep.to(x.dtype).mul_(1.0 / (1.0 - p)).unflatten(1, (len(drop), len(COLUMNS)))
        return {s.name: keep[:, i].flatten(1) for i, s in enumerate(drop)}

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> Tensor:
        """(B, 3, S, S) images -> (B, num_classes) logits; ``ctx`` as in :meth:`Stage.run`.

        For the paper's sizes: conv1 (B, 96, 27, 27) after its pool, conv2 (B, 256, 13, 13),
        conv3 and conv4 (B, 384, 13, 13), conv5 (B, 256, 6, 6), fc6 and fc7 (B, 4096).
        """
        return self.forward_to(x, BLOCK_NAMES[-1], ctx)

    def forward_to(self, x: Tensor, last: str, ctx: StepContext | None = None) -> Tensor:
        """The blocks up to and including ``last`` (a name of ``BLOCK_NAMES``): its output after its
        ReLU (and pool, dropout), e.g. ``"fc7"``'s (B, 2 * fc_units) features (the paper's Figure 4)."""
        if last not in BLOCK_BY_NAME:
            raise ValueError(f"layer {last!r}: use one of {', '.join(BLOCK_NAMES)}")
        keep = self._dropout_keep(x, ctx)
        x = x.contiguous(memory_format=self.memory_format)
        for spec in BLOCKS[: BLOCK_BY_NAME[last].index + 1]:
            x = self._conv(x, spec) if spec.kind == "conv" else self._fc(x, spec, keep.get(spec.name))
        return x


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the whole two-column network (60,965,224 for the paper at 1000 classes)."""
    total = 0
    for name in BLOCK_NAMES:
        for c in COLUMNS:
            w = geometry(cfg, name, c).weight_shape
            total += math.prod(w) + w[0]
    return total
