"""conv1's kernels as a picture, one per column: the paper's Figure 3 (the first column's kernels
come out largely colour-agnostic, the second's colour-specific), and a number for it. The one
drawing function (:func:`kernel_grid`), shared by the run's TensorBoard images
(:mod:`cluster.reporting`), ``alexnet filters`` and the study report (:func:`figure3_png`)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
from torch import Tensor

PAD = 1  # pixels between kernels
# the colour measure of kernels whose weights are independent draws (a network at initialisation):
# of the 3 channels' spread about their kernel's mean, the part across channels is 2 of 3 degrees
# of freedom per position
RANDOM_COLOUR = 2 / 3


def kernel_grid(weight: Tensor, scale: int = 4, vmax: float | None = None) -> np.ndarray:
    """uint8 (H, W, 3) image of one column's conv1 kernels ``weight`` (K, 3, k, k): the kernels in
    a near-square grid, each pixel ``scale`` x ``scale``, on a grey background.

    The colours are the weights as they are: one scale for all K kernels, symmetric about 0
    (0 is mid grey, magnitude ``vmax`` black or white; default the largest magnitude of
    ``weight``; pass the largest over both columns to draw them on one scale), so a weak kernel
    looks weak, as in the paper's figure."""
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"conv1 kernels must be (K, 3, k, k), got {tuple(weight.shape)}")
    w = weight.detach().float().cpu().numpy()
    m = float(np.abs(w).max()) if vmax is None else vmax
    w = 0.5 + w / (2 * max(m, 1e-12))  # [-m, m] -> [0, 1]
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


def colour_specificity(weight: Tensor) -> float:
    """How colour-specific one column's conv1 kernels ``weight`` (K, 3, k, k) are, in [0, 1]: the
    mean over kernels of the fraction of a kernel's variance that lies across its RGB channels.

    For kernel w with grey part g = mean of w over the channels (per position) and overall mean
    w̄: sum (w - g)^2 / sum (w - w̄)^2. 0: every position has equal R, G and B (a colour-agnostic,
    greyscale kernel); 1: the channels cancel at every position (pure colour opponency); a
    random kernel gives about 2/3 (:data:`RANDOM_COLOUR`). An all-zero kernel counts as 0."""
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"conv1 kernels must be (K, 3, k, k), got {tuple(weight.shape)}")
    w = weight.detach().double().cpu().numpy().reshape(weight.shape[0], 3, -1)  # (K, 3, k*k)
    colour = ((w - w.mean(axis=1, keepdims=True)) ** 2).sum(axis=(1, 2))
    total = ((w - w.mean(axis=(1, 2), keepdims=True)) ** 2).sum(axis=(1, 2))
    frac = np.divide(colour, total, out=np.zeros_like(colour), where=total > 0)
    return float(frac.mean())


def figure3_png(columns: Mapping[int, Tensor], title: str = "", scale: int = 4) -> bytes:
    """PNG of conv1's kernels, one panel per column (``{column: (K, 3, k, k) weight}``), on one
    colour scale, each panel titled with its :func:`colour_specificity`: the paper's Figure 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmax = max(float(w.detach().abs().max()) for w in columns.values())
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.6), squeeze=False)
    for ax, (c, w) in zip(axes[0], sorted(columns.items()), strict=True):
        ax.imshow(kernel_grid(w, scale, vmax), interpolation="nearest")
        ax.set_title(f"column {c}: colour {colour_specificity(w):.3f}", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
