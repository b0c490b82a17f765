"""``alexnet predict`` / ``export`` on bad input, and the checkpoint's stored side, fast: a checkpoint
of the fake trainer group's run (``tests/cluster/test_finetune.py``'s fixtures; untrained weights,
a real checkpoint). What they compute on a trained run: ``tests/e2e/test_trained_network.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from alexnet.cli import main
from cluster.manifest import _check_inference
from cluster.predict import load_predictor
from tests.cluster.test_bad_input import SETS, refused, train
from tests.cluster.test_finetune import groups, ten  # noqa: F401  (fixtures)


@pytest.fixture
def run(groups, ten, tmp_path) -> str:  # noqa: F811
    run = tmp_path / "run"
    assert main(train(ten, run, "--steps", "3", *SETS)) == 0
    return str(run)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(36, 36), (90, 50), (200, 300)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_predict_reads_the_stored_side_from_the_checkpoint(run, images, capsys):
    p = load_predictor(run, "cpu")
    assert (p.resize, p.preprocess.stored_size, p.preprocess.input_size) == (36, 36, 32)
    assert load_predictor(run, "cpu", resize=50).resize == 50
    capsys.readouterr()
    assert main(["predict", "--checkpoint", run, str(images), "--top-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and table[0].startswith(str(images / "0.png")) and table[0].count("class_") == 3
    argv = ["predict", "--checkpoint", run, str(images), "--json", "--ten-crop", "--batch-size", "2"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(r["top"]) for r in rows] == [5, 5, 5] and set(rows[0]) == {"path", "top"}


def test_predict_refuses_bad_input_naming_the_fix(run, images, tmp_path, capsys):
    cases = [
        (["--top-k", "11"], "--top-k 11: use 1..10 (the checkpoint's classes)"),
        (["--resize", "20"], "--resize 20: smaller than the checkpoint's input size 32"),
        (["--features", "fc9"], "--features fc9: use one of conv1, conv2"),
        (["--batch-size", "0"], "--batch-size 0: use >= 1"),
    ]
    for more, said in cases:
        msg = refused(capsys, ["predict", "--checkpoint", run, str(images), *more], "predict")
        assert said in msg, msg
    msg = refused(capsys, ["predict", "--checkpoint", run, str(tmp_path / "nope.jpg")], "predict")
    assert f"{tmp_path}/nope.jpg: no such file or folder" in msg, msg
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    msg = refused(capsys, ["predict", "--checkpoint", run, str(tmp_path / "bad.jpg")], "predict")
    assert "bad.jpg: not an image Pillow can read" in msg, msg
    msg = refused(capsys, ["predict", "--checkpoint", str(tmp_path), str(images)], "predict")
    assert str(tmp_path) in msg, msg


def test_the_inference_record_checks_the_stored_side():
    inf = {"classes": ["a", "b"], "input_size": 32, "input_scale": 1.0, "mean": "rgb"}
    assert _check_inference(inf, 2, 32) == (3, 1, 1)  # a record without it: predict takes 227/256
    assert _check_inference({**inf, "stored_size": 36}, 2, 32) == (3, 1, 1)
    for bad in (20, "36", True, -1):
        with pytest.raises(ValueError, match="inference.stored_size="):
            _check_inference({**inf, "stored_size": bad}, 2, 32)


def test_export_says_what_the_onnx_extra_lacks_before_writing(run, images, tmp_path, capsys, monkeypatch):
    import cluster.export as export

    monkeypatch.setattr(export, "onnx_available", lambda: "onnxscript is not installed: pip install ...")
    argv = ["export", "--checkpoint", run, str(tmp_path / "o"), "--images", str(images), "--onnx"]
    msg = refused(capsys, argv, "export")
    assert "--onnx: onnxscript is not installed" in msg, msg
    assert not (tmp_path / "o").exists()  # refused before anything is written
