"""Fine-tuning (``alexnet train --init-from``) against training from scratch, on handwritten digits.

scikit-learn's 8x8 digits as in ``bench/digits.py`` (1,500 train / 297 val PNGs, ``--size 36``,
``--preset small``, batch 64, lr 0.02, dropout 0, constant rate). Per seed: a run trained on the
digits 0-4 only (``--epochs`` pre-training epochs), then two runs on all ten digits, validated
after every epoch: one from that run's weights (``--init-from``: fc8 re-initialised for the 10
classes, nothing frozen), one from scratch. Prints each run's val top-1 error per epoch, then one
JSON line: per arm and seed, the steps to reach each val top-1 error of ``--targets`` (the first
validation at or below it, so in steps of one epoch; null if never within ``--finetune-epochs``),
and the errors.

    PYTHONPATH=. .venv/bin/python bench/finetune.py [--seeds 0 1 2] [--targets 0.1 0.05]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the project before this folder, whose pipeline.py would shadow the ``pipeline`` package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.digits import RECIPE, digits_imagefolder  # noqa: E402

FIRST_FIVE = ("0", "1", "2", "3", "4")


def first_five(src: Path, out: Path) -> None:
    """The ImageFolder ``src`` with only the digits 0-4 (train and val)."""
    for split in ("train", "val"):
        for digit in FIRST_FIVE:
            shutil.copytree(src / split / digit, out / split / digit)


def history(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val top-1 error) of each validation, from the run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["top1_error"]) for r in rows if r["kind"] == "eval"]


def steps_to(evals: list[tuple[int, float]], target: float) -> int | None:
    """The step of the first validation at or below ``target``."""
    return next((step for step, err in evals if err <= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10, help="pre-training epochs on the digits 0-4")
    ap.add_argument("--finetune-epochs", type=int, default=8, help="epochs of each 10-digit run")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.1, 0.05], help="val top-1 errors to reach")
    args = ap.parse_args()

    import ray

    from cluster.config import load_config
    from cluster.job import run_training

    tmp = Path(tempfile.mkdtemp(prefix="finetune-"))
    digits_imagefolder(tmp / "src")
    first_five(tmp / "src", tmp / "src5")
    alexnet = str(Path(sys.executable).parent / "alexnet")
    for src, out in (("src", "shards"), ("src5", "shards5")):
        argv = [alexnet, "shards", str(tmp / src), str(tmp / out), "--size", "36", "--quiet"]
        subprocess.run(argv, check=True)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)

    def run(name: str, shards: str, classes: int, epochs: int, seed: int, init_from: str | None = None):
        over = {**RECIPE, "schedule.kind": "constant", "model.num_classes": classes}
        over.update({"data.seed": seed, "train.seed": seed, "model.seed": seed, "train.epochs": epochs})
        over.update({"eval.ten_crop": False, "checkpoint.at_epoch_end": False})
        cfg = load_config(preset="small", overrides=over)
        run_dir = tmp / f"{name}-{seed}"
        t0 = time.perf_counter()
        res = run_training(cfg, shards, str(run_dir), preset="small", init_from=init_from)
        evals = history(run_dir)
        print(f"{name} seed {seed} ({res.state}, {time.perf_counter() - t0:.0f} s): {evals}", flush=True)
        return run_dir, evals

    out: dict[str, dict] = {"finetune": {}, "scratch": {}}
    try:
        for seed in args.seeds:
            pre, _ = run("five", str(tmp / "shards5"), 5, args.epochs, seed)
            for arm, init in (("finetune", str(pre)), ("scratch", None)):
                _, evals = run(arm, str(tmp / "shards"), 10, args.finetune_epochs, seed, init)
                reach = {str(t): steps_to(evals, t) for t in args.targets}
                out[arm][seed] = {"steps_to": reach, "errors": [round(e, 4) for _, e in evals]}
    finally:
        ray.shutdown()
    steps = [s for s, _ in evals]  # the validations' steps, the same in every 10-digit run
    print(json.dumps({**out, "eval_steps": steps, "seeds": args.seeds, "pretrain_epochs": args.epochs}))


if __name__ == "__main__":
    main()
