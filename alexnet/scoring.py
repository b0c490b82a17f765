"""Top-k and 10-crop scoring: the one scorer every path uses (training steps, validation, ``alexnet eval``).

Counts stay tensors on the logits' device until :meth:`Tally.totals` is called, so a caller can
score every micro-batch of a step or every batch of a validation pass and read the host once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

TOP_K = 5  # the paper reports top-1 and top-5 error


def hits(logits: Tensor, labels: Tensor, k: int = TOP_K) -> tuple[Tensor, Tensor]:
    """(top-1 hits, top-k hits) of ``logits`` (b, n) against ``labels`` (b,): 0-dim int64 tensors.

    With fewer than ``k`` classes, top-k is top-n (every prediction is a hit).
    """
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (b, k)
    hit = top == labels[:, None]
    return hit[:, 0].sum(), hit.any(dim=1).sum()


def average_crops(logits: Tensor, crops: int) -> Tensor:
    """The paper's multi-crop prediction: (crops * b, n) crop-major logits -> (b, n) log mean softmax.

    Crop-major means rows ``[i * b, (i + 1) * b)`` are crop ``i`` of every image. The log keeps
    the result a valid input for :func:`hits` and ``cross_entropy``.
    """
    b = logits.shape[0] // crops
    if b * crops != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows do not split into {crops} crops of the same images")
    return F.softmax(logits.float(), dim=1).view(crops, b, -1).mean(0).log()


@dataclass
class Tally:
    """Running top-1 / top-k hit counts, sample count and summed cross-entropy (device tensors).

    The cross-entropy sums accumulate in float64, as a Python float sum of each batch's would.
    """

    top1: Tensor | int = 0
    top5: Tensor | int = 0
    loss_sum: Tensor | float = 0.0
    n: int = 0

    def add(self, logits: Tensor, labels: Tensor, loss: bool = True) -> None:
        """Score one batch of logits (b, n); ``loss``: also sum its cross-entropy (in float32)."""
        h1, h5 = hits(logits, labels)
        self.top1 = self.top1 + h1
        self.top5 = self.top5 + h5
        if loss:
            self.add_loss(F.cross_entropy(logits.float(), labels, reduction="sum"))
        self.n += int(labels.shape[0])

    def add_loss(self, ce_sum: Tensor) -> None:
        """Add a batch's summed cross-entropy computed elsewhere (0-dim; e.g. the training loss)."""
        # float64 running sum: thousands of batches summed in float32 would drift in the 7th digit
        self.loss_sum = self.loss_sum + ce_sum.detach().double()

    def totals(self) -> dict[str, float]:
        """``{"top1", "top5", "loss_sum", "n"}`` as Python numbers (one host read per counter)."""
        return {
            "top1": float(self.top1),
            "top5": float(self.top5),
            "loss_sum": float(self.loss_sum),
            "n": float(self.n),
        }


def errors(top1: float, top5: float, n: float) -> dict[str, float]:
    """``{"top1_error", "top5_error"}`` from hit counts over ``n`` samples (1.0 when n is 0)."""
    n = max(n, 1.0)
    return {"top1_error": 1.0 - top1 / n, "top5_error": 1.0 - top5 / n}
