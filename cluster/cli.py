"""``alexnet train``, ``alexnet config`` and ``alexnet eval``: the job a user submits, its resolved
configuration, and offline evaluation.

    alexnet train --preset NAME | --config FILE.toml [--set key=value ...] --data SHARDS --run-dir DIR
                  [--resume [--from-checkpoint CKPT]] [--init-from CKPT] [--steps N | --epochs N]
                  [--metrics-port P]
    alexnet config --preset NAME | --config FILE.toml [--set key=value ...] [--data SHARDS]
                   [--steps N | --epochs N] [--metrics-port P] [--json]
    alexnet eval --checkpoint DIR --data SHARDS
    alexnet predict --checkpoint CKPT [--json] [--ten-crop] [--features LAYER] PATH...   (cluster/predict.py)
    alexnet export --checkpoint CKPT OUT --images PATH... [--onnx]                  (cluster/export.py)

All validate everything before any actor starts (``alexnet config`` starts none); a ``ValueError``
becomes a clean error message and exit code 2 (see ``alexnet/cli.py``).
"""

from __future__ import annotations

import argparse
import json

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
        init_from=args.init_from,
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
    p.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start a new run from this checkpoint's (or run dir's newest) weights: fine-tuning; fc8 is "
        "re-initialised when the classes differ; train.freeze keeps chosen blocks",
    )
    p.set_defaults(func=cmd_train)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on the val split; print one JSON line."""
    from cluster.evaluate import evaluate_checkpoint

    res = evaluate_checkpoint(args.checkpoint, args.data, args.batch_size, args.max_samples)
    print(json.dumps(res), flush=True)
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 error (center and 10-crop) of a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint dir, or a run dir (newest)")
    p.add_argument("--data", required=True, metavar="SHARDS", help="shard directory or URL (val split)")
    p.add_argument("--batch-size", type=int, default=0, help="default: the checkpoint's batch size")
    p.add_argument("--max-samples", type=int, default=0, help="stop after about this many images (0: all)")
    p.set_defaults(func=cmd_eval)


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify image files with a checkpoint: a table, or one JSON line per image; ``--features``."""
    import sys

    from cluster.predict import format_table, load_predictor, write_features

    p = load_predictor(args.checkpoint, args.device, args.resize)
    crop = "ten" if args.ten_crop else "center"
    rows = p.predict(args.paths, args.top_k, crop, args.batch_size)
    print("\n".join(json.dumps(r) for r in rows) if args.json else format_table(rows), flush=True)
    if args.features:
        feats, files = p.features(args.paths, args.features, crop, args.batch_size)
        npy, txt = write_features(args.out or f"features-{args.features}", feats, files)
        print(
            f"alexnet predict: {args.features} features {feats.shape} -> {npy} (rows: {txt})", file=sys.stderr
        )
    return 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k classes (and --features) of image files, from a checkpoint")
    p.add_argument(
        "--checkpoint", required=True, metavar="CKPT", help="checkpoint dir, or a run dir (newest)"
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files or folders (any format Pillow reads)"
    )
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--ten-crop", action="store_true", help="the paper's 10 crops, softmax averaged")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default auto: the GPU if any)")
    p.add_argument(
        "--resize", type=int, default=0, help="short side before cropping (default: the run's stored side)"
    )
    p.add_argument("--json", action="store_true", help='one JSON line per image: {"path", "top": [...]}')
    p.add_argument(
        "--features", metavar="LAYER", help="also write this layer's outputs (fc7, fc6, conv5, ...)"
    )
    p.add_argument(
        "--out", metavar="PREFIX", help="with --features: PREFIX.npy and PREFIX.txt (default features-LAYER)"
    )
    p.set_defaults(func=cmd_predict)


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint's network (``torch.export``; ``--onnx``) and check it against predict."""
    from cluster.export import TOLERANCE, export_checkpoint
    from cluster.predict import load_predictor

    p = load_predictor(args.checkpoint, args.device, args.resize)
    tol = TOLERANCE if args.tolerance is None else args.tolerance
    for c in export_checkpoint(p, args.out, args.images, args.onnx, tol):
        print(
            f"alexnet export: {args.out}/{c.file}: on {c.images} images the largest probability "
            f"difference from predict is {c.max_abs_prob_diff:.2g} (tolerance {tol:g}), "
            f"top-1 the same on {c.top1_agree}",
            flush=True,
        )
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="a checkpoint as a torch.export program (and ONNX), checked against predict"
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="CKPT", help="checkpoint dir, or a run dir (newest)"
    )
    p.add_argument("out", metavar="OUT", help="output folder: model.pt2, model.onnx, preprocess.json")
    p.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="PATH",
        help="real images (files or folders) to check it on",
    )
    p.add_argument("--onnx", action="store_true", help="also model.onnx (needs the onnx extra)")
    p.add_argument(
        "--tolerance",
        type=float,
        help="largest probability difference allowed (default 1e-4: cluster.export.TOLERANCE)",
    )
    p.add_argument(
        "--device", default="cpu", help="device the program is traced and checked on (default cpu)"
    )
    p.add_argument("--resize", type=int, default=0, help="short side before cropping (default: the run's)")
    p.set_defaults(func=cmd_export)


SUBCOMMANDS = [add_train, add_config, add_eval, add_predict, add_export]
