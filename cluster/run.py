"""A run, resolved once: what every part of the job takes and none of them works out again.

:func:`resolve_run` runs on the driver before any actor starts: it takes the checked job config,
the dataset's plan (:mod:`cluster.plan`) and the resume point's stream layout, and fixes what the
config leaves to "auto": the ranks' device kind, the process groups' backend and where JPEGs are
decoded. Before it (and before the dataset's plan, which depends on the grid through the global
batch), :func:`resolve_grid` fixes ``grid.shape = "auto"`` from the cluster's resources. The
coordinator, the trainer group, the data workers and every trainer rank receive the
:class:`Run` as it is (Ray pickles it: nothing is parsed or validated again in an actor), and the
grid is the one :class:`pipeline.grid.Grid` the config's validation built.
"""

from __future__ import annotations

from dataclasses import dataclass

from alexnet.config import ModelConfig
from cluster.config import JobConfig
from cluster.plan import RunPlan
from cluster.scaling import Resources, choose_grid
from pipeline.grid import Grid


@dataclass(frozen=True)
class Run:
    """The resolved run (see the module docstring).

    ``device``: the trainer ranks' device kind (``cuda`` or ``cpu``; a rank takes the GPU Ray
    gave it); ``backend``: ``nccl`` or ``gloo``; ``decode``: ``worker`` (the data workers ship
    decoded crops) or ``device`` (they ship JPEG bytes, the stage-0 ranks decode).
    """

    cfg: JobConfig
    data_url: str
    grid: Grid
    plan: RunPlan
    model: ModelConfig
    device: str
    backend: str
    decode: str

    @property
    def decode_on_device(self) -> bool:
        """Whether the stage-0 ranks decode the JPEGs."""
        return self.decode == "device"


def resolve_grid(
    cfg: JobConfig, resources: Resources, gpu_memory_gb: float = 0.0
) -> tuple[JobConfig, list[str]]:
    """``cfg`` with ``grid.shape = "auto"`` replaced by the grid :func:`cluster.scaling.choose_grid`
    picks for ``resources`` (read once, by the caller, before any actor starts), and the lines to
    print: the choice and why, then any warning (a per-replica batch too small for a GPU). An
    explicit shape comes back as it is, with no lines. From here on the run sees an explicit grid."""
    if not cfg.grid.is_auto:
        return cfg, []
    choice = choose_grid(resources, cfg, gpu_memory_gb)
    resolved = cfg.replace(**{"grid.shape": choice.shape})
    return resolved, [choice.line, *(f"warning: {w}" for w in choice.warnings)]


def resolve_run(cfg: JobConfig, data_url: str, plan: RunPlan) -> Run:
    """The :class:`Run` of a checked ``cfg`` on the dataset at ``data_url`` (``plan``: its
    :class:`cluster.plan.RunPlan`, with the resume point's streams)."""
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and cfg.grid.gpus_per_rank > 0)
    run = Run(
        cfg=cfg,
        data_url=data_url,
        grid=cfg.to_grid(),
        plan=plan,
        model=cfg.model_config(),
        device="cuda" if cuda else "cpu",
        backend="nccl" if cfg.uses_nccl() else "gloo",
        decode="device" if cfg.decode_on_device() else "worker",
    )
    if cfg.data.decode == "device" and not cuda:
        print(
            "[alexnet] data.decode=device on a CPU run: the stage-0 ranks decode the JPEGs on their "
            "CPU (the same pixels as data.decode=worker, which leaves it to the data workers)",
            flush=True,
        )
    return run
