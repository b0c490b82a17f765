"""The ``alexnet`` command's manners (issue 24): ``--version``, no traceback on a closed pipe, a help
line for every flag and an example in every subcommand's help, and an unknown flag that names a
config key (``--lr``) answered with its ``--set`` form, which works as written."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from alexnet.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
ALEXNET = Path(sys.executable).with_name("alexnet")  # the console script, beside the venv's python


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"alexnet-pipeline {want}"


def test_a_closed_pipe_is_a_quiet_exit():
    """`alexnet config --json | head` ended in a BrokenPipeError traceback. The read end is closed
    before the command starts, so its first write fails, whatever the output's size."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(
            [str(ALEXNET), "config", "--preset", "paper", "--json"],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(w)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.stderr == ""
    assert proc.returncode == 141


def test_top_level_help_is_for_users():
    text = build_parser().format_help()
    assert "SUBCOMMANDS" not in text and "registers itself" not in text
    assert "alexnet train --preset demo --data data/demo --run-dir runs/demo" in text


def test_every_flag_has_a_help_line_and_every_subcommand_an_example():
    parser = build_parser()
    subs = _subparsers(parser)
    assert {"info", "shards", "verify", "train", "config", "eval"} <= set(subs)
    for name, p in subs.items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help.strip(), (
                f"alexnet {name} {'/'.join(a.option_strings) or a.dest}: no help"
            )
        text = p.format_help()
        assert "example" in text, f"alexnet {name} --help has no example"
        examples = [
            line.split("#")[0].strip() for line in text.splitlines() if line.strip().startswith("alexnet ")
        ]
        assert any(e.startswith(f"alexnet {name} ") for e in examples), (name, text)
        for e in examples:  # each example parses with the real parser
            args = build_parser().parse_args(shlex.split(e)[1:])
            assert args.command == e.split()[1]


@pytest.mark.parametrize(
    "flags, hints",
    [
        (["--lr", "0.1"], ["--set optim.lr=0.1"]),
        (["--lr=0.1"], ["--set optim.lr=0.1"]),
        (["--momentum", "0.8"], ["--set optim.momentum=0.8"]),
        (["--batch-size", "64"], ["--set optim.batch_size=64", "--set eval.batch_size=64"]),
        (["--optim.weight_decay", "0.001"], ["--set optim.weight_decay=0.001"]),
    ],
)
def test_an_unknown_flag_that_names_a_config_key_suggests_set(flags, hints, capsys):
    """torchvision's scripts take `--lr 0.1`; alexnet takes `--set optim.lr=0.1`, and says so."""
    for command in (["train", "--run-dir", "runs/x"], ["config"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--preset", "small", *flags])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"alexnet {command[0]}: error: unrecognized arguments: {' '.join(flags)}" in err
        for h in hints:
            assert h in err, (h, err)
    for h in hints:  # the advice, as written, is accepted
        assert main(["config", "--preset", "small", *shlex.split(h)]) == 0
        capsys.readouterr()


def test_an_unknown_flag_that_names_no_key_gets_no_hint(capsys):
    with pytest.raises(SystemExit):
        main(["config", "--preset", "small", "--bogus", "1"])
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "alexnet config: error: unrecognized arguments: --bogus 1"
