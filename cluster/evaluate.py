"""Validation on the val split: ``alexnet eval``, and the pieces the trainer ranks share with it.

Every path scores with :mod:`alexnet.scoring` (top-1 / top-5 hits; the paper's 10-crop: softmax
averaged over the four corners and the center, with their flips):

* :func:`val_input`: a val batch's uint8 crops -> model input on the device;
* :class:`ValScore`: the hit counts of one validation pass, per crop kind;
* :func:`score_model` / :func:`evaluate_checkpoint` (``alexnet eval``): a model (a checkpoint)
  scored in one process with the fused model; the trainer ranks score the same way inside the
  pipeline (:mod:`cluster.rank`), on batches the data workers decode once (:mod:`cluster.val`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from alexnet.data.transforms import to_model_input
from alexnet.scoring import Tally, average_crops, errors

TEN = 10  # crops per image of the "ten" crop kind


def crop_kinds(ten_crop: bool) -> tuple[str, ...]:
    """The val passes to run: ``center`` always, ``ten`` (10-crop) when ``ten_crop``."""
    return ("center", "ten") if ten_crop else ("center",)


def val_input(batch: dict[str, Any], crop: str, mean: Tensor, scale: float, device: torch.device) -> Tensor:
    """Model input of a val batch: (b, 3, S, S) center crops, or (10 b, 3, S, S) crop-major ten crops."""
    u8 = torch.from_numpy(batch["images"]).to(device)
    if crop == "ten":  # (b, 10, 3, S, S) -> (10 b, 3, S, S), crop-major
        u8 = u8.transpose(0, 1).flatten(0, 1)
    no_lighting = torch.zeros(u8.shape[0], 3, device=device)  # PCA lighting is a training augmentation
    return to_model_input(u8, no_lighting, mean, scale)


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
            if batch["n"] == 0:
                continue
            labels = torch.from_numpy(batch["labels"]).to(mean.device)
            with torch.no_grad():
                logits = model(val_input(batch, crop, mean, scale, mean.device))
            score.add(crop, logits, labels)
        lost = short_read(stats)
        if lost:
            raise ShortReadError(f"{lost}: rebuild them with `alexnet shards`, or restore them from a copy")
    return score.totals()


def evaluate_checkpoint(
    checkpoint: str, data_url: str, batch_size: int = 0, max_samples: int = 0, ten_crop: bool = True
) -> dict[str, float]:
    """Center-crop and 10-crop top-1/top-5 error of a checkpoint on the val split (one process).

    Runs the fused execution (the same weights as any grid's, canonical keys) on CPU or the
    local GPU. Only the model file is read (and verified): a checkpoint whose optimizer state is
    damaged still evaluates. ``checkpoint`` may be a run directory: its newest checkpoint with a
    complete model file (newer ones skipped are named on stderr).
    """
    from alexnet.data.index import DatasetIndex
    from alexnet.model import FusedAlexNet
    from cluster.config import from_dict
    from cluster.manifest import Manifest

    ck = _load_model(checkpoint)
    cfg = from_dict(Manifest.from_json(ck.manifest).config)
    mcfg = cfg.model_config()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = FusedAlexNet(mcfg)
    model.load_state_dict(ck.model)
    model.to(device).eval()
    index = DatasetIndex.load(data_url)
    if index.num_classes != mcfg.num_classes:
        raise ValueError(
            f"--data {data_url} has {index.num_classes} classes, the checkpoint's model {mcfg.num_classes}"
        )
    if "val" not in index.meta["splits"] or index.count("val") == 0:
        raise ValueError(
            f"--data {data_url} has no val images: alexnet eval scores the val split; point --data at "
            "shards built with validation images (SRC/val/, or --val-fraction > 0)"
        )
    mean = index.mean_tensor(mcfg.input_size, cfg.data.mean).to(device)
    bs = batch_size or cfg.eval.batch_size or cfg.optim.batch_size
    totals = score_model(
        model, index, bs, mcfg.input_size, mean, cfg.data.input_scale, crop_kinds(ten_crop), max_samples
    )
    errs = crop_errors(totals)
    out: dict[str, float] = {k: errs[k] for k in ("top1_error", "top5_error")}
    out["samples"] = int(totals["center"]["n"])
    out.update({k: v for k, v in errs.items() if k.endswith("_10crop")})
    out["step"] = ck.step
    return out


def _load_model(checkpoint: str):
    """The checkpoint's model weights and manifest (no optimizer state): ``checkpoint`` itself, or
    the newest checkpoint of a run dir whose model file is complete."""
    import sys

    from cluster.checkpoint import is_checkpoint, load_checkpoint, load_newest

    if is_checkpoint(checkpoint):
        return load_checkpoint(checkpoint, optimizer=False)
    ck, skipped = load_newest(checkpoint, optimizer=False)
    if ck is None:  # the error naming the directory and what was skipped
        return load_checkpoint(checkpoint, optimizer=False)
    for line in skipped:
        print(f"alexnet eval: skipped newer checkpoint {line}", file=sys.stderr, flush=True)
    return ck
