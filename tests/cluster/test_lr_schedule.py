"""The learning-rate rule (the [schedule] section): plateau under validation noise, step, state, refusals."""

from __future__ import annotations

import math
import random

import pytest

from cluster.config import ScheduleSection, load_config
from cluster.lr_schedule import LRSchedule

# The noise model: the sampling noise of top-1 error on 50,000 validation images is about
# sqrt(0.45 * 0.55 / 50000) = 0.22 pp; each epoch's measurement is the true error plus
# Gaussian noise with sd 0.2 pp, independent across epochs. 400 seeded runs of 90 epochs.
NOISE_SD, EPOCHS, RUNS = 0.002, 90, 400


def _noisy(true_error, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [true_error(e) + rng.gauss(0.0, NOISE_SD) for e in range(EPOCHS)]


def _cuts(rule: ScheduleSection, errors: list[float | None], lr: float = 0.01) -> list[int]:
    """The epochs after which the rule cut the rate."""
    s = LRSchedule(rule, lr)
    return [e for e, err in enumerate(errors) if s.update(e, err) is not None]


def test_paper_preset_takes_the_default_rule():
    assert load_config(preset="paper").schedule == ScheduleSection()


def test_plateau_never_cuts_an_error_still_improving_0_2_pp_per_epoch():
    """From 60 % down to 42 % over 90 epochs, 0.2 pp per epoch, under the noise: no cut in any run."""
    rule = ScheduleSection()
    for seed in range(RUNS):
        errors = _noisy(lambda e: 0.60 - 0.002 * e, seed)
        assert _cuts(rule, errors) == [], seed


@pytest.mark.parametrize("level", [0.42, 0.60])
def test_plateau_cuts_a_flat_error_within_patience_plus_one_epochs(level):
    """A flat error (any noise draw) is cut at the end of epoch `patience` (the patience + 1-th),
    and again `patience` epochs after each cut, at most max_reductions times."""
    rule = ScheduleSection()
    p = rule.patience
    for seed in range(RUNS):
        cuts = _cuts(rule, _noisy(lambda e: level, seed))
        assert cuts[0] <= p, (seed, cuts)  # epochs counted from 0: within p + 1 epochs
        assert len(cuts) == rule.max_reductions, (seed, cuts)


def test_plateau_improvement_is_relative_and_min_epochs_holds_each_rate():
    rule = ScheduleSection(threshold=0.1, patience=2, min_epochs=4, max_reductions=2)
    s = LRSchedule(rule, 0.1)
    # 0.5 -> 0.46 is 8 %, not an improvement of 10 %; a flat run waits for min_epochs at each rate
    assert [s.update(e, err) is not None for e, err in enumerate([0.5, 0.46, 0.46, 0.46])] == [0, 0, 0, 1]
    assert math.isclose(s.lr, 0.01) and s.rate_epoch == 4
    assert [s.update(e, 0.46) is not None for e in range(4, 9)] == [0, 0, 0, 1, 0]  # epoch 7: 4 at the rate
    assert s.reductions == 2 and not any(s.update(e, 0.46) for e in range(9, 20))  # max_reductions
    s = LRSchedule(rule, 0.1)
    assert not any(s.update(e, err) for e, err in enumerate([0.5, 0.44, 0.39, 0.35, 0.31, 0.27]))  # -10 %


def test_cut_names_its_evidence():
    rule = ScheduleSection(patience=2, min_epochs=1)
    s = LRSchedule(rule, 0.01)
    errors = {20: 0.47, 21: 0.451, 22: 0.455, 23: 0.452}
    cuts = [s.update(e, err) for e, err in errors.items()]
    assert cuts[:3] == [None, None, None]
    assert cuts[3].describe() == "lr 0.01 -> 0.001 at epoch 23: val top-1 0.452, best 0.451 at epoch 21"


def test_step_cuts_after_each_milestone_validated_or_not():
    """torchvision's MultiStepLR: [30, 60] runs epochs 0-29 at lr, 30-59 at lr/10, 60-89 at lr/100."""
    s = LRSchedule(ScheduleSection(kind="step", milestones=(30, 60)), 0.01)
    lrs = []
    for e in range(90):
        lrs.append(s.lr)  # the rate epoch e runs at
        cut = s.update(e, None if e % 2 else 0.5)
        assert (cut is not None) == (e in (29, 59)), e
    assert lrs[29] == 0.01 and math.isclose(lrs[30], 1e-3) and math.isclose(lrs[60], 1e-4)
    assert math.isclose(lrs[-1], 1e-4) and s.reductions == 2
    assert s.update(89, 0.5) is None


def test_constant_never_changes():
    s = LRSchedule(ScheduleSection(kind="constant"), 0.01)
    assert not any(s.update(e, 0.9) for e in range(50)) and s.lr == 0.01


def test_state_round_trips_and_old_manifests_load():
    rule = ScheduleSection(patience=3, min_epochs=1)
    s = LRSchedule(rule, 0.01)
    for e, err in enumerate([0.6, 0.5, 0.5, 0.5, 0.5, 0.45]):
        s.update(e, err)
    assert s.reductions == 1 and s.best == 0.45 and s.best_epoch == 5
    assert LRSchedule.from_state(rule, s.state_dict()) == s
    assert LRSchedule(rule, 0.01).state_dict()["best"] is None
    # a manifest written before best_epoch/rate_epoch: after 6 epochs (0-5), 2 since the last best
    old = {"lr": 0.001, "best": 0.5, "bad_epochs": 2, "reductions": 1}
    s = LRSchedule.from_state(rule, old, epoch=6)
    assert (s.lr, s.best, s.best_epoch, s.reductions) == (0.001, 0.5, 3, 1)
    assert s.update(6, 0.5) is not None  # the third epoch without an improvement: patience 3


@pytest.mark.parametrize(
    "sets, words",
    [
        ({"schedule.kind": "step", "schedule.milestones": "30,20"}, ["schedule.milestones", "increasing"]),
        ({"schedule.kind": "step", "schedule.milestones": "0,20"}, ["schedule.milestones", ">= 1"]),
        ({"schedule.milestones": "thirty"}, ["schedule.milestones", "integer"]),
        ({"schedule.kind": "step", "schedule.milestones": ""}, ["schedule.milestones", "at least one"]),
        ({"schedule.max_reductions": 0}, ["schedule.max_reductions", "never cuts", "constant"]),
        ({"schedule.threshold": 1.5}, ["schedule.threshold", "[0, 1)"]),
        ({"schedule.kind": "cosine"}, ["schedule.kind", "step"]),
    ],
)
def test_schedules_that_cannot_work_are_refused_with_the_key(sets, words):
    with pytest.raises(ValueError) as e:
        load_config(preset="paper", overrides=sets)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize(
    "sets, words",
    [
        ({"eval.every_epochs": 0}, ["eval.every_epochs=0", "plateau", "schedule.kind=constant"]),
        ({"train.epochs": 16}, ["schedule.patience=15", "train.epochs=16", "schedule.kind=constant"]),
        ({"schedule.min_epochs": 40, "train.epochs": 30}, ["schedule.min_epochs=40", "train.epochs=30"]),
    ],
)
def test_a_plateau_rule_that_cannot_act_in_this_run_is_a_warning(sets, words):
    """Issue 24: a short run (or one without validation) whose plateau rule never acts is a normal
    thing to ask for: the config loads, and its one warning says the rate stays constant."""
    (warning,) = load_config(preset="paper", overrides=sets).warnings()
    for w in [*words, "the rate stays optim.lr=0.01 throughout"]:
        assert w in warning, (w, warning)
    assert load_config(preset="paper", overrides={**sets, "schedule.kind": "constant"}).warnings() == []


def test_a_run_counted_in_steps_or_long_enough_is_not_refused():
    assert load_config(preset="paper", overrides={"train.epochs": 17}).warnings() == []  # cut at epoch 15
    load_config(preset="paper", overrides={"train.steps": 100})  # its epochs are the dataset's
    load_config(preset="paper", overrides={"train.epochs": 2, "schedule.kind": "constant"})
    load_config(preset="paper", overrides={"train.epochs": 20, "schedule.kind": "step"})  # as torchvision
