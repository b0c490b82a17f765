"""The grid and the schedules as plain Python (no processes)."""

import pytest

from alexnet.model import BLOCK_NAMES
from pipeline.grid import Grid, default_cuts
from pipeline.schedules import GPipe, OneFOneB, make_schedule


def test_coords_and_ranks_round_trip():
    g = Grid(2, 3, 2, microbatches=2, global_batch=8)
    assert g.world_size == 12
    seen = set()
    for rank in range(g.world_size):
        r, s, c = g.coords(rank)
        assert g.rank_of(r, s, c) == rank
        seen.add((r, s, c))
    assert len(seen) == 12
    assert g.coords(0) == (0, 0, 0) and g.coords(1) == (0, 0, 1) and g.coords(2) == (0, 1, 0)
    assert g.coords(6) == (1, 0, 0)


def test_groups_partition_the_world():
    g = Grid(2, 2, 2, microbatches=1, global_batch=4)
    for groups, size in ((g.column_groups(), 2), (g.pipeline_groups(), 2), (g.data_groups(), 2)):
        flat = sorted(r for grp in groups for r in grp)
        assert flat == list(range(8))
        assert all(len(grp) == size for grp in groups)
    assert g.column_groups()[0] == [0, 1]
    assert g.pipeline_groups()[1] == [1, 3]  # replica 0, column 1: stage 0 then stage 1
    assert g.data_groups()[0] == [0, 4]


def test_stage_blocks_cover_the_network_once():
    for s_count in range(1, 9):
        g = Grid(1, s_count, 2, microbatches=1, global_batch=1)
        blocks = [b for s in range(s_count) for b in g.stage_blocks(s)]
        assert tuple(blocks) == BLOCK_NAMES
        assert all(g.stage_blocks(s) for s in range(s_count))
    g = Grid(1, 2, 1, microbatches=1, global_batch=1, cuts=("fc6",))
    assert g.stage_blocks(0) == ("conv1", "conv2", "conv3", "conv4", "conv5")
    assert g.stage_blocks(1) == ("fc6", "fc7", "fc8")


def test_default_cuts_balance_the_paper_cost():
    assert default_cuts(1) == ()
    assert default_cuts(2) == ("conv3",)  # 329 vs 395 MMAC: the most balanced single cut
    assert default_cuts(8) == BLOCK_NAMES[1:]
    assert default_cuts(2, {n: 1.0 for n in BLOCK_NAMES}) == ("conv5",)


def test_columns_of():
    assert Grid(1, 1, 1, 1, 1).columns_of(0) == (0, 1)
    g = Grid(1, 1, 2, 1, 1)
    assert g.columns_of(0) == (0,) and g.columns_of(1) == (1,)


def test_parse_and_json_round_trip():
    g = Grid.parse("2x2x2", microbatches=4, global_batch=32, schedule="gpipe")
    assert (g.replicas, g.stages, g.columns, g.microbatches, g.global_batch) == (2, 2, 2, 4, 32)
    assert g.microbatch_size == 4 and g.replica_batch == 16
    assert Grid.from_dict(g.to_dict()) == g
    import json

    assert Grid.from_dict(json.loads(json.dumps(g.to_dict()))) == g


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(replicas=0, stages=1, columns=2), "replicas=0"),
        (dict(replicas=1, stages=1, columns=3), "columns=3"),
        (dict(replicas=1, stages=9, columns=2), "8 blocks"),
        (dict(replicas=2, stages=1, columns=2, microbatches=3, global_batch=8), "multiple of 6"),
        (dict(replicas=1, stages=1, columns=2, microbatches=0), "microbatches=0"),
        (dict(replicas=1, stages=2, columns=2, cuts=("conv3", "fc6")), "give 1 block names"),
        (dict(replicas=1, stages=2, columns=2, cuts=("conv9",)), "unknown block"),
        (dict(replicas=1, stages=2, columns=2, cuts=("conv1",)), "strictly increasing"),
        (dict(replicas=1, stages=3, columns=2, cuts=("fc6", "conv3")), "strictly increasing"),
        (dict(replicas=1, stages=1, columns=2, schedule="zero-bubble"), "schedule='zero-bubble'"),
    ],
)
def test_refusals(kwargs, match):
    args = dict(microbatches=1, global_batch=4) | kwargs
    with pytest.raises(ValueError, match=match):
        Grid(**args)


def test_parse_refuses_bad_text():
    with pytest.raises(ValueError, match="RxSxC"):
        Grid.parse("2by2", microbatches=1, global_batch=1)


def _check_actions(sched, stages, m):
    for s in range(stages):
        acts = sched.actions(s)
        assert sorted((a.kind, a.mb) for a in acts) == sorted(
            [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
        )
        done = set()
        for a in acts:
            if a.kind == "B":
                assert a.mb in done  # a backward follows its forward
            done.add(a.mb)
        assert [a.mb for a in acts if a.kind == "B"] == list(range(m))  # same order on every stage


@pytest.mark.parametrize("stages, m", [(1, 1), (2, 1), (2, 4), (3, 2), (4, 8)])
def test_schedules_are_complete_and_ordered(stages, m):
    _check_actions(GPipe(stages, m), stages, m)
    _check_actions(OneFOneB(stages, m), stages, m)


def test_1f1b_bounds_activations_gpipe_does_not():
    assert [OneFOneB(4, 8).max_in_flight(s) for s in range(4)] == [4, 3, 2, 1]
    assert [GPipe(4, 8).max_in_flight(s) for s in range(4)] == [8, 8, 8, 8]
    assert OneFOneB(3, 1).max_in_flight(0) == 1  # M < S: runs (in GPipe's order)


def test_make_schedule_refuses():
    with pytest.raises(ValueError, match="use one of"):
        make_schedule("interleaved", 2, 2)
    with pytest.raises(ValueError, match="microbatches=0"):
        make_schedule("1f1b", 2, 0)


def test_parse_shape_is_the_one_parser():
    from pipeline.grid import parse_shape

    assert parse_shape("2x3x1") == (2, 3, 1)
    assert parse_shape(" 1 X 2 x 2 ") == (1, 2, 2)
    for bad in ("2x2", "axbxc", "", "1x2x2x2"):
        with pytest.raises(ValueError, match="RxSxC"):
            parse_shape(bad)
