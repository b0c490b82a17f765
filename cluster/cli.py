"""``alexnet train``, ``alexnet config`` and ``alexnet eval``: the job a user submits, its resolved
configuration, and offline evaluation.

    alexnet train --preset NAME | --config FILE.toml [--set key=value ...] --data SHARDS --run-dir DIR
                  [--resume [--from-checkpoint CKPT]] [--steps N | --epochs N] [--metrics-port P]
    alexnet config --preset NAME | --config FILE.toml [--set key=value ...] [--data SHARDS]
                   [--steps N | --epochs N] [--metrics-port P] [--json]
    alexnet eval --checkpoint DIR --data SHARDS

All validate everything before any actor starts (``alexnet config`` starts none); a ``ValueError``
becomes a clean error message and exit code 2 (see ``alexnet/cli.py``).
"""

from __future__ import annotations

import argparse
import json
import sys

from cluster.config import PRESETS, load_config, parse_sets


def job_config(args: argparse.Namespace):
    """The validated :class:`cluster.config.JobConfig` of ``alexnet train``'s arguments."""
    overrides: dict = parse_sets(args.set)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: use >= 1, or leave it out to run train.epochs")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs}: use >= 1")
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
        overrides["train.steps"] = 0
    if args.metrics_port is not None:
        overrides["metrics.port"] = args.metrics_port
    if args.data:
        overrides["data.path"] = args.data
    return load_config(args.preset, args.config, overrides)


def resolved_config(args: argparse.Namespace):
    """``alexnet train``'s config of these arguments, validated as ``train`` validates it before Ray
    starts: with shards (``--data`` or ``data.path``), resolved against them (``model.input_size``)
    and checked against them (:func:`cluster.plan.plan_run`)."""
    from cluster.plan import plan_run

    cfg = job_config(args)
    if cfg.data.path:
        cfg = cfg.for_data(cfg.data.path)
        plan_run(cfg, cfg.data.path)
    return cfg


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved configuration as TOML (or JSON); start nothing."""
    cfg = resolved_config(args)
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    source = f"--preset {args.preset}" if args.preset else f"--config {args.config}"
    print(f"# alexnet config {source}: every key with the value a run would use")
    if not cfg.model.input_size:
        print("# model.input_size = 0: 227/256 of the stored images' side (pass --data to resolve it)")
    print(cfg.to_toml(), end="")
    return 0


def _config_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments that make a job config, shared by ``train`` and ``config``."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=PRESETS, help="a config shipped with the package")
    src.add_argument("--config", metavar="FILE.toml", help="a TOML config file (e.g. a run's config.toml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--data", metavar="SHARDS", help="shard directory or URL (with dataset.json)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="total steps of the run (counted from step 0)")
    length.add_argument("--epochs", type=int, help="total epochs of the run")
    p.add_argument("--metrics-port", type=int, help="Prometheus endpoint port (0: any free port)")


def add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config", help="print the resolved configuration (TOML, or --json), validated as train does"
    )
    _config_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    p.set_defaults(func=cmd_config)


def cmd_train(args: argparse.Namespace) -> int:
    """Run or resume a training job."""
    from cluster.job import run_training

    cfg = job_config(args)
    if not cfg.data.path:
        raise ValueError(
            "no data: pass --data SHARDS (a directory or URL with dataset.json), or set data.path"
        )
    res = run_training(
        cfg,
        cfg.data.path,
        args.run_dir,
        resume=args.resume,
        preset=args.preset,
        from_checkpoint=args.from_checkpoint,
    )
    return res.exit_code


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train on Ray (local, or the cluster of `ray job submit`)")
    _config_arguments(p)
    p.add_argument(
        "--run-dir", required=True, metavar="DIR", help="checkpoints, metrics, plots (path or URL)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument(
        "--from-checkpoint",
        metavar="CKPT",
        help="with --resume: continue from this checkpoint (RUN/checkpoints/step-N) instead, writing "
        "into --run-dir",
    )
    p.set_defaults(func=cmd_train)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on the val split; print one JSON line."""
    from cluster.evaluate import ShortReadError, evaluate_checkpoint

    try:
        res = evaluate_checkpoint(args.checkpoint, args.data, args.batch_size, args.max_samples)
    except ShortReadError as e:  # the data, not the command line: exit 1, and no JSON line to trust
        print(f"alexnet eval: {e}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(res), flush=True)
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 error (center and 10-crop) of a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint dir, or a run dir (newest)")
    p.add_argument("--data", required=True, metavar="SHARDS", help="shard directory or URL (val split)")
    p.add_argument("--batch-size", type=int, default=0, help="default: the checkpoint's batch size")
    p.add_argument(
        "--max-samples", type=int, default=0, help="score exactly the first this many val images (0: all)"
    )
    p.set_defaults(func=cmd_eval)


SUBCOMMANDS = [add_train, add_config, add_eval]
