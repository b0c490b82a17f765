"""Micro-batch schedules: the order in which one stage runs its forwards and backwards.

Each schedule is a small class behind one interface (:class:`Schedule`): it turns
(stage, stages, micro-batches) into a list of :class:`Action`; the engine executes the list,
receiving inputs before a forward and output gradients before a backward, point to point.
Every stage runs its backwards in micro-batch order, so the gradients stage ``s + 1`` sends
arrive in the order stage ``s`` receives them; sends are asynchronous and receives blocking,
which is deadlock-free for both orders below.

Why not ``torch.distributed.pipelining`` (evaluated, torch 2.14): its ``PipelineStage`` is one
rank per stage and its schedules own the forward call, while a stage here is a *pair* of
ranks (one per column) whose forward runs all-gathers on the column group between P2P
transfers. It also (a) infers shapes by running the stage on meta tensors, where the
exchange's collectives cannot run; (b) splits only stage 0's inputs into micro-batches,
but the dropout masks in later stages need each micro-batch's global sample indices;
(c) records no per-action timestamps for the timeline and the compute / exchange / wait
split; (d) does its P2P with ``batch_isend_irecv``, which can hang on gloo (pytorch
#132644). The two schedules are a dozen lines each, so they are written here.

Both schedules run any M >= 1 (1F1B with M < S has no steady phase and runs in GPipe's
order), so "fewer micro-batches than stages" needs no refusal; an unknown schedule name
or M < 1 is refused when the schedule (and so the Grid) is built.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    """Run the forward ("F") or backward ("B") of micro-batch ``mb`` on this stage."""

    kind: str
    mb: int


class Schedule(ABC):
    """The order of one stage's forwards and backwards over M micro-batches."""

    name: str = ""

    def __init__(self, stages: int, microbatches: int) -> None:
        if stages < 1:
            raise ValueError(f"schedule {self.name}: stages={stages} must be >= 1")
        if microbatches < 1:
            raise ValueError(f"schedule {self.name}: microbatches={microbatches} must be >= 1")
        self.stages, self.microbatches = stages, microbatches

    @abstractmethod
    def actions(self, stage: int) -> list[Action]:
        """Stage ``stage``'s actions, in order; each micro-batch's F once, then its B once."""

    def max_in_flight(self, stage: int) -> int:
        """Most micro-batches whose activations ``stage`` holds at once (forward done, backward not)."""
        live = peak = 0
        for a in self.actions(stage):
            live += 1 if a.kind == "F" else -1
            peak = max(peak, live)
        return peak


class GPipe(Schedule):
    """All forwards, then all backwards (Huang et al. 2019). Holds all M micro-batches' activations."""

    name = "gpipe"

    def actions(self, stage: int) -> list[Action]:
        m = range(self.microbatches)
        return [Action("F", i) for i in m] + [Action("B", i) for i in m]


class OneFOneB(Schedule):
    """1F1B (PipeDream-flush, Narayanan et al. 2021): S - s - 1 warm-up forwards, then one
    forward and one backward alternately, then the remaining backwards. Stage s holds at
    most S - s micro-batches' activations instead of M."""

    name = "1f1b"

    def actions(self, stage: int) -> list[Action]:
        m = self.microbatches
        warmup = min(self.stages - stage - 1, m)
        out = [Action("F", i) for i in range(warmup)]
        for i in range(m - warmup):
            out += [Action("F", warmup + i), Action("B", i)]
        out += [Action("B", i) for i in range(m - warmup, m)]
        return out


SCHEDULE_CLASSES: dict[str, type[Schedule]] = {"gpipe": GPipe, "1f1b": OneFOneB}


def make_schedule(name: str, stages: int, microbatches: int) -> Schedule:
    """Build (and so validate) the schedule called ``name``."""
    if name not in SCHEDULE_CLASSES:
        raise ValueError(f"schedule={name!r}: use one of {sorted(SCHEDULE_CLASSES)}")
    return SCHEDULE_CLASSES[name](stages, microbatches)
