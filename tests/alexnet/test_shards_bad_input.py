"""``alexnet shards`` on bad input (exit code, message, what is and is not written) and its log output."""

from __future__ import annotations

import io
import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

from alexnet.cli import main as cli_main
from alexnet.data.index import DatasetIndex
from alexnet.data.writer import Progress, build_shards, build_synthetic

SIZE = 16


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    return buf.getvalue()


def _tree(root, classes=("ant", "bee", "cat"), val=True, empty=()) -> str:
    for k, c in enumerate(classes):
        for split, n in (("train", 3), ("val", 1)) if val else (("train", 3),):
            d = root / split / c
            d.mkdir(parents=True)
            if c not in empty:
                for i in range(n):
                    (d / f"{i}.jpg").write_bytes(_jpeg(10 * k + i))
    return str(root)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("alexnet shards: error: ") and "\n" not in err and "Traceback" not in err
    return err


# ---- no val split --------------------------------------------------------------------------------


def test_synthetic_without_val_warns_at_the_end(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["shards", "--synthetic", "200", str(out), "--val-fraction", "0", "--workers", "1", "--quiet"]
    assert cli_main(argv) == 0
    cap = capsys.readouterr()
    assert cap.err.strip().splitlines() == [
        f"alexnet shards: warning: {out} has no val split: `alexnet train` validates after every epoch, so "
        f"train on it with `--set eval.every_epochs=0`, or add validation images (SRC/val/, or "
        f"`--val-fraction 0.1` where SRC has none) and build into a new OUT"
    ]
    assert list(json.loads((out / "dataset.json").read_text())["splits"]) == ["train"]


def test_imagefolder_without_val_warns(tmp_path):
    s = build_shards(
        _tree(tmp_path / "src", val=False), str(tmp_path / "out"), size=SIZE, workers=1, progress=False
    )
    assert s.counts == {"train": 9} and len(s.warnings) == 1 and "eval.every_epochs=0" in s.warnings[0]
    s = build_shards(_tree(tmp_path / "src2"), str(tmp_path / "out2"), size=SIZE, workers=1, progress=False)
    assert s.counts == {"train": 9, "val": 3} and s.warnings == []
    src = _tree(tmp_path / "src3", val=False)
    (tmp_path / "src3" / "val" / "ant").mkdir(parents=True)
    (tmp_path / "src3" / "val" / "ant" / "bad.jpg").write_bytes(b"not an image")  # val there, none readable
    s = build_shards(src, str(tmp_path / "out3"), size=SIZE, workers=1, progress=False)
    assert s.counts == {"train": 9, "val": 0} and "holds no images" in s.warnings[0]


# ---- dataset.json ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "out"
    build_synthetic(60, str(out), size=SIZE, classes=3, shard_size=30, workers=1, progress=False)
    return out


def test_invalid_json_names_the_file(built, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    text = (built / "dataset.json").read_text()
    (out / "dataset.json").write_text(text[: len(text) // 2])  # a cut-off copy
    with pytest.raises(ValueError) as e:
        DatasetIndex.load(str(out))
    msg = str(e.value)
    assert msg.startswith(f"{out}/dataset.json: not valid JSON (") and "alexnet shards" in msg
    (out / "dataset.json").write_bytes(b"\xff\xfe binary")
    with pytest.raises(ValueError, match="dataset.json: not valid JSON"):
        DatasetIndex.load(str(out))
    (out / "dataset.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="dataset.json: a JSON list, not a shard index"):
        DatasetIndex.load(str(out))


def test_valid_json_without_required_keys(built, tmp_path):
    meta = json.loads((built / "dataset.json").read_text())
    out = tmp_path / "copy"
    out.mkdir()
    del meta["eigenvalues"], meta["splits"]
    (out / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"dataset.json: no splits, eigenvalues \(an incomplete"):
        DatasetIndex.load(str(out))
    meta = json.loads((built / "dataset.json").read_text())
    meta["splits"]["train"]["shards"] = [{"name": "train-000000.tar"}]
    (out / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"splits.train.shards\[0\] = .*must be \{\"name\""):
        DatasetIndex.load(str(out))


@pytest.mark.parametrize(
    "field,edit,says",
    [
        ("name", lambda sh, sp: sh.update(name="../other/train-000000.tar"), "plain file name"),
        ("name", lambda sh, sp: sh.update(name="/etc/passwd"), "plain file name"),
        ("name", lambda sh, sp: sh.update(name="sub/train-000000.tar"), "plain file name"),
        ("count", lambda sh, sp: sh.update(count=-5), "integer >= 0"),
        ("count", lambda sh, sp: sh.update(count="12"), "integer >= 0"),
        ("bytes", lambda sh, sp: sh.update(bytes=-1), "integer >= 0"),
        ("split count", lambda sh, sp: sp.update(count=sp["count"] + 1), "sum of its shards' counts"),
    ],
)
def test_an_edited_index_is_refused_naming_the_field(built, tmp_path, field, edit, says):
    """dataset.json names the files a reader opens: only plain names inside the dataset folder, and
    counts that are counts, pass; the message names the field."""
    meta = json.loads((built / "dataset.json").read_text())
    split = meta["splits"]["val"]
    edit(split["shards"][0], split)
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=says) as e:
        DatasetIndex.load(str(tmp_path))
    where = "splits.val.count" if field == "split count" else f"splits.val.shards[0].{field}"
    assert f"dataset.json: {where} = " in str(e.value) and "alexnet shards" in str(e.value)


def test_an_index_whose_mean_image_file_leaves_the_folder_is_refused(built, tmp_path):
    meta = json.loads((built / "dataset.json").read_text())
    meta["mean_image_file"] = "../mean_image.npy"
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"mean_image_file = '\.\./mean_image.npy': must be a plain file"):
        DatasetIndex.load(str(tmp_path))


def test_an_index_of_the_earlier_format_is_refused_in_one_line(built, tmp_path):
    meta = json.loads((built / "dataset.json").read_text())
    meta["format_version"] = 1
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as e:
        DatasetIndex.load(str(tmp_path))
    assert "format_version 1, this code reads 2; rebuild the shards" in str(e.value)
    assert "\n" not in str(e.value)


def test_old_index_without_class_names_loads(built, tmp_path):
    meta = json.loads((built / "dataset.json").read_text())
    assert meta["class_names"] == meta["classes"]
    del meta["class_names"]
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ix = DatasetIndex.load(str(tmp_path))
    assert ix.class_names == ix.classes == ["class_000", "class_001", "class_002"]


# ---- OUT that cannot be created ------------------------------------------------------------------


def test_out_under_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    out = tmp_path / "afile" / "out"
    assert cli_main(["shards", "--synthetic", "50", str(out), "--quiet", "--workers", "1"]) == 2
    err = _one_line_error(capsys)
    assert f"OUT={out}: cannot create it: {tmp_path}/afile is a file" in err
    assert (tmp_path / "afile").read_text() == "keep me"
    src = _tree(tmp_path / "src")
    assert cli_main(["shards", src, str(out), "--quiet"]) == 2
    assert "is a file" in _one_line_error(capsys)


def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("keep me")
    assert cli_main(["shards", "--synthetic", "50", str(tmp_path / "out"), "--quiet"]) == 2
    assert f"OUT={tmp_path / 'out'} is a file" in _one_line_error(capsys)
    assert (tmp_path / "out").read_text() == "keep me"


def test_out_in_a_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(ro, os.W_OK):  # root writes anyway: the case cannot happen here
            pytest.skip("running as root: a read-only folder is writable")
        out = ro / "out"
        assert cli_main(["shards", "--synthetic", "50", str(out), "--quiet"]) == 2
        assert f"OUT={out}: cannot create or write it (Permission denied)" in _one_line_error(capsys)
        assert not out.exists()
    finally:
        ro.chmod(stat.S_IRWXU)


def test_src_scan_failure_leaves_out_reusable(tmp_path, capsys):
    """The OUT check runs before the scan; a scan that then fails leaves nothing that blocks a retry."""
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    out = tmp_path / "out"
    assert cli_main(["shards", str(src), str(out), "--quiet"]) == 2
    assert "no training set" in _one_line_error(capsys)
    _tree(tmp_path / "src2")
    assert cli_main(["shards", str(tmp_path / "src2"), str(out), "--quiet", "--size", "16"]) == 0
    assert DatasetIndex.load(str(out)).count("train") == 9


# ---- empty class folders -----------------------------------------------------------------------


def test_empty_class_refused(tmp_path, capsys):
    src = _tree(tmp_path / "src", empty=("bee",))
    out = tmp_path / "out"
    assert cli_main(["shards", src, str(out), "--quiet", "--size", "16"]) == 2
    err = _one_line_error(capsys)
    assert "1 training class(es) hold no images: SRC/train/bee" in err and "--allow-empty-classes" in err
    assert not list(out.glob("*.tar")) and not (out / "dataset.json").exists()


def test_empty_class_dropped_when_allowed(tmp_path, capsys):
    src = _tree(tmp_path / "src", empty=("bee",))
    out = tmp_path / "out"
    argv = ["shards", src, str(out), "--quiet", "--size", "16", "--allow-empty-classes", "--workers", "1"]
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: left out 1 empty training class(es) (--allow-empty-classes): SRC/train/bee" in err
    ix = DatasetIndex.load(str(out))
    assert ix.classes == ["ant", "cat"] and ix.num_classes == 2
    import webdataset as wds

    labels = [int(x["cls"]) for x in wds.WebDataset([s.url for s in ix.shards("train")], shardshuffle=False)]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]  # dense: cat is 1, not 2


# ---- skip reasons ---------------------------------------------------------------------------------


def test_skip_reasons_read_as_text(tmp_path, capsys):
    src = _tree(tmp_path / "src")
    (tmp_path / "src/train/ant/garbage.jpg").write_bytes(b"this is not an image at all")
    (tmp_path / "src/train/ant/headonly.jpg").write_bytes(b"\xff\xd8\xff\xe0 a JPEG header, then nothing")
    (tmp_path / "src/train/ant/empty.jpg").write_bytes(b"")
    (tmp_path / "src/train/bee/cut.jpg").write_bytes(_jpeg(99)[:-200])
    assert cli_main(["shards", src, str(tmp_path / "out"), "--quiet", "--size", "16", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "object at 0x" not in out
    reasons = {d["path"]: d["reason"] for d in DatasetIndex.load(str(tmp_path / "out")).meta["skipped"]}
    assert reasons["train/ant/empty.jpg"] == "empty file"
    assert reasons["train/ant/garbage.jpg"] == "not an image: no format PIL reads matches its 27 bytes"
    assert reasons["train/ant/headonly.jpg"] == "damaged image data (Truncated File Read)"
    assert reasons["train/bee/cut.jpg"].startswith("damaged JPEG data (image file is truncated")
    for path, reason in reasons.items():
        assert f"  {path!r}: {reason!r}" in out


def test_a_file_name_cannot_forge_a_line_of_the_summary(tmp_path, capsys):
    """A source file named with a newline is printed escaped (repr), on its own line."""
    src = _tree(tmp_path / "src")
    forged = "x.jpg\nalexnet shards: all 1000000 images written"
    (tmp_path / "src/train/ant" / forged).write_bytes(b"not an image")
    assert cli_main(["shards", src, str(tmp_path / "out"), "--quiet", "--size", "16", "--workers", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("alexnet shards: all") for line in lines)
    assert any(line.startswith("  'train/ant/x.jpg\\nalexnet shards: all") for line in lines)


# ---- progress in a log (ray job logs) and on a terminal ------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _progress_build(tmp_path, file, interval) -> list[str]:
    p = Progress(file=file, interval=interval)
    build_synthetic(60, str(tmp_path / "out"), size=SIZE, classes=3, shard_size=10, workers=1, progress=p)
    return file.getvalue()


def test_progress_in_a_log_is_lines(tmp_path):
    text = _progress_build(tmp_path, io.StringIO(), interval=0.0)
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # 7 shards (54 train in 6, 6 val in 1): a line at the start, one per shard (interval 0), and the
    # last again at the close (with the overall rate)
    assert len(lines) == 9 and all(line.startswith("shards: ") for line in lines)
    assert lines[0].startswith("shards: 0/60 images (0%)") and lines[-1].startswith(
        "shards: 60/60 images (100%)"
    )


def test_progress_in_a_log_at_intervals(tmp_path):
    lines = _progress_build(tmp_path, io.StringIO(), interval=3600.0).splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "shards: 0/60 images (0%)",
        "shards: 60/60 images (100%)",
    ]
    (tmp_path / "out" / "dataset.json").unlink()
    assert _progress_build(tmp_path, io.StringIO(), interval=0.0) == ""  # a resume with nothing to write


def test_progress_on_a_terminal_is_a_bar(tmp_path):
    text = _progress_build(tmp_path, _Tty(), interval=0.0)
    assert text.count("\r") >= 2 and "| 60/60 [" in text  # tqdm's bar, redrawn in place


def test_cli_progress_into_a_pipe(tmp_path, capsys):
    """pytest's captured stderr is not a terminal, as under `ray job logs`: plain lines, no \\r."""
    assert cli_main(["shards", "--synthetic", "60", str(tmp_path / "out"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("shards: 60/60 images (100%)")
