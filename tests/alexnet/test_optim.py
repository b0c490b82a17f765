"""The paper's update rule against its formula written out by hand, and torch's rule kept exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alexnet.optim import PaperSGD, check_resume_rule, make_optimizer

MU, WD = 0.9, 5e-4
# several steps at 0.01, then several after the paper's /10
LRS = [0.01] * 5 + [0.001] * 6


def _params() -> dict[str, nn.Parameter]:
    gen = torch.Generator().manual_seed(3)
    return {
        "conv1.0.weight": nn.Parameter(torch.randn(4, 3, 2, 2, generator=gen)),
        "conv1.0.bias": nn.Parameter(torch.randn(4, generator=gen)),
        "fc8.weight": nn.Parameter(torch.randn(5, 6, generator=gen)),
        "fc8.bias": nn.Parameter(torch.randn(5, generator=gen)),
    }


def _grads(step: int, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}


def _run(rule: str) -> list[dict[str, torch.Tensor]]:
    """The optimizer of ``rule`` through LRS with fixed per-step gradients; the weights after each."""
    params = _params()
    opt = make_optimizer(params.items(), rule, LRS[0], MU, WD)
    out = []
    for t, lr in enumerate(LRS):
        for group in opt.param_groups:
            group["lr"] = lr
        for k, g in _grads(t, params).items():
            params[k].grad = g.clone()
        opt.step()
        out.append({k: p.detach().clone() for k, p in params.items()})
    return out


def test_paper_rule_is_the_formula_across_an_lr_drop():
    """v <- 0.9 v - 0.0005 eps w - eps grad; w <- w + v for weights, no weight decay on biases."""
    got = _run("paper")
    w = {k: p.detach().double() for k, p in _params().items()}
    v = {k: torch.zeros_like(x) for k, x in w.items()}
    for t, eps in enumerate(LRS):
        for k, g in _grads(t, w).items():
            wd = 0.0 if k.endswith("bias") else WD
            v[k] = MU * v[k] - wd * eps * w[k] - eps * g.double()
            w[k] = w[k] + v[k]
        for k in w:
            torch.testing.assert_close(got[t][k].double(), w[k], rtol=1e-6, atol=1e-7, msg=f"{k} step {t}")


def test_torch_rule_is_torch_sgd_exactly():
    got = _run("torch")
    params = _params()
    opt = torch.optim.SGD(params.values(), lr=LRS[0], momentum=MU, weight_decay=WD)
    for t, lr in enumerate(LRS):
        opt.param_groups[0]["lr"] = lr
        for k, g in _grads(t, params).items():
            params[k].grad = g.clone()
        opt.step()
        for k, p in params.items():
            assert torch.equal(got[t][k], p.detach()), (k, t)


def test_the_rules_agree_at_constant_lr_and_part_after_a_drop():
    """Without weight decay on the biases the rules differ only in where lr sits: the same weights
    while it is constant; after the /10 torch's step shrinks 10x at once, the paper's decays."""
    paper, torch_ = _run("paper"), _run("torch")
    drop = LRS.index(0.001)

    def step(run, t, k):
        return (run[t][k] - run[t - 1][k]).norm().item()

    for t in range(drop):
        torch.testing.assert_close(paper[t]["fc8.weight"], torch_[t]["fc8.weight"], rtol=1e-5, atol=1e-6)
    k = "fc8.weight"
    before = step(paper, drop - 1, k)
    assert step(torch_, drop, k) < 0.2 * before  # torch: ~1/10 of the displacement at once
    assert step(paper, drop, k) > 0.6 * before  # the paper: the old momentum carries on (0.9 of it)


def test_weight_decay_is_on_weights_only():
    params = _params()
    before = {k: p.detach().clone() for k, p in params.items()}
    opt = make_optimizer(params.items(), "paper", 0.1, MU, 0.5)
    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    for k, p in params.items():
        want = before[k] if k.endswith("bias") else before[k] * (1 - 0.1 * 0.5)
        torch.testing.assert_close(p.detach(), want)


def test_state_dict_round_trip_continues_exactly():
    """Optimizer state saved after 4 steps and loaded into a fresh optimizer gives the same weights."""
    straight = _run("paper")
    params = _params()
    opt = make_optimizer(params.items(), "paper", LRS[0], MU, WD)

    def steps(opt, params, ts):
        for t in ts:
            for group in opt.param_groups:
                group["lr"] = LRS[t]
            for k, g in _grads(t, params).items():
                params[k].grad = g.clone()
            opt.step()

    steps(opt, params, range(4))
    saved, weights = opt.state_dict(), {k: p.detach().clone() for k, p in params.items()}
    fresh = {k: nn.Parameter(w) for k, w in weights.items()}
    opt2 = make_optimizer(fresh.items(), "paper", LRS[0], MU, WD)
    opt2.load_state_dict(saved)
    steps(opt2, fresh, range(4, len(LRS)))
    for k, p in fresh.items():
        assert torch.equal(p.detach(), straight[-1][k]), k
    assert isinstance(opt2, PaperSGD) and set(opt2.state[fresh["fc8.weight"]]) == {"momentum_buffer"}


def test_parameters_without_gradients_are_left_alone():
    params = _params()
    opt = make_optimizer(params.items(), "paper", 0.1, MU, WD)
    params["fc8.weight"].grad = torch.ones_like(params["fc8.weight"])
    before = params["conv1.0.weight"].detach().clone()
    opt.step()
    assert torch.equal(params["conv1.0.weight"].detach(), before)
    assert params["conv1.0.weight"] not in opt.state


def test_bad_rule_and_cross_rule_resume_are_refused():
    with pytest.raises(ValueError, match="optim.rule"):
        make_optimizer(_params().items(), "adam")
    check_resume_rule("paper", "paper", "ck")
    with pytest.raises(ValueError, match=r"optim.rule='torch'.*--set optim.rule=torch"):
        check_resume_rule("torch", "paper", "ck")
    with pytest.raises(ValueError, match="--set optim.rule=paper"):
        check_resume_rule("paper", "torch", "ck")


def test_the_fp16_loss_scaler_steps_the_paper_rule_and_skips_an_overflow():
    """``torch.amp.GradScaler`` (the engine's fp16 path) drives :class:`PaperSGD` as it would a
    torch optimizer: a scaled step (a power of two: exact) equals the plain one; a step whose
    gradients overflowed changes nothing, and the scale is halved."""
    plain, scaled = _params(), _params()
    opts = [make_optimizer(p.items(), "paper", 0.1, MU, WD) for p in (plain, scaled)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def loss(params, grads):  # d loss / d p = grads[p]
        return sum((p * grads[k]).sum() for k, p in params.items())

    for step in range(3):
        grads = _grads(step, plain)
        for opt in opts:
            opt.zero_grad()
        loss(plain, grads).backward()
        opts[0].step()
        scaler.scale(loss(scaled, grads)).backward()
        scaler.step(opts[1])
        scaler.update()
    for k in plain:
        assert torch.equal(plain[k].detach(), scaled[k].detach()), k
    before = {k: p.detach().clone() for k, p in scaled.items()}
    scale = scaler.get_scale()
    grads = _grads(3, scaled)
    grads["fc8.bias"][0] = float("inf")
    opts[1].zero_grad()
    scaler.scale(loss(scaled, grads)).backward()
    scaler.step(opts[1])
    scaler.update()
    assert all(torch.equal(scaled[k].detach(), before[k]) for k in scaled)
    assert scaler.get_scale() == scale / 2
