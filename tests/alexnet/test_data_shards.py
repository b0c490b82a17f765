"""Shard builder: ImageFolder -> WebDataset shards readable by plain tools, correct index and statistics."""

from __future__ import annotations

import io
import json
import tarfile

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from alexnet.cli import main as cli_main
from alexnet.data.index import DatasetIndex
from alexnet.data.reader import ReaderSpec, Stream
from alexnet.data.sources import SourceFile, scan_source
from alexnet.data.writer import build_shards, build_synthetic, shard_order

SIZE = 24


def _imagefolder(root) -> None:
    """train/{ant,bee}: RGB JPEGs of varied shapes, a grey PNG, a CMYK JPEG, a corrupt file; val/ likewise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for c in ("bee", "ant"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(24, 60)), int(rng.integers(24, 60))
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8), mode="L").save(
        root / "train/ant/grey.png"
    )
    Image.fromarray(rng.integers(0, 255, (40, 30, 4), dtype=np.uint8), mode="CMYK").save(
        root / "train/bee/cmyk.jpg"
    )
    (root / "train/bee/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _imagefolder(root / "src")
    summary = build_shards(
        str(root / "src"), str(root / "out"), size=SIZE, shard_size=4, workers=2, progress=False
    )
    return root, summary


def _tar_samples(path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_counts_classes_and_skipped(built):
    root, s = built
    ix = DatasetIndex.load(str(root / "out"))
    assert ix.classes == ["ant", "bee"]  # sorted folder names, as ImageFolder
    assert s.counts == {"train": 12, "val": 4}  # 10 RGB + grey + CMYK; the corrupt file skipped
    assert [p for p, _ in s.skipped] == ["train/bee/corrupt.jpg"]
    assert [d["path"] for d in ix.meta["skipped"]] == ["train/bee/corrupt.jpg"]
    # 13 files in shard order (shard_order) in shards of 4: the one holding the corrupt file has one less
    order = [f.path for f in shard_order(scan_source(str(root / "src")).splits["train"], "train")]
    expected = [4, 4, 4, 1]
    expected[order.index("train/bee/corrupt.jpg") // 4] -= 1
    assert [sh.count for sh in ix.shards("train")] == expected
    assert ix.count("val") == 4 and ix.meta["format_version"] == 2 and ix.size == SIZE


def test_readable_by_tarfile_and_webdataset(built):
    root, _ = built
    ix = DatasetIndex.load(str(root / "out"))
    urls = [sh.url for sh in ix.shards("train")]
    by_tar = {}
    for u in urls:
        by_tar.update(_tar_samples(u))
    assert all(set(v) == {"jpg", "cls", "json"} for v in by_tar.values())
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    seen = [(x["__key__"], int(x["cls"])) for x in samples]
    assert sorted(seen) == sorted((k, int(v["cls"])) for k, v in by_tar.items())
    # each sample names its source image (path inside SRC) in its json member, readable with plain
    # webdataset; the keys stay the writer's numbering
    order = [f for f in shard_order(scan_source(str(root / "src")).splits["train"], "train")]
    want = {f.path: f.label for f in order if f.path != "train/bee/corrupt.jpg"}
    got = {json.loads(x["json"])["src"]: int(x["cls"]) for x in samples}
    assert got == want and all(x["__key__"].startswith("train_") for x in samples)
    labels = [lab for _, lab in sorted(seen)]
    assert labels.count(0) == 6 and labels.count(1) == 6  # ant: 5 + grey; bee: 5 + CMYK
    for v in by_tar.values():
        im = Image.open(io.BytesIO(v["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SIZE, SIZE)


def test_statistics_match_numpy(built):
    root, _ = built
    ix = DatasetIndex.load(str(root / "out"))
    imgs = []
    for sh in ix.shards("train"):
        for v in _tar_samples(sh.url).values():
            imgs.append(np.asarray(Image.open(io.BytesIO(v["jpg"])).convert("RGB"), np.float64))
    x = np.stack(imgs)  # (N, S, S, 3)
    np.testing.assert_allclose(ix.mean_image(), x.mean(0).transpose(2, 0, 1), rtol=1e-5, atol=1e-4)
    pix = x.reshape(-1, 3)
    np.testing.assert_allclose(ix.mean_rgb, pix.mean(0), rtol=1e-9)
    cov = np.cov(pix, rowvar=False, bias=True)
    np.testing.assert_allclose(np.asarray(ix.meta["rgb_cov"]), cov, rtol=1e-7, atol=1e-6)
    evals, evecs = np.linalg.eigh(cov)
    np.testing.assert_allclose(ix.eigenvalues, evals[::-1], rtol=1e-7)
    # eigenvectors up to sign, one per column
    for i in range(3):
        assert abs(abs(ix.eigenvectors[:, i] @ evecs[:, 2 - i]) - 1) < 1e-7
    np.testing.assert_allclose(ix.eigenvectors @ np.diag(ix.eigenvalues) @ ix.eigenvectors.T, cov, atol=1e-6)


def test_resume_keeps_complete_shards_and_refuses_other_data(built, tmp_path):
    root, _ = built
    out = root / "out"
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    (out / "train-000001.tar").unlink()
    (out / "dataset.json").unlink()
    s = build_shards(str(root / "src"), str(out), size=SIZE, shard_size=4, workers=1, progress=False)
    assert (s.shards_written, s.shards_reused) == (1, 4)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    assert s.counts == {"train": 12, "val": 4} and [p for p, _ in s.skipped] == ["train/bee/corrupt.jpg"]
    with pytest.raises(ValueError, match="different dataset"):
        build_shards(str(root / "src"), str(out), size=SIZE + 8, shard_size=4, workers=1, progress=False)
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        build_synthetic(50, str(tmp_path), progress=False)


def test_a_shard_cut_or_replaced_since_its_build_is_written_again(tmp_path):
    """A shard an earlier build completed is reused only when its size and sample count are what its
    part file recorded: one truncated (the size check before a run would then pass with the short
    size) is written again, and the index records its real size."""
    out = tmp_path / "out"
    build_synthetic(60, str(out), size=SIZE, classes=3, shard_size=10, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    cut = out / "train-000001.tar"
    cut.write_bytes(before[cut.name][: len(before[cut.name]) // 4])
    (out / "dataset.json").unlink()
    s = build_synthetic(60, str(out), size=SIZE, classes=3, shard_size=10, workers=1, progress=False)
    assert (s.shards_written, s.shards_reused) == (1, len(before) - 1)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    assert any("'train-000001.tar'" in w and "written again" in w for w in s.warnings), s.warnings
    sizes = {
        sh["name"]: sh["bytes"]
        for sh in json.loads((out / "dataset.json").read_text())["splits"]["train"]["shards"]
    }
    assert sizes["train-000001.tar"] == len(before["train-000001.tar"])


def test_synthetic_on_fsspec_url_and_cli(tmp_path):
    url = "memory://alexnet-test/syn"
    s = build_synthetic(300, url, size=36, classes=4, shard_size=100, progress=False)
    assert s.counts == {"train": 270, "val": 30}
    ix = DatasetIndex.load(url)
    assert ix.classes == [f"class_{i:03d}" for i in range(4)] and ix.size == 36
    assert fsspec.filesystem("memory").exists("/alexnet-test/syn/train-000002.tar")
    b = Stream(ReaderSpec(url, batch_size=16, input_size=32), 0).next_batch()
    assert b.images.shape == (16, 3, 32, 32) and set(b.labels) <= {0, 1, 2, 3}
    assert cli_main(["shards", "--synthetic", "200", str(tmp_path / "cli"), "--quiet", "--workers", "1"]) == 0
    meta = json.loads((tmp_path / "cli" / "dataset.json").read_text())
    assert meta["size"] == 40 and len(meta["classes"]) == 10 and meta["splits"]["train"]["count"] == 180
    assert cli_main(["shards", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2


def test_synthetic_classes_differ():
    """Each class is its own pattern: class-mean images differ more than images within a class vary."""
    from alexnet.data.synthetic import synthetic_image

    x = np.stack([synthetic_image(0, "train", i, 40, 10) for i in range(400)]).astype(np.float64)
    gray = x.mean(-1)
    # a colour-independent feature: normalised gradient energy along x vs y, per image
    gx = np.abs(np.diff(gray, axis=2)).mean((1, 2))
    gy = np.abs(np.diff(gray, axis=1)).mean((1, 2))
    ratio = (gx / (gx + gy)).reshape(40, 10)  # (image, class)
    # vertical stripes (class 4) change along x; horizontal (class 3) along y
    assert ratio[:, 4].mean() > 0.6 > 0.4 > ratio[:, 3].mean()


def test_shards_mix_the_classes():
    """Class-sorted files (as an ImageFolder lists them) are written in a seeded order that puts
    every class in every shard, so the reader's bounded shuffle buffer still gives mixed batches."""
    files = [SourceFile(f"train/{c}/{i:04d}.png", c, 1) for c in range(10) for i in range(300)]
    order = shard_order(files, "train")
    assert sorted(order) == sorted(files) and order == shard_order(
        list(files), "train"
    )  # a fixed permutation
    assert shard_order(files, "val") != order  # each split its own
    for k in range(0, len(order), 100):  # shards of 100: a sorted order would hold one class each
        counts = np.bincount([f.label for f in order[k : k + 100]], minlength=10)
        assert counts.min() >= 2 and counts.max() <= 22, counts
