"""The learning-rate rule (the [schedule] section)."""

from __future__ import annotations

import math

from cluster.config import load_config
from cluster.lr_schedule import LRSchedule


def test_plateau_divides_lr_at_most_n_times():
    rule = load_config(preset="paper").schedule
    s = LRSchedule(rule, 0.01)
    errs = [0.9, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    lrs = []
    for e in errs:
        s.update(e)
        lrs.append(s.lr)
    assert math.isclose(lrs[2], 1e-3) and math.isclose(lrs[4], 1e-4) and math.isclose(lrs[5], 1e-5)
    assert math.isclose(lrs[-1], 1e-5) and s.reductions == 3
    assert LRSchedule.from_state(rule, s.state_dict()) == s


def test_constant_never_changes_and_state_starts_without_a_best():
    rule = load_config(preset="paper", overrides={"schedule.kind": "constant"}).schedule
    s = LRSchedule(rule, 0.01)
    assert s.state_dict() == {"lr": 0.01, "best": None, "bad_epochs": 0, "reductions": 0}
    assert not any(s.update(0.9) for _ in range(5)) and s.lr == 0.01
