"""The paper's findings in the job config: every switch shown with the paper's default, refusals
before work (C = 2 for the one-column net, a cut at a removed block), and a checkpoint of one
variant refusing to resume as another."""

from __future__ import annotations

import pytest

from alexnet.cli import main
from cluster.config import load_config, tomllib
from cluster.manifest import Manifest
from cluster.plan import RunPlan

PLAN = RunPlan(steps_per_epoch=5, total_steps=20, data_workers=2, data_streams=2)
SWITCHES = {
    "model": {
        "activation": "relu",
        "pooling": "overlapping",
        "lrn": True,
        "columns": 2,
        "remove_blocks": [],
        "dropout": 0.5,
    },
    "data": {"crop": "random", "flip": True, "lighting": True},
}


def test_alexnet_config_shows_every_switch_with_the_papers_default(capsys):
    assert main(["config", "--preset", "paper"]) == 0
    tree = tomllib.loads(capsys.readouterr().out)
    for section, values in SWITCHES.items():
        assert {k: tree[section][k] for k in values} == values, section


@pytest.mark.parametrize("preset", ["demo", "small"])
def test_every_preset_defaults_to_the_papers_choices(preset):
    d = load_config(preset=preset).to_dict()
    for section, values in SWITCHES.items():
        assert {k: d[section][k] for k in values} == values, section


def test_switches_reach_the_model_and_the_grid():
    cfg = load_config(
        preset="demo",
        overrides={
            "model.activation": "tanh",
            "model.pooling": "non_overlapping",
            "model.lrn": "false",
            "model.remove_blocks": "conv4",
        },
    )
    m = cfg.for_stored_size(40).model_config()
    assert (m.activation, m.pooling, m.lrn, m.remove_blocks) == ("tanh", "non_overlapping", False, ("conv4",))
    grid = cfg.to_grid()
    assert "conv4" not in grid.blocks and grid.stage_blocks(0) + grid.stage_blocks(1) == grid.blocks
    one = load_config(preset="demo", overrides={"model.columns": 1, "grid.shape": "1x2x1"})
    assert one.to_grid().columns_of(0) == (0,)


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (
            {"model.columns": 1},  # the demo's grid is 1x2x2
            ["model.columns=1", "grid.shape='1x2x2'", "one-column net", "use C = 1"],
        ),
        (
            {"model.remove_blocks": "conv3", "grid.cuts": "conv3"},
            ["grid.cuts=['conv3']", "model.remove_blocks=['conv3']", "removed from this model", "conv4"],
        ),
        ({"data.crop": "corner"}, ["data.crop='corner'", "random", "center"]),
        ({"model.activation": "sigmoid"}, ["model.activation='sigmoid'", "relu", "tanh"]),
    ],
)
def test_refused_before_work_with_the_reason(sets, words):
    with pytest.raises(ValueError) as e:
        load_config(preset="demo", overrides=sets)
    for w in words:
        assert w in str(e.value), str(e.value)


def _manifest(config: dict) -> Manifest:
    return Manifest(
        step=7,
        epoch=1,
        lr_schedule={"lr": 0.005, "best": None, "bad_epochs": 0, "reductions": 0},
        data_workers=2,
        data_positions=[{"w": 0}, {"w": 1}],
        steps_per_epoch=5,
        config=config,
        data_streams=2,
    )


@pytest.mark.parametrize(
    ("saved", "now", "words"),
    [
        (
            {},
            {"model.activation": "tanh"},
            ["model.activation='relu'", "'tanh'", '--set model.activation="relu"'],
        ),
        ({"model.lrn": "false"}, {}, ["model.lrn=False", "--set model.lrn=false"]),
        ({"model.remove_blocks": "conv3"}, {}, ["model.remove_blocks=['conv3']", "same [model] section"]),
        ({}, {"data.flip": "false"}, ["data.flip=True", "--set data.flip=true"]),
        ({"data.crop": "center"}, {}, ["data.crop='center'", "'random'"]),
    ],
)
def test_a_checkpoint_of_one_variant_refuses_to_resume_as_another(saved, now, words):
    m = _manifest(load_config(preset="demo", overrides=saved).to_dict())
    with pytest.raises(ValueError) as e:
        m.check_resume(load_config(preset="demo", overrides=now), PLAN, "RUN/checkpoints/step-00000007")
    for w in words:
        assert w in str(e.value), str(e.value)
    m.check_resume(load_config(preset="demo", overrides=saved), PLAN, "ck")  # as itself: resumes
