import pytest
import torch

from alexnet.layers import LocalResponseNorm, StepContext, dropout_mask, local_response_norm


def paper_lrn_reference(a: torch.Tensor, n=5, k=2.0, alpha=1e-4, beta=0.75) -> torch.Tensor:
    """The paper's formula, written out literally in float64: one loop over maps."""
    a = a.double()
    num_maps = a.shape[1]
    out = torch.empty_like(a)
    for i in range(num_maps):
        lo, hi = max(0, i - n // 2), min(num_maps - 1, i + n // 2)
        s = (a[:, lo : hi + 1] ** 2).sum(dim=1)
        out[:, i] = a[:, i] / (k + alpha * s) ** beta
    return out


@pytest.mark.parametrize("convention", ["paper", "per_size"])
def test_lrn_matches_formula(convention):
    x = torch.randn(3, 11, 6, 5) * 30  # large activations, so the denominator matters
    lrn = LocalResponseNorm(5, 1e-4, 0.75, 2.0, convention=convention)
    alpha = 1e-4 if convention == "paper" else 1e-4 / 5
    ref = paper_lrn_reference(x, alpha=alpha)
    got = lrn(x)
    assert (got.double() - ref).abs().max() / ref.abs().max() < 1e-6
    # the two conventions really differ on these inputs
    other = paper_lrn_reference(x, alpha=1e-4 / 5 if convention == "paper" else 1e-4)
    assert (other - ref).abs().max() / ref.abs().max() > 1e-3


def test_per_size_convention_equals_torch():
    x = torch.randn(2, 16, 7, 7) * 20
    ours = LocalResponseNorm(5, 1e-4, 0.75, 2.0, convention="per_size")(x)
    theirs = torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_lrn_beta_general_matches_formula():
    x = torch.randn(2, 7, 4, 4) * 10
    got = local_response_norm(x, 3, alpha=1e-2, beta=0.6, k=1.0)
    ref = paper_lrn_reference(x, n=3, k=1.0, alpha=1e-2, beta=0.6)
    assert (got.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("beta", [0.75, 0.6])
@pytest.mark.parametrize("groups", [1, 2])
def test_lrn_gradcheck(beta, groups):
    # alpha large enough that the cross-map term of the gradient is not negligible
    x = (torch.randn(2, 8, 3, 3, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, 5, 0.05, beta, 2.0, groups), (x,))


def test_lrn_groups_do_not_cross():
    x = torch.randn(2, 10, 3, 3) * 20
    whole = local_response_norm(x, groups=2)
    parts = torch.cat([local_response_norm(x[:, :5]), local_response_norm(x[:, 5:])], dim=1)
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)
    assert not torch.allclose(
        local_response_norm(x, alpha=1e-2), local_response_norm(x, alpha=1e-2, groups=2)
    )


def test_lrn_rejects_bad_settings():
    with pytest.raises(ValueError, match="convention"):
        LocalResponseNorm(convention="caffe")
    with pytest.raises(ValueError, match="odd"):
        LocalResponseNorm(size=4)


def test_dropout_mask_is_partition_invariant():
    ctx = StepContext(seed=3, step=7)
    whole = dropout_mask(ctx, layer=5, column=1, batch=16, units=64, p=0.5, device=torch.device("cpu"))
    parts = [
        dropout_mask(StepContext(3, 7, torch.arange(i, i + 4)), 5, 1, 4, 64, 0.5, torch.device("cpu"))
        for i in range(0, 16, 4)
    ]
    assert torch.equal(whole, torch.cat(parts))
    # it is a function of every key component
    for other in (
        dropout_mask(StepContext(4, 7), 5, 1, 16, 64, 0.5, torch.device("cpu")),
        dropout_mask(StepContext(3, 8), 5, 1, 16, 64, 0.5, torch.device("cpu")),
        dropout_mask(ctx, 6, 1, 16, 64, 0.5, torch.device("cpu")),
        dropout_mask(ctx, 5, 0, 16, 64, 0.5, torch.device("cpu")),
    ):
        assert not torch.equal(whole, other)
    # rows differ and the keep rate is p
    assert not torch.equal(whole[0], whole[1])
    big = dropout_mask(ctx, 5, 0, 256, 2048, 0.5, torch.device("cpu"))
    assert abs(big.float().mean().item() - 0.5) < 0.005


@pytest.mark.parametrize("size", [1, 3, 5])
def test_lrn_channels_last_matches_contiguous(size):
    # the fused model runs LRN on channels_last activations; same values and gradients
    x = torch.randn(2, 12, 5, 4, dtype=torch.float64) * 20
    g = torch.randn_like(x)
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        xi = x.clone(memory_format=fmt).requires_grad_()
        out = local_response_norm(xi, size, 1e-2, 0.75, 2.0, groups=2)
        out.backward(g)
        ref = torch.cat(
            [
                paper_lrn_reference(x[:, :6], n=size, alpha=1e-2),
                paper_lrn_reference(x[:, 6:], n=size, alpha=1e-2),
            ],
            1,
        )
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, size, 0.05, 0.75, 2.0, 2), (xc,))


def test_relu_lrn_fused_equals_relu_then_lrn():
    from alexnet.layers import relu_local_response_norm_

    z = torch.randn(2, 8, 4, 3, dtype=torch.float64) * 20
    g = torch.randn_like(z)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    a = local_response_norm(torch.relu(za), 5, 1e-2, 0.75, 2.0, groups=2)
    b = relu_local_response_norm_(zb * 1.0, 5, 1e-2, 0.75, 2.0, groups=2)  # consumes a temporary
    a.backward(g)
    b.backward(g)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zb.grad, za.grad, rtol=1e-12, atol=1e-12)
    assert (za.grad == 0).any()  # the ReLU really cut some gradients
    zc = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: relu_local_response_norm_(t * 1.0, 5, 0.05, 0.75, 2.0, 2), (zc,)
    )


def test_lrn_computes_16_bit_inputs_in_float32():
    # in bfloat16, k + alpha * S would round the alpha * S term away
    xb = (torch.randn(2, 8, 3, 3) * 30).bfloat16()
    out = local_response_norm(xb, alpha=1e-3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, local_response_norm(xb.float(), alpha=1e-3), rtol=0, atol=0)


def test_compiled_lrn_agrees_with_the_eager_one_forward_and_backward():
    # torch.compile with Inductor (C++ on CPU, Triton on CUDA); the first compile takes ~30 s here
    from alexnet.layers import relu_local_response_norm_

    z = torch.randn(3, 12, 6, 5) * 20
    g = torch.randn_like(z)
    for fmt, relu in ((torch.contiguous_format, True), (torch.channels_last, False)):
        outs, grads = [], []
        for kernel in ("eager", "compiled"):
            zi = z.clone(memory_format=fmt).requires_grad_()
            if relu:
                out = relu_local_response_norm_(zi * 1.0, 5, 1e-2, 0.75, 2.0, 2, kernel)
            else:
                out = local_response_norm(zi, 5, 1e-2, 0.75, 2.0, 2, kernel)
            out.backward(g)
            outs.append(out)
            grads.append(zi.grad)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
        assert bool((grads[0] == 0).any()) == relu  # the ReLU's cut gradients, in both
    # the paper's formula, not just agreement
    ref = torch.cat([paper_lrn_reference(z[:, :6], alpha=1e-2), paper_lrn_reference(z[:, 6:], alpha=1e-2)], 1)
    got = local_response_norm(z, 5, 1e-2, 0.75, 2.0, groups=2, kernel="compiled")
    assert (got.double() - ref).abs().max() / ref.abs().max() < 1e-6


def test_a_failed_compile_falls_back_to_the_eager_lrn(monkeypatch):
    from alexnet import layers

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(layers, "_COMPILED", {"forward": broken, "backward": broken})
    x = (torch.randn(2, 8, 4, 3) * 20).requires_grad_()
    with pytest.warns(RuntimeWarning, match="torch.compile of the forward failed.*train.lrn_kernel=eager"):
        out = local_response_norm(x, 5, 1e-2, 0.75, 2.0, 2, kernel="compiled")
    with pytest.warns(RuntimeWarning, match="torch.compile of the backward failed"):
        out.sum().backward()  # the forward ran eagerly inside the compiled node; its backward too
    xe = x.detach().clone().requires_grad_()
    ref = local_response_norm(xe, 5, 1e-2, 0.75, 2.0, 2)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, xe.grad)
    assert not layers.compiled_lrn_available()  # from now on the eager function, no retry
    with pytest.raises(ValueError, match="train.lrn_kernel"):
        local_response_norm(x, kernel="triton")
