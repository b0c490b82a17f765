"""The (replica, stage, column) layout of the ranks: one checked object, plain Python.

Ranks are numbered ``rank = (r * S + s) * C + c``: the columns of one stage are neighbours
(so a placement that packs consecutive ranks puts a stage's all-gather on one node), then
the stages of one replica, then the replicas.

Groups (lists of global ranks, in group-rank order):

* column group (same r, s): the all-gathers at the exchange points, column 0 first;
* pipeline group (same r, c): activations forward and gradients back, stage 0 first;
* data-parallel group (same s, c): gradients summed across replicas, replica 0 first.

Stage cuts are block names: ``cuts[i]`` is the first block of stage ``i + 1``. Without
cuts, :func:`default_cuts` balances the paper network's forward MACs per stage.

The grid also holds what it needs of the model (:meth:`Grid.for_model`): its block names (a
net without conv3 or conv4 has fewer, and cuts name the remaining ones) and its number of
columns (the one-column net of the paper's section 3.2 runs on C = 1 only).
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from typing import Any

from alexnet.config import ModelConfig
from alexnet.info import block_macs
from alexnet.model import BLOCK_NAMES, block_names


@functools.cache
def _paper_block_macs() -> dict[str, int]:
    """Forward MACs of each block of the paper network (``alexnet info``). Only a default split's
    weights: backward costs about 2x forward for every block, so the ratios hold for a whole step."""
    return block_macs(ModelConfig())


def default_cuts(
    stages: int, cost: dict[str, float] | None = None, blocks: tuple[str, ...] = BLOCK_NAMES
) -> tuple[str, ...]:
    """Cut points splitting ``blocks`` (the paper's 8) into ``stages`` contiguous runs of balanced cost.

    Minimises the most expensive stage (exact, by dynamic programming over the blocks);
    ``cost`` maps block name -> relative cost (default: the paper network's forward MACs).
    """
    if not 1 <= stages <= len(blocks):
        raise ValueError(f"stages={stages}: use 1..{len(blocks)} (the network has {len(blocks)} blocks)")
    w = [float((cost or _paper_block_macs())[n]) for n in blocks]
    n = len(w)
    prefix = [0.0]
    for x in w:
        prefix.append(prefix[-1] + x)
    inf = float("inf")
    # best[k][i]: the smallest possible max-stage cost of blocks[:i] in k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    arg = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], arg[k][i] = v, j
    starts, i = [], n
    for k in range(stages, 0, -1):
        i = arg[k][i]
        starts.append(i)
    return tuple(blocks[j] for j in sorted(starts)[1:])


def parse_shape(shape: str) -> tuple[int, int, int]:
    """``"2x2x2"`` -> (replicas, stages, columns): the one parser of the grid's text form."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*", shape or "")
    if not m:
        raise ValueError(f"grid {shape!r}: write it as RxSxC (replicas x stages x columns), e.g. 2x2x2")
    r, s, c = (int(g) for g in m.groups())
    return r, s, c


@dataclass(frozen=True)
class Grid:
    """R x S x C ranks, M micro-batches per step, the global batch, the stage cuts, the schedule
    (the order of a stage's micro-batch forwards and backwards: ``pipeline.schedules``).

    Refuses, when built: non-positive sizes, C not in {1, 2}, C = 2 for a one-column net,
    more stages than blocks, bad cuts (a removed block's included), a global batch that does
    not split into R replicas x M micro-batches, and an unknown schedule (or one that cannot
    run M micro-batches over S stages).

    ``blocks`` and ``net_columns`` are the model's (:meth:`for_model`): its block names and its
    number of columns (2 for the paper's net, 1 for the one-column net).
    """

    replicas: int
    stages: int
    columns: int
    microbatches: int
    global_batch: int
    cuts: tuple[str, ...] | None = None
    schedule: str = "1f1b"
    blocks: tuple[str, ...] = BLOCK_NAMES
    net_columns: int = 2

    def __post_init__(self) -> None:
        for name in ("replicas", "stages", "microbatches", "global_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"grid {name}={v!r}: must be a positive integer")
        if self.columns not in (1, 2):
            raise ValueError(
                f"grid columns={self.columns!r}: use 2 (one rank per column, the paper's two GPUs) "
                "or 1 (both columns in one rank)"
            )
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.net_columns == 1 and self.columns == 2:
            raise ValueError(
                "grid columns=2 puts one network column on each of two ranks, but the one-column net "
                "(model.columns=1) has a single column and nothing to exchange: use C = 1 (e.g. "
                "grid.shape=1x2x1), where a rank holds every column the model has"
            )
        if self.stages > len(self.blocks):
            raise ValueError(
                f"grid stages={self.stages}: the network has {len(self.blocks)} blocks "
                f"({', '.join(self.blocks)}); use at most {len(self.blocks)} stages"
            )
        if self.global_batch % (self.replicas * self.microbatches):
            raise ValueError(
                f"global_batch={self.global_batch} does not split into replicas={self.replicas} x "
                f"microbatches={self.microbatches} equal micro-batches: make the batch a multiple of "
                f"{self.replicas * self.microbatches} or change the micro-batch count"
            )
        cuts = default_cuts(self.stages, blocks=self.blocks) if self.cuts is None else tuple(self.cuts)
        self._check_cuts(cuts)
        object.__setattr__(self, "cuts", cuts)
        from pipeline.schedules import make_schedule  # a schedule refuses impossible setups itself

        make_schedule(self.schedule, self.stages, self.microbatches)

    def _check_cuts(self, cuts: tuple[str, ...]) -> None:
        if len(cuts) != self.stages - 1:
            raise ValueError(
                f"grid cuts={list(cuts)}: give {self.stages - 1} block names (the first block of "
                f"stages 1..{self.stages - 1}), or none for the default split"
            )
        removed = [c for c in cuts if c in BLOCK_NAMES and c not in self.blocks]
        if removed:
            raise ValueError(
                f"grid cuts={list(cuts)}: {removed} removed from this model (model.remove_blocks); "
                f"cut at one of its blocks {list(self.blocks[1:])}"
            )
        unknown = [c for c in cuts if c not in self.blocks]
        if unknown:
            raise ValueError(f"grid cuts: unknown block(s) {unknown}; blocks are {list(self.blocks)}")
        idx = [self.blocks.index(c) for c in cuts]
        if idx and (idx[0] == 0 or any(b <= a for a, b in zip(idx, idx[1:], strict=False))):
            raise ValueError(
                f"grid cuts={list(cuts)}: must be strictly increasing block names after conv1, so "
                "that every stage holds at least one block"
            )

    # -- sizes -------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.replicas * self.stages * self.columns

    @property
    def replica_batch(self) -> int:
        """Rows of the global batch each replica takes (B / R)."""
        return self.global_batch // self.replicas

    @property
    def microbatch_size(self) -> int:
        """Rows per micro-batch (B / (R * M))."""
        return self.global_batch // (self.replicas * self.microbatches)

    # -- coordinates -------------------------------------------------------------------------
    def coords(self, rank: int) -> tuple[int, int, int]:
        """Global rank -> (replica, stage, column)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank}: grid {self.shape} has ranks 0..{self.world_size - 1}")
        rs, c = divmod(rank, self.columns)
        r, s = divmod(rs, self.stages)
        return r, s, c

    def rank_of(self, r: int, s: int, c: int) -> int:
        """(replica, stage, column) -> global rank."""
        if not (0 <= r < self.replicas and 0 <= s < self.stages and 0 <= c < self.columns):
            raise ValueError(f"coordinates {(r, s, c)} are outside grid {self.shape}")
        return (r * self.stages + s) * self.columns + c

    def stage_blocks(self, s: int) -> tuple[str, ...]:
        """The contiguous run of block names stage ``s`` computes."""
        starts = [0] + [self.blocks.index(c) for c in self.cuts] + [len(self.blocks)]
        return self.blocks[starts[s] : starts[s + 1]]

    def columns_of(self, c: int) -> tuple[int, ...]:
        """The network columns column-rank ``c`` holds: every column the model has when C=1
        ((0, 1), or (0,) for the one-column net), else (c,)."""
        return tuple(range(self.net_columns)) if self.columns == 1 else (c,)

    # -- groups (global rank lists) ----------------------------------------------------------
    def column_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(r, s, c) for c in range(self.columns)]
            for r in range(self.replicas)
            for s in range(self.stages)
        ]

    def pipeline_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(r, s, c) for s in range(self.stages)]
            for r in range(self.replicas)
            for c in range(self.columns)
        ]

    def data_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(r, s, c) for r in range(self.replicas)]
            for s in range(self.stages)
            for c in range(self.columns)
        ]

    # -- text and JSON -----------------------------------------------------------------------
    @property
    def shape(self) -> str:
        return f"{self.replicas}x{self.stages}x{self.columns}"

    @classmethod
    def parse(
        cls,
        shape: str,
        microbatches: int = 1,
        global_batch: int = 1,
        cuts: tuple[str, ...] | None = None,
        schedule: str = "1f1b",
        model: ModelConfig | None = None,
    ) -> Grid:
        """``Grid.parse("2x2x2", microbatches=4, global_batch=32)``: replicas x stages x columns;
        ``model``: the network it runs (default: the paper's blocks and columns)."""
        r, s, c = parse_shape(shape)
        return cls(r, s, c, microbatches, global_batch, cuts, schedule, **model_fields(model))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cuts"] = list(self.cuts or ())
        d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grid:
        return cls(
            replicas=int(d["replicas"]),
            stages=int(d["stages"]),
            columns=int(d["columns"]),
            microbatches=int(d["microbatches"]),
            global_batch=int(d["global_batch"]),
            cuts=tuple(d["cuts"]) if d.get("cuts") is not None else None,
            schedule=str(d.get("schedule", "1f1b")),
            blocks=tuple(d.get("blocks") or BLOCK_NAMES),
            net_columns=int(d.get("net_columns", 2)),
        )

    def check_model(self, cfg: ModelConfig) -> None:
        """Refuse a model this grid was not laid out for (other blocks or columns)."""
        want = model_fields(cfg)
        if (self.blocks, self.net_columns) != (want["blocks"], want["net_columns"]):
            raise ValueError(
                f"grid {self.shape} was laid out for blocks {list(self.blocks)} in {self.net_columns} "
                f"column(s), the model has {list(want['blocks'])} in {want['net_columns']}: build the "
                "grid with Grid.parse(..., model=cfg)"
            )


def model_fields(cfg: ModelConfig | None) -> dict[str, Any]:
    """The :class:`Grid` fields of a model: its block names and its number of columns."""
    if cfg is None:
        return {"blocks": BLOCK_NAMES, "net_columns": 2}
    return {"blocks": block_names(cfg), "net_columns": cfg.columns}
