"""The paper's findings as switches (README "The paper's findings"): each variant's shapes and
parameter counts, its two executions equal, the tanh initialisation, and the CLI's ``--set``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from alexnet.cli import main
from alexnet.config import ModelConfig, parse_model_sets
from alexnet.info import summary
from alexnet.layers import StepContext
from alexnet.model import (
    BLOCK_NAMES,
    FusedAlexNet,
    Stage,
    TwoColumnAlexNet,
    block_names,
    geometry,
    model_blocks,
    parameter_count,
)

PAPER = ModelConfig()
SMALL = ModelConfig.small(num_classes=10, input_size=32)

# one variant of each kind, on the small net (fast); the paper net's counts are in the tests below
VARIANTS = {
    "tanh": {"activation": "tanh"},
    "pool_2_2": {"pooling": "non_overlapping"},
    "no_lrn": {"lrn": False},
    "one_column": {"columns": 1},
    "no_conv3": {"remove_blocks": ("conv3",)},
    "no_conv4": {"remove_blocks": ("conv4",)},
    "tanh_one_column_no_lrn": {"activation": "tanh", "columns": 1, "lrn": False},
}


def _count(cfg: ModelConfig) -> int:
    return sum(p.numel() for p in TwoColumnAlexNet(cfg).parameters())


def test_paper_net_parameter_counts_of_each_switch():
    # activation, LRN and dropout have no parameters; 2/2 pooling gives the paper's sizes
    for sw in ({"activation": "tanh"}, {"lrn": False}, {"pooling": "non_overlapping"}, {"dropout": 0.0}):
        assert parameter_count(ModelConfig(**sw)) == 60_965_224, sw
    assert ModelConfig(pooling="non_overlapping").spatial_sizes() == (55, 27, 13, 6)  # the paper's 3.4
    # the one-column net (footnote 2): 48, 128, 192, 192 kernels, conv5 256, fc 4096, 4096, 1000
    one = ModelConfig(columns=1)
    assert parameter_count(one) == _count(one) == 59_798_312
    widths = [geometry(one, n, 0).weight_shape[0] for n in BLOCK_NAMES]
    assert widths == [48, 128, 192, 192, 256, 4096, 4096, 1000]
    assert geometry(one, "fc6", 0).weight_shape == (4096, 256 * 6 * 6)
    # depth: conv3's 2 x (192 x 256 x 9 + 192) go; conv4 then reads both columns' conv2 (256 maps)
    assert parameter_count(ModelConfig(remove_blocks=("conv3",))) == 60_965_224 - 885_120 + 221_184
    assert geometry(ModelConfig(remove_blocks=("conv3",)), "conv4", 1).weight_shape == (192, 256, 3, 3)
    # without conv4, conv5 reads its own column's conv3 (192 maps): its weights keep their shape
    assert parameter_count(ModelConfig(remove_blocks=("conv4",))) == 60_965_224 - 663_936
    assert geometry(ModelConfig(remove_blocks=("conv4",)), "conv5", 0).weight_shape == (128, 192, 3, 3)


def test_small_net_pooling_changes_its_sizes_and_fc6():
    """Documented, not equalised: at 32 px 3/2 pools give 15 -> 7 -> 3, 2/2 pools 16 -> 8 -> 4, so
    fc6 reads 2 x 32 x 4 x 4 = 1024 inputs per column instead of 576."""
    two = ModelConfig.small(num_classes=10, input_size=32, pooling="non_overlapping")
    assert SMALL.spatial_sizes() == (32, 15, 7, 3)
    assert two.spatial_sizes() == (32, 16, 8, 4)
    assert geometry(SMALL, "fc6", 0).weight_shape == (256, 576)
    assert geometry(two, "fc6", 0).weight_shape == (256, 1024)
    assert parameter_count(SMALL) == _count(SMALL) == 715_978
    assert parameter_count(two) == _count(two) == 715_978 + 2 * 256 * (1024 - 576)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_variant_runs_the_same_function_locally_and_fused(name):
    cfg = ModelConfig.small(num_classes=10, input_size=32, **VARIANTS[name])
    ref, fused = TwoColumnAlexNet(cfg), FusedAlexNet(cfg)
    fused.load_state_dict(ref.state_dict())
    assert sum(p.numel() for p in fused.parameters()) == parameter_count(cfg) == _count(cfg)
    assert set(fused.state_dict()) == set(ref.state_dict())  # canonical keys both ways
    x = torch.randn(3, 3, 32, 32)
    ctx = StepContext(seed=1, step=2)
    out = ref(x, ctx)
    assert out.shape == (3, 10)
    torch.testing.assert_close(fused(x, ctx), out, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    assert all(p.grad is not None for p in ref.parameters())


def test_the_switches_change_what_the_net_computes():
    """Each switch acts: the same weights give other logits with it flipped (it is not ignored)."""
    x = torch.randn(2, 3, 32, 32)
    base = TwoColumnAlexNet(SMALL).eval()
    for sw in ({"activation": "tanh"}, {"lrn": False}):
        other = TwoColumnAlexNet(ModelConfig.small(num_classes=10, input_size=32, **sw)).eval()
        other.load_state_dict(base.state_dict())
        assert not torch.allclose(other(x), base(x)), sw
    # 2/2 pooling: other map sizes on the small net, so other fc6 weights; the pools differ
    two = ModelConfig.small(num_classes=10, input_size=32, pooling="non_overlapping")
    stage = Stage(two, ["conv1"], (0, 1))
    assert stage.run([x])[0].shape == (2, 16, 16, 16)
    assert Stage(SMALL, ["conv1"], (0, 1)).run([x])[0].shape == (2, 16, 15, 15)


def test_removed_blocks_shrink_the_block_list_and_move_the_exchange():
    cfg = ModelConfig.small(remove_blocks=("conv4", "conv3"))
    assert cfg.remove_blocks == ("conv3", "conv4")  # canonical order: one net, one spelling
    assert block_names(cfg) == ("conv1", "conv2", "conv5", "fc6", "fc7", "fc8")
    assert [b.name for b in model_blocks(cfg) if b.exchange] == ["conv5", "fc6", "fc7", "fc8"]
    assert [b.index for b in model_blocks(cfg)] == [0, 1, 4, 5, 6, 7]  # init and dropout keys kept
    with pytest.raises(ValueError, match="not in this model"):
        Stage(cfg, ["conv3"], (0, 1))
    # the weights of a kept block are those of the full net (keyed by the paper's block index)
    full, cut = (
        TwoColumnAlexNet(ModelConfig.small()),
        TwoColumnAlexNet(ModelConfig.small(remove_blocks=("conv4",))),
    )
    assert torch.equal(full["fc7"]["1"].weight, cut["fc7"]["1"].weight)


def test_one_column_net_has_no_exchange_and_one_column():
    cfg = ModelConfig.small(columns=1)
    assert all(not b.exchange for b in model_blocks(cfg))
    assert set(TwoColumnAlexNet(cfg).state_dict()) == {
        f"{n}.0.{p}" for n in BLOCK_NAMES for p in ("weight", "bias")
    }
    with pytest.raises(ValueError, match=r"1-column net takes \(0,\)"):
        Stage(cfg, ["conv1"], (0, 1))


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        ({"activation": "sigmoid"}, "model.activation='sigmoid'"),
        ({"pooling": "3/2"}, "model.pooling='3/2'"),
        ({"columns": 3}, "model.columns=3"),
        ({"remove_blocks": ("conv5",)}, r"model.remove_blocks=\['conv5'\]"),
        ({"remove_blocks": ("conv3", "conv3")}, "distinct"),
    ],
)
def test_bad_switches_are_refused_naming_the_key(sets, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**sets)


@pytest.mark.parametrize("cfg", [ModelConfig(activation="tanh"), ModelConfig.small(activation="tanh")])
def test_tanh_init_is_lecun_with_zero_biases_and_the_first_loss_is_near_ln_k(cfg):
    """Documented choice (ModelConfig): N(0, 1/fan_in) where tanh follows, biases 0, fc8 small."""
    model = TwoColumnAlexNet(cfg)
    for name in BLOCK_NAMES:
        block = model[name]["0"]
        w = block.weight.detach()
        want = cfg.fc8_init_std if name == "fc8" else math.sqrt(1.0 / w[0].numel())
        assert abs(w.std().item() / want - 1) < 0.1, name
        assert torch.all(block.bias == 0), name
    # inputs at the presets' scale: raw mean-subtracted pixels (paper), 1/64 of them (small)
    scale = 60.0 if cfg.input_size == 227 else 1.0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, cfg.input_size, cfg.input_size, generator=gen) * scale
    labels = torch.randint(0, cfg.num_classes, (8,), generator=gen)
    with torch.no_grad():
        loss = F.cross_entropy(model.eval()(x), labels).item()
    assert abs(loss - math.log(cfg.num_classes)) < 0.1, loss


def test_alexnet_info_prints_each_variants_parameter_count(capsys):
    assert main(["info", "--set", "model.columns=1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 59_798_312 and out["columns"] == 1 and out["exchange_points"] == []
    assert out["switches"]["columns"] == 1
    assert main(["info", "--set", "model.columns=1"]) == 0
    text = capsys.readouterr().out
    assert "One-column AlexNet" in text and "59,798,312" in text
    assert main(["info", "--set", "model.remove_blocks=conv3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 60_301_288 and "conv3" not in [r["name"] for r in out["layers"]]
    assert summary(ModelConfig())["params"] == 60_965_224


def test_model_sets_are_coerced_and_bad_ones_name_the_fix():
    got = parse_model_sets(["model.lrn=false", "model.columns=1", "model.remove_blocks=[conv3, conv4]"])
    assert got == {"lrn": False, "columns": 1, "remove_blocks": ("conv3", "conv4")}
    with pytest.raises(ValueError, match="--set model.KEY=VALUE"):
        parse_model_sets(["grid.shape=1x1x1"])
    with pytest.raises(ValueError, match="model.lrn='maybe': use true or false"):
        parse_model_sets(["model.lrn=maybe"])
    with pytest.raises(ValueError, match="model.columns='two': give an integer"):
        parse_model_sets(["model.columns=two"])
