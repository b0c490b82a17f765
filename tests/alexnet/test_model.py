import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alexnet.config import ModelConfig
from alexnet.layers import LocalResponseNorm, StepContext
from alexnet.model import BLOCK_NAMES, FusedAlexNet, Stage, TwoColumnAlexNet, parameter_count
from alexnet.train_local import train_local

PAPER = ModelConfig()
SMALL = ModelConfig.small(num_classes=10, input_size=32)


def test_parameter_count_is_the_papers():
    assert parameter_count(PAPER) == 60_965_224
    assert sum(p.numel() for p in TwoColumnAlexNet(PAPER).parameters()) == 60_965_224
    assert sum(p.numel() for p in FusedAlexNet(PAPER).parameters()) == 60_965_224


def test_shapes_per_layer_and_column():
    model = TwoColumnAlexNet(PAPER)
    expected = {
        "conv1": (48, 27, 27),  # 55x55x48 before the pool
        "conv2": (128, 13, 13),
        "conv3": (192, 13, 13),
        "conv4": (192, 13, 13),
        "conv5": (128, 6, 6),
        "fc6": (2048,),
        "fc7": (2048,),
        "fc8": (500,),
    }
    xs = [torch.randn(2, 3, 227, 227)]
    for name in BLOCK_NAMES:
        xs = Stage.run(_slice(model, name), xs, ctx=StepContext())
        assert len(xs) == 2
        for x in xs:
            assert tuple(x.shape[1:]) == expected[name], name
    conv1 = model["conv1"]["0"]
    out = F.conv2d(torch.randn(1, 3, 227, 227), conv1.weight, conv1.bias, 4)
    assert out.shape == (1, 48, 55, 55)


def _slice(model: TwoColumnAlexNet, name: str) -> Stage:
    stage = Stage(model.cfg, [name], (0, 1))
    stage.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(name + ".")})
    return stage


def test_paper_init_statistics():
    model = TwoColumnAlexNet(PAPER)
    for name in BLOCK_NAMES:
        for c in ("0", "1"):
            block = model[name][c]
            w = block.weight.detach()
            assert abs(w.mean().item()) < 1e-3, name
            assert abs(w.std().item() - 0.01) < 0.0015, name
            bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
            assert torch.all(block.bias == bias), name
    # the columns are drawn independently, and the same seed draws the same weights
    assert not torch.equal(model["conv1"]["0"].weight, model["conv1"]["1"].weight)
    assert torch.equal(TwoColumnAlexNet(PAPER)["fc6"]["1"].weight, model["fc6"]["1"].weight)


def test_small_init_statistics():
    """He (sqrt(2 / fan_in)) where a ReLU follows, the paper's N(0, 0.01) for the logits, biases 0."""
    model = TwoColumnAlexNet(SMALL)
    for name in BLOCK_NAMES:
        for c in ("0", "1"):
            block = model[name][c]
            w = block.weight.detach()
            want = 0.01 if name == "fc8" else math.sqrt(2.0 / w[0].numel())
            assert abs(w.std().item() / want - 1) < 0.1, (name, w.std().item(), want)
            assert torch.all(block.bias == 0), name


def _demo_like_inputs(rows: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The generated dataset's images as the demo's trainers see them: 32 px crops of the 40 px
    images, mean-subtracted, times data.input_scale (1/64)."""
    from alexnet.data.synthetic import synthetic_image, synthetic_label

    imgs = np.stack([synthetic_image(0, "train", i, 40, classes) for i in range(rows)])  # (B, 40, 40, 3)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()[:, :, 4:36, 4:36]
    y = torch.tensor([synthetic_label(i, classes) for i in range(rows)])
    return (x - x.mean(0)) / 64, y


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("data", ["demo", "gaussian"])
def test_small_network_starts_at_the_chance_loss(classes, data):
    """The first training loss (dropout on) is within 15 % of ln(num_classes), where a reader of
    the demo's plot expects it (it was ~20 on 10 classes: He on fc8 and the paper's bias 1)."""
    cfg = ModelConfig.small(num_classes=classes, input_size=32)
    gen = torch.Generator().manual_seed(1)
    if data == "demo":
        x, y = _demo_like_inputs(128, classes)
    else:
        x, y = torch.randn(128, 3, 32, 32, generator=gen), torch.randint(0, classes, (128,), generator=gen)
    for model in (TwoColumnAlexNet(cfg), FusedAlexNet(cfg)):
        logits = model.train()(x, StepContext(step=0, sample_index=torch.arange(128)))
        loss = F.cross_entropy(logits, y).item()
        assert abs(loss / math.log(classes) - 1) < 0.15, (type(model).__name__, loss)


def test_stage_on_one_column_has_the_reference_weights():
    ref = TwoColumnAlexNet(SMALL).state_dict()
    stage = Stage(SMALL, ["conv3", "conv4"], (1,))
    sd = stage.state_dict()
    assert set(sd) == {"conv3.1.weight", "conv3.1.bias", "conv4.1.weight", "conv4.1.bias"}
    for k, v in sd.items():
        assert torch.equal(v, ref[k])


def test_stage_refuses_non_contiguous_blocks():
    with pytest.raises(ValueError, match="contiguous"):
        Stage(SMALL, ["conv1", "conv3"], (0, 1))
    with pytest.raises(ValueError, match="columns"):
        Stage(SMALL, ["conv1"], (2,))


@pytest.mark.parametrize("cfg", [PAPER, SMALL], ids=["paper", "small"])
def test_local_equals_fused_forward_and_grad(cfg):
    torch.manual_seed(1)
    local = TwoColumnAlexNet(cfg).double()
    # larger weights than the paper's init so that every layer (and LRN) matters
    with torch.no_grad():
        for p in local.parameters():
            p.normal_(0, 1.0 / math.sqrt(max(p[0].numel(), 1)))
    fused = FusedAlexNet(cfg).double()
    fused.load_state_dict(local.state_dict())
    x = torch.randn(3, 3, cfg.input_size, cfg.input_size, dtype=torch.float64) * 50
    y = torch.tensor([1, 0, 4])
    ctx = StepContext(seed=5, step=2)
    local.train()
    fused.train()
    la, fa = local(x, ctx), fused(x, ctx)
    assert (la - fa).abs().max() / la.abs().max() < 1e-10
    F.cross_entropy(la, y).backward()
    F.cross_entropy(fa, y).backward()
    lg = {n: p.grad for n, p in local.named_parameters()}
    fg = {n: p.grad for n, p in fused.named_parameters()}
    from alexnet.model import fused_to_columns

    fg = fused_to_columns(cfg, fg)
    assert set(lg) == set(fg)
    for k in lg:
        err = (lg[k] - fg[k]).abs().max() / lg[k].abs().max().clamp_min(1e-30)
        assert err < 1e-9, k


def test_local_equals_fused_fp32():
    torch.manual_seed(2)
    local, fused = TwoColumnAlexNet(SMALL), FusedAlexNet(SMALL)
    fused.load_state_dict(local.state_dict())
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    ctx = StepContext(seed=0, step=3)
    F.cross_entropy(local(x, ctx), y).backward()
    F.cross_entropy(fused(x, ctx), y).backward()
    from alexnet.model import fused_to_columns

    fg = fused_to_columns(SMALL, {n: p.grad for n, p in fused.named_parameters()})
    for n, p in local.named_parameters():
        assert (p.grad - fg[n]).abs().max() / p.grad.abs().max() < 1e-5, n


def test_state_dicts_load_across_executions():
    local = TwoColumnAlexNet(SMALL)
    fused = FusedAlexNet(ModelConfig.small(num_classes=10, input_size=32, seed=9))
    assert not torch.equal(fused.state_dict()["fc6.0.weight"], local.state_dict()["fc6.0.weight"])
    fused.load_state_dict(local.state_dict())
    back = TwoColumnAlexNet(ModelConfig.small(num_classes=10, input_size=32, seed=9))
    back.load_state_dict(fused.state_dict())
    assert set(fused.state_dict()) == set(local.state_dict())
    for k, v in local.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with pytest.raises(RuntimeError):
        fused.load_state_dict({"conv1.0.weight": torch.zeros(1)})


def test_dropout_same_whole_or_in_micro_batches():
    torch.manual_seed(3)
    model = TwoColumnAlexNet(SMALL).train()
    x = torch.randn(16, 3, 32, 32)
    whole = model(x, StepContext(seed=1, step=4))
    parts = torch.cat(
        [
            model(x[i : i + 4], StepContext(seed=1, step=4, sample_index=torch.arange(i, i + 4)))
            for i in range(0, 16, 4)
        ]
    )
    torch.testing.assert_close(whole, parts, rtol=1e-5, atol=1e-6)
    # and dropout is really on: another step draws other masks
    assert not torch.allclose(whole, model(x, StepContext(seed=1, step=5)))
    model.eval()
    torch.testing.assert_close(model(x, StepContext(seed=1, step=4)), model(x, StepContext(seed=1, step=5)))


def test_odd_class_count_splits_fc8():
    cfg = ModelConfig.small(num_classes=7)
    assert cfg.fc8_split == (4, 3)
    assert TwoColumnAlexNet(cfg).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def _quadrants(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable batch: each of 4 classes is a bright square in its own quadrant, plus noise."""
    y = torch.arange(n) % 4
    x = torch.randn(n, 3, 32, 32) * 0.3
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, :, r * 16 : r * 16 + 12, col * 16 : col * 16 + 12] += 2.0
    return x, y


def test_small_variant_trains():
    torch.manual_seed(0)
    cfg = ModelConfig.small(num_classes=4, input_size=32)
    x, y = _quadrants()
    losses = [loss for _, _, loss in train_local(cfg, lambda step: (x, y), 40, 0.01, fused=True)]
    assert losses[0] > 1.2
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses


def test_train_local_fused_equals_the_reference():
    """The one-process loop trains the same function whichever execution runs it (dropout on).

    In float64: in float32 the two executions' rounding differs (grouped vs per-column
    convolutions, channels_last), and a max-pool near-tie can route a gradient differently
    within three steps; the single-step float32 agreement is test_local_equals_fused_fp32's."""
    cfg = ModelConfig.small(num_classes=4, input_size=32, dropout=0.5)
    x, y = _quadrants(16)
    f64 = torch.float64
    runs = [list(train_local(cfg, lambda step: (x, y), 3, 0.01, fused=f, dtype=f64)) for f in (False, True)]
    ref, fused = (run[-1][1] for run in runs)  # the models after the last step
    for (_, _, a), (_, _, b) in zip(*runs, strict=True):
        assert b == pytest.approx(a, rel=1e-12)
    fw = fused.state_dict()
    for k, w in ref.state_dict().items():
        assert w.dtype == torch.float64 and (fw[k] - w).abs().max() <= 1e-12 * w.abs().max(), k
    assert runs[0][0][2] != runs[0][1][2]  # it trained: the loss moved


def test_training_without_a_step_context_is_refused():
    """No silent step-0 default: a plain model(x) training loop would draw the same masks every step."""
    x = torch.randn(2, 3, 32, 32)
    for model in (FusedAlexNet(SMALL), TwoColumnAlexNet(SMALL)):
        with pytest.raises(ValueError, match=r"pass ctx=StepContext\(seed=cfg.seed, step=step"):
            model.train()(x)
        assert model.eval()(x).shape == (2, 10)  # eval mode draws no mask: no context needed
    fc = Stage(SMALL, ["fc6", "fc7", "fc8"], (0, 1)).train()
    feats = [torch.randn(2, 32, 3, 3)] * 2
    with pytest.raises(ValueError, match="dropout"):
        fc.run(feats)
    assert [t.shape for t in fc.run(feats, ctx=StepContext(step=1))] == [(2, 5), (2, 5)]
    # blocks without dropout, or dropout 0, need no context in training either
    assert Stage(SMALL, ["conv1", "conv2"], (0, 1)).train().run([x])[0].shape == (2, 32, 7, 7)
    no_drop = ModelConfig.small(num_classes=10, input_size=32, dropout=0.0)
    assert FusedAlexNet(no_drop).train()(x).shape == (2, 10)


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="lrn_convention"):
        ModelConfig(lrn_convention="torch")
    with pytest.raises(ValueError, match="input_size"):
        ModelConfig(input_size=32)
    with pytest.raises(ValueError, match="num_classes"):
        ModelConfig(num_classes=1)
    with pytest.raises(ValueError, match=r"model.input_size=28.*--size 36"):
        ModelConfig.small(input_size=28)
    with pytest.raises(ValueError, match=r"model.input_size=192.*skip pixels"):
        ModelConfig.small(input_size=192)
    assert ModelConfig.small(input_size=191).conv1_stride == 5


def test_the_default_lrn_is_the_trained_one():
    """alpha / n (cuda-convnet's layer.py, Caffe): with activations near 100 across the window the
    factor is 0.44, where the printed formula (alpha undivided, five times stronger) leaves 0.23."""
    x = torch.full((1, 5, 1, 1), 100.0)
    factors = {}
    for conv in ("per_size", "paper"):
        c = ModelConfig(lrn_convention=conv)
        lrn = LocalResponseNorm(c.lrn_size, c.lrn_alpha, c.lrn_beta, c.lrn_k, c.lrn_convention)
        factors[conv] = round(lrn(x)[0, 2, 0, 0].item() / 100, 2)
    assert ModelConfig().lrn_convention == "per_size" and ModelConfig.small().lrn_convention == "per_size"
    assert factors == {"per_size": 0.44, "paper": 0.23}


def test_for_variant_builds_each_named_variant():
    from alexnet.config import ModelConfig

    assert ModelConfig.for_variant("paper") == ModelConfig()
    assert ModelConfig.for_variant("paper", num_classes=10) == ModelConfig(num_classes=10)
    assert ModelConfig.for_variant("small", input_size=64) == ModelConfig.small(input_size=64)
    with pytest.raises(ValueError, match="model.variant"):
        ModelConfig.for_variant("tiny")
