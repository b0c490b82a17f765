"""The grid of a variant of the paper's net (plain Python): cuts name the model's remaining
blocks, the one-column net runs on C = 1 only, and the model's layout travels with the grid."""

from __future__ import annotations

import pytest

from alexnet.config import ModelConfig
from alexnet.model import BLOCK_NAMES
from pipeline.grid import Grid, default_cuts

NO_CONV3 = ModelConfig.small(remove_blocks=("conv3",))
ONE = ModelConfig.small(columns=1)


def test_cuts_name_the_remaining_blocks():
    g = Grid.parse("1x7x2", 7, 14, model=NO_CONV3)  # as many stages as blocks
    assert g.blocks == ("conv1", "conv2", "conv4", "conv5", "fc6", "fc7", "fc8")
    assert [g.stage_blocks(s) for s in range(7)] == [(n,) for n in g.blocks]
    assert default_cuts(3, blocks=g.blocks) == Grid.parse("1x3x2", 3, 6, model=NO_CONV3).cuts
    assert "conv3" not in Grid.parse("1x3x2", 3, 6, model=NO_CONV3).cuts
    with pytest.raises(ValueError, match=r"the network has 7 blocks"):
        Grid.parse("1x8x2", 8, 16, model=NO_CONV3)
    with pytest.raises(ValueError, match=r"\['conv3'\] removed from this model \(model.remove_blocks\)"):
        Grid.parse("1x2x2", 2, 4, cuts=("conv3",), model=NO_CONV3)
    assert Grid.parse("1x2x2", 2, 4, cuts=("conv3",)).stage_blocks(1)[0] == "conv3"  # the paper's net


def test_the_one_column_net_runs_on_one_column_rank_only():
    with pytest.raises(ValueError, match="one-column net .* use C = 1"):
        Grid.parse("1x2x2", 2, 4, model=ONE)
    g = Grid.parse("2x2x1", 2, 8, model=ONE)
    assert g.columns_of(0) == (0,)
    assert Grid.parse("2x2x1", 2, 8).columns_of(0) == (0, 1)  # the paper's net: both columns in a rank


def test_the_models_layout_round_trips_and_old_grids_are_the_papers():
    g = Grid.parse("1x2x1", 2, 4, model=ModelConfig.small(columns=1, remove_blocks=("conv4",)))
    assert Grid.from_dict(g.to_dict()) == g
    old = {k: v for k, v in Grid.parse("1x2x2", 2, 4).to_dict().items() if k not in ("blocks", "net_columns")}
    assert Grid.from_dict(old).blocks == BLOCK_NAMES and Grid.from_dict(old).net_columns == 2


def test_a_grid_laid_out_for_another_model_is_refused():
    g = Grid.parse("1x2x2", 2, 4)
    g.check_model(ModelConfig.small())
    with pytest.raises(ValueError, match=r"Grid.parse\(..., model=cfg\)"):
        g.check_model(NO_CONV3)
    with pytest.raises(ValueError, match=r"in 2 column\(s\), the model has .* in 1:"):
        Grid.parse("1x2x1", 2, 4).check_model(ONE)
