"""The ``alexnet`` command: the 2012 two-column AlexNet, trained pipeline-parallel on Ray.

Each subcommand registers itself in ``SUBCOMMANDS``; :func:`main` adds the manners every one of
them shares: ``--version``, unknown flags explained by the subcommand's ``unknown_hint`` default
(train and config name the ``--set`` form of a config key), a ``ValueError`` as one line and exit
code 2, and a closed pipe (``| head``) as a quiet exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from alexnet.config import VARIANTS, ModelConfig, parse_model_sets


def add_model_sets(p: argparse.ArgumentParser) -> None:
    """The ``--set model.KEY=VALUE`` option of the commands that build a model from switches."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="model.KEY=VALUE",
        help="a model switch, e.g. model.activation=tanh, model.columns=1, model.remove_blocks=conv3",
    )


DESCRIPTION = """\
The 2012 two-column AlexNet (Krizhevsky, Sutskever, Hinton), trained pipeline-parallel on Ray.

examples:
  alexnet shards --synthetic 3000 data/demo                  # a generated dataset
  alexnet train --preset demo --data data/demo --run-dir runs/demo
  alexnet config --preset small --set optim.lr=0.02 --sources
  alexnet eval --checkpoint runs/demo --data data/demo

`alexnet COMMAND --help` describes each command, with an example.
"""

# an example per subcommand, shown at the end of its --help
EXAMPLE = "example:\n  "


def example(*lines: str) -> str:
    """The epilog of a subcommand's help: its example command lines."""
    return ("examples:\n  " if len(lines) > 1 else EXAMPLE) + "\n  ".join(lines)


def subparser(
    sub: argparse._SubParsersAction, name: str, help: str, *examples: str
) -> argparse.ArgumentParser:
    """Add subcommand ``name``: a one-line ``help``, and ``examples`` shown after its flags."""
    return sub.add_parser(
        name,
        help=help,
        description=help[:1].upper() + help[1:] + ".",
        epilog=example(*examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def cmd_info(args: argparse.Namespace) -> int:
    """Print the model table (or its JSON)."""
    from alexnet.info import format_table, summary

    switches = parse_model_sets(args.set)
    cfg = ModelConfig.for_variant(args.variant, args.num_classes, args.input_size, **switches)
    print(json.dumps(summary(cfg)) if args.json else format_table(cfg))
    return 0


def add_info(sub: argparse._SubParsersAction) -> None:
    p = subparser(
        sub,
        "info",
        "per-layer shapes, parameters and MACs of the network",
        "alexnet info --variant small --num-classes 10 --json",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--variant", choices=VARIANTS, default="paper", help="the 2012 network or the small-image one"
    )
    p.add_argument("--num-classes", type=int, default=None, help="classes of fc8 (default: the variant's)")
    p.add_argument("--input-size", type=int, default=None, help="crop side in px (default: the variant's)")
    add_model_sets(p)
    p.set_defaults(func=cmd_info)


# Each entry adds one subcommand's parser; later packages append theirs here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_info]


def _load_optional() -> None:
    """Register subcommands that live in other modules (they may import heavier packages)."""
    import importlib

    for mod in ("alexnet.shards_cli", "pipeline.verify", "cluster.cli", "cluster.plan_cli"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        # main() may run more than once in a process (tests): register each subcommand once
        SUBCOMMANDS.extend(a for a in getattr(module, "SUBCOMMANDS", []) if a not in SUBCOMMANDS)


def version() -> str:
    """The installed package's version (``pyproject.toml``)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("alexnet-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    """The ``alexnet`` parser with every subcommand registered."""
    _load_optional()
    parser = argparse.ArgumentParser(
        prog="alexnet", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"alexnet-pipeline {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``alexnet`` console script."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # a subcommand may explain its unknown flags (train, config: the --set form of a config key)
        hint = args.unknown_hint(unknown) if hasattr(args, "unknown_hint") else ""
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except BrokenPipeError:
        # `alexnet config --json | head`: the reader is gone, which is no error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not print a traceback either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
    except ValueError as e:
        print(f"alexnet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
