"""``alexnet train --init-from CKPT``: a new run that starts from a checkpoint's weights.

Only the weights come over: the optimizer's momentum, the data position and the learning-rate
rule start fresh, as in any new run. The checkpoint is read with the one loader
(:func:`cluster.evaluate.load_for_inference`: every file checked, nothing trusted). Every block's
shape must be the new run's (the same variant, widths and input size); fc8 is kept when the
dataset's classes are the checkpoint's (same names, same order), else re-initialised as a fresh
run would draw it (``model.seed``), and that is said. ``train.freeze`` then keeps chosen blocks
as loaded (:class:`pipeline.engine.Engine`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from alexnet.model import BLOCK_NAMES, COLUMNS, geometry, init_column_params
from cluster.config import JobConfig
from cluster.evaluate import load_for_inference


def init_weights(
    checkpoint: str, cfg: JobConfig, classes: Sequence[str]
) -> tuple[dict[str, Tensor], list[str]]:
    """The canonical weights a run of ``cfg`` on a dataset of ``classes`` starts from, and the lines
    that say what was taken. A block whose shape differs is a ``ValueError`` naming it."""
    loaded = load_for_inference(checkpoint, torch.device("cpu"))
    state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    src, dst = loaded.config.model_config(), cfg.model_config()
    for name in BLOCK_NAMES[:-1]:
        have, want = geometry(src, name, 0).weight_shape, geometry(dst, name, 0).weight_shape
        if have != want:
            raise ValueError(
                f"--init-from {checkpoint}: its {name} is {have}, this run's is {want} (model.variant, "
                f"model.input_size: {loaded.config.model.variant}/{src.input_size} there, "
                f"{cfg.model.variant}/{dst.input_size} here"
                "): fine-tune with the checkpoint's model settings"
            )
    old = list(loaded.preprocess.classes)
    lines = [
        f"--init-from {loaded.url} (step {loaded.step}): its weights; the optimizer, data position and "
        "learning rate start fresh"
    ]
    if old != list(classes):
        for c in COLUMNS:
            state[f"fc8.{c}.weight"], state[f"fc8.{c}.bias"] = init_column_params(dst, "fc8", c)
        lines.append(
            f"--init-from: the checkpoint's {len(old)} classes are not this dataset's {len(classes)} "
            f"({_names(old)} vs {_names(classes)}): fc8 re-initialised"
        )
    if cfg.train.freeze:
        lines.append(f"train.freeze: {', '.join(cfg.train.freeze)} stay as loaded")
    return state, lines


def _names(classes: Sequence[str]) -> str:
    shown = ", ".join(list(classes)[:3])
    return f"[{shown}{', ...' if len(classes) > 3 else ''}]"
