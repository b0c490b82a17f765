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

The paper's findings are switches of :class:`ModelConfig` (activation, pooling, LRN, the
one-column net, removed blocks): :func:`model_blocks` is the block list of a config (``BLOCKS``
is the paper's), :func:`net_columns` its columns, and every execution reads those two.
"""

from __future__ import annotations

import dataclasses
import functools
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
    local_response_norm,
    relu_local_response_norm_,
)

COLUMNS = (0, 1)  # the paper's two columns; a config's own are net_columns(cfg)


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
    act: bool = True  # an activation follows (model.activation: ReLU in the paper)
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
    BlockSpec("fc8", 7, "fc", "both", act=False),
)
BLOCK_NAMES: tuple[str, ...] = tuple(b.name for b in BLOCKS)


@functools.cache
def model_blocks(cfg: ModelConfig) -> tuple[BlockSpec, ...]:
    """The blocks of ``cfg``'s network: ``BLOCKS`` without ``cfg.remove_blocks`` and with LRN only
    if ``cfg.lrn``. A removed block's exchange passes to the next block (conv4 reads both columns
    when conv3 is gone); the one-column net has no exchange (every block reads its own column);
    blocks keep their paper ``index`` (initialisation and dropout keys)."""
    out: list[BlockSpec] = []
    exchange_pending = False
    for b in BLOCKS:
        if b.name in cfg.remove_blocks:
            exchange_pending |= b.exchange
            continue
        inp = "both" if exchange_pending else b.input
        inp = "own" if cfg.columns == 1 and inp == "both" else inp  # one column: nothing to exchange
        out.append(dataclasses.replace(b, input=inp, lrn=b.lrn and cfg.lrn))
        exchange_pending = False
    return tuple(out)


def block_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Names of ``cfg``'s blocks, in order (what grid cuts name)."""
    return tuple(b.name for b in model_blocks(cfg))


def block_spec(cfg: ModelConfig, name: str) -> BlockSpec:
    """Block ``name`` of ``cfg``'s network; a removed or unknown one is an error naming the blocks."""
    for b in model_blocks(cfg):
        if b.name == name:
            return b
    raise ValueError(
        f"block {name!r} is not in this model (model.remove_blocks); its blocks are {block_names(cfg)}"
    )


def previous_block(cfg: ModelConfig, name: str) -> str:
    """The block before ``name`` in ``cfg``'s network (whose output is ``name``'s input)."""
    names = block_names(cfg)
    i = names.index(block_spec(cfg, name).name)
    if i == 0:
        raise ValueError(f"block {name!r} is the first: its input is the image")
    return names[i - 1]


def net_columns(cfg: ModelConfig) -> tuple[int, ...]:
    """The columns of ``cfg``'s network: (0, 1), or (0,) for the one-column net."""
    return tuple(range(cfg.columns))


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
    geos = _geometries(cfg)
    if name not in geos:
        block_spec(cfg, name)  # the error naming the model's blocks
    return geos[name][column]


@functools.cache
def _geometries(cfg: ModelConfig) -> dict[str, tuple[LayerGeometry, ...]]:
    """Every block's per-column shapes, walking ``cfg``'s blocks from the image: a block reads its
    predecessor's output (all columns' at an exchange point)."""
    widths = dict(zip(("conv1", "conv2", "conv3", "conv4", "conv5"), cfg.conv_widths(), strict=True))
    widths.update(fc6=cfg.fc_width(), fc7=cfg.fc_width())
    z, st = cfg.pool_window
    k2 = cfg.conv2_kernel
    conv_args = {"conv1": (cfg.conv1_kernel, cfg.conv1_stride, cfg.conv1_padding), "conv2": (k2, 1, k2 // 2)}
    n = cfg.columns
    prev: tuple[int, ...] = (cfg.in_channels, cfg.input_size, cfg.input_size)  # one column's input
    out: dict[str, tuple[LayerGeometry, ...]] = {}
    for spec in model_blocks(cfg):
        fan = n if spec.exchange else 1  # an exchange point reads every column's maps
        geos = []
        for c in range(n):
            width = cfg.fc8_split[c] if spec.name == "fc8" else widths[spec.name]
            if spec.kind == "conv":
                k, stride, pad = conv_args.get(spec.name, (3, 1, 1))
                side = (prev[1] + 2 * pad - k) // stride + 1
                pooled = (side - z) // st + 1 if spec.pool else side
                geo = LayerGeometry(
                    (width, prev[0] * fan, k, k), stride, pad, (width, side, side), (width, pooled, pooled)
                )
            else:
                geo = LayerGeometry((width, math.prod(prev) * fan), 1, 0, (width,), (width,))
            geos.append(geo)
        out[spec.name] = tuple(geos)
        prev = geos[0].out
    return out


def _lrn(cfg: ModelConfig, groups: int = 1, kernel: str = "eager") -> LocalResponseNorm:
    """The paper's LRN with the config's constants; ``groups=2`` normalises each column's half apart."""
    return LocalResponseNorm(
        cfg.lrn_size, cfg.lrn_alpha, cfg.lrn_beta, cfg.lrn_k, cfg.lrn_convention, groups, kernel
    )


def _init_std(cfg: ModelConfig, spec: BlockSpec, weight_shape: tuple[int, ...]) -> float:
    """The std of one block's initial weights: ``fc8_init_std`` for the logits layer (no activation
    follows it, and small logits start the softmax near uniform), else ``init_std``; 0 means He
    (sqrt(2 / fan_in), which keeps a ReLU layer's activations at its input's scale). Under tanh,
    LeCun's sqrt(1 / fan_in) for the layers tanh follows (see :class:`ModelConfig`)."""
    fan_in = math.prod(weight_shape[1:])  # of one output unit
    if spec.act and cfg.activation == "tanh":
        return math.sqrt(1.0 / fan_in)
    std = cfg.init_std if spec.act else cfg.fc8_init_std
    if std > 0:
        return std
    return math.sqrt(2.0 / fan_in)


def init_column_params(cfg: ModelConfig, name: str, column: int) -> tuple[Tensor, Tensor]:
    """The initial (weight, bias) of one column of one block (see :class:`ModelConfig`).

    The paper's: weights ~ N(0, 0.01), biases 1 in conv2, conv4, conv5, fc6, fc7 and 0
    elsewhere; the small variant's: He weights with biases 0, fc8 ~ N(0, 0.01). Drawn from a
    generator keyed by (seed, block, column), so any split of the model into stages and ranks
    starts from the same weights.
    """
    spec, geo = block_spec(cfg, name), geometry(cfg, name, column)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + spec.index * 16 + column)
    w = torch.empty(geo.weight_shape).normal_(0.0, _init_std(cfg, spec, geo.weight_shape), generator=gen)
    one = spec.bias_one and cfg.activation == "relu"  # tanh: biases 0 (bias 1 saturates it)
    b = torch.full((geo.weight_shape[0],), cfg.init_bias if one else 0.0)
    return w, b


def _activate(cfg: ModelConfig, x: Tensor) -> Tensor:
    """``model.activation`` on a temporary (in place for ReLU, as the paper's layers do)."""
    return F.relu(x, inplace=True) if cfg.activation == "relu" else torch.tanh(x)


class ColumnBlock(nn.Module):
    """One column's half of one block: conv or linear, then ReLU, LRN, pool, dropout as the paper
    (the activation, LRN and pooling as ``cfg`` switches them)."""

    def __init__(self, cfg: ModelConfig, name: str, column: int, lrn_kernel: str = "eager") -> None:
        super().__init__()
        self.cfg, self.spec, self.column = cfg, block_spec(cfg, name), column
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
        if self.spec.act:
            x = _activate(self.cfg, x)
        if self.lrn is not None:
            x = self.lrn(x)
        if self.spec.pool:
            x = F.max_pool2d(x, *self.cfg.pool_window)
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
        all_names, cols = block_names(cfg), net_columns(cfg)
        for n in blocks:
            block_spec(cfg, n)  # a removed or unknown block: the error naming the model's blocks
        names = [n for n in all_names if n in set(blocks)]
        if list(blocks) != names or not names:
            raise ValueError(f"blocks {list(blocks)} are not a contiguous run of {all_names}")
        first = all_names.index(names[0])
        if all_names[first : first + len(names)] != tuple(names):
            raise ValueError(f"blocks {list(blocks)} are not a contiguous run of {all_names}")
        if not columns or any(c not in cols for c in columns) or sorted(set(columns)) != list(columns):
            subsets = "(0,)" if cols == (0,) else "(0,), (1,) or (0, 1)"
            raise ValueError(f"columns {list(columns)}: this {len(cols)}-column net takes {subsets}")
        if fused and tuple(columns) != cols:
            raise ValueError(f"a fused stage holds every column {cols}, got columns {list(columns)}")
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
            spec = block_spec(self.cfg, name)
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
        first = block_spec(self.cfg, self.block_names[0])
        x = xs[0] if first.input == "image" else torch.cat(xs, dim=1)  # (B, every column's maps, ...)
        keep = self._fused_keep(x.shape[0], x.device, ctx)
        for name in self.block_names:
            spec = block_spec(self.cfg, name)
            x = self._fused_conv(x, spec) if spec.kind == "conv" else self._fused_fc(x, spec, keep.get(name))
        sizes = [geometry(self.cfg, self.block_names[-1], c).out[0] for c in self.columns]
        return list(x.split(sizes, dim=1))  # one tensor per column, as the per-column path returns

    def _fused_conv(self, x: Tensor, spec: BlockSpec) -> Tensor:
        halves = [self[spec.name][str(c)] for c in self.columns]
        weight = torch.cat([h.weight for h in halves])  # (out0 + out1, in per group, k, k)
        bias = torch.cat([h.bias for h in halves])
        geo, n = halves[0].geo, len(halves)
        x = F.conv2d(x, weight, bias, geo.stride, geo.padding, 1, n if spec.grouped else 1)
        if spec.lrn and self.cfg.activation == "relu":
            lrn = halves[0].lrn
            # the conv output is a temporary: ReLU in place, folded into LRN's autograd node;
            # groups=n keeps each column's window inside its own maps
            x = relu_local_response_norm_(x, lrn.size, lrn.alpha, lrn.beta, lrn.k, n, self.lrn_kernel)
        else:
            x = _activate(self.cfg, x) if spec.act else x
            if spec.lrn:
                lrn = halves[0].lrn
                x = local_response_norm(x, lrn.size, lrn.alpha, lrn.beta, lrn.k, n, self.lrn_kernel)
        return F.max_pool2d(x, *self.cfg.pool_window) if spec.pool else x

    def _fused_fc(self, x: Tensor, spec: BlockSpec, keep: Tensor | None) -> Tensor:
        x = x.flatten(1)
        halves = [self[spec.name][str(c)] for c in self.columns]
        x = torch.cat([F.linear(x, h.weight, h.bias) for h in halves], 1)
        if spec.act:
            x = _activate(self.cfg, x)
        if keep is None:
            return x
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.cfg.dropout))  # SeededDropout's op order

    def _fused_keep(self, batch: int, device: torch.device, ctx: StepContext | None) -> dict[str, Tensor]:
        """Keep-masks (B, columns * fc width) of the stage's dropout blocks, columns side by side, from
        one hash pass; the bits of the per-column :class:`SeededDropout`. Empty when none are drawn."""
        drop = [s for s in (block_spec(self.cfg, n) for n in self.block_names) if s.dropout]
        if not drop or not self.training or self.cfg.dropout == 0.0:
            return {}
        ctx = StepContext.required(ctx, "dropout")
        pairs = [(s.index, c) for s in drop for c in self.columns]
        keep = dropout_masks(ctx, pairs, batch, self.cfg.fc_width(), self.cfg.dropout, device)  # (B, nL, U)
        keep = keep.unflatten(1, (len(drop), len(self.columns)))
        return {s.name: keep[:, i].flatten(1) for i, s in enumerate(drop)}


class TwoColumnAlexNet(Stage):
    """Both columns in one process, exchange = concatenation: the reference execution (of the
    one-column net too, when ``cfg.columns`` is 1: its one column, no exchanges)."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        cfg = cfg or ModelConfig()
        super().__init__(cfg, block_names(cfg), net_columns(cfg))

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> Tensor:  # type: ignore[override]
        """(B, 3, S, S) images -> (B, num_classes) logits; ``ctx`` as in :meth:`Stage.run`."""
        return torch.cat(self.run([x], concat_exchange, ctx), dim=1)


# ---------------------------------------------------------------------------------------------
# Fused execution
# ---------------------------------------------------------------------------------------------


def column_sizes(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Output rows (dim 0 of weight and bias) of each column in block ``name``."""
    return tuple(geometry(cfg, name, c).weight_shape[0] for c in net_columns(cfg))


def columns_to_fused(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Canonical ``{block}.{c}.{w|b}`` tensors -> fused ``{block}.{w|b}`` (concatenated on dim 0).

    Works for anything shaped like the parameters (weights, momentum buffers).
    """
    out = {}
    for name in block_names(cfg):
        for p in ("weight", "bias"):
            out[f"{name}.{p}"] = torch.cat([state[f"{name}.{c}.{p}"] for c in net_columns(cfg)], dim=0)
    return out


def fused_to_columns(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`columns_to_fused`."""
    out = {}
    for name in block_names(cfg):
        sizes = column_sizes(cfg, name)
        for p in ("weight", "bias"):
            parts = torch.split(state[f"{name}.{p}"], sizes, dim=0)
            for c, part in zip(net_columns(cfg), parts, strict=True):
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
        self.blocks, self.columns = model_blocks(cfg), net_columns(cfg)
        canonical = {}
        for name in block_names(cfg):
            for c in self.columns:
                canonical[f"{name}.{c}.weight"], canonical[f"{name}.{c}.bias"] = init_column_params(
                    cfg, name, c
                )
        fused = columns_to_fused(cfg, canonical)
        for name in block_names(cfg):
            self.add_module(name, _Params(fused[f"{name}.weight"], fused[f"{name}.bias"]))
        n = len(self.columns)
        self.lrn = _lrn(cfg, groups=n)
        assert all(s.act for s in BLOCKS if s.lrn), "_conv folds the ReLU before each LRN into it"
        # conv2d's (stride, padding, groups) per conv block; every column shares stride and padding
        self._conv_args = {
            s.name: (geometry(cfg, s.name, 0).stride, geometry(cfg, s.name, 0).padding, n if s.grouped else 1)
            for s in self.blocks
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
        names = block_names(self.cfg)
        keys = [f"{prefix}{n}.{c}.{p}" for n in names for c in self.columns for p in ("weight", "bias")]
        if all(k in state for k in keys):
            own = {k[len(prefix) :]: state.pop(k) for k in keys}
            for k, v in columns_to_fused(self.cfg, own).items():
                state[prefix + k] = v

    def _conv(self, x: Tensor, spec: BlockSpec) -> Tensor:
        """Convolution, ReLU (with the paper's LRN fused behind it) and max-pool, as ``spec`` says."""
        p = getattr(self, spec.name)
        stride, padding, groups = self._conv_args[spec.name]
        x = F.conv2d(x, p.weight, p.bias, stride, padding, 1, groups)
        lrn = self.lrn
        if spec.lrn and self.cfg.activation == "relu":
            # ReLU + LRN in one autograd node (the conv output is a temporary; conv's backward
            # does not read it), groups=2 so the window never crosses from one column to the other
            x = relu_local_response_norm_(x, lrn.size, lrn.alpha, lrn.beta, lrn.k, lrn.groups)
        else:
            x = _activate(self.cfg, x) if spec.act else x
            x = lrn(x) if spec.lrn else x
        return F.max_pool2d(x, *self.cfg.pool_window) if spec.pool else x

    def _fc(self, x: Tensor, spec: BlockSpec, keep: Tensor | None) -> Tensor:
        """Linear, ReLU where ``spec`` has one, then dropout with the scaled keep-mask ``keep``."""
        p = getattr(self, spec.name)
        x = F.linear(x.flatten(1), p.weight, p.bias)
        if spec.act:
            x = _activate(self.cfg, x)
        return x if keep is None else x * keep

    def _dropout_keep(self, x: Tensor, ctx: StepContext | None) -> dict[str, Tensor]:
        """Scaled keep-masks of the dropout blocks (fc6, fc7), (B, columns * fc width) each, columns
        side by side; empty when no dropout is drawn (eval mode, or dropout 0).

        Both layers and every column come from one hash pass (:func:`dropout_masks`); the
        bits are those of the per-column :func:`dropout_mask` the local model uses.
        """
        drop = [s for s in self.blocks if s.dropout]
        if not self.training or self.cfg.dropout == 0.0:
            return {}
        ctx = StepContext.required(ctx, "FusedAlexNet")
        pairs = [(s.index, c) for s in drop for c in self.columns]
        b, p = x.shape[0], self.cfg.dropout
        keep = dropout_masks(ctx, pairs, b, self.cfg.fc_width(), p, x.device)  # (B, columns * layers, U)
        keep = keep.to(x.dtype).mul_(1.0 / (1.0 - p)).unflatten(1, (len(drop), len(self.columns)))
        return {s.name: keep[:, i].flatten(1) for i, s in enumerate(drop)}

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> Tensor:
        """(B, 3, S, S) images -> (B, num_classes) logits; ``ctx`` as in :meth:`Stage.run`.

        For the paper's sizes: conv1 (B, 96, 27, 27) after its pool, conv2 (B, 256, 13, 13),
        conv3 and conv4 (B, 384, 13, 13), conv5 (B, 256, 6, 6), fc6 and fc7 (B, 4096).
        """
        return self.forward_to(x, self.blocks[-1].name, ctx)

    def forward_to(self, x: Tensor, last: str, ctx: StepContext | None = None) -> Tensor:
        """The blocks up to and including ``last`` (a block of this model): its output after its
        activation (and pool, dropout), e.g. ``"fc7"``'s (B, 2 * fc_units) features (the paper's
        Figure 4)."""
        names = [b.name for b in self.blocks]
        if last not in names:
            raise ValueError(f"layer {last!r}: use one of {', '.join(names)}")
        keep = self._dropout_keep(x, ctx)
        x = x.contiguous(memory_format=self.memory_format)
        for spec in self.blocks[: [b.name for b in self.blocks].index(last) + 1]:
            x = self._conv(x, spec) if spec.kind == "conv" else self._fc(x, spec, keep.get(spec.name))
        return x


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the whole network (60,965,224 for the paper at 1000 classes)."""
    total = 0
    for name in block_names(cfg):
        for c in net_columns(cfg):
            w = geometry(cfg, name, c).weight_shape
            total += math.prod(w) + w[0]
    return total
