"""``alexnet study`` end to end on the session's local Ray: a tiny study file (the baseline and
no-LRN, one seed, 6 steps of the demo preset on a generated dataset) trains both runs, its report's
numbers are the runs' own (read here from their ``metrics.jsonl``), ``alexnet filters`` on its
baseline gives the report's colour measure, and the same command again trains nothing."""

from __future__ import annotations

import json

import pytest

from alexnet.cli import main
from cluster import study as st

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

STUDY = """
seeds = [0]
[[variant]]
name = "baseline"
[[variant]]
name = "no-lrn"
finding = "lrn"
set = { "model.lrn" = false }
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path_factory.mktemp("data") / "demo")
    build_synthetic(120, out, workers=1, progress=False)  # 108 train: 3 steps of 32 per epoch, 12 val
    return out


def _last_eval(run_dir) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"][-1], [r for r in rows if r["kind"] == "step"]


def test_a_study_reports_its_runs_numbers_and_a_second_call_trains_nothing(
    ray_local, shards, tmp_path, monkeypatch
):
    f = tmp_path / "tiny.toml"
    f.write_text(STUDY)
    out = tmp_path / "study"
    args = ["study", str(f), "--preset", "demo", "--data", shards, "--study-dir", str(out), "--steps", "6"]
    # 2 trainer ranks and 1 data worker, not the demo's 4 and 2 (each a process importing torch):
    # what a study reports does not depend on them
    args += ["--set", "grid.shape=1x1x2", "--set", "data.workers=1"]
    assert main(args) == 0
    state = json.loads((out / "study.json").read_text())
    runs = {r["key"]: r for r in state["runs"]}
    assert {k: r["status"] for k, r in runs.items()} == {
        "baseline-seed0": "finished",
        "no-lrn-seed0": "finished",
    }
    final = {}
    for key, r in runs.items():
        last, steps = _last_eval(out / key)  # validations at steps 3 and 6: the last is the run's end
        assert last["step"] == 6 and len(steps) == 6
        for k in ("top1_error", "top5_error", "top1_error_10crop", "top5_error_10crop"):
            assert r["result"]["final"][k] == last[k], (key, k)
        # the training error over min(an epoch, a quarter of the run) = 1 step: the last step's
        assert r["result"]["train_top1_error"] == steps[-1]["top1_error"]
        assert r["result"]["gap"] == pytest.approx(last["top1_error"] - steps[-1]["top1_error"])
        final[key] = last["top1_error_10crop"]
    lrn = next(m for m in state["findings"] if m["finding"] == "lrn")
    want = 100 * (final["no-lrn-seed0"] - final["baseline-seed0"])
    assert lrn["errors"] == "10crop" and lrn["top1"]["per_seed"] == [pytest.approx(want)]
    assert lrn["top1"]["verdict"] == "one seed: no spread to judge it by"
    md = (out / "study.md").read_text()
    assert (
        f"| baseline | 0 | finished | {100 * runs['baseline-seed0']['result']['final']['top1_error']:.1f} |"
        in md
    )
    assert f"top-1 {want:+.2f} pt (1 seed)" in md
    for png in ("deltas.png", "regularisation.png", "filters.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG", png
    colour = runs["baseline-seed0"]["result"]["colour"]
    assert set(colour["columns"]) == {"0", "1"} and colour["greyscale"] is False  # the demo set is in colour
    png = tmp_path / "f" / "conv1.png"
    assert main(["filters", str(out / "baseline-seed0"), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    written = json.loads(png.with_suffix(".json").read_text())
    assert written["colour_specificity"] == colour["columns"] and written["greyscale"] is False

    # the same command again: nothing is trained, the runs and their checkpoints stay as they were
    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/*/manifest.json")}

    def no_training(data, preset):
        def train(spec, on_coordinator):
            raise AssertionError(f"{spec.key} was trained again")

        return train

    monkeypatch.setattr(st, "train_with_job", no_training)
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/*/manifest.json")} == checkpoints
    again = json.loads((out / "study.json").read_text())
    assert again["runs"] == state["runs"] and again["findings"] == state["findings"]
