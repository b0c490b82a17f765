"""The small preset on real data, over seeds and learning-rate rules (the README's "Small datasets").

scikit-learn's 1,797 handwritten 8x8 digits (shipped inside the package) written out as an
ImageFolder of PNGs (1,500 train / 297 val, split by a seeded permutation), ``alexnet shards --size
36``, then ``alexnet train --preset small`` with the README's recipe (batch 64, lr 0.02, dropout 0,
15 epochs) once per seed and rule: ``step`` (the rate /10 after epochs 10 and 13, the recipe) and
``constant`` (the baseline, in the same run). Prints each run's val top-1 error after every epoch,
then one JSON line: per rule, the last epoch's error per seed and the worst over the last three
epochs. ``tests/e2e/test_digits.py`` runs a 5-epoch form of the recipe through the CLI (seed 0).

    PYTHONPATH=. .venv/bin/python bench/digits.py [--seeds 0 1 2] [--epochs 15]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the project before this folder, whose pipeline.py would shadow the ``pipeline`` package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_VAL = 297  # of 1,797: the rest (1,500) to train on
RECIPE = {"optim.lr": 0.02, "optim.batch_size": 64, "model.dropout": 0}
RULES = {
    "step": {"schedule.kind": "step", "schedule.milestones": "10,13"},
    "constant": {"schedule.kind": "constant"},
}


def digits_imagefolder(root: Path) -> None:
    """SRC/{train,val}/<digit>/<index>.png: the 8x8 images at 0-255, split by a seeded permutation."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    for i, k in enumerate(order):
        folder = root / ("val" if i < N_VAL else "train") / str(d.target[k])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (d.images[k] * (255 / 16)).round().astype(np.uint8)  # the set's values are 0..16
        Image.fromarray(pixels, "L").save(folder / f"{k:04d}.png")


def val_errors(run_dir: Path) -> list[float]:
    """The val top-1 error after each epoch, from the run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["top1_error"] for r in rows if r["kind"] == "eval"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()

    import ray

    from cluster.config import load_config
    from cluster.job import run_training

    tmp = Path(tempfile.mkdtemp(prefix="digits-"))
    digits_imagefolder(tmp / "src")
    shards = str(tmp / "shards")
    alexnet = str(Path(sys.executable).parent / "alexnet")
    subprocess.run([alexnet, "shards", str(tmp / "src"), shards, "--size", "36", "--quiet"], check=True)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    out: dict[str, dict] = {}
    try:
        for rule, sets in RULES.items():
            last, worst = [], []
            for seed in args.seeds:
                over = {**RECIPE, **sets, "train.seed": seed}  # the run's seed: init, dropout, data
                over.update({"train.epochs": args.epochs, "eval.ten_crop": False})
                cfg = load_config(preset="small", overrides={**over, "checkpoint.at_epoch_end": False})
                run = tmp / f"{rule}-{seed}"
                t0 = time.perf_counter()
                res = run_training(cfg, shards, str(run), preset="small")
                errs = val_errors(run)
                print(
                    f"{rule} seed {seed} ({res.state}, {time.perf_counter() - t0:.0f} s): "
                    f"{[round(e, 3) for e in errs]}",
                    flush=True,
                )
                last.append(round(errs[-1], 4))
                worst.append(round(max(errs[-3:]), 4))
            out[rule] = {"last_epoch_error": last, "worst_of_last_3_epochs": worst}
    finally:
        ray.shutdown()
    print(json.dumps({**out, "seeds": args.seeds, "epochs": args.epochs, "val_images": N_VAL}))


if __name__ == "__main__":
    main()
