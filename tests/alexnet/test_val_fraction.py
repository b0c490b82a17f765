"""``alexnet shards SRC OUT --val-fraction F`` (issue 24): where SRC has no val split, a seeded,
class-stratified share of train becomes one, recorded in dataset.json; and each fix the no-val
messages advise (`alexnet shards`' warning, `alexnet config`/`train`'s refusal) works as written."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from alexnet.cli import main
from alexnet.data.sources import Source, SourceFile, hold_out_val


def _source(sizes: list[int]) -> Source:
    train = [SourceFile(f"train/c{c}/{i:03d}.jpg", c, 100) for c, n in enumerate(sizes) for i in range(n)]
    classes = [f"c{c}" for c in range(len(sizes))]
    layout = {"train": "class folders", "val": "none", "val_labels": None, "class_names": None}
    return Source(classes, classes, {"train": train}, layout)


def test_hold_out_is_stratified_seeded_and_a_partition():
    src = _source([20, 30, 3, 1])
    got = hold_out_val(src, 0.2, seed=0)
    train, val = got.splits["train"], got.splits["val"]
    per_class = [sum(f.label == c for f in val) for c in range(4)]
    assert per_class == [4, 6, 1, 0]  # round(n * 0.2), and a class of one keeps its image for training
    assert sorted(train + val) == sorted(src.splits["train"]) and not set(train) & set(val)
    assert hold_out_val(src, 0.2, seed=0).splits == got.splits  # a function of (SRC, fraction, seed)
    assert hold_out_val(src, 0.2, seed=1).splits["val"] != val
    assert got.val_split == {"from": "train", "fraction": 0.2, "seed": 0, "per_class": "round(n * fraction)"}
    assert got.layout["val"] == "held out of train: 0.2 of each class, seed 0"
    assert hold_out_val(src, 0.0) is src


@pytest.mark.parametrize(
    "fraction, words",
    [(1.0, ["--val-fraction 1.0", "[0, 1)"]), (0.01, ["--val-fraction 0.01", "holds no image", "0.1"])],
)
def test_a_fraction_that_cannot_split_is_refused(fraction, words):
    with pytest.raises(ValueError) as e:
        hold_out_val(_source([5, 5]), fraction)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_a_source_with_a_val_split_refuses_a_fraction():
    src = _source([5, 5])
    src.splits["val"] = [SourceFile("val/c0/0.jpg", 0, 100)]
    with pytest.raises(ValueError, match="SRC already has a val split .* drop --val-fraction"):
        hold_out_val(src, 0.1)


def _imagefolder(root, per_class: int = 10) -> str:
    """SRC/train/{a,b}/ of small PNGs, no val/."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        d = root / "train" / c
        d.mkdir(parents=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(buf, "PNG")
            (d / f"{i}.png").write_bytes(buf.getvalue())
    return str(root)


def _shards(*argv: str) -> int:
    return main(["shards", *argv, "--size", "36", "--workers", "1", "--quiet"])


def test_val_fraction_splits_a_real_dataset_and_records_it(tmp_path):
    """It used to be ignored for SRC OUT ("synthetic only"): the dataset came out without val."""
    src, out = _imagefolder(tmp_path / "src"), tmp_path / "out"
    assert _shards(src, str(out), "--val-fraction", "0.2", "--seed", "3") == 0
    index = json.loads((out / "dataset.json").read_text())
    assert {k: v["count"] for k, v in index["splits"].items()} == {"train": 16, "val": 4}
    assert index["val_split"] == {
        "from": "train",
        "fraction": 0.2,
        "seed": 3,
        "per_class": "round(n * fraction)",
    }
    assert index["layout"]["val"] == "held out of train: 0.2 of each class, seed 3"


def test_every_fix_the_no_val_messages_advise_works_as_written(tmp_path, capsys):
    src, noval = _imagefolder(tmp_path / "src"), str(tmp_path / "noval")
    assert _shards(src, noval) == 0
    warning = capsys.readouterr().err
    # the refusal of `alexnet config` / `alexnet train` on it, with the same two fixes
    assert main(["config", "--preset", "small", "--data", noval]) == 2
    assert "--set model.num_classes=2" in capsys.readouterr().err  # advised, and taken below
    small = [
        "config",
        "--preset",
        "small",
        "--set",
        "model.num_classes=2",
        "--set",
        "optim.batch_size=8",
        "--data",
    ]
    assert main([*small, noval]) == 2
    refusal = capsys.readouterr().err
    for message in (warning, refusal):
        assert "--set eval.every_epochs=0" in message, message
        assert re.search(r"--val-fraction 0\.1\b", message), message
    # fix 1: train it without validation (also under the small preset's plateau rule: a warning)
    assert main([*small, noval, "--set", "eval.every_epochs=0"]) == 0
    assert "warning: schedule.kind='plateau'" in capsys.readouterr().err
    # fix 2: rebuild with a val split held out of train, into a new OUT
    new = str(tmp_path / "new")
    assert _shards(src, new, "--val-fraction", "0.1") == 0
    assert "no val split" not in capsys.readouterr().err
    assert main([*small, new]) == 0
