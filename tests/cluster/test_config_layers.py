"""Configs layer (issue 24): ``--preset``, then ``--config FILE`` (one or more), then ``--set``, then
the flags, each overriding the one before; a file alone starts from the ``paper`` preset; ``alexnet
config --sources`` says where each value came from; a plateau rule that cannot act is a warning."""

from __future__ import annotations

import json
import re

import pytest

from alexnet.cli import main
from cluster.config import BASE_PRESET, DEFAULT_ORIGIN, load_config, tomllib


def test_a_config_file_alone_starts_from_the_paper_preset_not_cpu_defaults(tmp_path):
    """A partial TOML used to take the dataclasses' CPU-style defaults for every key it left out
    (gpus_per_rank 0, metrics.port -1, checkpoint.every_steps 0)."""
    p = tmp_path / "mine.toml"
    p.write_text("[optim]\nlr = 0.02\n")
    cfg = load_config(path=p)
    paper = load_config(preset=BASE_PRESET)
    assert BASE_PRESET == "paper"
    assert cfg.optim.lr == 0.02
    assert (cfg.grid.gpus_per_rank, cfg.metrics.port, cfg.checkpoint.every_steps) == (1.0, 9108, 2000)
    assert cfg == paper.replace(**{"optim.lr": 0.02})


def test_preset_then_files_then_sets_each_override_the_one_before(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("[optim]\nlr = 0.02\nbatch_size = 64\n[train]\nepochs = 7\n")
    b.write_text("[optim]\nlr = 0.03\n")
    cfg = load_config(preset="small", path=[a, b], overrides={"train.epochs": "9"})
    small = load_config(preset="small")
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.train.epochs) == (0.03, 64, 9)
    # everything the layers above leave alone is the preset's
    assert cfg.model == small.model and cfg.grid == small.grid and cfg.eval == small.eval


def test_cli_takes_preset_and_several_configs(tmp_path, capsys):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("[optim]\nbatch_size = 64\n")
    b.write_text("[optim]\nlr = 0.03\n")
    argv = ["config", "--preset", "small", "--config", str(a), "--config", str(b), "--json"]
    assert main([*argv, "--set", "optim.lr=0.04"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert (tree["model"]["variant"], tree["optim"]["batch_size"], tree["optim"]["lr"]) == ("small", 64, 0.04)


def test_config_sources_name_the_layer_of_every_value(tmp_path, capsys):
    f = tmp_path / "f.toml"
    f.write_text("[optim]\nbatch_size = 64\nlr = 0.02\n")
    argv = ["config", "--preset", "small", "--config", str(f), "--set", "optim.lr=0.3", "--epochs", "40"]
    assert main([*argv, "--sources"]) == 0
    text = capsys.readouterr().out
    assert load_config(path=_written(tmp_path, text)) == load_config(
        preset="small", path=f, overrides={"optim.lr": 0.3, "train.epochs": 40}
    )  # the comments keep it valid TOML that reads back
    lines = set(text.splitlines())
    for line in (
        "lr = 0.3  # --set",
        f"batch_size = 64  # --config {f}",
        "epochs = 40  # --epochs",
        'variant = "small"  # preset small',
        f"streams = 0  # {DEFAULT_ORIGIN}",
    ):
        assert line in lines, (line, text)
    assert main([*argv, "--sources", "--json"]) == 0
    sources = json.loads(capsys.readouterr().out)["sources"]
    assert sources["optim.lr"] == "--set" and sources["train.steps"] == "--epochs"
    assert sources["model.num_classes"] == "preset small"


def test_config_sources_of_a_file_alone_name_the_base(tmp_path, capsys):
    f = tmp_path / "f.toml"
    f.write_text("[optim]\nlr = 0.02\n")
    assert main(["config", "--config", str(f), "--sources", "--json"]) == 0
    sources = json.loads(capsys.readouterr().out)["sources"]
    assert sources["optim.lr"] == f"--config {f}"
    assert sources["grid.gpus_per_rank"] == "preset paper (the base of --config)"


def test_config_sources_name_what_the_shards_decided(tmp_path, capsys):
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path / "tiny")
    build_synthetic(40, out, workers=1, progress=False)
    assert (
        main(["config", "--preset", "small", "--data", out, "--set", "optim.batch_size=8", "--sources"]) == 0
    )
    lines = set(capsys.readouterr().out.splitlines())
    assert f"input_size = 35  # from the shards at {out}" in lines
    assert f'path = "{out}"  # --data' in lines


@pytest.mark.parametrize("preset", ["small", "paper"])
def test_shortening_a_plateau_preset_is_a_warning_and_its_advice_works(preset, capsys):
    """`alexnet train --preset small --epochs 5` used to be refused (`schedule.patience=15 ...`)."""
    assert main(["config", "--preset", preset, "--epochs", "5"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("alexnet config: warning: schedule.kind='plateau' with schedule.patience=15"), err
    assert "train.epochs=5" in err and "the rate stays" in err
    # the warning's advice, as written, is accepted and silences it
    assert "--set schedule.kind=constant" in err
    assert main(["config", "--preset", preset, "--epochs", "5", "--set", "schedule.kind=constant"]) == 0
    assert capsys.readouterr().err == ""


def test_training_without_validation_under_a_plateau_preset_is_a_warning(capsys):
    """`--set eval.every_epochs=0`, which `alexnet shards` advises for a dataset without a val split,
    used to fail on its own with --preset small (plateau cuts on the validation error)."""
    assert main(["config", "--preset", "small", "--set", "eval.every_epochs=0"]) == 0
    err = capsys.readouterr().err
    assert "warning: schedule.kind='plateau' cuts on the validation error" in err, err
    argv = ["config", "--preset", "small", "--set", "eval.every_epochs=0", "--set", "schedule.kind=constant"]
    assert main(argv) == 0 and capsys.readouterr().err == ""


def _written(tmp_path, text: str):
    p = tmp_path / "printed.toml"
    p.write_text(text)
    tomllib.loads(text)
    return p


@pytest.mark.parametrize(
    "argv, drop",
    [
        (["--epochs", "5"], []),  # the plateau rule's warning
        (["--set", "eval.every_epochs=0"], []),  # the same without validation
        (["--set", "optim.lr"], ["--set", "optim.lr"]),  # a --set without "=": refused, with an example
        (["--set", "schedule.kind=step", "--set", "schedule.milestones="], ["--set", "schedule.milestones="]),
    ],
)
def test_every_set_a_config_message_advises_works_as_written(argv, drop, capsys):
    """Each `--set key=value` a warning or an error of `alexnet config` advises is accepted as written
    (added to the command, in place of the offending `--set` where there is one)."""
    main(["config", "--preset", "small", *argv])
    err = capsys.readouterr().err
    advised = [kv for kv in re.findall(r"--set ([\w.]+=[^\s;),]+)", err) if kv != "section.key=value"]
    assert advised, argv
    i = next((i for i in range(len(argv)) if argv[i : i + len(drop)] == drop), 0) if drop else 0
    kept = argv[:i] + argv[i + len(drop) :] if drop else argv
    for kv in advised:
        assert main(["config", "--preset", "small", *kept, "--set", kv]) == 0, kv
        capsys.readouterr()
