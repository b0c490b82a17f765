"""The whole training loop in one process: the paper's network and its update rule, one screen long.

The reference for everything distributed (``alexnet verify`` and the equivalence tests train the
two-column model here and compare a grid of ranks with it), and the shortest way to see what a
training step is. Both executions train the same function with the same weights: the two-column
reference (:class:`TwoColumnAlexNet`, the columns' exchanges as concatenations) or the fused
one-device path (:class:`FusedAlexNet`, grouped convolutions).

    for step, model, loss in train_local(cfg, batch, steps=100, lr=0.01): ...

``batch(step)`` returns that step's images (B, 3, S, S) float32, already normalised (see
:func:`alexnet.data.transforms.to_model_input`), and labels (B,) int64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alexnet.config import ModelConfig
from alexnet.layers import StepContext
from alexnet.model import FusedAlexNet, TwoColumnAlexNet
from alexnet.optim import make_optimizer

Batch = Callable[[int], tuple[Tensor, Tensor]]  # step -> (images (B, 3, S, S), labels (B,))


def train_local(
    cfg: ModelConfig,
    batch: Batch,
    steps: int,
    lr: float,
    *,
    fused: bool = False,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    rule: str = "paper",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[int, nn.Module, float]]:
    """Train ``steps`` steps from the paper's initialisation; after each, yield ``(step, model, loss)``.

    The update is ``rule``'s (:mod:`alexnet.optim`; the job's ``optim.rule``): by default the
    paper's, momentum 0.9 and weight decay 5e-4 on the weights, at the constant learning rate
    ``lr`` (the divide-by-10 rule is the job's, ``[schedule]``). When a step is yielded the model
    holds its updated weights and, in each ``.grad``, that step's gradients. ``dtype`` float64
    compares executions beyond float32's rounding (whose differences a ReLU or max-pool can
    turn into a different gradient within a few steps).
    """
    model = (FusedAlexNet if fused else TwoColumnAlexNet)(cfg).to(device, dtype).train()
    opt = make_optimizer(model.named_parameters(), rule, lr, momentum, weight_decay)
    for step in range(steps):
        images, labels = batch(step)
        images, labels = images.to(device, dtype), labels.to(device)  # (B, 3, S, S), (B,)
        rows = torch.arange(images.shape[0], device=device)  # global sample indices: the whole batch
        ctx = StepContext(seed=cfg.seed, step=step, sample_index=rows)  # keys this step's dropout masks
        logits = model(images, ctx)  # (B, num_classes)
        loss = F.cross_entropy(logits, labels)  # the mean over the batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # reads .grad and leaves it as it is
        yield step, model, float(loss.detach())
