"""Generated, learnable images: the demo's and the tests' dataset.

Each class is a pattern family (circle, square, triangle, horizontal/vertical/diagonal stripes,
checkerboard, cross, ring, dot grid); classes beyond ten reuse the families with a different
colour palette. Every image draws its colours, position, scale and period at random and adds
Gaussian noise, so a model has to learn shapes, not pixels, and a 32 px crop of a 40 px image (or
its mirror) still shows the pattern. Image ``i`` of a split is a pure function of (seed, split, i).
"""

from __future__ import annotations

import numpy as np

NUM_PATTERNS = 10


def synthetic_label(i: int, num_classes: int) -> int:
    """Label of image ``i`` (classes balanced, interleaved)."""
    return i % num_classes


def synthetic_image(seed: int, split: str, i: int, size: int, num_classes: int) -> np.ndarray:
    """Image ``i`` of a split: uint8 (size, size, 3) HWC RGB."""
    label = synthetic_label(i, num_classes)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (S, S) in [0, 1)
    cy, cx = rng.uniform(0.35, 0.65, size=2)
    r = rng.uniform(0.2, 0.32)
    period = rng.uniform(0.15, 0.3)
    phase = rng.uniform(0, 1)
    pattern = label % NUM_PATTERNS
    dy, dx = yy - cy, xx - cx
    if pattern == 0:
        mask = dy**2 + dx**2 < r**2
    elif pattern == 1:
        mask = (np.abs(dy) < r * 0.85) & (np.abs(dx) < r * 0.85)
    elif pattern == 2:
        mask = (dy < r * 0.8) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.6)
    elif pattern == 3:
        mask = ((yy / period + phase) % 1) < 0.5
    elif pattern == 4:
        mask = ((xx / period + phase) % 1) < 0.5
    elif pattern == 5:
        mask = (((xx + yy) / period + phase) % 1) < 0.5
    elif pattern == 6:
        mask = ((np.floor(yy / period + phase) + np.floor(xx / period + phase)) % 2) < 1
    elif pattern == 7:
        mask = (
            ((np.abs(dy) < r * 0.3) | (np.abs(dx) < r * 0.3))
            & (np.abs(dy) < r * 1.3)
            & (np.abs(dx) < r * 1.3)
        )
    elif pattern == 8:
        d = np.sqrt(dy**2 + dx**2)
        mask = (d < r * 1.2) & (d > r * 0.7)
    else:
        mask = (((yy / period + phase) % 1 - 0.5) ** 2 + ((xx / period + phase) % 1 - 0.5) ** 2) < 0.06
    # palette: classes beyond ten get a hue shift; fg and bg differ by >= 80 levels on average
    family = label // NUM_PATTERNS
    fg = rng.uniform(120, 255, size=3)
    bg = rng.uniform(0, 100, size=3)
    if family:
        fg = np.roll(fg, family % 3) * (0.6 + 0.4 * ((family * 0.37) % 1))
    if rng.random() < 0.5:
        fg, bg = bg, fg
    img = np.where(mask[..., None], fg, bg) + rng.normal(0, 18, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)
