"""The report of an ``alexnet study``: what each run measured, each finding's delta against the
baseline with its spread over seeds, beside the paper's number, and a verdict that claims no more
than the spread allows. Pure arithmetic on the runs' own numbers (:func:`run_result` reads them
from a run directory's ``metrics.jsonl``), then ``study.md`` and the plots.

The verdict rule (:func:`verdict`): the deltas are paired by seed (variant minus baseline, same
``train.seed``); over n seeds their mean and the half-width of its 95 % confidence interval,
t(0.975, n-1) x sd / sqrt(n). An interval that holds 0 is "within noise"; one that does not is
"same direction as the paper" or "opposite to the paper"; one seed has no spread, so it gets no
verdict ("one seed: no spread to judge it by").
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# colour measure difference between a run's columns that counts as specialised (two random
# columns of 48 11x11x3 kernels differ by about 0.01; alexnet.filters.colour_specificity)
SPECIALISED = 0.1
CURVE_POINTS = 200  # points per training-error curve kept in study.json (for the plots)


@dataclass(frozen=True)
class Finding:
    """One of the paper's findings: where it argues it, what it reports, what the study measures.

    ``metric``: ``"error"`` (final top-1/top-5 error, variant minus baseline, in points), ``"gap"``
    (the train-val gap: overfitting), ``"speed"`` (epochs to the training-error threshold, variant
    over baseline), ``"ten_crop"`` (the baseline's center minus its 10-crop error: no run) or
    ``"columns"`` (conv1's colour measure per column: no run). ``paper_top1``/``paper_top5``: the
    paper's delta in points (the variant's error minus the paper net's), or the speed ratio;
    ``sign``: the direction the paper reports (+1: the variant is worse / slower / overfits more)."""

    key: str
    title: str
    section: str
    paper: str
    metric: str
    paper_top1: float | None = None
    paper_top5: float | None = None
    sign: int = 1


FINDINGS: dict[str, Finding] = {
    f.key: f
    for f in (
        Finding(
            "relu",
            "ReLU instead of tanh trains much faster",
            "3.1, Fig. 1",
            "25 % CIFAR-10 training error 6x sooner (in epochs) with ReLU",
            "speed",
            6.0,
        ),
        Finding(
            "columns",
            "two columns on two GPUs",
            "3.2",
            "one column: +1.7 % top-1, +1.2 % top-5",
            "error",
            1.7,
            1.2,
        ),
        Finding(
            "lrn", "local response normalization", "3.3", "off: +1.4 % top-1, +1.2 % top-5", "error", 1.4, 1.2
        ),
        Finding(
            "pooling",
            "overlapping pooling (z=3, s=2)",
            "3.4",
            "z=2, s=2: +0.4 % top-1, +0.3 % top-5",
            "error",
            0.4,
            0.3,
        ),
        Finding(
            "augmentation", "random crops + flips", "4.1", 'without them "substantial overfitting"', "gap"
        ),
        Finding("lighting", "PCA colour lighting", "4.1", "off: +1 % top-1 or more", "error", 1.0),
        Finding(
            "dropout",
            "dropout 0.5 in fc6, fc7",
            "4.2",
            'without it "substantial overfitting" (with it ~2x the iterations)',
            "gap",
        ),
        Finding("depth", "depth", "6", "a middle conv layer removed: about +2 % top-1", "error", 2.0),
        Finding("ten_crop", "10-crop test", "4.1", "used for every reported number", "ten_crop"),
        Finding(
            "columns_specialise",
            "the columns specialise",
            "6.1, Fig. 3",
            "one column's conv1 kernels colour-agnostic, the other's colour-specific, in every run",
            "columns",
        ),
    )
}


# -- one run's numbers, from its run directory ----------------------------------------------------


def read_history(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The step rows and validation rows of a run, by step: ``metrics.jsonl`` and the parts a study
    kept of it before each resume (``metrics.part-K.jsonl``, oldest first; a resumed run writes only
    the steps after its checkpoint), later files winning for a step run twice."""
    files = sorted(run_dir.glob("metrics.part-*.jsonl"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for f in [*files, run_dir / "metrics.jsonl"]:
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            row = json.loads(line)
            (steps if row.get("kind") == "step" else evals)[int(row["step"])] = row
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]


def train_window(steps_per_epoch: int, total_steps: int) -> int:
    """Steps the training error is averaged over: one epoch, or a quarter of a shorter run."""
    return max(1, min(steps_per_epoch, total_steps // 4))


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def first_below(steps: Sequence[int], smoothed: Sequence[float], threshold: float) -> int | None:
    """The first step whose smoothed training error is at or below ``threshold`` (None: never)."""
    return next((s for s, e in zip(steps, smoothed, strict=True) if e <= threshold), None)


def training_error(
    step_rows: Sequence[Mapping[str, Any]], steps_per_epoch: int, total_steps: int
) -> tuple[list[int], list[float]]:
    """The steps done (1-based) and the training top-1 error after each, averaged over the
    :func:`train_window` steps before it."""
    rows = [r for r in step_rows if "top1_error" in r]
    steps = [int(r["step"]) + 1 for r in rows]  # a row's step is the step's index: done after it
    window = train_window(steps_per_epoch, total_steps)
    return steps, trailing_mean([float(r["top1_error"]) for r in rows], window)


def crossing(
    step_rows: Sequence[Mapping[str, Any]], steps_per_epoch: int, total_steps: int, threshold: float
) -> dict[str, Any]:
    """When the training error (:func:`training_error`) first reached ``threshold``: its step and
    epoch (None: never), as :func:`run_result` has them."""
    reached = first_below(*training_error(step_rows, steps_per_epoch, total_steps), threshold)
    return {
        "threshold": threshold,
        "threshold_step": reached,
        "threshold_epochs": None if reached is None else reached / steps_per_epoch,
    }


def run_result(
    step_rows: Sequence[Mapping[str, Any]],
    eval_rows: Sequence[Mapping[str, Any]],
    final: Mapping[str, Any] | None,
    steps_per_epoch: int,
    total_steps: int,
    threshold: float,
) -> dict[str, Any]:
    """A finished run's numbers for the report: ``final`` (its last validation: center and 10-crop
    top-1/top-5 error), ``train_top1_error`` (mean top-1 error of the training batches over the
    run's last :func:`train_window` steps, measured as trained: augmentation and dropout on),
    ``gap`` (final center top-1 minus it: overfitting), the step (and epoch) at which the trailing
    training error first reached ``threshold``, and the training and validation curves (for the
    plots)."""
    steps, smoothed = training_error(step_rows, steps_per_epoch, total_steps)
    train = smoothed[-1] if smoothed else None
    every = max(1, math.ceil(len(steps) / CURVE_POINTS))
    return {
        "final": dict(final) if final else None,
        "train_top1_error": train,
        "gap": final["top1_error"] - train if final and train is not None else None,
        **crossing(step_rows, steps_per_epoch, total_steps, threshold),
        # steps whose rows no metrics.jsonl holds: a run killed outright (SIGKILL) wrote none for the
        # steps before the checkpoint it resumed from; its curve and crossing lack them
        "missing_steps": total_steps - len(steps),
        "steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "epochs": total_steps / steps_per_epoch,
        "curve": {
            "epochs": [s / steps_per_epoch for s in steps[::every]],
            "train_top1_error": smoothed[::every],
        },
        "val_curve": {
            "epochs": [int(e["step"]) / steps_per_epoch for e in eval_rows],
            "top1_error": [e["top1_error"] for e in eval_rows],
        },
    }


# -- the arithmetic over seeds -------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """The mean of paired deltas over seeds, their sample sd, and the half-width of the 95 %
    confidence interval of the mean (t distribution; None with one seed)."""

    mean: float
    sd: float | None
    n: int
    ci: float | None
    low: float
    high: float

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "sd": self.sd,
            "n": self.n,
            "ci95": self.ci,
            "min": self.low,
            "max": self.high,
        }


def stat(values: Sequence[float]) -> Stat | None:
    """:class:`Stat` of ``values`` (None when there are none)."""
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Stat(mean, None, 1, None, mean, mean)
    from scipy.special import stdtrit  # the t quantile (scipy.stats costs seconds to import)

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Stat(mean, sd, n, float(stdtrit(n - 1, 0.975)) * sd / math.sqrt(n), min(values), max(values))


def verdict(s: Stat | None, sign: int = 1) -> str:
    """The words for a measured delta ``s`` against the paper's direction ``sign`` (module docstring;
    0: no claim of the paper, the words say above or below the baseline)."""
    if s is None:
        return "not measured"
    if s.n == 1:
        return "one seed: no spread to judge it by"
    if abs(s.mean) <= s.ci:
        return "within noise"
    if sign == 0:  # a variant that tests no claim of the paper
        return "above the baseline" if s.mean > 0 else "below the baseline"
    return "same direction as the paper" if (s.mean > 0) == (sign > 0) else "opposite to the paper"


def error_keys(results: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """The top-1 and top-5 keys the comparison uses: the 10-crop errors when every run has them
    (the paper's way), else the center crop's."""
    ten = all(r["final"] and "top1_error_10crop" in r["final"] for r in results)
    return ("top1_error_10crop", "top5_error_10crop") if ten else ("top1_error", "top5_error")


def paired(base: Mapping[int, Mapping[str, Any]], var: Mapping[int, Mapping[str, Any]], value) -> list[float]:
    """``value(variant run) - value(baseline run)`` per seed both have a number for (sorted by seed)."""
    out = []
    for seed in sorted(set(base) & set(var)):
        a, b = value(base[seed]), value(var[seed])
        if a is not None and b is not None:
            out.append(b - a)
    return out


def _final(key: str):
    return lambda r: r["final"][key] if r["final"] and key in r["final"] else None


def _speed(r: Mapping[str, Any]) -> float | None:
    """Epochs to the threshold; a run that never reached it counts its length (a lower bound)."""
    return r["threshold_epochs"] if r["threshold_epochs"] is not None else r["epochs"]


def compare(
    finding: Finding,
    base: Mapping[int, Mapping[str, Any]],
    var: Mapping[int, Mapping[str, Any]] | None,
    variant: str | None,
) -> dict[str, Any]:
    """One finding measured: the per-seed deltas, their :class:`Stat` and the verdict. ``base`` and
    ``var``: run results (:func:`run_result`) by seed; ``var`` None for the findings that are the
    baseline's own (10-crop, the columns' colour). Errors are the 10-crop ones when every run
    compared has them (:func:`error_keys`)."""
    out: dict[str, Any] = {"finding": finding.key, "variant": variant, "metric": finding.metric}
    both = sorted(set(base) & set(var or base))  # the seeds compared
    results = [base[s] for s in both] + [var[s] for s in both if var]
    top1, top5 = error_keys(results) if results else ("top1_error", "top5_error")
    if finding.metric == "ten_crop":
        d = [
            r["final"]["top1_error"] - r["final"]["top1_error_10crop"]
            for r in base.values()
            if r["final"] and "top1_error_10crop" in r["final"]
        ]
        out["top1"] = _summary(d, 100, finding.sign)
        return out
    if finding.metric == "columns":
        return {**out, **columns_summary(base)}
    assert var is not None, finding.key
    if finding.metric == "speed":
        ratios = [
            _speed(var[s]) / base[s]["threshold_epochs"]
            for s in sorted(set(base) & set(var))
            if base[s]["threshold_epochs"]
        ]
        censored = any(var[s]["threshold_epochs"] is None for s in var)
        logs = [math.log(r) for r in ratios]
        out["ratio"] = {
            "per_seed": ratios,
            "geomean": math.exp(sum(logs) / len(logs)) if logs else None,
            "censored": censored,  # some variant run never reached the threshold: ratios are lower bounds
            "verdict": verdict(stat(logs), finding.sign),
        }
    if finding.metric == "gap":
        out["gap"] = _summary(paired(base, var, lambda r: r["gap"]), 100, finding.sign)
    out["top1"] = _summary(paired(base, var, _final(top1)), 100, finding.sign)
    out["top5"] = _summary(paired(base, var, _final(top5)), 100, finding.sign)
    out["errors"] = top1.replace("top1_error", "").lstrip("_") or "center"
    return out


def _summary(deltas: Sequence[float], scale: float, sign: int) -> dict[str, Any]:
    """Deltas (scaled, e.g. to points) with their statistics and verdict."""
    scaled = [d * scale for d in deltas]
    s = stat(scaled)
    return {"per_seed": scaled, "stat": s.to_json() if s else None, "verdict": verdict(s, sign)}


def columns_summary(base: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The columns' colour measure per baseline run, and whether one column is the more
    colour-specific by :data:`SPECIALISED` in every run (the paper's Figure 3 claim)."""
    runs = [r["colour"] for _, r in sorted(base.items()) if r.get("colour")]
    if not runs:
        return {"verdict": "not measured"}
    if any(c["greyscale"] for c in runs):
        return {
            "per_seed": runs,
            "verdict": "not measurable: greyscale data (R = G = B), so conv1 sees no colour to specialise on",
        }
    if any(len(c["columns"]) < 2 for c in runs):
        return {"per_seed": runs, "verdict": "not measurable: a one-column baseline"}
    diffs = [max(c["columns"].values()) - min(c["columns"].values()) for c in runs]
    every = all(d >= SPECIALISED for d in diffs)
    words = (
        f"one column more colour-specific by >= {SPECIALISED} in every run"
        if every
        else (f"no consistent specialisation (column difference {min(diffs):.3f} to {max(diffs):.3f})")
    )
    return {"per_seed": runs, "difference": diffs, "verdict": words}


def unnamed(variant: str) -> Finding:
    """What a variant that names no finding is compared on: its final error, with no paper's number."""
    return Finding("", f"variant {variant}", "-", "-", "error", sign=0)


def finding_of(m: Mapping[str, Any]) -> Finding:
    """The :class:`Finding` a :func:`compare` result measured."""
    return FINDINGS[m["finding"]] if m["finding"] else unnamed(m["variant"])


# -- study.md -------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _delta(summary: Mapping[str, Any] | None, unit: str = " pt") -> str:
    """``+1.2 pt ± 0.8 (3 seeds)``: the mean and the 95 % interval's half-width."""
    if not summary or not summary["stat"]:
        return "-"
    s = summary["stat"]
    if s["n"] == 1:
        return f"{s['mean']:+.2f}{unit} (1 seed)"
    return f"{s['mean']:+.2f}{unit} ± {s['ci95']:.2f} ({s['n']} seeds, {s['min']:+.2f} to {s['max']:+.2f})"


def measured_words(m: Mapping[str, Any]) -> tuple[str, str]:
    """A finding's measured value and verdict, as the report's table cells."""
    if m["metric"] == "speed":
        r = m["ratio"]
        top1 = f"; final top-1 {_delta(m['top1'])} ({m['top1']['verdict']})"
        if r["geomean"] is None:
            return "the baseline never reached the threshold" + top1, "speed not measured"
        low = ">= " if r["censored"] else ""
        per = ", ".join(f"{low}{x:.2f}x" for x in r["per_seed"])
        return f"epochs to threshold {low}{r['geomean']:.2f}x the baseline's ({per})" + top1, r["verdict"]
    if m["metric"] == "columns":
        per = m.get("per_seed") or []
        cells = "; ".join(" / ".join(f"{v:.3f}" for _, v in sorted(c["columns"].items())) for c in per)
        return (f"colour per column: {cells}" if cells else "-"), m["verdict"]
    if m["metric"] == "ten_crop":
        return f"center minus 10-crop top-1: {_delta(m['top1'])}", m["top1"]["verdict"]
    if m["metric"] == "gap":
        return (
            f"train-val gap {_delta(m['gap'])}; top-1 {_delta(m['top1'])}",
            m["gap"]["verdict"],
        )
    return f"top-1 {_delta(m['top1'])}; top-5 {_delta(m['top5'])}", m["top1"]["verdict"]


def markdown(study: Mapping[str, Any]) -> str:
    """``study.md``: the runs' table and the findings' table of a ``study.json`` tree."""
    lines = [
        f"# Study `{study['study']}`",
        "",
        f"Data `{study['data']}`; seeds {study['seeds']}; training-error threshold {study['threshold']}; "
        f"baseline `{study['baseline']}`. Errors in percent; deltas in points (variant minus baseline, "
        "paired by seed), `± x`: the 95 % interval's half-width over seeds.",
        "",
        "## Runs",
        "",
        "| variant | seed | status | top-1 | top-5 | 10-crop top-1 | 10-crop top-5 | train top-1 | gap "
        "| threshold at step (epoch) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in study["runs"]:
        res = r.get("result") or {}
        f = res.get("final") or {}
        reached = res.get("threshold_step")
        at = (
            "-"
            if not res
            else ("not reached" if reached is None else f"{reached} ({res['threshold_epochs']:.2f})")
        )
        if res.get("missing_steps"):
            at += f" ({res['missing_steps']} steps' history lost)"
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['status']} | {_pct(f.get('top1_error'))} | "
            f"{_pct(f.get('top5_error'))} | {_pct(f.get('top1_error_10crop'))} | "
            f"{_pct(f.get('top5_error_10crop'))} | {_pct(res.get('train_top1_error'))} | "
            f"{_pct(res.get('gap'))} | {at} |"
        )
    lines += [
        "",
        "## The paper's findings",
        "",
        "| finding (section) | variant | measured here | the paper | verdict |",
        "|---|---|---|---|---|",
    ]
    for m in study.get("findings", []):
        f = finding_of(m)
        value, words = measured_words(m)
        lines.append(
            f"| {f.title} ({f.section}) | {m['variant'] or '(baseline)'} | {value} | {f.paper} | {words} |"
        )
    lines += [
        "",
        "A verdict says only what the spread over seeds allows: an interval that holds 0 is "
        '"within noise"; one seed gives none. The train-val gap is the final center top-1 error minus '
        "the training batches' top-1 error over the run's last epoch (or quarter), measured as "
        "trained (augmentation and dropout on).",
        "",
    ]
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def plot_speed(curves: Mapping[str, Sequence[Mapping[str, Any]]], threshold: float) -> bytes:
    """Figure 1's form: training error against epochs per variant (one line per seed), the
    threshold dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, results) in enumerate(curves.items()):
        for j, r in enumerate(results):
            c = r["curve"]
            style = "-" if i == 0 else "--"
            ax.plot(c["epochs"], c["train_top1_error"], style, color=f"C{i}", label=name if j == 0 else None)
    ax.axhline(threshold, color="k", lw=0.8, ls=":", label=f"threshold {threshold:g}")
    ax.set_xlabel("epochs")
    ax.set_ylabel("training top-1 error")
    ax.set_ylim(0, 1)
    ax.legend()
    return _png(fig)


def plot_deltas(findings: Sequence[Mapping[str, Any]]) -> bytes:
    """Each variant's top-1 delta (points, mean over seeds with its 95 % interval) as a bar, the
    paper's number beside it where it gives one."""
    plt = _pyplot()
    rows = [m for m in findings if m.get("top1") and m["top1"]["stat"] and m["variant"]]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(rows) + 1), 4))
    x = list(range(len(rows)))
    ours = [m["top1"]["stat"]["mean"] for m in rows]
    err = [m["top1"]["stat"]["ci95"] or 0 for m in rows]
    paper = [finding_of(m).paper_top1 if finding_of(m).metric == "error" else None for m in rows]
    ax.bar([i - 0.2 for i in x], ours, 0.4, yerr=err, capsize=3, label="measured (95 % interval)")
    ax.bar([i + 0.2 for i in x], [p or 0 for p in paper], 0.4, color="0.7", hatch="//", label="the paper")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(x, [m["variant"] for m in rows], rotation=30, ha="right")
    ax.set_ylabel("top-1 error minus the baseline's (points)")
    ax.legend()
    return _png(fig)


def plot_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes:
    """Training error (lines) and val top-1 error (markers) against epochs, one colour per variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, results) in enumerate(runs.items()):
        for j, r in enumerate(results):
            c = r["curve"]
            ax.plot(
                c["epochs"],
                c["train_top1_error"],
                color=f"C{i}",
                lw=0.9,
                label=f"{name} train" if j == 0 else None,
            )
            v = r.get("val_curve") or {}
            if v.get("epochs"):
                ax.plot(
                    v["epochs"], v["top1_error"], "o", color=f"C{i}", label=f"{name} val" if j == 0 else None
                )
    ax.set_xlabel("epochs")
    ax.set_ylabel("top-1 error")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return _png(fig)
