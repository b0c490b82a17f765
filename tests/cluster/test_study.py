"""``alexnet study`` without training: the report's arithmetic and verdicts on synthetic numbers,
study files, the paper-ablations variants' configs, and the bookkeeping that makes a second call
train nothing finished and continue what was cut off (a fake trainer)."""

from __future__ import annotations

import json
import math

import pytest

from cluster import studies as sd
from cluster import study as st
from cluster import study_report as rep
from cluster.config import Layer, config_layers, load_config, resolve_layers
from cluster.run import resolve_grid
from cluster.scaling import Resources

# -- the report's arithmetic ----------------------------------------------------------------------


def test_stat_is_the_mean_sd_and_t_interval_over_seeds():
    s = rep.stat([1.0, 2.0, 3.0])
    assert (s.mean, s.sd, s.n, s.low, s.high) == (2.0, 1.0, 3, 1.0, 3.0)
    assert s.ci == pytest.approx(4.302653 / math.sqrt(3))  # t(0.975, 2) x sd / sqrt(n)
    one = rep.stat([0.7])
    assert (one.mean, one.sd, one.ci, one.n) == (0.7, None, None, 1)
    assert rep.stat([]) is None


@pytest.mark.parametrize(
    "deltas, sign, words",
    [
        ([1.0, 2.0, 3.0], 1, "within noise"),  # mean 2 < its interval's half-width 2.48
        ([2.0, 2.1, 1.9], 1, "same direction as the paper"),
        ([-2.0, -2.1, -1.9], 1, "opposite to the paper"),
        ([-2.0, -2.1, -1.9], -1, "same direction as the paper"),
        ([0.0, 0.0], 1, "within noise"),
        ([5.0], 1, "one seed: no spread to judge it by"),
        ([2.0, 2.1, 1.9], 0, "above the baseline"),
    ],
)
def test_the_verdict_claims_no_more_than_the_spread(deltas, sign, words):
    assert rep.verdict(rep.stat(deltas), sign) == words


def _steps(errors):
    return [{"kind": "step", "step": i, "top1_error": e, "loss": 1.0} for i, e in enumerate(errors)]


def test_run_result_reads_train_error_gap_and_the_threshold_step():
    # 8 steps, 4 per epoch: the training error is averaged over min(epoch, run / 4) = 2 steps
    errors = [0.9, 0.8, 0.6, 0.4, 0.3, 0.2, 0.2, 0.1]
    evals = [{"kind": "eval", "step": 4, "top1_error": 0.5}, {"kind": "eval", "step": 8, "top1_error": 0.3}]
    final = {"top1_error": 0.3, "top5_error": 0.1}
    r = rep.run_result(_steps(errors), evals, final, 4, 8, 0.36)
    assert r["train_top1_error"] == pytest.approx(0.15)  # (0.2 + 0.1) / 2
    assert r["gap"] == pytest.approx(0.15)
    # trailing means: .9 .85 .7 .5 .35 ... -> first <= 0.36 after step 5 (the row of step index 4)
    assert r["threshold_step"] == 5 and r["threshold_epochs"] == 1.25
    assert r["val_curve"] == {"epochs": [1.0, 2.0], "top1_error": [0.5, 0.3]}
    assert r["missing_steps"] == 0
    never = rep.run_result(_steps(errors)[3:], [], None, 4, 8, 0.05)  # steps 0-2 killed outright
    assert never["threshold_step"] is None and never["gap"] is None and never["missing_steps"] == 3


def _result(top1, top5=None, ten=None, epochs_to=None, gap=None, epochs=10.0):
    final = {"top1_error": top1, "top5_error": top5 if top5 is not None else top1 / 2}
    if ten is not None:
        final.update(top1_error_10crop=ten, top5_error_10crop=ten / 2)
    return {"final": final, "threshold_epochs": epochs_to, "epochs": epochs, "gap": gap}


def test_compare_pairs_by_seed_and_uses_ten_crop_when_every_run_has_it():
    base = {0: _result(0.30, ten=0.28), 1: _result(0.32, ten=0.30), 2: _result(0.31, ten=0.29)}
    var = {
        0: _result(0.33, ten=0.31),
        1: _result(0.35, ten=0.33),
        2: _result(0.34, ten=0.32),
        7: _result(0.9),
    }
    m = rep.compare(rep.FINDINGS["lrn"], base, var, "no-lrn")
    assert m["errors"] == "10crop"
    assert m["top1"]["per_seed"] == pytest.approx([3.0, 3.0, 3.0])  # seed 7 has no baseline: left out
    assert m["top1"]["verdict"] == "same direction as the paper"
    value, words = rep.measured_words(m)
    assert value.startswith("top-1 +3.00 pt ± 0.00 (3 seeds") and words == "same direction as the paper"
    ten = rep.compare(rep.FINDINGS["ten_crop"], base, None, None)
    assert ten["top1"]["per_seed"] == pytest.approx([2.0, 2.0, 2.0])  # center minus 10-crop, points
    var[1]["final"].pop("top1_error_10crop")
    assert rep.compare(rep.FINDINGS["lrn"], base, var, "no-lrn")["errors"] == "center"


def test_speed_is_a_ratio_of_epochs_and_a_run_that_never_reached_it_is_a_lower_bound():
    base = {0: _result(0.3, epochs_to=2.0), 1: _result(0.3, epochs_to=4.0)}
    var = {0: _result(0.5, epochs_to=6.0), 1: _result(0.6, epochs_to=None, epochs=10.0)}
    m = rep.compare(rep.FINDINGS["relu"], base, var, "tanh")
    assert m["ratio"]["per_seed"] == [3.0, 2.5] and m["ratio"]["censored"]
    assert m["ratio"]["geomean"] == pytest.approx(math.sqrt(7.5))
    assert rep.measured_words(m)[0].startswith("epochs to threshold >= 2.74x")


def test_gap_findings_compare_overfitting_and_columns_refuse_greyscale():
    base = {0: _result(0.3, gap=0.05), 1: _result(0.3, gap=0.06)}
    var = {0: _result(0.3, gap=0.15), 1: _result(0.3, gap=0.17)}
    m = rep.compare(rep.FINDINGS["dropout"], base, var, "no-dropout")
    assert m["gap"]["per_seed"] == pytest.approx([10.0, 11.0])
    colour = {"columns": {"0": 0.2, "1": 0.5}, "greyscale": False}
    base = {0: {**_result(0.3), "colour": colour}, 1: {**_result(0.3), "colour": colour}}
    cols = rep.compare(rep.FINDINGS["columns_specialise"], base, None, None)
    assert cols["difference"] == pytest.approx([0.3, 0.3]) and "in every run" in cols["verdict"]
    base[1]["colour"] = {"columns": {"0": 0.66, "1": 0.66}, "greyscale": True}
    assert "greyscale" in rep.compare(rep.FINDINGS["columns_specialise"], base, None, None)["verdict"]


def test_markdown_shows_each_run_and_finding():
    state = {
        "study": "s",
        "data": "d",
        "seeds": [0],
        "threshold": 0.25,
        "baseline": "baseline",
        "runs": [
            {
                "variant": "baseline",
                "seed": 0,
                "status": "finished",
                "result": {
                    **rep.run_result(
                        _steps([0.5, 0.2]), [], {"top1_error": 0.123, "top5_error": 0.05}, 2, 2, 0.25
                    )
                },
            },
            {"variant": "x", "seed": 0, "status": "failed"},
        ],
        "findings": [rep.compare(rep.unnamed("x"), {0: _result(0.1)}, {0: _result(0.2)}, "x")],
    }
    md = rep.markdown(state)
    assert "| baseline | 0 | finished | 12.3 | 5.0 |" in md
    assert "| x | 0 | failed |" in md
    assert "| variant x (-) | x | top-1 +10.00 pt (1 seed)" in md


# -- study files ----------------------------------------------------------------------------------

GOOD = """
name = "mine"
seeds = [0, 3]
threshold = 0.4
[[variant]]
name = "baseline"
[[variant]]
name = "no-lrn"
finding = "lrn"
set = { "model.lrn" = false }
[[variant]]
name = "flat"
set = ["data.flip=false", "model.dropout=0"]
"""


def test_a_study_file_reads_its_variants(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(GOOD)
    s = sd.load_study_file(f)
    assert (s.name, s.seeds, s.threshold) == ("mine", (0, 3), 0.4)
    assert [(v.name, v.finding, dict(v.sets)) for v in s.variants] == [
        ("baseline", None, {}),
        ("no-lrn", "lrn", {"model.lrn": False}),
        ("flat", None, {"data.flip": "false", "model.dropout": "0"}),
    ]


@pytest.mark.parametrize(
    "text, words",
    [
        ("nme = 'x'\n[[variant]]\nname = 'a'", "unknown key(s) nme"),
        ("name = 'x'", "no [[variant]] tables"),
        ("[[variant]]\nname = 'a'\n[[variant]]\nname = 'a'", "variant name(s) a given twice"),
        ("[[variant]]\nname = 'a/b'", "name = 'a/b'"),
        ("[[variant]]\nname = 'a'\nfinding = 'speed'", "finding = 'speed': use one of relu"),
        ("[[variant]]\nname = 'a'\nsets = {}", "unknown key(s) sets"),
        ("seeds = [-1]\n[[variant]]\nname = 'a'", "seeds = [-1]"),
        ("threshold = 2\n[[variant]]\nname = 'a'", "threshold = 2"),
        ("[[variant]\nname = 'a'", "not valid TOML"),
    ],
)
def test_a_bad_study_file_is_refused_naming_the_file_and_key(tmp_path, text, words):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match="study file .*bad.toml") as e:
        sd.load_study_file(f)
    assert words in str(e.value)


# -- the paper-ablations variants -----------------------------------------------------------------


@pytest.mark.parametrize("preset", ["demo", "small", "paper"])
def test_every_paper_ablation_is_a_valid_config_unlike_the_baseline(preset):
    layers = config_layers(preset)
    base = resolve_layers(layers)[0]
    if base.grid.is_auto:  # the paper preset: the grid alexnet study chooses on 8 GPUs of one node
        base = resolve_grid(base, Resources.uniform(1, 8))[0]
        layers.append(Layer("grid.shape auto", {"grid.shape": base.grid.shape}))
    study = sd.paper_ablations(base)
    findings = {v.finding for v in study.variants[1:]}
    assert findings == {"relu", "columns", "lrn", "pooling", "augmentation", "lighting", "dropout", "depth"}
    for v in study.variants[1:]:
        cfg = resolve_layers([*layers, Layer(v.name, dict(v.sets))])[0]  # validates, grid included
        assert cfg.to_dict() != base.to_dict(), v.name
    one = next(v for v in study.variants if v.name == "one-column")
    assert one.sets["grid.shape"] == base.grid.shape[:-1] + "1"


# -- bookkeeping ----------------------------------------------------------------------------------


def _spec(tmp_path, name, seed=0, **sets):
    cfg = load_config(preset="demo", overrides={"train.seed": seed, **sets})
    return st.RunSpec(sd.Variant(name, sets), seed, tmp_path / f"{name}-seed{seed}", cfg, 16, 20, 2)


def test_runs_at_once_fits_the_cluster_and_is_one_on_a_laptop():
    need = {"CPU": 6.0, "GPU": 2.0}
    assert st.runs_at_once(None, need, 9).at_once == 1
    assert st.runs_at_once({"CPU": 64.0, "GPU": 8.0}, need, 9).at_once == 4  # GPUs bound it
    assert st.runs_at_once({"CPU": 64.0, "GPU": 8.0}, need, 3).at_once == 3
    assert st.runs_at_once({"CPU": 4.0}, {"CPU": 6.0}, 3).at_once == 1  # too small: one at a time


def test_study_json_keeps_status_adds_seeds_and_refuses_changed_settings(tmp_path):
    study = sd.Study("s", (sd.Variant("a"),))
    specs = [_spec(tmp_path, "a", 0)]
    state = st.load_state(tmp_path, study, "d", specs, 0.25)
    state["runs"][0]["status"] = "running"  # cut off there
    st.save_state(tmp_path, state)
    more = [*specs, _spec(tmp_path, "a", 1)]
    again = st.load_state(tmp_path, study, "d", more, 0.25)
    assert [(r["key"], r["status"]) for r in again["runs"]] == [
        ("a-seed0", "running"),
        ("a-seed1", "pending"),
    ]
    changed = [_spec(tmp_path, "a", 0, **{"optim.lr": 0.1})]
    with pytest.raises(ValueError, match=r"run a-seed0 was trained with other settings \(optim.lr: 0.005"):
        st.load_state(tmp_path, study, "d", changed, 0.25)
    with pytest.raises(ValueError, match="holds study 's', not 'other'"):
        st.load_state(tmp_path, sd.Study("other", study.variants), "d", specs, 0.25)


def test_a_resumed_runs_history_is_its_parts_later_winning(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _steps([0.9, 0.8, 0.7])))
    st.keep_history(run)  # the run resumes from its checkpoint at step 2: step 2 is run again
    rows = _steps([0.9, 0.8, 0.6, 0.5])[2:] + [{"kind": "eval", "step": 4, "top1_error": 0.4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, evals = rep.read_history(run)
    assert [r["top1_error"] for r in steps] == [0.9, 0.8, 0.6, 0.5]
    assert [e["step"] for e in evals] == [4]
    assert (run / "metrics.part-0.jsonl").exists()


def test_a_second_call_trains_only_what_is_not_finished(tmp_path, monkeypatch):
    specs = [_spec(tmp_path, n) for n in ("done", "cut", "new", "later")]
    state = st.load_state(tmp_path, sd.Study("s", tuple(s.variant for s in specs)), "d", specs, 0.25)
    for r, status in zip(state["runs"], ("finished", "running", "pending", "pending"), strict=True):
        r["status"] = status
    monkeypatch.setattr(st, "is_finished", lambda spec, entry: entry["status"] == "finished")
    trained = []

    def train(spec, on_coordinator):
        trained.append(spec.key)
        return "stopped" if spec.variant.name == "new" else "finished"  # Ctrl-C during "new"

    runner = st.StudyRunner(tmp_path, state, specs, train, lambda s: {"n": s.key}, st.Slots(1))
    runner.run()
    assert trained == ["cut-seed0", "new-seed0"]  # "later" is not started after a stop
    saved = {r["key"]: r for r in json.loads((tmp_path / "study.json").read_text())["runs"]}
    assert [saved[k]["status"] for k in ("done-seed0", "cut-seed0", "new-seed0", "later-seed0")] == [
        "finished",
        "finished",
        "stopped",
        "pending",
    ]
    assert saved["cut-seed0"]["result"] == {"n": "cut-seed0"}

    def broken(spec, on_coordinator):
        raise RuntimeError("rank 3 died")

    runner = st.StudyRunner(tmp_path, runner.state, specs, broken, lambda s: {}, st.Slots(2))
    runner.run()  # two at a time, in threads: a failed run is recorded, the others still run
    saved = {r["key"]: r for r in json.loads((tmp_path / "study.json").read_text())["runs"]}
    assert saved["new-seed0"]["status"] == saved["later-seed0"]["status"] == "failed"
    assert saved["later-seed0"]["error"] == "RuntimeError: rank 3 died"


def test_tensorboard_draws_the_one_column_nets_only_column(tmp_path):
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cluster.reporting import TensorBoardLog

    tb = TensorBoardLog(str(tmp_path))
    tb.kernels(3, {"conv1.0.weight": torch.randn(4, 3, 5, 5)})  # a KeyError on conv1.1 before
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["conv1/column0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from alexnet.data.writer import build_synthetic

    out = str(tmp_path_factory.mktemp("data") / "tiny")
    build_synthetic(80, out, workers=1, progress=False)  # 72 train: 2 batches, one per data worker
    return out


@pytest.mark.parametrize(
    "sets, words",
    [
        ({"model.pooling": "max"}, "study s, variant v: model.pooling='max'"),
        ({"model.lrn": True}, "variant v sets model.lrn, which the base config already has"),
    ],
)
def test_a_bad_variant_is_refused_before_any_run(tiny, tmp_path, sets, words):
    study = sd.Study("s", (sd.Variant("base"), sd.Variant("v", sets)))
    with pytest.raises(ValueError, match=words):
        st.run_study(study, config_layers("demo"), tiny, str(tmp_path / "d"), train=_never)
    assert not (tmp_path / "d").exists()  # nothing written


def _never(spec, on_coordinator):
    raise AssertionError("trained")


def test_bad_seeds_and_study_dirs_are_refused(tiny, tmp_path):
    study = sd.Study("s", (sd.Variant("base"),))
    with pytest.raises(ValueError, match=r"--seeds \[1, 1\]: give distinct integers"):
        st.run_study(study, config_layers("demo"), tiny, str(tmp_path), [1, 1], train=_never)
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="--study-dir .*f is a file"):
        st.run_study(study, config_layers("demo"), tiny, str(tmp_path / "f"), train=_never)
    with pytest.raises(ValueError, match="--threshold = 1.5"):
        st.run_study(study, config_layers("demo"), tiny, str(tmp_path / "d"), threshold=1.5, train=_never)


def test_figure_1s_plot_is_drawn_from_the_curves():  # the e2e test draws the other plots
    r = rep.run_result(_steps([0.9, 0.5, 0.2, 0.1]), [], None, 2, 4, 0.25)
    assert rep.plot_speed({"relu": [r], "tanh": [r]}, 0.25)[:4] == b"\x89PNG"


def test_another_threshold_is_measured_from_the_history_without_training(tmp_path):
    spec = _spec(tmp_path, "a")  # 16 steps per epoch, 20 steps: the training error over 5 steps
    spec.run_dir.mkdir()
    rows = _steps([0.9] * 10 + [0.4] * 10)
    (spec.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = rep.run_result(rows, [], None, 16, 20, 0.25)
    assert result["threshold_step"] is None
    state = {"runs": [{"key": "a-seed0", "result": result}]}
    st.rethreshold(state, [spec], 0.55)
    # trailing 5-step means: after step 13 (0.9 x 2 + 0.4 x 3) / 5 = 0.6, after 14 0.5 (<= 0.55)
    assert (result["threshold"], result["threshold_step"], result["threshold_epochs"]) == (0.55, 14, 14 / 16)


def test_a_study_on_a_cluster_shares_it_among_the_runs_it_starts_together():
    """grid.shape = "auto": the split of the cluster that keeps the most GPUs busy, then the most
    runs at once, each run at least one replica on one node; without GPUs one run after another."""
    from cluster.scaling import study_share

    at_once, share = study_share(Resources.uniform(4, 8), 9)
    assert at_once == 8 and [n.gpus for n in share.nodes] == [4]  # 8 runs x 4 GPUs: all 32 busy
    at_once, share = study_share(Resources.uniform(4, 8), 27)
    assert at_once == 16 and [n.gpus for n in share.nodes] == [2]  # 16 runs x 2 GPUs
    at_once, share = study_share(Resources.uniform(4, 8), 2)
    assert at_once == 2 and [n.gpus for n in share.nodes] == [8, 8]  # two whole nodes each
    at_once, share = study_share(Resources.uniform(1, 6), 9)
    assert at_once == 3 and [n.gpus for n in share.nodes] == [2]
    cpu = Resources.uniform(1, 0, cpus=8)
    assert study_share(cpu, 9) == (1, cpu) and study_share(Resources.uniform(4, 8), 1)[0] == 1


def test_alexnet_study_chooses_each_runs_grid_for_its_share(monkeypatch, capsys):
    import argparse

    import cluster.job
    from cluster.cli import _study_grid

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a cluster: runs side by side (never joined here)
    monkeypatch.setattr(cluster.job, "cluster_resources", lambda: Resources.uniform(2, 4))
    args = argparse.Namespace(name="paper-ablations", seeds=[0, 1, 2])
    cfg = _study_grid(load_config(preset="paper"), args)
    out = capsys.readouterr().out
    assert cfg.grid.shape == "1x1x2", out  # 4 runs x 2 GPUs of the 8
    assert "study: 4 runs at once" in out and "grid 1x1x2" in out, out
    monkeypatch.delenv("RAY_ADDRESS")  # the embedded local Ray: one run at a time, on all of it
    monkeypatch.setattr(cluster.job, "cluster_resources", lambda: Resources.uniform(1, 8))
    assert _study_grid(load_config(preset="paper"), args).grid.shape == "4x1x2"
