"""``alexnet study``: the paper's findings measured as ordinary ``alexnet train`` runs.

A study is a baseline and variants (config overrides), each trained once per seed
(``train.seed``: the initialisation, the data order and augmentation, dropout) in its own run
directory ``STUDY_DIR/<variant>-seed<k>/`` by :func:`cluster.job.run_training`, the function
``alexnet train`` runs. ``STUDY_DIR/study.json`` lists the runs, their status (``pending``,
``running``, ``finished``, ``stopped``, ``failed``) and their numbers, so a second call trains
nothing that is finished and a run that was cut off continues from its newest checkpoint
(``alexnet train --resume``'s mechanism); then the report (:mod:`cluster.study_report`):
``study.md``, ``study.json``'s findings and the plots in ``STUDY_DIR/plots/``.

Studies: ``paper-ablations`` (the baseline and one variant per finding the switches express;
10-crop is an evaluation of the baseline and Figure 3 a look at its kernels, not runs),
``relu-vs-tanh``, or a TOML file: :mod:`cluster.studies` defines them.

**Why not Ray Tune.** Tune runs each trial as a trainable inside resources it reserves for the
trial (``tune.with_resources`` / ``PlacementGroupFactory``: a bundle for the trainable and one per
remote worker it starts, which must be scheduled into the trial's placement group). An ``alexnet
train`` run is itself a multi-actor job that reserves its own placement group with its own layout
(a replica's ranks packed on one node, replicas spread, data workers beside the stage-0 ranks,
``grid.placement_timeout_s``; :mod:`cluster.placement`): inside a Tune trial that group would be
reserved a second time beside the trial's (twice the resources, or a trial waiting for itself),
unless the run gave up its own placement for the trial's bundles. Tune's checkpoint and restore
(``Tuner.restore``, its trial directories) would also duplicate the run's own checkpoints,
``--resume`` and failure recovery, and its experiment layout is not the run directories a user
reads with ``alexnet eval``. So the study runs the runs itself: one after another on a laptop (an
embedded local Ray), and on a cluster as many at once as its resources hold, each its own
placement group (:func:`runs_at_once`, the one place that decides it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import JobConfig, Layer, resolve_layers
from cluster.studies import DEFAULT_THRESHOLD, Study, Variant, check_threshold
from cluster.study_report import FINDINGS, compare, run_result, unnamed

STUDY_FILE = "study.json"
FORMAT = 1


# -- the study's runs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: a variant at a seed, its resolved and checked config and where it runs."""

    variant: Variant
    seed: int
    run_dir: Path
    cfg: JobConfig
    steps_per_epoch: int
    total_steps: int
    data_workers: int

    @property
    def key(self) -> str:
        return f"{self.variant.name}-seed{self.seed}"


def plan_runs(
    study: Study, base_layers: Sequence[Layer], data: str, study_dir: Path, seeds: Sequence[int]
) -> list[RunSpec]:
    """Every run of ``study`` (variants x seeds), each config layered ``base_layers`` (the preset,
    files, ``--set``, flags), the variant's keys, ``train.seed``, and checked with the dataset as
    ``alexnet train`` checks it: all before any training starts. A variant that is the baseline
    (the base config already set what it changes) is refused."""
    from cluster.plan import plan_run

    specs = []
    for seed in seeds:  # seed by seed: a study cut short still has every variant of its first seeds
        for v in study.variants:
            layers = [
                *base_layers,
                Layer(f"variant {v.name}", dict(v.sets)),
                Layer("--seeds", {"train.seed": seed}),
            ]
            try:
                cfg = resolve_layers(layers)[0].for_data(data)
                plan, _ = plan_run(cfg, data)
            except ValueError as e:
                raise ValueError(f"study {study.name}, variant {v.name}: {e}") from None
            specs.append(
                RunSpec(
                    v,
                    seed,
                    study_dir / f"{v.name}-seed{seed}",
                    cfg,
                    plan.steps_per_epoch,
                    plan.total_steps,
                    plan.data_workers,
                )
            )
    base = {s.seed: s.cfg.to_dict() for s in specs if s.variant == study.variants[0]}
    for s in specs:
        if s.variant != study.variants[0] and s.cfg.to_dict() == base[s.seed]:
            keys = ", ".join(s.variant.sets) or "nothing"
            raise ValueError(
                f"study {study.name}: variant {s.variant.name} sets {keys}, which the base config already "
                "has: it would train the baseline again; leave those keys out of --set / --config"
            )
    return specs


@dataclass(frozen=True)
class Slots:
    """How many runs start together (``at_once``). Under ``grid.shape = "auto"`` each run's grid
    was chosen for its share of the cluster before (``alexnet study``:
    :func:`cluster.scaling.study_share`), so that many fit side by side."""

    at_once: int


def run_resources(cfg: JobConfig, data_workers: int) -> dict[str, float]:
    """What one run reserves (:mod:`cluster.placement`): its ranks' CPUs and GPUs, a CPU per data worker."""
    from cluster.placement import DATA_WORKER

    g, n = cfg.grid, cfg.grid.world_size
    need = {"CPU": n * g.cpus_per_rank + data_workers * DATA_WORKER["CPU"]}
    if g.gpus_per_rank > 0:
        need["GPU"] = n * g.gpus_per_rank
    return need


def runs_at_once(cluster: Mapping[str, float] | None, need: Mapping[str, float], runs: int) -> Slots:
    """How many of ``runs`` runs, each reserving ``need``, a study starts together on ``cluster``
    (``ray.cluster_resources()``; None: an embedded local Ray, whose logical CPUs are only a count,
    so the runs go one after another)."""
    if cluster is None or runs <= 1:
        return Slots(1)
    fits = min(int(cluster.get(k, 0.0) // v) for k, v in need.items() if v > 0)
    return Slots(max(1, min(runs, fits)))


# -- study.json ------------------------------------------------------------------------------------


def _settings(cfg: JobConfig) -> dict[str, Any]:
    """What a run's numbers depend on: its config but the metrics endpoint."""
    tree = cfg.to_dict()
    tree.pop("metrics")
    return tree


def load_state(study_dir: Path, study: Study, data: str, specs: Sequence[RunSpec], threshold: float) -> dict:
    """``study.json`` as a previous call left it, with entries for new runs (a new seed); a run
    whose settings changed since is refused (its numbers would mix two configs)."""
    path = study_dir / STUDY_FILE
    state = json.loads(path.read_text()) if path.exists() else {"format": FORMAT, "runs": []}
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: study.json format {state.get('format')!r}, this release writes {FORMAT}")
    if state.get("study", study.name) != study.name:
        raise ValueError(
            f"--study-dir {study_dir} holds study {state['study']!r}, not {study.name!r}: "
            "choose another --study-dir"
        )
    old = {r["key"]: r for r in state["runs"]}
    runs = []
    for s in specs:
        entry = old.get(s.key) or {
            "key": s.key,
            "variant": s.variant.name,
            "seed": s.seed,
            "status": "pending",
        }
        if "settings" in entry and entry["settings"] != _settings(s.cfg):
            diff = _diff(entry["settings"], _settings(s.cfg))
            raise ValueError(
                f"--study-dir {study_dir}: run {s.key} was trained with other settings ({diff}): "
                "repeat the first call's options, or choose a new --study-dir"
            )
        entry.update(settings=_settings(s.cfg), run_dir=s.run_dir.name)
        runs.append(entry)
    state.update(
        study=study.name,
        data=data,
        seeds=sorted({s.seed for s in specs}),
        threshold=threshold,
        baseline=study.variants[0].name,
        variants=[{"name": v.name, "finding": v.finding, "set": dict(v.sets)} for v in study.variants],
        runs=runs,
    )
    return state


def _diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    keys = [
        f"{s}.{k}: {a[s][k]!r} then, {b[s][k]!r} now"
        for s in b
        for k in b[s]
        if a.get(s, {}).get(k) != b[s][k]
    ]
    return "; ".join(keys[:4]) + ("; ..." if len(keys) > 4 else "")


def save_state(study_dir: Path, state: dict) -> None:
    """Write ``study.json`` atomically (a cut-off write leaves the previous one)."""
    tmp = study_dir / (STUDY_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(study_dir / STUDY_FILE)


def is_finished(spec: RunSpec, entry: Mapping[str, Any]) -> bool:
    """Whether a run needs no more training: recorded finished, with its final checkpoint and
    history on disk (a run directory removed or cut since is trained again)."""
    from cluster.checkpoint import latest_checkpoint

    if entry["status"] != "finished" or not (spec.run_dir / "metrics.jsonl").exists():
        return False
    ck = latest_checkpoint(str(spec.run_dir))
    return ck is not None and int(ck.rstrip("/").rsplit("-", 1)[1]) >= spec.total_steps


def rethreshold(state: dict, specs: Sequence[RunSpec], threshold: float) -> None:
    """Finished runs measured against another ``--threshold`` get its crossing from their history
    (nothing is trained or evaluated again)."""
    from cluster.study_report import crossing, read_history

    for spec, entry in zip(specs, state["runs"], strict=True):
        res = entry.get("result")
        if res and res["threshold"] != threshold:
            res.update(
                crossing(read_history(spec.run_dir)[0], spec.steps_per_epoch, spec.total_steps, threshold)
            )


def keep_history(run_dir: Path) -> None:
    """Before a run resumes: keep its ``metrics.jsonl`` as the next ``metrics.part-K.jsonl``
    (a resumed run writes only the steps after its checkpoint; the report reads all parts)."""
    current = run_dir / "metrics.jsonl"
    if current.exists():
        k = len(list(run_dir.glob("metrics.part-*.jsonl")))
        current.replace(run_dir / f"metrics.part-{k}.jsonl")


# -- running ---------------------------------------------------------------------------------------

Train = Callable[[RunSpec, Callable[[Any], None]], str]  # (spec, on_coordinator) -> status


def train_with_job(data: str, preset: str | None) -> Train:
    """Train one run as ``alexnet train --resume`` on its run directory would: from its newest
    checkpoint, or from step 0 when it has none. Returns the run's status."""
    from cluster.coordinator import FINISHED
    from cluster.job import run_training

    def train(spec: RunSpec, on_coordinator: Callable[[Any], None]) -> str:
        keep_history(spec.run_dir)
        res = run_training(
            spec.cfg, data, str(spec.run_dir), resume=True, preset=preset, on_coordinator=on_coordinator
        )
        if res.state != FINISHED:
            raise RuntimeError(res.error or f"the run ended in state {res.state}")
        return "stopped" if res.stopped else "finished"

    return train


def _say(line: str) -> None:
    print(f"[study] {line}", flush=True)


class StudyRunner:
    """Runs a study's unfinished runs (``slots.at_once`` at a time), keeping ``study.json`` current.

    ``train(spec, on_coordinator)`` trains one run to its end and returns ``"finished"`` or
    ``"stopped"`` (raises on failure); ``result(spec)`` reads its numbers. A stop request (SIGTERM,
    Ctrl-C) stops the runs in flight at their next checkpoint and starts no more."""

    def __init__(
        self,
        study_dir: Path,
        state: dict,
        specs: Sequence[RunSpec],
        train: Train,
        result: Callable[[RunSpec], dict[str, Any]],
        slots: Slots,
    ) -> None:
        self.dir, self.state, self.specs, self.slots = study_dir, state, list(specs), slots
        self.train, self.result = train, result
        self.entries = {r["key"]: r for r in state["runs"]}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.coordinators: list[Any] = []
        self.done_steps = 0
        self.done_s = 0.0

    def todo(self) -> list[RunSpec]:
        """The runs that need training (the others' entries are marked finished)."""
        return [s for s in self.specs if not is_finished(s, self.entries[s.key])]

    def run(self) -> list[RunSpec]:
        """Train every run in :meth:`todo`; returns them."""
        todo = self.todo()
        total = len(self.specs)
        _say(
            f"{self.state['study']}: {total} runs, {total - len(todo)} already finished, {len(todo)} to train"
            + (f", {self.slots.at_once} at a time" if self.slots.at_once > 1 and todo else "")
        )
        self._remaining = sum(s.total_steps for s in todo)
        if self.slots.at_once == 1:
            for i, spec in enumerate(todo):
                if self.stop.is_set():
                    break
                self._one(spec, total - len(todo) + i + 1, total)
            return todo
        with self._stop_on_signals(), concurrent.futures.ThreadPoolExecutor(self.slots.at_once) as pool:
            futures = [
                pool.submit(self._one, s, total - len(todo) + i + 1, total) for i, s in enumerate(todo)
            ]
            concurrent.futures.wait(futures)
        return todo

    def _one(self, spec: RunSpec, number: int, total: int) -> None:
        if self.stop.is_set():
            return
        entry = self.entries[spec.key]
        was = entry["status"]
        with self.lock:
            eta = self._eta()
            entry.update(status="running", error=None)
            save_state(self.dir, self.state)
        how = {
            "running": "continuing (cut off before)",
            "stopped": "continuing",
            "failed": "again (it failed)",
        }
        how = how.get(was, "starting")
        _say(f"run {number}/{total} {spec.key}: {how}, {spec.total_steps} steps; study ETA {eta}")
        t0 = time.perf_counter()
        try:
            status = self.train(spec, self._register)
            if status == "finished":
                entry["result"] = self.result(spec)
        except Exception as e:  # one run failing does not end the study: say it, go on
            status, entry["error"] = "failed", f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - t0
        with self.lock:
            entry["status"] = status
            entry["seconds"] = round(seconds, 1)
            if status == "finished":
                self.done_steps += spec.total_steps
                self.done_s += seconds
            self._remaining -= spec.total_steps
            save_state(self.dir, self.state)
        if status == "stopped":
            self.stop.set()
        _say(
            f"run {number}/{total} {spec.key}: {status} in {seconds:.0f} s"
            + (f": {entry['error']}" if status == "failed" else "")
        )

    def _eta(self) -> str:
        """The study's remaining time, at the seconds per step of the runs finished in this call."""
        from cluster.reporting import format_eta

        if not self.done_steps:
            return "?"
        return format_eta(self.done_s / self.done_steps * self._remaining / self.slots.at_once)

    def _register(self, coord: Any) -> None:
        with self.lock:
            self.coordinators.append(coord)
            if self.stop.is_set():
                coord.request_stop()

    def _stop_on_signals(self) -> contextlib.AbstractContextManager[None]:
        """With runs in threads (which cannot take signals), SIGTERM and Ctrl-C stop every run in
        flight at its next checkpoint and start no more."""
        from cluster.job import on_stop_signals

        def on_signal(signum, frame):
            _say(f"{signal.Signals(signum).name}: stopping the runs in flight at their next checkpoint")
            with self.lock:
                self.stop.set()
                for c in self.coordinators:
                    c.request_stop()

        return on_stop_signals(on_signal)


# -- the whole command -----------------------------------------------------------------------------


def run_result_of(spec: RunSpec, data: str, threshold: float) -> dict[str, Any]:
    """A finished run's numbers (:func:`cluster.study_report.run_result`) from its own files: its
    last validation if it was at the run's end; else (a run ending mid-epoch) its final checkpoint
    scored once as ``alexnet eval`` scores it; and its conv1's colour measure per column."""
    from cluster.study_report import read_history

    steps, evals = read_history(spec.run_dir)
    final = None
    if evals and int(evals[-1]["step"]) == spec.total_steps:
        final = {**_errors(evals[-1]), "step": spec.total_steps, "source": "the run's last validation"}
    elif has_val(data):
        from cluster.evaluate import evaluate_checkpoint

        res = evaluate_checkpoint(str(spec.run_dir), data, ten_crop=spec.cfg.eval.ten_crop)
        final = {**_errors(res), "step": int(res["step"]), "source": "alexnet eval of the final checkpoint"}
    out = run_result(steps, evals, final, spec.steps_per_epoch, spec.total_steps, threshold)
    out["colour"] = conv1_colour(str(spec.run_dir))
    return out


def _errors(row: Mapping[str, Any]) -> dict[str, float]:
    keys = ("top1_error", "top5_error", "top1_error_10crop", "top5_error_10crop")
    return {k: float(row[k]) for k in keys if k in row}


def has_val(data: str) -> bool:
    """Whether the shards have val images (a run's final errors can be measured)."""
    from alexnet.data.index import DatasetIndex

    index = DatasetIndex.load(data)
    return "val" in index.meta["splits"] and index.count("val") > 0


def conv1_colour(checkpoint: str) -> dict[str, Any]:
    """conv1's colour measure per column of a checkpoint (or run dir), and whether its data is
    greyscale (:func:`conv1_of`)."""
    from alexnet.filters import colour_specificity

    cols, grey, _ = conv1_of(checkpoint)
    return {"columns": {str(c): colour_specificity(w) for c, w in cols.items()}, "greyscale": grey}


def conv1_of(checkpoint: str) -> tuple[dict[int, Any], bool, str]:
    """conv1's weights by column of a checkpoint (a run dir: its newest), whether the data it was
    trained on is greyscale (its mean image has R = G = B within half a grey level: a colour
    dataset's never has), and the checkpoint read."""
    import torch

    from cluster.evaluate import load_for_inference

    loaded = load_for_inference(checkpoint, torch.device("cpu"))
    state = loaded.model.state_dict()
    cols = {c: state[f"conv1.{c}.weight"] for c in range(2) if f"conv1.{c}.weight" in state}
    mean = loaded.preprocess.mean  # (3, S, S) or (3, 1, 1), 0-255
    grey = bool((mean[0] - mean[1]).abs().max() < 0.5 and (mean[1] - mean[2]).abs().max() < 0.5)
    return cols, grey, loaded.url


def findings_of(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each finding the study measures, from its finished runs (:func:`cluster.study_report.compare`)."""
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for r in state["runs"]:
        if r["status"] == "finished" and r.get("result"):
            by_variant.setdefault(r["variant"], {})[r["seed"]] = r["result"]
    base = by_variant.get(state["baseline"], {})
    out = []
    for v in state["variants"][1:]:
        finding = FINDINGS[v["finding"]] if v["finding"] else unnamed(v["name"])
        out.append(compare(finding, base, by_variant.get(v["name"], {}), v["name"]))
    for key in ("ten_crop", "columns_specialise"):
        out.append(compare(FINDINGS[key], base, None, None))
    return out


def write_report(study_dir: Path, state: dict, filters_from: str | None) -> dict[str, str]:
    """``study.md``, ``study.json`` (with the findings) and the plots; their paths by kind."""
    from alexnet.filters import figure3_png
    from cluster import study_report as rep

    state["findings"] = findings_of(state)
    save_state(study_dir, state)
    (study_dir / "study.md").write_text(rep.markdown(state))
    plots = study_dir / "plots"
    plots.mkdir(exist_ok=True)
    files = {"report": str(study_dir / "study.md"), "json": str(study_dir / STUDY_FILE)}
    results: dict[str, list] = {}
    for r in state["runs"]:
        if r["status"] == "finished" and r.get("result"):
            results.setdefault(r["variant"], []).append(r["result"])
    base = state["baseline"]
    speed = [v["name"] for v in state["variants"] if v["finding"] == "relu"]
    if base in results and any(v in results for v in speed):
        files["speed"] = _write(
            plots / "relu_vs_tanh.png",
            rep.plot_speed(
                {base: results[base], **{v: results[v] for v in speed if v in results}}, state["threshold"]
            ),
        )
    if any(m.get("top1") and m["top1"]["stat"] and m["variant"] for m in state["findings"]):
        files["deltas"] = _write(plots / "deltas.png", rep.plot_deltas(state["findings"]))
    reg = [v["name"] for v in state["variants"] if v["finding"] in ("augmentation", "dropout", "lighting")]
    if base in results:
        curves = {base: results[base], **{v: results[v] for v in reg if v in results}}
        files["regularisation"] = _write(plots / "regularisation.png", rep.plot_curves(curves))
    if filters_from is not None:
        cols, grey, url = conv1_of(filters_from)
        title = f"conv1 of {Path(url).parent.parent.name}" + (" (greyscale data)" if grey else "")
        files["filters"] = _write(plots / "filters.png", figure3_png(cols, title))
    return files


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def run_study(
    study: Study,
    base_layers: Sequence[Layer],
    data: str,
    study_dir: str,
    seeds: Sequence[int] | None = None,
    threshold: float | None = None,
    preset: str | None = None,
    train: Train | None = None,
) -> int:
    """``alexnet study``: check every run, train the unfinished ones, write the report. Exit code
    0 (all finished), 1 (a run failed), 143 (stopped on request; the same command continues)."""
    if "://" in study_dir:
        raise ValueError(f"--study-dir {study_dir}: give a local path or a shared mount (not a URL)")
    root = Path(study_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(
            f"--study-dir {study_dir} is a file: give a directory (new, or a study's to continue)"
        )
    seeds = list(seeds or study.seeds or [0])
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds {seeds}: give distinct integers >= 0")
    threshold = check_threshold(
        threshold if threshold is not None else study.threshold or DEFAULT_THRESHOLD, "--threshold"
    )
    specs = plan_runs(study, base_layers, data, root, seeds)
    root.mkdir(parents=True, exist_ok=True)
    state = load_state(root, study, data, specs, threshold)
    rethreshold(state, specs, threshold)
    save_state(root, state)
    runner = StudyRunner(
        root,
        state,
        specs,
        train or train_with_job(data, preset),
        lambda s: run_result_of(s, data, threshold),
        Slots(1),
    )
    if not runner.todo():
        _say(f"{study.name}: all {len(specs)} runs finished already: nothing to train")
    else:
        runner.slots = _start_ray(runner.todo())
        if runner.slots.at_once > 1:  # runs side by side cannot share one metrics port: any free one each
            runner.specs = [_any_port(s) for s in runner.specs]
        runner.run()
    baseline = [
        s for s in specs if s.variant == study.variants[0] and runner.entries[s.key]["status"] == "finished"
    ]
    files = write_report(root, state, str(baseline[0].run_dir) if baseline else None)
    for kind, path in files.items():
        _say(f"{kind}: {path}")
    statuses = [r["status"] for r in state["runs"]]
    if "stopped" in statuses or runner.stop.is_set():
        _say("stopped: run the same command again to continue")
        return 143
    return 1 if any(s != "finished" for s in statuses) else 0


def _any_port(spec: RunSpec) -> RunSpec:
    if spec.cfg.metrics.port <= 0:
        return spec
    return dataclasses.replace(spec, cfg=spec.cfg.replace(**{"metrics.port": 0}))


def _start_ray(todo: Sequence[RunSpec]) -> Slots:
    """Attach to the cluster (``RAY_ADDRESS``) or start a local Ray big enough for the largest run
    (:func:`cluster.job.init_ray`), and decide how many runs start together (:func:`runs_at_once`)."""
    import os

    import ray

    from cluster.job import init_ray
    from cluster.plan import plan_run

    biggest = max(todo, key=lambda s: run_resources(s.cfg, s.data_workers)["CPU"])
    init_ray(biggest.cfg, plan_run(biggest.cfg, biggest.cfg.data.path)[0])
    need = {k: max(run_resources(s.cfg, s.data_workers).get(k, 0.0) for s in todo) for k in ("CPU", "GPU")}
    cluster = ray.cluster_resources() if os.environ.get("RAY_ADDRESS") else None
    return runs_at_once(cluster, {k: v for k, v in need.items() if v > 0}, len(todo))
