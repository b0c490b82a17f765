"""The paper's ablations on real data: ``alexnet study paper-ablations`` with the small preset on
scikit-learn's 1,797 handwritten digits (bench/digits.py's ImageFolder, ``--size 36``), over seeds.

Each variant is compared with the baseline trained in the same study (the same seeds, data and
recipe), so the deltas are ratios against a baseline measured in the same run. The recipe is the
README's for small datasets (batch 64, lr 0.02, the rate /10 after epochs 10 and 13 of 15; a
shorter ``--epochs`` scales the cuts)
with the paper's dropout 0.5 kept in the baseline (its no-dropout variant is one of the
ablations). Prints the study's ``study.md`` (the table recorded in bench/RESULTS.md); the study
directory keeps every run, and the same command again continues a study that was cut off.

    PYTHONPATH=. .venv/bin/python bench/study.py [--seeds 0 1 2] [--epochs 15] [--threshold 0.25]
        [--study-dir DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the project before this folder, whose pipeline.py would shadow the ``pipeline`` package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPE = [
    "optim.batch_size=64",
    "optim.lr=0.02",
    "schedule.kind=step",
    "checkpoint.at_epoch_end=false",  # 27 runs: checkpoints every 1000 steps and at the end only
]


def milestones(epochs: int) -> str:
    """The recipe's rate cuts (after epochs 10 and 13 of 15) scaled to a run of ``epochs``."""
    return ",".join(str(m) for m in sorted({max(1, round(epochs * f)) for f in (10 / 15, 13 / 15)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--study-dir", default="", help="default: a new temporary directory")
    ap.add_argument("--threshold", type=float, default=0.25, help="training error timed (ReLU vs tanh)")
    args = ap.parse_args()

    from alexnet.cli import main as alexnet
    from bench.digits import digits_imagefolder

    root = Path(args.study_dir or tempfile.mkdtemp(prefix="digits-study-"))
    shards = root / "shards"
    if not (shards / "dataset.json").exists():
        digits_imagefolder(root / "src")
        exe = str(Path(sys.executable).parent / "alexnet")
        subprocess.run([exe, "shards", str(root / "src"), str(shards), "--size", "36", "--quiet"], check=True)
    cmd = ["study", "paper-ablations", "--preset", "small", "--data", str(shards)]
    cmd += [
        "--study-dir",
        str(root / "study"),
        "--epochs",
        str(args.epochs),
        "--threshold",
        str(args.threshold),
    ]
    cmd += ["--seeds", *map(str, args.seeds)]
    for s in [*RECIPE, f"schedule.milestones={milestones(args.epochs)}"]:
        cmd += ["--set", s]
    print("alexnet " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    code = alexnet(cmd)
    print(f"exit {code} after {time.perf_counter() - t0:.0f} s", flush=True)
    print((root / "study" / "study.md").read_text())


if __name__ == "__main__":
    main()
