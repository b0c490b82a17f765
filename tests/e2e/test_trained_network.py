"""The trained network outside its run, from one 2-epoch demo run (trained once for the module):

* ``alexnet predict --json`` on 20 held-out images (the first val images, written out as PNG)
  gets about as many right as the run's own val error says, and its probabilities are the
  validation pass's on the same images (the same preprocessing from the checkpoint alone);
* ``--features fc7`` writes their (20, 512) features and the file list;
* ``alexnet export`` writes a ``torch.export`` program (and ONNX, with the extra) that matches
  predict within the tolerance, and the check catches a program of other weights;
* ``RUN/tensorboard/`` holds the scalars of ``metrics.jsonl`` and conv1's kernels per column;
* ``--init-from RUN`` fine-tunes to a 5-class set (fc8 re-initialised), ``train.freeze``
  keeps conv1 bit for bit.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.cli import main
from alexnet.data.transforms import decode_image
from cluster.checkpoint import latest_checkpoint, load_checkpoint
from tests.conftest import start_ray_local

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

N_IMAGES = 640  # 576 train (18 steps of 32 per epoch) + 64 val, 40 px, 10 classes
HELD_OUT = 20


def _write_val_pngs(data: str, out: Path, n: int) -> list[int]:
    """The first ``n`` val images of the shards as PNG files (their decoded pixels, losslessly), in
    shard order, named so that sorted order is shard order; their labels."""
    out.mkdir(parents=True)
    labels: list[int] = []
    with tarfile.open(Path(data) / "val-000000.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
        for key in sorted({name.rsplit(".", 1)[0] for name in members})[:n]:
            img = decode_image(tar.extractfile(members[f"{key}.jpg"]).read())  # as validation decodes
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(out / f"{len(labels):02d}.png")
            labels.append(int(tar.extractfile(members[f"{key}.cls"]).read()))
    return labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _ray_finalizer) -> SimpleNamespace:
    from alexnet.data.writer import build_synthetic

    start_ray_local()
    root = tmp_path_factory.mktemp("trained")
    data, run = str(root / "data"), str(root / "run")
    build_synthetic(N_IMAGES, data, workers=1, progress=False)
    argv = ["train", "--preset", "demo", "--data", data, "--run-dir", run, "--epochs", "2"]
    # 2 trainer ranks and 1 data worker, not the demo's 4 and 2 (each a process importing torch):
    # the trained network is the same whatever ran it
    argv += ["--set", "grid.shape=1x1x2", "--set", "data.workers=1"]
    assert main(argv + ["--set", "metrics.port=-1"]) == 0
    rows = [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]
    labels = _write_val_pngs(data, root / "held_out", HELD_OUT)
    return SimpleNamespace(
        root=root,
        data=data,
        run=run,
        images=root / "held_out",
        labels=labels,
        evals=[r for r in rows if r["kind"] == "eval"],
        steps=[r for r in rows if r["kind"] == "step"],
    )


def test_predict_scores_held_out_images_as_the_run_validated(trained, capsys):
    capsys.readouterr()
    assert main(["predict", "--checkpoint", trained.run, "--json", str(trained.images)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["path"]).name for r in rows] == [f"{i:02d}.png" for i in range(HELD_OUT)]
    classes = [f"class_{c:03d}" for c in range(10)]
    for r in rows:
        probs = [t["prob"] for t in r["top"]]
        assert len(r["top"]) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(t["class"] == classes[t["index"]] for t in r["top"])
    right = sum(r["top"][0]["index"] == y for r, y in zip(rows, trained.labels, strict=True))
    # the run's last val error e says 20 (1 - e) right; the margin is two binomial standard
    # deviations of 20 draws (4.4 at e = 0.6): these 20 are a sample of the 64 it scored
    e = trained.evals[-1]["top1_error"]
    margin = 2 * math.sqrt(HELD_OUT * e * (1 - e))
    assert right >= HELD_OUT * (1 - e) - margin, (right, e)


def test_predict_is_the_validation_pass_on_the_same_images(trained):
    from alexnet.data.index import DatasetIndex
    from alexnet.data.records import ReaderStats
    from alexnet.data.val import ValPlan, worker_batches
    from cluster.evaluate import load_for_inference
    from cluster.predict import load_predictor

    p = load_predictor(trained.run, "cpu")
    logp, files = p.outputs([str(trained.images)])
    loaded = load_for_inference(trained.run, torch.device("cpu"))
    pre = loaded.preprocess
    index = DatasetIndex.load(trained.data)
    plan = ValPlan.of(index, 64, replicas=1, workers=1)
    batch = next(worker_batches(index, plan, 0, "center", pre.input_size, ReaderStats()))
    with torch.no_grad():
        logits = loaded.model(batch.model_input(pre.mean, pre.input_scale, torch.device("cpu")))
    want = torch.log_softmax(logits, dim=1)[:HELD_OUT].numpy()
    assert batch.labels[:HELD_OUT].tolist() == trained.labels
    np.testing.assert_allclose(logp, want, atol=1e-5)
    assert p.resize == 40 and len(files) == HELD_OUT  # the stored side the checkpoint records


def test_features_fc7_are_written_with_their_file_list(trained, tmp_path, capsys):
    from cluster.predict import load_predictor

    out = tmp_path / "feats" / "fc7"
    argv = ["predict", "--checkpoint", trained.run, str(trained.images), "--features", "fc7"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    assert "fc7 features (20, 512)" in capsys.readouterr().err
    feats = np.load(f"{out}.npy")
    files = Path(f"{out}.txt").read_text().splitlines()
    assert feats.shape == (HELD_OUT, 512) and feats.dtype == np.float32 and (feats >= 0).all()
    assert [Path(f).name for f in files] == [f"{i:02d}.png" for i in range(HELD_OUT)]
    want, _ = load_predictor(trained.run, "cpu").features([files[3]], "fc7")
    np.testing.assert_allclose(feats[3], want[0], rtol=1e-5, atol=1e-6)
    assert feats.std(0).max() > 0  # not one constant vector


def test_export_writes_a_program_that_matches_predict(trained, tmp_path, capsys):
    from cluster.export import ExportMismatch, export_program, verify
    from cluster.predict import load_predictor

    out = tmp_path / "export"
    argv = ["export", "--checkpoint", trained.run, str(out), "--images", str(trained.images)]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "model.pt2: on 20 images the largest probability difference from predict is" in line, line
    assert "top-1 the same on 20" in line, line
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["resize"] == 40 and pre["classes"][:2] == ["class_000", "class_001"]
    assert pre["input"] == {"dtype": "uint8", "layout": "NCHW", "channels": "RGB", "size": 32}
    # the program on its own: any batch size, uint8 crops in
    p = load_predictor(trained.run, "cpu")
    prog = torch.export.load(str(out / "model.pt2")).module()
    x = torch.stack([im[:, 4:36, 4:36] for im in p.images(sorted(trained.images.iterdir()))[:3]])
    ref, _ = p.outputs(sorted(trained.images.iterdir())[:3])
    np.testing.assert_allclose(torch.softmax(prog(x), 1).detach().numpy(), np.exp(ref), atol=1e-4)
    # the check fails a program of other weights
    other = load_predictor(trained.run, "cpu")
    with torch.no_grad():
        other.model.fc8.weight.mul_(-1)
    bad = tmp_path / "bad"
    bad.mkdir()
    path = export_program(other, bad)
    with pytest.raises(ExportMismatch, match="outputs differ from alexnet predict's on 20 images"):
        verify(p, path, [str(trained.images)])


def test_onnx_export_matches_predict(trained, tmp_path, capsys):
    from cluster.export import onnx_available

    why = onnx_available()
    if why:
        pytest.skip(f"the onnx extra is absent: {why}")
    out = tmp_path / "onnx"
    argv = ["export", "--checkpoint", trained.run, str(out), "--images", str(trained.images), "--onnx"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("model.onnx: on 20 images" in s and "top-1 the same on 20" in s for s in lines), lines
    assert (out / "model.onnx").stat().st_size > 1000


def test_tensorboard_holds_the_scalars_and_the_kernels(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from alexnet.filters import kernel_grid

    acc = EventAccumulator(str(Path(trained.run) / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/top1_error", "train/lr", "train/images_per_second", "train/step_s",
                "train/compute_s", "train/exchange_s", "train/data_wait_s"):  # fmt: skip
        assert tag in tags["scalars"], tags["scalars"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in trained.steps]
    np.testing.assert_allclose([e.value for e in loss], [r["loss"] for r in trained.steps], rtol=1e-6)
    val = acc.Scalars("val/top1_error")
    assert [(e.step, round(e.value, 6)) for e in val] == [
        (r["step"], round(r["top1_error"], 6)) for r in trained.evals
    ]
    assert "val/top1_error_10crop" in tags["scalars"]
    # conv1 per column at each validation; the last one is the final checkpoint's weights
    ck = load_checkpoint(latest_checkpoint(trained.run), ("model.safetensors",))
    for c in (0, 1):
        imgs = acc.Images(f"conv1/column{c}")
        assert [e.step for e in imgs] == [r["step"] for r in trained.evals]
        got = np.asarray(Image.open(io.BytesIO(imgs[-1].encoded_image_string)))
        assert np.array_equal(got, kernel_grid(ck.model[f"conv1.{c}.weight"]))


def test_init_from_fine_tunes_to_five_classes_with_conv1_frozen(trained, tmp_path, capsys):
    from alexnet.data.writer import build_synthetic

    data, run = str(tmp_path / "five"), str(tmp_path / "ft")
    build_synthetic(200, data, classes=5, workers=1, progress=False)  # 180 train: 5 steps of 32 per epoch
    argv = ["train", "--preset", "demo", "--data", data, "--run-dir", run, "--steps", "6", "--init-from"]
    sets = ["--set", "model.num_classes=5", "--set", 'train.freeze=["conv1"]', "--set", "metrics.port=-1"]
    sets += ["--set", "grid.shape=1x1x2", "--set", "data.workers=1"]  # fewer processes; the same freeze
    capsys.readouterr()
    assert main(argv + [trained.run, *sets]) == 0
    out = capsys.readouterr().out
    assert "the checkpoint's 10 classes are not this dataset's 5" in out and "fc8 re-initialised" in out, out
    assert "train.freeze: conv1 stay as loaded" in out and "finished at step 6" in out, out
    src = load_checkpoint(latest_checkpoint(trained.run), ("model.safetensors",)).model
    new = load_checkpoint(latest_checkpoint(run), ("model.safetensors",)).model
    for c in (0, 1):
        assert torch.equal(new[f"conv1.{c}.weight"], src[f"conv1.{c}.weight"])  # frozen: bit for bit
        assert not torch.equal(new[f"conv2.{c}.weight"], src[f"conv2.{c}.weight"])  # trained on
        drift = (new[f"conv2.{c}.weight"] - src[f"conv2.{c}.weight"]).norm()
        assert drift < 0.3 * src[f"conv2.{c}.weight"].norm()  # from its weights (a fresh draw: ~1.4x)
    assert new["fc8.0.weight"].shape[0] + new["fc8.1.weight"].shape[0] == 5
