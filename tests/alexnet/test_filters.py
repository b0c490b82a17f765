"""conv1's colour measure and the Figure 3 image (``alexnet filters``, the study report)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.filters import RANDOM_COLOUR, colour_specificity, figure3_png, kernel_grid


def test_colour_specificity_is_0_for_grey_kernels_1_for_opponent_ones_2_3_for_random():
    g = torch.randn(16, 1, 5, 5)
    assert colour_specificity(g.expand(16, 3, 5, 5) + 0.3) == 0.0  # R = G = B (and an offset)
    assert colour_specificity(torch.cat([g, -g, 0 * g], 1)) == pytest.approx(1.0)
    half = torch.cat([g[:8].expand(8, 3, 5, 5), torch.cat([g, -g, 0 * g], 1)[8:]])
    assert colour_specificity(half) == pytest.approx(0.5)  # the mean over kernels
    assert colour_specificity(torch.randn(400, 3, 5, 5)) == pytest.approx(RANDOM_COLOUR, abs=0.02)
    assert colour_specificity(torch.zeros(2, 3, 3, 3)) == 0.0
    with pytest.raises(ValueError, match=r"\(K, 3, k, k\)"):
        colour_specificity(torch.zeros(5, 1, 4, 4))


def test_kernel_grid_takes_a_shared_scale():
    w = torch.zeros(1, 3, 2, 2)
    w[0, 0] = 1.0
    assert tuple(kernel_grid(w, 1)[1, 1]) == (255, 128, 128)
    assert tuple(kernel_grid(w, 1, vmax=2.0)[1, 1]) == (191, 128, 128)  # the other column's max is 2


def test_figure3_has_a_panel_per_column():
    cols = {0: torch.randn(48, 3, 11, 11), 1: torch.randn(48, 3, 11, 11)}
    two = np.asarray(Image.open(io.BytesIO(figure3_png(cols, "t"))))
    one = np.asarray(Image.open(io.BytesIO(figure3_png({0: cols[0]}))))
    assert two.shape[0] == one.shape[0] and two.shape[1] == 2 * one.shape[1]  # 3.2 in wide per panel
