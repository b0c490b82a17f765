"""``alexnet shards``: WebDataset shards from an ImageFolder tree, ImageNet as downloaded, or generated data.

    alexnet shards SRC OUT [--size 256] [--quality 90] [--shard-size 1000] [--workers N]
                           [--val-labels FILE] [--allow-empty-classes] [--val-fraction F [--seed S]]
    alexnet shards --synthetic N OUT [--size 40] [--classes 10] [--val-fraction 0.1] [--seed 0]

SRC holds ``train/`` and ``val/`` class folders, or the ILSVRC-2012 files (the train tar, a flat
val folder with the devkit's labels: :mod:`alexnet.data.sources`). Where SRC has no val split,
``--val-fraction F`` holds F of each training class out as one (seeded by ``--seed``).
OUT may be a local path or an fsspec URL. Interrupted builds resume (complete shards are kept).
Progress goes to stderr: a bar on a terminal, a line every 30 s in a log (``ray job logs``,
``kubectl logs``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def cmd_shards(args: argparse.Namespace) -> int:
    """Run the build and print a summary (skipped files named, warnings last)."""
    from alexnet.data.writer import build_shards, build_synthetic

    common = dict(
        quality=args.quality, shard_size=args.shard_size, workers=args.workers, progress=not args.quiet
    )
    if args.synthetic is not None:
        if args.out is not None:
            raise ValueError("with --synthetic N give only OUT (no SRC)")
        if args.val_labels is not None or args.allow_empty_classes:
            raise ValueError("--val-labels and --allow-empty-classes are for SRC OUT, not --synthetic")
        s = build_synthetic(
            args.synthetic,
            args.src,
            size=args.size or 40,
            classes=args.classes,
            val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
            seed=args.seed,
            **common,
        )
    else:
        if args.out is None:
            raise ValueError(
                "give SRC OUT (an ImageFolder tree and the output directory), or --synthetic N OUT"
            )
        s = build_shards(
            args.src,
            args.out,
            size=args.size or 256,
            val_labels=args.val_labels,
            allow_empty_classes=args.allow_empty_classes,
            val_fraction=args.val_fraction or 0.0,
            seed=args.seed,
            **common,
        )
    counts = ", ".join(f"{k} {v}" for k, v in s.counts.items())
    print(
        f"{s.out}: {counts} images; {s.shards_written} shards written, {s.shards_reused} kept from an "
        f"earlier run; {s.images_per_s:.0f} images/s"
    )
    if s.skipped:
        print(f"skipped {len(s.skipped)} unreadable images:")
        for path, reason in s.skipped:
            print(f"  {path!r}: {reason!r}")  # repr: a file name cannot forge a line of the summary
    for w in s.warnings:
        print(f"alexnet shards: warning: {w}", file=sys.stderr)
    return 0


def add_shards(sub: argparse._SubParsersAction) -> None:
    """Register ``alexnet shards``."""
    from alexnet.cli import subparser

    p = subparser(
        sub,
        "shards",
        "ImageFolder tree, ImageNet files (or --synthetic N) -> WebDataset shards + dataset.json",
        "alexnet shards --synthetic 3000 data/demo",
        "alexnet shards MY_IMAGEFOLDER data/mine --size 36 --val-fraction 0.1   # SRC without val/",
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help="folder with train/ and val/ (class folders, or ImageNet's tars, flat val; --synthetic: OUT)",
    )
    p.add_argument("out", metavar="OUT", nargs="?", help="output directory or fsspec URL")
    p.add_argument(
        "--synthetic", type=int, metavar="N", help="generate N learnable images instead of reading SRC"
    )
    p.add_argument("--size", type=int, default=None, help="stored image side (default 256; synthetic 40)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument(
        "--val-labels",
        metavar="FILE",
        default=None,
        help="labels of a flat val folder: ILSVRC2012_devkit_t12.tar.gz (or its folder), its "
        "ILSVRC2012_validation_ground_truth.txt (meta.mat beside it), or LOC_val_solution.csv "
        "(default: the first of those found in SRC)",
    )
    p.add_argument(
        "--allow-empty-classes",
        action="store_true",
        help="leave training class folders without images out of the classes (default: refuse them)",
    )
    p.add_argument("--classes", type=int, default=10, help="synthetic: number of classes")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="SRC without a val split: hold this fraction of each class out of train as val (seeded, "
        "recorded in dataset.json); synthetic: the fraction of N for val (default 0.1)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the --val-fraction split; synthetic: the generator's"
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_shards)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_shards]
