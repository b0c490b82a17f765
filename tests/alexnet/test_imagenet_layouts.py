"""``alexnet shards`` on ImageNet as people have it, fabricated small: each layout, its labels, bad input.

The fabricated ILSVRC-2012: four WNID classes, three train images each (one greyscale JPEG, one
CMYK JPEG, one PNG named ``n02105855_2933.JPEG`` among them), eight flat val images labelled by
a devkit (``meta.mat`` as the real one: a ``synsets`` struct array with the real fields, one
internal node, ILSVRC IDs deliberately NOT in WNID order) and by a Kaggle ``LOC_val_solution.csv``.
Every image is a solid colour of its class (the grey one aside), so a stored sample's pixels say
which class it really is, whatever the file it came from.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torchvision.io import ImageReadMode, decode_jpeg

from alexnet.cli import main as cli_main
from alexnet.data.index import DatasetIndex
from alexnet.data.writer import build_shards

SIZE = 16
# ILSVRC ID -> WNID, words: IDs out of WNID order, as in the real devkit (ID 1 is n02119789)
SYNSETS = {
    1: ("n02105855", "Shetland sheepdog, Shetland sheep dog, Shetland"),
    2: ("n01440764", "tench, Tinca tinca"),
    3: ("n01491361", "tiger shark, Galeocerdo cuvieri"),
    4: ("n01443537", "goldfish, Carassius auratus"),
}
WNIDS = sorted(w for w, _ in SYNSETS.values())  # the class order: index = label
COLOUR = dict(zip(WNIDS, [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)], strict=True))
VAL_WNIDS = [WNIDS[i] for i in (2, 0, 3, 1, 1, 3, 0, 2)]  # two val images per class, shuffled
GREY, CMYK, PNG = "n01440764_17.JPEG", "n01443537_2.JPEG", "n02105855_2933.JPEG"
# the fields of the real meta.mat's synsets, in its order
FIELDS = [
    "ILSVRC2012_ID",
    "WNID",
    "words",
    "gloss",
    "num_children",
    "children",
    "wordnet_height",
    "num_train_images",
]


def _image(rgb: tuple[int, int, int], seed: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
    x = np.clip(np.array(rgb) + rng.integers(-6, 7, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(x)
    if mode == "L":
        im = Image.new("L", (w, h), 128)
    elif mode == "CMYK":
        im = im.convert("CMYK")
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def _train_images() -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for k, wnid in enumerate(reversed(WNIDS)):  # made in reverse order: nothing depends on it
        out[wnid] = {f"{wnid}_{i}.JPEG": _image(COLOUR[wnid], 10 * k + i) for i in (1, 2, 17)}
    out["n01440764"][GREY] = _image(COLOUR["n01440764"], 99, mode="L")
    out["n01443537"][CMYK] = _image(COLOUR["n01443537"], 98, mode="CMYK")
    del out["n02105855"]["n02105855_17.JPEG"]
    out["n02105855"][PNG] = _image(COLOUR["n02105855"], 97, fmt="PNG")  # ImageNet's PNG named .JPEG
    return out


TRAIN = _train_images()
VAL = {f"ILSVRC2012_val_{i:08d}.JPEG": _image(COLOUR[w], 100 + i) for i, w in enumerate(VAL_WNIDS, 1)}
TRUTH = dict(zip(VAL, VAL_WNIDS, strict=True))
ID_OF = {w: i for i, (w, _) in SYNSETS.items()}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _tar(files: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _meta_mat(synsets: dict[int, tuple[str, str]]) -> bytes:
    """A devkit meta.mat: (N, 1) struct array ``synsets`` with the real fields; leaves and one inner node."""
    rows = [
        (i, wnid, words, f"gloss of {words}", 0, np.zeros((1, 0)), 0, 3)
        for i, (wnid, words) in synsets.items()
    ]
    children = np.array([list(synsets)], dtype=float)
    rows.append((1001, "n00001740", "entity", "that which exists", len(synsets), children, 4, 0))
    arr = np.zeros((len(rows), 1), dtype=[(f, object) for f in FIELDS])
    for k, row in enumerate(rows):
        arr[k, 0] = row
    buf = io.BytesIO()
    savemat(buf, {"synsets": arr})
    return buf.getvalue()


def _truth_txt(truth: dict[str, str]) -> bytes:
    return "".join(f"{ID_OF[truth[name]]}\n" for name in sorted(truth)).encode()


def _devkit_files(truth: dict[str, str] = TRUTH, synsets: dict = SYNSETS) -> dict[str, bytes]:
    return {
        "ILSVRC2012_devkit_t12/COPYING": b"devkit",
        "ILSVRC2012_devkit_t12/data/meta.mat": _meta_mat(synsets),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": _truth_txt(truth),
    }


def _devkit_targz(truth: dict[str, str] = TRUTH, synsets: dict = SYNSETS) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in _devkit_files(truth, synsets).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _loc_csv(truth: dict[str, str]) -> bytes:
    rows = [f"{Path(n).stem},{w} 10 20 30 40 {w} 1 2 3 4" for n, w in reversed(list(truth.items()))]
    return ("ImageId,PredictionString\n" + "\n".join(rows) + "\n").encode()


def _mapping_txt() -> bytes:
    return "".join(f"{w} {words}\n" for w, words in sorted(SYNSETS.values())).encode()


# ---- layouts of SRC ---------------------------------------------------------------------------


def train_folders(src: Path) -> None:
    for wnid, files in TRAIN.items():
        for name, data in files.items():
            _write(src / "train" / wnid / name, data)


def train_tar(src: Path, inside: bool = False) -> None:
    outer = {f"{w}.tar": _tar(files) for w, files in TRAIN.items()}  # not in WNID order
    _write(src / ("train" if inside else "") / "ILSVRC2012_img_train.tar", _tar(outer, tarfile.GNU_FORMAT))


def train_class_tars(src: Path) -> None:
    for wnid, files in TRAIN.items():
        _write(src / "train" / f"{wnid}.tar", _tar(files, tarfile.USTAR_FORMAT))


def val_folders(src: Path) -> None:
    for name, data in VAL.items():
        _write(src / "val" / TRUTH[name] / name, data)


def val_flat(src: Path) -> None:
    for name, data in VAL.items():
        _write(src / "val" / name, data)


DEVKIT_DATA = {f"devkit/data/{k.rsplit('/', 1)[-1]}": v for k, v in _devkit_files().items() if "/data/" in k}
LAYOUTS = {
    # name: (train, val, label files {path in SRC: bytes}, --val-labels (in SRC) or None, labels used)
    "train tar, flat val, devkit tar.gz found in SRC": (
        train_tar,
        val_flat,
        {"ILSVRC2012_devkit_t12.tar.gz": _devkit_targz()},
        None,
        "ILSVRC2012_devkit_t12.tar.gz",
    ),
    "train/ tar, flat val, --val-labels ground truth txt with meta.mat beside": (
        lambda s: train_tar(s, inside=True),
        val_flat,
        DEVKIT_DATA,
        "devkit/data/ILSVRC2012_validation_ground_truth.txt",
        "devkit/data/ILSVRC2012_validation_ground_truth.txt",
    ),
    "class tars, val tar, --val-labels LOC csv with its synset mapping": (
        train_class_tars,
        lambda s: _write(s / "ILSVRC2012_img_val.tar", _tar(VAL)),
        {"kaggle/LOC_val_solution.csv": _loc_csv(TRUTH), "kaggle/LOC_synset_mapping.txt": _mapping_txt()},
        "kaggle/LOC_val_solution.csv",
        "kaggle/LOC_val_solution.csv",
    ),
    "n*/ folders, flat val, unpacked devkit folder found in SRC": (
        train_folders,
        val_flat,
        _devkit_files(),
        None,
        "ILSVRC2012_devkit_t12",
    ),
}


def make_src(root: Path, layout: str) -> tuple[Path, str | None]:
    train, val, files, labels, _ = LAYOUTS[layout]
    src = root / "src"
    train(src)
    val(src)
    for rel, data in files.items():
        _write(src / rel, data)
    return src, (str(src / labels) if labels else None)


def _build(src: Path, out: Path, **kw) -> object:
    return build_shards(str(src), str(out), size=SIZE, shard_size=5, workers=1, progress=False, **kw)


def _samples(ix: DatasetIndex, split: str) -> list[tuple[int, np.ndarray]]:
    """(label, decoded HWC uint8 pixels) of every stored sample, in key order."""
    out = []
    for sh in ix.shards(split):
        with tarfile.open(sh.url) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for key in sorted({n.split(".")[0] for n in members}):
            jpg = members[f"{key}.jpg"]
            t = decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
            assert t.shape == (3, SIZE, SIZE)  # a real 3-channel JPEG, whatever the source's mode
            out.append((int(members[f"{key}.cls"]), t.permute(1, 2, 0).numpy()))
    return out


def _class_by_colour(px: np.ndarray) -> str | None:
    """The WNID whose colour these pixels are; None for grey pixels."""
    mean = px.reshape(-1, 3).mean(0)
    if np.ptp(mean) < 4:
        return None
    return min(COLOUR, key=lambda w: np.abs(mean - COLOUR[w]).sum())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same images as an ImageFolder tree (train/<wnid>/, val/<wnid>/): what every layout must equal."""
    root = tmp_path_factory.mktemp("ref")
    train_folders(root / "src")
    val_folders(root / "src")
    s = _build(root / "src", root / "out")
    return root / "out", s


def test_reference_labels_colours_and_modes(reference):
    out, s = reference
    ix = DatasetIndex.load(str(out))
    assert ix.classes == WNIDS  # sorted WNIDs, not ILSVRC ID order
    assert s.counts == {"train": 12, "val": 8} and s.skipped == []  # grey, CMYK and PNG-as-JPEG all read
    train = _samples(ix, "train")
    grey = [lab for lab, px in train if _class_by_colour(px) is None]
    assert grey == [WNIDS.index("n01440764")]  # the greyscale JPEG, stored as RGB with R = G = B
    assert all(WNIDS[lab] == _class_by_colour(px) for lab, px in train if _class_by_colour(px))
    # the CMYK source kept its colour (not inverted), PNG-as-JPEG its pixels
    labels = sorted(lab for lab, _ in train)
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    val = _samples(ix, "val")
    assert [WNIDS[lab] for lab, _ in val] == [_class_by_colour(px) for _, px in val]
    assert sorted(WNIDS[lab] for lab, _ in val) == sorted(VAL_WNIDS)


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isreg()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_imagefolder(layout, reference, tmp_path):
    """Each ILSVRC layout gives the same shards as the ImageFolder of the same images: every member
    byte-identical but the ``json`` one, whose ``src`` names the image as this layout holds it (the
    same file name)."""
    src, labels = make_src(tmp_path, layout)
    s = _build(src, tmp_path / "out", val_labels=labels)
    ref_out, ref = reference
    assert s.counts == ref.counts and s.skipped == []
    for p in sorted(ref_out.glob("*.tar")):
        got, want = _members(tmp_path / "out" / p.name), _members(p)
        assert list(got) == list(want), p.name  # same members in the same order
        for name in want:
            if name.endswith(".json"):
                a, b = json.loads(got[name])["src"], json.loads(want[name])["src"]
                assert a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1] and b.startswith(("train/", "val/"))
            else:
                assert got[name] == want[name], (p.name, name)
    ix = DatasetIndex.load(str(tmp_path / "out"))
    assert ix.classes == WNIDS
    words = dict(SYNSETS.values())
    assert ix.class_names == [words[w] for w in WNIDS]  # from meta.mat (or LOC_synset_mapping.txt)
    assert ix.meta["layout"]["val_labels"] == f"{src}/{LAYOUTS[layout][4]}"
    # the labels are the fabricated ground truth, sample by sample
    val = _samples(ix, "val")
    assert [WNIDS[lab] for lab, _ in val] == [_class_by_colour(px) for _, px in val]


def test_cli_flat_val_with_devkit_and_names(tmp_path, capsys):
    src, _ = make_src(tmp_path, "train tar, flat val, devkit tar.gz found in SRC")
    out = tmp_path / "out"
    assert cli_main(["shards", str(src), str(out), "--size", str(SIZE), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "ILSVRC2012_img_train.tar, read in place" in err and "ILSVRC2012_devkit_t12.tar.gz" in err
    ix = DatasetIndex.load(str(out))
    assert ix.count("val") == 8 and ix.class_names[0] == "tench, Tinca tinca"


def test_imagefolder_without_label_files_names_are_folders(reference):
    ix = DatasetIndex.load(str(reference[0]))
    assert ix.class_names == WNIDS and ix.meta["layout"]["val_labels"] is None


# ---- bad input: one clear error naming the file and the fix, and nothing written ---------------


def _refused(argv: list[str], out: Path, capsys) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alexnet shards: error: ") and "\n" not in err and "Traceback" not in err
    assert not list(out.glob("*.tar")) and not (out / "dataset.json").exists()  # before any shard
    return err


def _flat_src(tmp_path: Path, val: dict[str, bytes] = VAL) -> Path:
    src = tmp_path / "src"
    train_folders(src)
    for name, data in val.items():
        _write(src / "val" / name, data)
    return src


def test_devkit_with_labels_for_missing_files(tmp_path, capsys):
    src = _flat_src(tmp_path, {k: v for k, v in VAL.items() if not k.endswith("3.JPEG")})
    _write(src / "ILSVRC2012_devkit_t12.tar.gz", _devkit_targz())
    out = tmp_path / "out"
    err = _refused(["shards", str(src), str(out)], out, capsys)
    assert "ILSVRC2012_devkit_t12.tar.gz labels 8 val images, 1 of which are not in SRC" in err
    assert "ILSVRC2012_val_00000003" in err and "complete val set" in err


def test_val_files_without_labels(tmp_path, capsys):
    src = _flat_src(tmp_path, dict(VAL, **{"ILSVRC2012_val_00000099.JPEG": VAL[next(iter(VAL))]}))
    _write(src / "ILSVRC2012_devkit_t12.tar.gz", _devkit_targz())
    out = tmp_path / "out"
    err = _refused(["shards", str(src), str(out)], out, capsys)
    assert "has no label for 1 of the 9 val images" in err and "val/ILSVRC2012_val_00000099.JPEG" in err


def test_val_wnid_missing_from_train(tmp_path, capsys):
    src = _flat_src(tmp_path)
    truth = dict(TRUTH, **{"ILSVRC2012_val_00000005.JPEG": "n09999999"})
    _write(tmp_path / "LOC_val_solution.csv", _loc_csv(truth))
    out = tmp_path / "out"
    err = _refused(
        ["shards", str(src), str(out), "--val-labels", str(tmp_path / "LOC_val_solution.csv")], out, capsys
    )
    assert "n09999999" in err and "no training images" in err and "ILSVRC2012_val_00000005" in err


def test_flat_val_without_labels(tmp_path, capsys):
    src = _flat_src(tmp_path)
    out = tmp_path / "out"
    err = _refused(["shards", str(src), str(out)], out, capsys)
    assert "flat (8 files" in err and "--val-labels FILE" in err and "ILSVRC2012_devkit_t12.tar.gz" in err


def test_ground_truth_without_meta_mat(tmp_path, capsys):
    src = _flat_src(tmp_path)
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_bytes(_truth_txt(TRUTH))
    out = tmp_path / "out"
    err = _refused(["shards", str(src), str(out), "--val-labels", str(gt)], out, capsys)
    assert f"no {tmp_path}/meta.mat" in err and "put meta.mat beside it" in err


def test_ground_truth_id_not_a_class(tmp_path, capsys):
    src = _flat_src(tmp_path)
    files = _devkit_files()
    files["ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"] = b"2\n1\n1001\n"
    for k, v in files.items():
        _write(src / k, v)
    out = tmp_path / "out"
    err = _refused(["shards", str(src), str(out)], out, capsys)
    assert "ILSVRC2012_validation_ground_truth.txt: line 3 is '1001'" in err


def test_not_a_meta_mat(tmp_path, capsys):
    src = _flat_src(tmp_path)
    _write(src / "dk/meta.mat", b"MATLAB 5.0 MAT-file, but not really")
    _write(src / "dk/ILSVRC2012_validation_ground_truth.txt", _truth_txt(TRUTH))
    out = tmp_path / "out"
    err = _refused(["shards", str(src), str(out), "--val-labels", str(src / "dk")], out, capsys)
    assert "dk/meta.mat: not a devkit meta.mat" in err


def test_ambiguous_train_and_needless_flag(tmp_path, capsys):
    src = tmp_path / "src"
    train_folders(src)
    train_tar(src)  # a half-done unpacking: folders and the tar
    val_folders(src)
    out = tmp_path / "out"
    err = _refused(["shards", str(src), str(out)], out, capsys)
    assert "train is there twice" in err and "ILSVRC2012_img_train.tar" in err
    (src / "ILSVRC2012_img_train.tar").unlink()
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_bytes(_loc_csv(TRUTH))
    err = _refused(["shards", str(src), str(out), "--val-labels", str(labels)], out, capsys)
    assert "drop --val-labels" in err


def test_truncated_train_tar(tmp_path, capsys):
    src = tmp_path / "src"
    train_tar(src)
    data = (src / "ILSVRC2012_img_train.tar").read_bytes()
    (src / "ILSVRC2012_img_train.tar").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    err = _refused(["shards", str(src), str(out)], out, capsys)
    assert "ILSVRC2012_img_train.tar" in err and "download it again" in err
    shutil.rmtree(src)


def test_readme_datasets_commands_parse():
    """The README's `alexnet shards` lines for ImageNet are real commands with real flags."""
    import re

    from tests.deploy.test_configs import check_alexnet_command
    from tests.deploy.test_readme import ROOT, shell_commands

    text = (ROOT / "README.md").read_text()
    section = text.split("### Datasets: `alexnet shards`", 1)[1].split("\n### ", 1)[0]
    cmds = shell_commands(section)
    assert [c[:2] for c in cmds] == [["alexnet", "shards"]] * 2 and "--val-labels" in cmds[1]
    for argv in cmds:
        check_alexnet_command(argv, "README Datasets")
    assert re.search(r"`--allow-empty-classes`", section)


def test_val_labels_without_val_set_and_twin_names(tmp_path, capsys):
    src = tmp_path / "src"
    train_folders(src)
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_bytes(_loc_csv(TRUTH))
    out = tmp_path / "out"
    err = _refused(["shards", str(src), str(out), "--val-labels", str(labels)], out, capsys)
    assert "SRC has no val set; drop --val-labels" in err
    val_flat(src)
    _write(src / "val" / "ILSVRC2012_val_00000002.png", VAL["ILSVRC2012_val_00000002.JPEG"])
    err = _refused(["shards", str(src), str(out), "--val-labels", str(labels)], out, capsys)
    assert "1 val image(s) share a name" in err and "val/ILSVRC2012_val_00000002.png" in err


def test_val_half_sorted_refused_but_a_script_beside_folders_is_fine(tmp_path, capsys):
    src = tmp_path / "src"
    train_folders(src)
    val_folders(src)
    _write(src / "val" / "valprep.sh", b"#!/bin/sh\nmkdir -p n01440764\n")  # what the sorting recipes leave
    s = _build(src, tmp_path / "ok")
    assert s.counts == {"train": 12, "val": 8}
    _write(src / "val" / "ILSVRC2012_val_00000099.JPEG", VAL["ILSVRC2012_val_00000001.JPEG"])  # not sorted
    out = tmp_path / "out"
    err = _refused(["shards", str(src), str(out)], out, capsys)
    assert "val is there twice, as class folders SRC/val/<class>/ and as flat SRC/val/<image>" in err
