"""conv1's kernels as a picture, one per column: the paper's Figure 3 (the first column's kernels
come out largely colour-agnostic, the second's colour-specific). The one drawing function, shared
by the run's TensorBoard images (:mod:`cluster.reporting`) and ``alexnet filters``."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

PAD = 1  # pixels between kernels


def kernel_grid(weight: Tensor, scale: int = 4) -> np.ndarray:
    """uint8 (H, W, 3) image of one column's conv1 kernels ``weight`` (K, 3, k, k): the kernels in
    a near-square grid, each pixel ``scale`` x ``scale``, on a grey background.

    The colours are the weights as they are: one scale for all K kernels, symmetric about 0
    (0 is mid grey, the largest magnitude black or white), so a weak kernel looks weak, as in the
    paper's figure."""
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"conv1 kernels must be (K, 3, k, k), got {tuple(weight.shape)}")
    w = weight.detach().float().cpu().numpy()
    w = 0.5 + w / (2 * max(float(np.abs(w).max()), 1e-12))  # [-m, m] -> [0, 1]
    n, _, k, _ = w.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell = k + PAD
    img = np.full((rows * cell + PAD, cols * cell + PAD, 3), 0.5, np.float32)
    for i in range(n):
        y, x = PAD + (i // cols) * cell, PAD + (i % cols) * cell
        img[y : y + k, x : x + k] = w[i].transpose(1, 2, 0)  # (3, k, k) -> (k, k, 3)
    img = img.repeat(scale, 0).repeat(scale, 1)
    return (img * 255 + 0.5).clip(0, 255).astype(np.uint8)
