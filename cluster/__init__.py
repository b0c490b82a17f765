"""Where it runs: Ray actors, the coordinator, checkpoints, metrics and the CLI's job commands.

One owner per concern::

    cli.py          alexnet train / config / eval / predict / export / study / filters (arguments -> calls)
    job.py          run_training: the driver's outline, top to bottom
    config.py       the typed job config; its one validation builds the Grid and the ModelConfig
    plan.py         RunPlan (the dataset checked once) and Milestones (what happens at step N)
    coordinator.py  the state machine
    faults.py       the failure policy (restart budget, NaN rule) and the injected faults
    lr_schedule.py  the learning-rate rule ([schedule])
    manifest.py     the typed checkpoint manifest, the resume checks, the run's checkpoints
    checkpoint.py   checkpoint files: safetensors + manifest, atomic, pruned, background writer
    reporting.py    metrics, progress lines, history; metrics.jsonl, plot, trace, tensorboard/
    metrics.py      every Prometheus metric, declared once
    group.py        Ray: placement groups, actors, calls with timeouts, failure classification
    placement.py    the placement layout, as a pure function
    rank.py         the trainer actor (one grid rank: engine, batches, validation)
    reduce.py       which ranks' numbers mean what; per-rank results -> one per step
    evaluate.py     validation scoring shared with alexnet eval; load_for_inference (the one loader)
    predict.py      alexnet predict: a checkpoint applied to image files (top-k, features), its Python API
    export.py       alexnet export: torch.export (and ONNX) programs, checked against predict
    finetune.py     alexnet train --init-from: a new run's starting weights from a checkpoint
    data.py         the Ray data workers
    studies.py      the studies: paper-ablations, relu-vs-tanh, a study file (TOML)
    study.py        alexnet study: a study's runs (alexnet train runs over variants and seeds), study.json
    study_report.py the study's arithmetic, verdicts, study.md and plots (pure)
"""
