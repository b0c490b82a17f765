"""Validation on the val split: ``alexnet eval``, and the pieces the trainer ranks share with it.

Every path scores with :mod:`alexnet.scoring` (top-1 / top-5 hits; the paper's 10-crop: softmax
averaged over the four corners and the center, with their flips):

* :class:`ValScore`: the hit counts of one validation pass, per crop kind;
* :func:`load_for_inference`: a checkpoint (or a run's newest) as a model in eval mode and its
  preprocessing, from the checkpoint alone (what ``alexnet eval`` and ``alexnet predict`` start from);
* :func:`score_model` / :func:`evaluate_checkpoint` (``alexnet eval``): a model (a checkpoint)
  scored in one process with the fused model; the trainer ranks score the same way inside the
  pipeline (:mod:`cluster.rank`), on batches the data workers decode once (:mod:`cluster.val`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
from torch import Tensor

from alexnet.scoring import Tally, average_crops, errors

TEN = 10  # crops per image of the "ten" crop kind


def crop_kinds(ten_crop: bool) -> tuple[str, ...]:
    """The val passes to run: ``center`` always, ``ten`` (10-crop) when ``ten_crop``."""
    return ("center", "ten") if ten_crop else ("center",)


class ValScore:
    """Hit counts of one validation pass per crop kind; the center pass also sums the loss."""

    def __init__(self, crops: tuple[str, ...]) -> None:
        self.tallies = {crop: Tally() for crop in crops}

    def add(self, crop: str, logits: Tensor, labels: Tensor) -> None:
        """Score one batch: ``logits`` (b, n) for ``center``, (10 b, n) crop-major for ``ten``."""
        tally = self.tallies[crop]
        if crop == "ten":
            tally.add(average_crops(logits, TEN), labels, loss=False)
        else:
            tally.add(logits, labels)

    def totals(self) -> dict[str, dict[str, float]]:
        """``{crop: {"top1", "top5", "loss_sum", "n"}}`` as Python numbers (one host read each)."""
        return {crop: t.totals() for crop, t in self.tallies.items()}


def crop_errors(totals: dict[str, dict[str, float]]) -> dict[str, float]:
    """``top1_error``, ``top5_error`` (center) and ``..._10crop`` (ten, if scored) from hit counts."""
    out: dict[str, float] = {}
    for crop, suffix in (("center", ""), ("ten", "_10crop")):
        if crop in totals:
            t = totals[crop]
            out.update({k + suffix: v for k, v in errors(t["top1"], t["top5"], t["n"]).items()})
    return out


class ShortReadError(ValueError):
    """A val pass read fewer samples than ``dataset.json`` promises (shards cut short or unreadable)."""


def score_model(
    model: torch.nn.Module,
    index: Any,
    batch_size: int,
    input_size: int,
    mean: Tensor,
    scale: float,
    crops: tuple[str, ...],
    max_samples: int = 0,
) -> dict[str, dict[str, float]]:
    """:meth:`ValScore.totals` of a one-process ``model`` (on ``mean``'s device) over the val split
    of ``index`` (an :class:`alexnet.data.index.DatasetIndex`), decoded here through the same plan
    and stages as a run's validation (:mod:`alexnet.data.val`, one replica, one worker);
    ``max_samples`` > 0: exactly its first ``max_samples`` images. Raises :class:`ShortReadError`
    when shards gave fewer samples than ``dataset.json`` promises (corrupt samples are counted and
    skipped, as in a run)."""
    from alexnet.data.records import ReaderStats
    from alexnet.data.val import ValPlan, short_read, worker_batches

    plan = ValPlan.of(index, batch_size, replicas=1, workers=1, max_samples=max_samples)
    score = ValScore(crops)
    for crop in crops:
        stats = ReaderStats()
        for batch in worker_batches(index, plan, 0, crop, input_size, stats):
            if batch.n == 0:
                continue
            labels = torch.from_numpy(batch.labels).to(mean.device)
            with torch.no_grad():
                logits = model(batch.model_input(mean, scale, mean.device))
            score.add(crop, logits, labels)
        lost = short_read(stats)
        if lost:
            raise ShortReadError(f"{lost}: rebuild them with `alexnet shards`, or restore them from a copy")
    return score.totals()


class Loaded(NamedTuple):
    """A checkpoint ready for inference (:func:`load_for_inference`)."""

    model: torch.nn.Module  # the fused execution, in eval mode, on ``preprocess.mean``'s device
    preprocess: Any  # cluster.manifest.Preprocess: classes, input size, mean, input_scale
    config: Any  # the run's cluster.config.JobConfig, as the checkpoint records it
    url: str  # the checkpoint directory read
    step: int


def load_for_inference(checkpoint: str, device: torch.device | None = None) -> Loaded:
    """The model of ``checkpoint`` in eval mode on ``device`` (default: the local GPU if any) and its
    preprocessing, from the checkpoint alone (no dataset). ``checkpoint`` may be a run directory: its
    newest checkpoint whose model and mean files verify (newer ones skipped are named on stderr).

    Only the model and mean files are read, each checked (:mod:`cluster.checkpoint`) and the model's
    tensors checked against its config before anything is allocated; a checkpoint that fails is a
    :class:`cluster.checkpoint.CorruptCheckpoint` (a run dir: the older one is taken)."""
    from alexnet.model import FusedAlexNet
    from cluster.config import from_dict
    from cluster.manifest import Preprocess

    ck = _load(checkpoint)
    cfg = from_dict(ck.manifest["config"])  # parsed when the checkpoint was checked
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = FusedAlexNet(cfg.model_config())
    model.load_state_dict(ck.model)  # the names and shapes were checked against this model
    pre = Preprocess.from_checkpoint(ck)
    pre = dataclasses.replace(pre, mean=pre.mean.to(device))
    return Loaded(model.to(device).eval(), pre, cfg, ck.url, ck.step)


def evaluate_checkpoint(
    checkpoint: str, data_url: str, batch_size: int = 0, max_samples: int = 0, ten_crop: bool = True
) -> dict[str, float]:
    """Center-crop and 10-crop top-1/top-5 error of a checkpoint on the val split (one process).

    Runs the fused execution (the same weights as any grid's, canonical keys) on CPU or the
    local GPU, with the checkpoint's own classes and preprocessing (:func:`load_for_inference`):
    ``data_url`` gives only the images, and must name the same classes in the same order. Only
    the model and mean files are read: a checkpoint whose optimizer state is damaged still
    evaluates.
    """
    from alexnet.data.index import DatasetIndex

    loaded = load_for_inference(checkpoint)
    pre = loaded.preprocess
    index = DatasetIndex.load(data_url)
    if list(index.classes) != list(pre.classes):
        raise ValueError(
            f"--data {data_url} has classes {_names(index.classes)}, the checkpoint {loaded.url} was "
            f"trained on {_names(pre.classes)}: point --data at shards of the same classes"
        )
    if "val" not in index.meta["splits"] or index.count("val") == 0:
        raise ValueError(
            f"--data {data_url} has no val images: alexnet eval scores the val split; point --data at "
            "shards built with validation images (SRC/val/, or --val-fraction > 0)"
        )
    cfg = loaded.config
    bs = batch_size or cfg.eval.batch_size or cfg.optim.batch_size
    totals = score_model(
        loaded.model, index, bs, pre.input_size, pre.mean, pre.input_scale, crop_kinds(ten_crop), max_samples
    )
    errs = crop_errors(totals)
    out: dict[str, float] = {k: errs[k] for k in ("top1_error", "top5_error")}
    out["samples"] = int(totals["center"]["n"])
    out.update({k: v for k, v in errs.items() if k.endswith("_10crop")})
    out["step"] = loaded.step
    return out


def _names(classes) -> str:
    shown = ", ".join(list(classes)[:4])
    return f"[{shown}{', ...' if len(classes) > 4 else ''}] ({len(classes)})"


def _load(checkpoint: str):
    """The checkpoint's model weights, mean and manifest (no optimizer state), each verified:
    ``checkpoint`` itself, or the newest checkpoint of a run dir whose files for inference verify."""
    import sys

    from cluster.checkpoint import INFERENCE_FILES, is_checkpoint, load_checkpoint, load_newest
    from cluster.manifest import expected_tensors

    if is_checkpoint(checkpoint):
        return load_checkpoint(checkpoint, INFERENCE_FILES, expected_tensors)
    ck, skipped = load_newest(checkpoint, INFERENCE_FILES, expected_tensors)
    if ck is None:  # the error naming the directory and what was skipped
        return load_checkpoint(checkpoint, INFERENCE_FILES, expected_tensors)
    for line in skipped:
        print(f"alexnet eval: skipped newer checkpoint {line}", file=sys.stderr, flush=True)
    return ck
