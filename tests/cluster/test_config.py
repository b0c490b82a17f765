"""The job config: presets load, overrides coerce, every bad value is refused with its key."""

from __future__ import annotations

import pytest

from cluster.config import PRESETS, JobConfig, load_config, parse_sets


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_validate(name):
    cfg = load_config(preset=name)
    assert isinstance(cfg, JobConfig)
    cfg.for_stored_size(256 if name == "paper" else 40).model_config()  # builds


@pytest.mark.parametrize("name", PRESETS)
def test_presets_train_as_the_paper_trained(name):
    cfg = load_config(preset=name)
    assert cfg.model.lrn_convention == "per_size" and cfg.optim.rule == "paper"


def test_unset_input_size_is_the_papers_fraction_of_the_stored_side():
    small = load_config(preset="small")
    assert small.model.input_size == 0  # unset: from the data
    sizes = {stored: small.for_stored_size(stored).model.input_size for stored in (36, 40, 64, 72, 160)}
    assert sizes == {36: 32, 40: 35, 64: 57, 72: 64, 160: 142}
    paper = load_config(preset="paper", overrides={"model.input_size": 0})
    assert paper.for_stored_size(256).model.input_size == 227
    with pytest.raises(ValueError, match="model.input_size=0 takes its value from the stored images"):
        small.model_config()


@pytest.mark.parametrize(
    "preset, sets, stored, words",
    [
        # the case: 32 px crops of 256 px images see an eighth of the side
        ("small", {"model.input_size": 32}, 256, ["input_size=32", "less than half", "--size 36", "unset"]),
        ("paper", {}, 512, ["model.input_size=227", "less than half", "--size 256"]),
        ("paper", {}, 200, ["model.input_size=227", "larger than the stored"]),
        ("small", {}, 28, ["28 px", "model.input_size=25", "--size 36"]),  # 227/256 of 28: too small
        ("small", {}, 256, ["256 px", "model.input_size=227", "skip pixels", "--size 36"]),
    ],
)
def test_crops_that_do_not_fit_the_stored_images_are_refused(preset, sets, stored, words):
    cfg = load_config(preset=preset, overrides=sets)
    with pytest.raises(ValueError) as e:
        cfg.for_stored_size(stored, "SHARDS")
    assert str(e.value).startswith("SHARDS")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("name", PRESETS)
def test_toml_form_reads_back_to_the_same_config(name, tmp_path):
    sets = {
        "data.path": 'C:\\x "q"',
        "grid.shape": "1x2x2",
        "grid.microbatches": 2,
        "grid.cuts": "conv3",
        "schedule.milestones": "3,7",
        "optim.lr": 1e-5,
    }
    for cfg in (load_config(preset=name), load_config(preset=name, overrides=sets)):
        p = tmp_path / "config.toml"
        p.write_text(cfg.to_toml())
        assert load_config(path=p) == cfg
        text = cfg.to_toml()
        for section, values in cfg.to_dict().items():  # every section and key is written
            assert f"[{section}]" in text and all(f"\n{k} = " in text for k in values)


def test_paper_preset_is_the_paper():
    cfg = load_config(preset="paper")
    assert cfg.model.num_classes == 1000 and cfg.model.input_size == 227
    assert cfg.model.lrn_convention == "per_size" and cfg.optim.rule == "paper"
    assert cfg.optim.batch_size == 128 and cfg.optim.lr == 0.01
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 5e-4
    assert cfg.schedule.kind == "plateau" and cfg.schedule.factor == 0.1 and cfg.schedule.max_reductions == 3
    assert cfg.train.epochs == 90
    assert cfg.grid.shape == "auto" and cfg.grid.gpus_per_rank == 1  # from the cluster
    assert cfg.eval.ten_crop and cfg.eval.ten_crop_every_epochs == 0  # the 10-crop pass at the end only


def test_demo_preset_exercises_columns_and_stages_on_cpu():
    cfg = load_config(preset="demo")
    r, s, c = cfg.grid.dims
    assert s == 2 and c == 2 and cfg.grid.gpus_per_rank == 0 and cfg.train.device == "cpu"
    assert cfg.model.variant == "small"


def test_faults_are_off_by_default():
    f = load_config(preset="demo").faults
    assert (f.kill_rank, f.kill_step, f.kill_data_worker, f.kill_data_step) == (-1, -1, -1, -1)


def test_overrides_are_coerced():
    cfg = load_config(
        preset="demo",
        overrides=parse_sets(["optim.lr=0.5", "grid.cuts=conv3", "eval.ten_crop=false", "train.steps=7"]),
    )
    assert cfg.optim.lr == 0.5 and cfg.grid.cuts == ("conv3",)
    assert cfg.eval.ten_crop is False and cfg.train.steps == 7


def test_toml_file(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text('[optim]\nbatch_size = 64\n[grid]\nshape = "2x1x2"\n')
    cfg = load_config(path=p)
    assert cfg.optim.batch_size == 64 and cfg.grid.world_size == 4


@pytest.mark.parametrize(
    "sets, words",
    [
        (["optim.lrr=1"], ["optim.lrr", "batch_size"]),
        (["nosuch.key=1"], ["nosuch", "optim"]),
        (["optim.lr=fast"], ["optim.lr", "number"]),
        (["optim.lr=-1"], ["optim.lr", "> 0"]),
        (["grid.shape=1x2x3"], ["grid.shape", "columns=3", "use 2", "or 1"]),
        (["grid.shape=two"], ["grid.shape", "RxSxC"]),
        (["grid.shape=1x9x2"], ["grid.shape", "8 blocks"]),
        (["grid.cuts=conv9"], ["grid.cuts", "unknown block"]),  # at config time, before Ray starts
        (["grid.cuts=conv3,fc6"], ["grid.cuts", "give 1 block names"]),
        (["grid.schedule=zero-bubble"], ["grid.schedule", "use one of"]),
        (["grid.microbatches=0"], ["grid.microbatches", "positive"]),
        (["model.num_classes=0"], ["model.num_classes"]),
        (["model.num_classes=1"], ["model.num_classes", "at least 2"]),
        (["model.variant=huge"], ["model.variant", "paper"]),
        (["optim.batch_size=33"], ["grid.microbatches", "33"]),
        (["grid.shape=3x1x2"], ["optim.batch_size", "replicas"]),
        (["eval.ten_crop=maybe"], ["eval.ten_crop", "true or false"]),
        (["eval.ten_crop_every_epochs=-1"], ["eval.ten_crop_every_epochs", "0: only at the run's last"]),
        (["faults.kill_rank=9"], ["faults.kill_rank", "0..3"]),
        (["train.device=tpu"], ["train.device"]),
        (["optim.lr"], ["--set", "section.key=value"]),
        (["optim.rule=adam"], ["optim.rule", "paper", "torch"]),
        (["model.input_size=-1"], ["model.input_size", "0 (from the data)"]),
        (["model.lrn_convention=torch"], ["model.lrn_convention", "per_size"]),
        (["lr=1"], ["section.key=value"]),
    ],
)
def test_bad_values_name_the_key_and_the_fix(sets, words):
    with pytest.raises(ValueError) as e:
        load_config(preset="demo", overrides=parse_sets(sets))
    for w in words:
        assert w in str(e.value)


def test_preset_or_config_at_least_one(tmp_path):
    with pytest.raises(ValueError, match="give --preset NAME .* and/or --config FILE.toml"):
        load_config()
    with pytest.raises(ValueError, match="--preset"):
        load_config(preset="huge")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(path=bad)
    unknown = tmp_path / "u.toml"
    unknown.write_text("[optimizer]\nlr = 1\n")
    with pytest.raises(ValueError, match="unknown section"):
        load_config(path=unknown)


def test_round_trip_through_dict():
    cfg = load_config(preset="demo", overrides={"grid.cuts": "conv3"})
    assert cfg.replace() == cfg
    assert cfg.replace(**{"optim.lr": 0.3}).optim.lr == 0.3


def test_grid_refusals_name_the_config_keys():
    """Every refusal of pipeline.grid.Grid comes back naming the keys that set the fields it names."""
    from cluster.config import grid_error_keys
    from pipeline.grid import Grid

    cases = [
        (dict(replicas=0), ["grid.shape"]),
        (dict(columns=3), ["grid.shape"]),
        (dict(stages=9), ["grid.shape"]),
        (dict(microbatches=0), ["grid.microbatches"]),
        (dict(global_batch=6, microbatches=4), ["optim.batch_size", "grid.shape", "grid.microbatches"]),
        (dict(stages=2, cuts=("conv9",)), ["grid.cuts"]),
        (dict(stages=2, cuts=("conv1",)), ["grid.cuts"]),
        (dict(schedule="zero-bubble"), ["grid.schedule"]),
    ]
    for kwargs, keys in cases:
        args = dict(replicas=1, stages=1, columns=2, microbatches=1, global_batch=8) | kwargs
        with pytest.raises(ValueError) as e:
            Grid(**args)
        assert grid_error_keys(str(e.value))[: len(keys)] == keys, (kwargs, str(e.value))


@pytest.mark.parametrize(
    "sets, words",
    [
        # one GPU per rank: NCCL refuses two ranks on one GPU, and a rank drives a single device
        (["grid.gpus_per_rank=0.5", "train.device=cuda"], ["grid.gpus_per_rank=0.5", "NCCL", "use 1"]),
        (["grid.gpus_per_rank=0.5", "train.device=auto"], ["grid.gpus_per_rank=0.5", "one whole GPU"]),
        (["grid.gpus_per_rank=2", "train.device=cuda"], ["grid.gpus_per_rank=2", "use 1", "grid.shape"]),
        (["grid.gpus_per_rank=2", "grid.backend=gloo"], ["grid.gpus_per_rank=2", "one GPU"]),
        (["grid.backend=nccl"], ["grid.gpus_per_rank=0.0", "NCCL needs one whole GPU"]),
        (["train.precision=half"], ["train.precision", "bf16", "fp16"]),
        (["train.cudnn_benchmark=yes"], ["train.cudnn_benchmark", "auto"]),
        (["train.lrn_kernel=triton"], ["train.lrn_kernel", "compiled"]),
        (["train.compile=yes"], ["train.compile", "'yes'", "off", "on", "cudagraphs"]),
        # deterministic mode refuses what has no reproducible result
        (
            ["train.deterministic=true", "train.cudnn_benchmark=on"],
            ["train.cudnn_benchmark='on'", "deterministic", "by timing", "auto or off"],
        ),
        (
            ["train.deterministic=true", "train.precision=fp16"],
            ["train.precision='fp16'", "loss scale", "bf16 or fp32"],
        ),
    ],
)
def test_gpu_and_numerics_refusals_name_the_key_and_the_fix(sets, words):
    with pytest.raises(ValueError) as e:
        load_config(preset="demo", overrides=parse_sets(sets))
    for w in words:
        assert w in str(e.value)


def test_numerics_defaults_and_what_they_allow():
    paper = load_config(preset="paper")
    assert paper.train.precision == "auto" and not paper.train.deterministic  # bf16 on capable GPUs
    assert paper.uses_nccl() and paper.train.benchmark_cudnn(cuda=True)
    demo = load_config(preset="demo")
    assert demo.train.precision == "auto" and not demo.uses_nccl()  # fp32 on CPU
    assert not demo.train.benchmark_cudnn(cuda=False)
    det = load_config(preset="paper", overrides={"train.deterministic": "true"})
    assert not det.train.benchmark_cudnn(cuda=True)  # auto: off when deterministic
    assert paper.train.compile == "off"  # eager unless asked
    for value in ("on", "cudagraphs"):  # cudagraphs: CUDA graphs on CUDA, "on" on CPU (the engine's)
        assert load_config(preset="demo", overrides={"train.compile": value}).train.compile == value
    # fractions of a GPU stay possible without NCCL (gloo ranks on CPU)
    load_config(preset="demo", overrides={"grid.gpus_per_rank": "0.5", "train.device": "cpu"})
    load_config(preset="demo", overrides={"train.precision": "bf16", "train.deterministic": "true"})


def test_a_list_on_the_command_line_reads_in_either_form():
    """``--set schedule.milestones=30,60`` and the TOML form ``[30, 60]`` (what config.toml shows) give
    the same list; so do ``conv3,fc6`` and ``["conv3", "fc6"]``."""
    for text in ("10,13", "[10, 13]", " [10,13] "):
        cfg = load_config(preset="small", overrides={"schedule.kind": "step", "schedule.milestones": text})
        assert cfg.schedule.milestones == (10, 13), text
    grid = {"grid.shape": "1x3x2", "grid.schedule": "gpipe"}
    for text in ("conv3,fc6", '["conv3", "fc6"]', "['conv3','fc6']"):
        cfg = load_config(preset="demo", overrides={**grid, "grid.cuts": text})
        assert cfg.grid.cuts == ("conv3", "fc6"), text


def test_1f1b_with_fewer_microbatches_than_stages_is_accepted():
    """The schedule runs M < S in GPipe's order (the equivalence and NCCL-rules tests cover it)."""
    cfg = load_config(preset="demo", overrides={"grid.shape": "1x3x2", "grid.microbatches": 1})
    assert cfg.grid.schedule == "1f1b" and cfg.to_grid().microbatches == 1 and cfg.to_grid().stages == 3


def test_train_seed_keys_every_random_draw_of_the_run():
    """train.seed moves the model's seed (init, dropout) and the data's (order, augmentation); the
    section seeds add to it; the default 0 leaves both as they were."""
    base = load_config(preset="demo")
    assert base.model_config().seed == 0 and base.data_seed == 0
    other = load_config(preset="demo", overrides={"train.seed": 3})
    assert other.model_config().seed == 3 and other.data_seed == 3
    one = load_config(preset="demo", overrides={"train.seed": 3, "model.seed": 1})
    assert one.model_config().seed == 4 and one.data_seed == 3
