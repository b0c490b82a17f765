"""The learning-rate rule (the ``[schedule]`` config section), applied at each epoch end."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cluster.config import ScheduleSection


@dataclass
class LRSchedule:
    """The paper's rule: divide the rate by 10 when validation error stops improving, at most N times.

    ``rule.kind = "constant"`` keeps the rate. The state (``lr``, ``best``, ``bad_epochs``,
    ``reductions``) is plain data, so it round-trips through the checkpoint manifest as JSON.
    """

    rule: ScheduleSection
    lr: float
    best: float = math.inf
    bad_epochs: int = 0
    reductions: int = 0

    def update(self, val_error: float) -> bool:
        """Feed one epoch's validation top-1 error; True when the rate was just reduced."""
        r = self.rule
        if r.kind == "constant":
            return False
        if val_error < self.best - r.threshold:
            self.best, self.bad_epochs = val_error, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= r.patience and self.reductions < r.max_reductions:
            self.lr *= r.factor
            self.reductions += 1
            self.bad_epochs = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """The state as JSON (the manifest's ``schedule`` entry; ``best`` is null before any epoch)."""
        return {
            "lr": self.lr,
            "best": None if math.isinf(self.best) else self.best,
            "bad_epochs": self.bad_epochs,
            "reductions": self.reductions,
        }

    @classmethod
    def from_state(cls, rule: ScheduleSection, d: dict[str, Any]) -> LRSchedule:
        """Inverse of :meth:`state_dict`, under ``rule``."""
        best = math.inf if d.get("best") is None else float(d["best"])
        return cls(rule, float(d["lr"]), best, int(d["bad_epochs"]), int(d["reductions"]))
