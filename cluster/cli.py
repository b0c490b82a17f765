"""``alexnet train``, ``alexnet config`` and ``alexnet eval``: the job a user submits, its resolved
configuration, and offline evaluation.

    alexnet train [--preset NAME] [--config FILE.toml ...] [--set key=value ...] --data SHARDS --run-dir DIR
                  [--resume [--from-checkpoint CKPT]] [--init-from CKPT] [--steps N | --epochs N]
                  [--metrics-port P]
    alexnet config [--preset NAME] [--config FILE.toml ...] [--set key=value ...] [--data SHARDS]
                   [--steps N | --epochs N] [--metrics-port P] [--json] [--sources]

The config is layered: the preset (``paper`` when only files are given), each ``--config`` file,
``--set``, the flags; each overriding the ones before (:mod:`cluster.config`).
    alexnet eval --checkpoint DIR --data SHARDS
    alexnet predict --checkpoint CKPT [--json] [--ten-crop] [--features LAYER] PATH...   (cluster/predict.py)
    alexnet export --checkpoint CKPT OUT --images PATH... [--onnx]                  (cluster/export.py)
    alexnet plan [--preset NAME] [--nodes N --gpus-per-node G] [--json]             (cluster/plan_cli.py)
    alexnet study [NAME|FILE.toml] --preset P --data SHARDS --study-dir DIR [--seeds ...]  (cluster/study.py)
    alexnet filters CHECKPOINT [--out FILE.png] [--json]          (alexnet/filters.py, Figure 3)

All validate everything before any actor starts (``alexnet config`` starts none); a ``ValueError``
becomes a clean error message and exit code 2 (see ``alexnet/cli.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from alexnet.cli import subparser
from cluster.config import BASE_PRESET, PRESETS, JobConfig, Layer, config_layers, parse_sets, resolve_layers


def job_config(args: argparse.Namespace) -> tuple[JobConfig, dict[str, str]]:
    """The validated :class:`cluster.config.JobConfig` of ``alexnet train``'s arguments, layered
    ``--preset``, ``--config`` (each), ``--set``, then the flags; and each key's origin."""
    cfg, sources = resolve_layers(job_layers(args))
    for w in cfg.warnings():
        print(f"alexnet {args.command}: warning: {w}", file=sys.stderr, flush=True)
    return cfg, sources


def job_layers(args: argparse.Namespace) -> list[Layer]:
    """The config layers of ``alexnet train``'s (and ``study``'s) arguments: ``--preset``,
    ``--config`` (each), ``--set``, then the flags."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: use >= 1, or leave it out to run train.epochs")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs}: use >= 1")
    layers = config_layers(args.preset, args.config or [])
    layers.append(Layer("--set", parse_sets(args.set)))
    if args.steps is not None:
        layers.append(Layer("--steps", {"train.steps": args.steps}))
    if args.epochs is not None:
        layers.append(Layer("--epochs", {"train.epochs": args.epochs, "train.steps": 0}))
    if args.metrics_port is not None:
        layers.append(Layer("--metrics-port", {"metrics.port": args.metrics_port}))
    if args.data:
        layers.append(Layer("--data", {"data.path": args.data}))
    return layers


def resolved_config(args: argparse.Namespace) -> tuple[JobConfig, dict[str, str]]:
    """``alexnet train``'s config of these arguments, validated as ``train`` validates it before Ray
    starts: with shards (``--data`` or ``data.path``), resolved against them (``model.input_size``)
    and checked against them (:func:`cluster.plan.plan_run`); and each key's origin."""
    from cluster.plan import plan_run

    cfg, sources = job_config(args)
    if cfg.data.path:
        layered = cfg.to_dict()
        cfg = cfg.for_data(cfg.data.path)
        plan_run(cfg, cfg.data.path)
        for section, values in cfg.to_dict().items():  # what the shards decided (model.input_size)
            for k, v in values.items():
                if layered[section][k] != v:
                    sources[f"{section}.{k}"] = f"from the shards at {cfg.data.path}"
    return cfg, sources


def set_hint(flags: list[str]) -> str:
    """For unknown flags that name config keys (``--lr 0.1``, ``--batch-size=64``), the ``--set``
    form that does it (``--set optim.lr=0.1``); "" when none does."""
    keys = [f"{s}.{k}" for s, values in JobConfig().to_dict().items() for k in values]
    hints = []
    for i, flag in enumerate(flags):
        if not flag.startswith("--"):
            continue
        name, eq, value = flag[2:].partition("=")
        if not eq:
            nxt = flags[i + 1] if i + 1 < len(flags) else ""
            value = nxt if nxt and not nxt.startswith("--") else "VALUE"
        name = name.replace("-", "_")
        hints += [f"--set {k}={value}" for k in keys if k == name or k.split(".", 1)[1] == name]
    if not hints:
        return ""
    return f"; did you mean {' or '.join(hints)}? (alexnet sets config keys with --set section.key=value)"


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved configuration as TOML (or JSON); start nothing."""
    cfg, sources = resolved_config(args)
    if args.json:
        tree = {"config": cfg.to_dict(), "sources": sources} if args.sources else cfg.to_dict()
        print(json.dumps(tree, indent=2))
        return 0
    layers = [f"--preset {args.preset}" if args.preset else f"--preset {BASE_PRESET} (the base)"]
    layers += [f"--config {c}" for c in args.config or []]
    print(f"# alexnet config {' + '.join(layers)}: every key with the value a run would use")
    if not cfg.model.input_size:
        print("# model.input_size = 0: 227/256 of the stored images' side (pass --data to resolve it)")
    print(f"# batch and learning rate: {cfg.describe_batch()}")
    if cfg.grid.is_auto:
        print('# grid.shape = auto: see the grid a cluster gets with `alexnet plan` (README "Scaling out")')
    print(cfg.to_toml(sources if args.sources else None), end="")
    return 0


def _config_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments that make a job config, shared by ``train`` and ``config``."""
    config_source_arguments(p)
    p.add_argument("--data", metavar="SHARDS", help="shard directory or URL (with dataset.json)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="total steps of the run (counted from step 0)")
    length.add_argument("--epochs", type=int, help="total epochs of the run")
    p.add_argument("--metrics-port", type=int, help="Prometheus endpoint port (0: any free port, -1: none)")


def config_source_arguments(p: argparse.ArgumentParser) -> None:
    """``--preset``, ``--config``, ``--set``: the layers of a job config (``alexnet plan`` takes these)."""
    p.add_argument(
        "--preset",
        choices=PRESETS,
        help=f"a config shipped with the package, the first layer (default with --config: {BASE_PRESET})",
    )
    p.add_argument(
        "--config",
        action="append",
        metavar="FILE.toml",
        help="a TOML config file (e.g. a run's config.toml) layered on the preset; repeatable, later wins",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set optim.lr=0.02 (repeatable; wins over the files)",
    )


def add_config(sub: argparse._SubParsersAction) -> None:
    p = subparser(
        sub,
        "config",
        "print the resolved configuration (TOML, or --json), validated as train does",
        "alexnet config --preset small --config mine.toml --set optim.lr=0.02 --sources",
    )
    _config_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    p.add_argument(
        "--sources",
        action="store_true",
        help="say where each value came from (a comment per line; with --json, a sources table)",
    )
    p.set_defaults(func=cmd_config, unknown_hint=set_hint)


def cmd_train(args: argparse.Namespace) -> int:
    """Run or resume a training job."""
    from cluster.job import run_training

    cfg, _sources = job_config(args)
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
    p = subparser(
        sub,
        "train",
        "train on Ray (local, or the cluster of `ray job submit`)",
        "alexnet train --preset demo --data data/demo --run-dir runs/demo",
        "alexnet train --preset small --data data/mine --run-dir runs/mine --set optim.lr=0.02 --epochs 5",
    )
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
    p.set_defaults(func=cmd_train, unknown_hint=set_hint)


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
    p = subparser(
        sub,
        "eval",
        "top-1/top-5 error (center and 10-crop) of a checkpoint",
        "alexnet eval --checkpoint runs/demo --data data/demo",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint dir, or a run dir (newest)")
    p.add_argument("--data", required=True, metavar="SHARDS", help="shard directory or URL (val split)")
    p.add_argument("--batch-size", type=int, default=0, help="default: the checkpoint's batch size")
    p.add_argument(
        "--max-samples", type=int, default=0, help="score exactly the first this many val images (0: all)"
    )
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
    p = subparser(
        sub,
        "predict",
        "top-k classes (and --features) of image files, from a checkpoint",
        "alexnet predict --checkpoint runs/demo photos/ --json",
        "alexnet predict --checkpoint runs/demo photos/ --features fc7 --out feats",
    )
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
    p = subparser(
        sub,
        "export",
        "a checkpoint as a torch.export program (and ONNX), checked against predict",
        "alexnet export --checkpoint runs/demo exported/ --images photos/",
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


def cmd_study(args: argparse.Namespace) -> int:
    """Train a study's runs (those not finished yet) and write its report."""
    from cluster.studies import get_study
    from cluster.study import run_study

    layers = job_layers(args)
    base, _ = resolve_layers(layers)  # checked once here: a bad --set is named before anything else
    if not base.data.path:
        raise ValueError("no data: pass --data SHARDS (a directory or URL with dataset.json)")
    if base.grid.is_auto:
        base = _study_grid(base, args)
        layers.append(Layer("grid.shape auto", {"grid.shape": base.grid.shape}))
    study = get_study(args.name, base)
    return run_study(study, layers, base.data.path, args.study_dir, args.seeds, args.threshold, args.preset)


def _study_grid(base: JobConfig, args: argparse.Namespace) -> JobConfig:
    """``grid.shape = "auto"`` for a study: one grid for every run, chosen once. On a Ray cluster
    (``RAY_ADDRESS``, where a study starts runs side by side) for the share of it each run gets, so
    the runs started together fill it rather than the first taking all of it
    (:func:`cluster.scaling.study_share`); else for the whole machine, as a run would."""
    from cluster.job import cluster_resources
    from cluster.run import resolve_grid
    from cluster.scaling import study_share
    from cluster.studies import get_study

    res = cluster_resources()
    runs = 1
    if os.environ.get("RAY_ADDRESS"):
        variants = get_study(args.name, resolve_grid(base, res)[0]).variants  # their count only
        runs = len(variants) * len(args.seeds)
    at_once, share = study_share(res, runs)
    base, lines = resolve_grid(base, share)
    if at_once > 1:
        lines.insert(0, f"study: {at_once} runs at once on {res.where}, each on {share.where}")
    for line in lines:
        print(f"[alexnet] {line}", flush=True)
    return base


def add_study(sub: argparse._SubParsersAction) -> None:
    from cluster.studies import DEFAULT_THRESHOLD, STUDIES, STUDY_FORMAT

    p = subparser(
        sub,
        "study",
        "train the paper's ablations (or a study of your own) as runs over seeds, and report the deltas",
        "alexnet study --preset demo --data data/demo --study-dir studies/demo --steps 20",
        "alexnet study relu-vs-tanh --preset small --data data/mine --study-dir studies/race --seeds 0 1 2",
        "alexnet study mine.toml --preset small --data data/mine --study-dir studies/mine",
    )
    p.epilog += (
        "\n\n"
        + STUDY_FORMAT
        + (
            "\n\nEach run is an `alexnet train` run in STUDY_DIR/<variant>-seed<k>/; STUDY_DIR/study.json "
            "lists them\nwith their status, so the same command again trains only what is not finished "
            "(a run cut off\nresumes from its checkpoint). Report: STUDY_DIR/study.md, study.json, "
            "plots/*.png."
        )
    )
    p.add_argument(
        "name",
        nargs="?",
        default="paper-ablations",
        metavar="NAME",
        help=f"{', '.join(STUDIES)} (default paper-ablations), or a study file FILE.toml",
    )
    _config_arguments(p)
    p.add_argument("--study-dir", required=True, metavar="DIR", help="the study's run directories and report")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="train.seed of each run (default: the file's, or 0)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help=f"training top-1 error whose first crossing is timed (default {DEFAULT_THRESHOLD}, Figure 1's)",
    )
    p.set_defaults(func=cmd_study, unknown_hint=set_hint)


def cmd_filters(args: argparse.Namespace) -> int:
    """conv1's kernels per column as one PNG, and each column's colour measure (printed, and as JSON)."""
    from pathlib import Path

    from alexnet.filters import RANDOM_COLOUR, colour_specificity, figure3_png
    from cluster.study import conv1_of

    cols, grey, url = conv1_of(args.checkpoint)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(figure3_png(cols, f"conv1 of {url}" + (" (greyscale data)" if grey else "")))
    measure = {str(c): colour_specificity(w) for c, w in cols.items()}
    note = (
        "greyscale data (R = G = B in its mean image): conv1 saw no colour, so the measure is meaningless"
        if grey
        else f"0: colour-agnostic kernels, 1: pure colour opposition, ~{RANDOM_COLOUR:.2f}: random kernels"
    )
    tree = {
        "checkpoint": url,
        "png": str(out),
        "colour_specificity": measure,
        "greyscale": grey,
        "note": note,
    }
    out.with_suffix(".json").write_text(json.dumps(tree, indent=1) + "\n")
    if args.json:
        print(json.dumps(tree))
        return 0
    for c, v in measure.items():
        print(f"column {c}: colour specificity {v:.3f} ({cols[int(c)].shape[0]} kernels)")
    print(f"({note})")
    print(f"alexnet filters: {out} and {out.with_suffix('.json')}")
    return 0


def add_filters(sub: argparse._SubParsersAction) -> None:
    p = subparser(
        sub,
        "filters",
        "conv1's kernels, one panel per column (the paper's Figure 3), and how colour-specific each is",
        "alexnet filters runs/demo --out conv1.png",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint dir, or a run dir (newest)")
    p.add_argument(
        "--out",
        default="filters.png",
        metavar="FILE.png",
        help="the image (default filters.png); the measure goes to FILE.json beside it",
    )
    p.add_argument("--json", action="store_true", help="print the measure as one JSON line")
    p.set_defaults(func=cmd_filters)


SUBCOMMANDS = [add_train, add_config, add_eval, add_predict, add_export, add_study, add_filters]
