"""The ``alexnet`` command. Each subcommand registers itself in ``SUBCOMMANDS``."""

from __future__ import annotations

import argparse
import json
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


def cmd_info(args: argparse.Namespace) -> int:
    """Print the model table (or its JSON)."""
    from alexnet.info import format_table, summary

    switches = parse_model_sets(args.set)
    cfg = ModelConfig.for_variant(args.variant, args.num_classes, args.input_size, **switches)
    print(json.dumps(summary(cfg)) if args.json else format_table(cfg))
    return 0


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="per-layer shapes, parameters and MACs of the network")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--variant", choices=VARIANTS, default="paper")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--input-size", type=int, default=None)
    add_model_sets(p)
    p.set_defaults(func=cmd_info)


# Each entry adds one subcommand's parser; later packages append theirs here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_info]


def _load_optional() -> None:
    """Register subcommands that live in other modules (they may import heavier packages)."""
    import importlib

    for mod in ("alexnet.shards_cli", "pipeline.verify", "cluster.cli"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        # main() may run more than once in a process (tests): register each subcommand once
        SUBCOMMANDS.extend(a for a in getattr(module, "SUBCOMMANDS", []) if a not in SUBCOMMANDS)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``alexnet`` console script."""
    _load_optional()
    parser = argparse.ArgumentParser(prog="alexnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"alexnet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
