"""``alexnet config``: the resolved configuration as TOML or JSON, validated as ``train`` does, no Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alexnet.cli import main
from cluster.config import PRESETS, load_config, tomllib


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path_factory.mktemp("data") / "tiny")
    build_synthetic(160, out, workers=1, progress=False)  # 40 px images, 144 to train on
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_config_prints_every_key_as_toml_that_reads_back(name, capsys, tmp_path):
    assert main(["config", "--preset", name]) == 0
    text = capsys.readouterr().out
    assert tomllib.loads(text) == load_config(preset=name).to_dict()
    p = tmp_path / "c.toml"
    p.write_text(text)
    assert load_config(path=p) == load_config(preset=name)


def test_paper_preset_shows_the_recipe(capsys):
    assert main(["config", "--preset", "paper"]) == 0
    tree = tomllib.loads(capsys.readouterr().out)
    assert tree["model"]["lrn_convention"] == "per_size" and tree["optim"]["rule"] == "paper"
    s = tree["schedule"]
    assert (s["kind"], s["factor"], s["threshold"], s["patience"], s["min_epochs"], s["max_reductions"]) == (
        "plateau",
        0.1,
        0.03,
        15,
        10,
        3,
    )


def test_json_with_sets_and_data_resolves_the_crop(shards, capsys):
    argv = [
        "config",
        "--preset",
        "small",
        "--data",
        shards,
        "--set",
        "optim.lr=0.02",
        "--set",
        "optim.batch_size=16",
        "--epochs",
        "40",
        "--json",
    ]
    assert main(argv) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["model"]["input_size"] == 35  # 227/256 of the 40 px stored side
    assert tree["data"]["path"] == shards and tree["optim"]["lr"] == 0.02 and tree["train"]["epochs"] == 40


@pytest.mark.parametrize(
    "argv, words",
    [
        (
            ["--set", "schedule.kind=step", "--set", "schedule.milestones=30,20"],
            ["schedule.milestones", "increasing"],
        ),
        (["--set", "schedule.max_reductions=0"], ["schedule.max_reductions", "never cuts"]),
        (["--set", "optim.rule=adam"], ["optim.rule", "paper"]),
    ],
)
def test_config_refuses_what_train_refuses(argv, words, capsys):
    assert main(["config", "--preset", "paper", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alexnet config: error:")
    for w in words:
        assert w in err, (w, err)


def test_config_refuses_a_crop_that_does_not_fit_the_data(shards, capsys):
    assert main(["config", "--preset", "paper", "--data", shards, "--set", "model.num_classes=10"]) == 2
    err = capsys.readouterr().err
    assert "model.input_size=227 is larger than the stored images (40 px)" in err and shards in err


def test_config_starts_no_ray(shards):
    code = (
        "import sys; from alexnet.cli import main; "
        f"rc = main(['config', '--preset', 'small', '--data', {shards!r}, '--set', 'optim.batch_size=16']); "
        "import ray; print(rc, ray.is_initialized())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 False"
