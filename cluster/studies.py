"""The studies ``alexnet study`` knows: a baseline and variants (config overrides), each tied to
one of the paper's findings (:data:`cluster.study_report.FINDINGS`). Built in: ``paper-ablations``
(the baseline and one variant per finding the switches express) and ``relu-vs-tanh``; any other
is a TOML file (:func:`load_study_file`, format :data:`STUDY_FORMAT`). Pure: no Ray, no training
(:mod:`cluster.study` runs them)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import JobConfig, parse_sets
from cluster.study_report import FINDINGS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

STUDIES = ("paper-ablations", "relu-vs-tanh")
DEFAULT_THRESHOLD = 0.25  # the paper's Figure 1: 25 % training error
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Variant:
    """One arm of a study: its name (its run directories' prefix), the config keys it sets
    (``{"section.key": value}``, layered after the study's ``--set``), and the finding it tests
    (a key of :data:`cluster.study_report.FINDINGS`, or None)."""

    name: str
    sets: Mapping[str, Any] = field(default_factory=dict)
    finding: str | None = None


@dataclass(frozen=True)
class Study:
    """A named list of variants, the first the baseline; the seeds and the training-error
    threshold the study file chose (None: the command line's, or the defaults)."""

    name: str
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...] | None = None
    threshold: float | None = None


def paper_ablations(base: JobConfig) -> Study:
    """The baseline and one variant per finding that the switches express, built on ``base`` (the
    one-column net keeps the base grid's replicas and stages, with one column)."""
    r, s, _ = base.grid.dims
    return Study(
        "paper-ablations",
        (
            Variant("baseline"),
            Variant("tanh", {"model.activation": "tanh"}, "relu"),
            Variant("one-column", {"model.columns": 1, "grid.shape": f"{r}x{s}x1"}, "columns"),
            Variant("no-lrn", {"model.lrn": False}, "lrn"),
            Variant("non-overlapping-pool", {"model.pooling": "non_overlapping"}, "pooling"),
            Variant("no-crop-flip", {"data.crop": "center", "data.flip": False}, "augmentation"),
            Variant("no-lighting", {"data.lighting": False}, "lighting"),
            Variant("no-dropout", {"model.dropout": 0.0}, "dropout"),
            # conv4, not conv3: conv3 is where the columns meet, so removing conv4 changes depth only
            Variant("no-conv4", {"model.remove_blocks": ["conv4"]}, "depth"),
        ),
    )


def relu_vs_tanh(base: JobConfig) -> Study:
    """The paper's Figure 1 race: the baseline (ReLU) and the same net with tanh."""
    return Study("relu-vs-tanh", (Variant("relu"), Variant("tanh", {"model.activation": "tanh"}, "relu")))


STUDY_KEYS = ("name", "seeds", "threshold", "variant")
VARIANT_KEYS = ("name", "finding", "set")
STUDY_FORMAT = """\
A study file (TOML):

    name = "lrn-and-pooling"        # optional (default: the file's name)
    seeds = [0, 1, 2]               # optional (--seeds wins; default [0])
    threshold = 0.25                # optional training-error threshold (--threshold wins)

    [[variant]]                     # the first variant is the baseline
    name = "baseline"

    [[variant]]
    name = "no-lrn"
    finding = "lrn"                 # optional: the paper's finding it tests (its number in the report)
    set = { "model.lrn" = false }   # config keys, as --set takes them (or ["model.lrn=false"])

Findings: """ + ", ".join(FINDINGS)


def _study_error(path: str, what: str) -> ValueError:
    return ValueError(f"study file {path}: {what} (see `alexnet study --help` for the format)")


def load_study_file(path: str | Path) -> Study:
    """A user-defined study from a TOML file (:data:`STUDY_FORMAT`); every mistake is refused
    naming the file, the key and the fix."""
    try:
        tree = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"study file {path}: cannot read it ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"study file {path}: not valid TOML ({e})") from None
    unknown = sorted(set(tree) - set(STUDY_KEYS))
    if unknown:
        raise _study_error(str(path), f"unknown key(s) {', '.join(unknown)}: use {', '.join(STUDY_KEYS)}")
    items = tree.get("variant")
    if not isinstance(items, list) or not items:
        raise _study_error(str(path), "no [[variant]] tables: give at least the baseline")
    variants = tuple(_variant(str(path), i, v) for i, v in enumerate(items))
    names = [v.name for v in variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _study_error(str(path), f"variant name(s) {', '.join(dup)} given twice: names must differ")
    seeds = tree.get("seeds")
    if seeds is not None and (
        not isinstance(seeds, list) or not seeds or not all(type(s) is int and s >= 0 for s in seeds)
    ):
        raise _study_error(str(path), f"seeds = {seeds!r}: give a list of integers >= 0, e.g. [0, 1, 2]")
    threshold = tree.get("threshold")
    if threshold is not None:
        check_threshold(threshold, f"study file {path}: threshold")
    name = tree.get("name", Path(path).stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise _study_error(str(path), f"name = {name!r}: use letters, digits, '.', '_' or '-'")
    return Study(name, variants, tuple(seeds) if seeds else None, threshold)


def _variant(path: str, i: int, v: Any) -> Variant:
    """``[[variant]]`` number ``i`` of the file at ``path``."""
    if not isinstance(v, dict):
        raise _study_error(path, f"variant {i + 1} is not a table")
    unknown = sorted(set(v) - set(VARIANT_KEYS))
    if unknown:
        raise _study_error(
            path, f"variant {i + 1}: unknown key(s) {', '.join(unknown)}: use {', '.join(VARIANT_KEYS)}"
        )
    name = v.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _study_error(
            path, f"variant {i + 1}: name = {name!r}: give a name of letters, digits, '.', '_' or '-'"
        )
    finding = v.get("finding")
    if finding is not None and finding not in FINDINGS:
        raise _study_error(path, f"variant {name}: finding = {finding!r}: use one of {', '.join(FINDINGS)}")
    sets = v.get("set", {})
    if isinstance(sets, list):
        if not all(isinstance(x, str) for x in sets):
            raise _study_error(path, f'variant {name}: set = {sets!r}: give strings like "model.lrn=false"')
        sets = parse_sets(sets)
    if not isinstance(sets, dict):
        raise _study_error(
            path, f'variant {name}: set = {sets!r}: give a table, e.g. {{ "model.lrn" = false }}'
        )
    return Variant(name, dict(sets), finding)


def check_threshold(value: Any, what: str) -> float:
    """A training-error threshold: a number in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(f"{what} = {value!r}: give a training error between 0 and 1, e.g. 0.25")
    return float(value)


def get_study(name: str, base: JobConfig) -> Study:
    """The study ``name``: a built-in one (:data:`STUDIES`) or a TOML file (a path ending in .toml)."""
    if name == "paper-ablations":
        return paper_ablations(base)
    if name == "relu-vs-tanh":
        return relu_vs_tanh(base)
    if name.endswith(".toml"):
        return load_study_file(name)
    raise ValueError(f"study {name!r}: use {', '.join(STUDIES)}, or a study file FILE.toml")
