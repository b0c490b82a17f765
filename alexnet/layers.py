"""The paper's layers that torch does not provide as the paper defines them.

* ``LocalResponseNorm``: the paper's cross-map normalisation, with a custom autograd
  function (one cheap forward, an analytic backward that reuses the forward's work), or the
  same math compiled into one kernel per direction (``kernel="compiled"``, for GPUs).
* ``SeededDropout``: dropout whose mask is a pure function of
  (seed, step, layer, column, global sample index, unit), so it does not change with
  how a batch is split into micro-batches, pipeline stages or replicas.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------
# Local response normalisation
# ---------------------------------------------------------------------------------------------


def _channel_windows(size: int) -> list[tuple[slice, slice]]:
    """(destination, source) channel slices whose shifted adds make a clamped window sum.

    out[i] = sum_{j=i-lo}^{i+hi} t[j] over valid j: t itself, plus t shifted by 1..lo
    channels one way and 1..hi the other. No padded copy: the edges simply get fewer terms.
    The window is symmetric for odd ``size``, so the operator is its own adjoint.
    """
    lo = size // 2
    hi = size - 1 - lo
    down = [(slice(o, None), slice(None, -o)) for o in range(1, lo + 1)]
    up = [(slice(None, -o), slice(o, None)) for o in range(1, hi + 1)]
    return down + up


def _denominator_(a: Tensor, out: Tensor, size: int, alpha: float, k: float) -> Tensor:
    """out = k + alpha * S(a^2) on (B, G, Cg, H, W) views, in place.

    The squares and the scaling ride along in the adds (addcmul), so ``a`` is read once per
    window term and ``out`` is written by the first term rather than zero-filled.
    """
    torch.addcmul(torch.full((), k, dtype=a.dtype, device=a.device), a, a, value=alpha, out=out)
    for dst, src in _channel_windows(size):
        s = a[:, :, src]
        out[:, :, dst].addcmul_(s, s, value=alpha)
    return out


def _window_sum_(t: Tensor, out: Tensor, size: int) -> Tensor:
    """out = S(t) on (B, G, Cg, H, W) views, in place (the first shifted add writes ``out``)."""
    windows = _channel_windows(size)
    if not windows or t.shape[2] < 2:
        return out.copy_(t)
    (dst, src), rest = windows[0], windows[1:]  # dst = [1:], src = [:-1]
    torch.add(t[:, :, dst], t[:, :, src], out=out[:, :, dst])
    out[:, :, :1].copy_(t[:, :, :1])
    for dst, src in rest:
        out[:, :, dst].add_(t[:, :, src])
    return out


def _pow_neg_beta_(d: Tensor, out: Tensor, beta: float) -> Tensor:
    """out = d ** -beta, in place; for the paper's beta = 3/4 as rsqrt(d * sqrt(d)),
    three cheap passes instead of a pow (which costs several times more on CPU)."""
    if beta == 0.75:
        return torch.sqrt(d, out=out).mul_(d).rsqrt_()
    if beta == 0.5:
        return torch.rsqrt(d, out=out)
    return torch.pow(d, -beta, out=out)


class _LRNFunction(torch.autograd.Function):
    """b = a * d^-beta with d = k + alpha * S(a^2), S the channel window sum.

    Backward: db_i/da_j = delta_ij d_i^-beta - 2 alpha beta a_j [j in win(i)] a_i d_i^(-beta-1),
    so grad_a = g * d^-beta - 2 alpha beta * a * S(g * b / d).

    Written for memory traffic, which is what LRN costs on a CPU: every large fresh
    tensor costs page faults on first touch (several times an elementwise pass), so
    each direction allocates exactly two tensors and does everything else in place.
    Only ``d`` is saved beyond the input and output (which autograd keeps anyway for
    the ReLU before and the max-pool after); d^-beta is recomputed in the backward.
    Works in any memory format: the groups are a (B, G, C/G, H, W) view, which exists
    for contiguous and channels_last tensors alike.
    """

    @staticmethod
    def forward(ctx, x: Tensor, size: int, alpha: float, beta: float, k: float, groups: int, relu: bool):
        if relu:
            x = x.relu_()  # see relu_local_response_norm_: x is a temporary the caller hands over
        x5 = x.unflatten(1, (groups, x.shape[1] // groups))  # windows never cross a column
        d = torch.empty_like(x)
        _denominator_(x5, d.unflatten(1, x5.shape[1:3]), size, alpha, k)
        out = _pow_neg_beta_(d, torch.empty_like(x), beta).mul_(x)
        ctx.save_for_backward(x, out, d)
        ctx.hyper = (size, alpha, beta, groups, relu)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, out, d = ctx.saved_tensors
        size, alpha, beta, groups, relu = ctx.hyper
        with torch.profiler.record_function(LRN_BACKWARD_RANGE):
            grad = _lrn_grad(x, out, d, grad_out, size, alpha, beta, groups, relu)
        return grad, None, None, None, None, None, None


def _lrn_grad(
    x: Tensor,
    out: Tensor,
    d: Tensor,
    grad_out: Tensor,
    size: int,
    alpha: float,
    beta: float,
    groups: int,
    relu: bool,
) -> Tensor:
    """LRN's input gradient from x (after the ReLU, if folded in), b and d: see :class:`_LRNFunction`."""
    split = (groups, x.shape[1] // groups)
    u = torch.mul(grad_out, out).div_(d)  # g * b / d
    t = torch.empty_like(u)
    _window_sum_(u.unflatten(1, split), t.unflatten(1, split), size)
    grad = _pow_neg_beta_(d, u, beta).mul_(grad_out)  # reuses u's memory: g * d^-beta
    grad.addcmul_(x, t, value=-2.0 * alpha * beta)
    if relu:
        grad.mul_(torch.sign(x, out=t))  # ReLU's gradient: x = relu(z) >= 0, sign is 0 or 1
    return grad


# The same LRN as one generated kernel per direction (torch.compile: Triton on CUDA, C++ on CPU).
# Eager LRN is ~9 elementwise passes forward and ~12 backward over the activation, each a trip
# through memory; on a GPU that traffic is the whole cost, and one fused pass removes most of it.
# Written as plain tensor functions (no in-place, no ``out=``) so Inductor can fuse them; the
# backward recomputes d from the input (a 5-channel stencil, cheap inside the kernel) rather than
# saving it. Whether it is faster is a property of the device: ``bench/gpu_check.py`` times both.
# "traced": the same math as plain differentiable tensor ops, autograd through them; what a
# compiled stage (train.compile) takes into its graph (the eager Function's in-place and out=
# ops would break the graph, and a compiled kernel inside a compiled region is compiled twice)
LRN_KERNELS = ("eager", "compiled", "traced")
LRN_KERNEL_SETTINGS = ("auto", "eager", "compiled")  # train.lrn_kernel ("auto": compiled on CUDA)
# profiler ranges around every LRN call, so a profile can tell LRN's share of a step
LRN_FORWARD_RANGE, LRN_BACKWARD_RANGE = "alexnet.lrn", "alexnet.lrn_backward"


def _window_sum(t5: Tensor, size: int) -> Tensor:
    """S(t) along dim 2 of a (B, G, Cg, H, W) view: the clamped window as shifted slices of a
    zero-padded copy (which the compiler folds into index arithmetic)."""
    lo = size // 2
    padded = nn.functional.pad(t5, (0, 0, 0, 0, lo, size - 1 - lo))
    cg = t5.shape[2]
    acc = padded[:, :, 0:cg]
    for i in range(1, size):
        acc = acc + padded[:, :, i : i + cg]
    return acc


def _lrn_forward_math(z: Tensor, size: int, alpha: float, beta: float, k: float, groups: int, relu: bool):
    x = torch.relu(z) if relu else z
    x5 = x.unflatten(1, (groups, x.shape[1] // groups))
    d = k + alpha * _window_sum(x5 * x5, size)
    return (x5 * d.pow(-beta)).flatten(1, 2)


def _lrn_backward_math(
    z: Tensor, out: Tensor, g: Tensor, size: int, alpha: float, beta: float, k: float, groups: int, relu: bool
):
    x = torch.relu(z) if relu else z
    split = (groups, x.shape[1] // groups)
    x5, o5, g5 = x.unflatten(1, split), out.unflatten(1, split), g.unflatten(1, split)
    d = k + alpha * _window_sum(x5 * x5, size)
    t = _window_sum(g5 * o5 / d, size)
    grad = g5 * d.pow(-beta) - (2.0 * alpha * beta) * x5 * t
    if relu:
        grad = grad * (z.unflatten(1, split) > 0)
    return grad.flatten(1, 2)


_COMPILED: dict[str, Callable | None] = {}  # "forward"/"backward" -> compiled function; None: failed


def _compiled(direction: str) -> Callable | None:
    """The compiled LRN function of ``direction``, built on first use; None once compiling failed."""
    if direction not in _COMPILED:
        fn = _lrn_forward_math if direction == "forward" else _lrn_backward_math
        _COMPILED[direction] = torch.compile(fn, fullgraph=True)
    return _COMPILED[direction]


def _compile_failed(direction: str, error: Exception) -> None:
    _COMPILED[direction] = None
    warnings.warn(
        f"LRN: torch.compile of the {direction} failed ({type(error).__name__}: {str(error)[:200]}); "
        "using the eager LRN from now on (train.lrn_kernel=eager avoids the attempt)",
        RuntimeWarning,
        stacklevel=3,
    )


def compiled_lrn_available() -> bool:
    """False once compiling the LRN failed in this process (it then runs eagerly)."""
    return all(_COMPILED.get(d, True) is not None for d in ("forward", "backward"))


class _CompiledLRNFunction(torch.autograd.Function):
    """:class:`_LRNFunction`'s forward and backward, each one compiled kernel; saves only the
    input (before the ReLU) and the output. Falls back to the eager math if compiling fails."""

    @staticmethod
    def forward(ctx, z: Tensor, size: int, alpha: float, beta: float, k: float, groups: int, relu: bool):
        ctx.hyper = (size, alpha, beta, k, groups, relu)
        fn = _compiled("forward")
        out = None
        if fn is not None:
            try:
                out = fn(z, size, alpha, beta, k, groups, relu)
            except Exception as e:  # no compiler / no Triton here: the eager math, same numbers
                _compile_failed("forward", e)
        if out is None:
            out = _lrn_forward_math(z, size, alpha, beta, k, groups, relu)
        ctx.save_for_backward(z, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, out = ctx.saved_tensors
        hyper = ctx.hyper
        fn = _compiled("backward")
        with torch.profiler.record_function(LRN_BACKWARD_RANGE):
            if fn is not None:
                try:
                    return fn(z, out, grad_out, *hyper), None, None, None, None, None, None
                except Exception as e:
                    _compile_failed("backward", e)
            return _lrn_backward_math(z, out, grad_out, *hyper), None, None, None, None, None, None


def _lrn_apply(x: Tensor, size, alpha, beta, k, groups, relu: bool, kernel: str) -> Tensor:
    if kernel not in LRN_KERNELS:
        raise ValueError(f"LRN kernel={kernel!r}: use one of {LRN_KERNELS} (train.lrn_kernel)")
    if kernel == "traced":
        return _lrn_forward_math(x, size, alpha, beta, k, groups, relu)
    fn = _CompiledLRNFunction if kernel == "compiled" and compiled_lrn_available() else _LRNFunction
    with torch.profiler.record_function(LRN_FORWARD_RANGE):
        return fn.apply(x, size, alpha, beta, k, groups, relu)


def _lrn_dtype(x: Tensor) -> Tensor:
    """float32 for 16-bit inputs (autocast): in bfloat16, k + alpha * S rounds alpha * S away
    (bf16 steps by 1/64 near k = 2), so the normalisation would all but vanish."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def local_response_norm(
    x: Tensor,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 2.0,
    groups: int = 1,
    kernel: str = "eager",
) -> Tensor:
    """The paper's LRN with ``alpha`` used as written (no division by ``size``).

    ``groups`` > 1 normalises each group of channels on its own, which is how the fused
    model applies one column's LRN to its half of a two-column tensor. ``kernel``: ``"eager"``
    (the hand-written autograd function) or ``"compiled"`` (one generated kernel per direction,
    the eager one if compiling fails); both compute the same function.
    """
    if x.dim() != 4:
        raise ValueError(f"local_response_norm expects (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups")
    return _lrn_apply(_lrn_dtype(x), size, alpha, beta, k, groups, False, kernel)


def relu_local_response_norm_(
    z: Tensor,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 2.0,
    groups: int = 1,
    kernel: str = "eager",
) -> Tensor:
    """``local_response_norm(relu(z))`` with the ReLU done in place on ``z`` and its backward
    folded into LRN's (``kernel`` as there; the compiled one leaves ``z`` as it is).

    Saves the separate ReLU backward, which allocates (and page-faults in) a gradient as big
    as the activation. ``z`` is consumed: pass a temporary nobody else reads (a conv output
    whose backward does not need it), as :class:`alexnet.model.FusedAlexNet` does.
    """
    if z.dim() != 4:
        raise ValueError(f"relu_local_response_norm_ expects (B, C, H, W), got shape {tuple(z.shape)}")
    if z.shape[1] % groups:
        raise ValueError(f"{z.shape[1]} channels do not split into {groups} groups")
    return _lrn_apply(_lrn_dtype(z), size, alpha, beta, k, groups, True, kernel)


class LocalResponseNorm(nn.Module):
    """Cross-map local response normalisation, section 3.3 of the paper.

    b^i = a^i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} (a^j)^2)^beta,
    k=2, n=5, alpha=1e-4, beta=0.75.

    ``convention="paper"`` (default) uses alpha as printed. ``convention="per_size"``
    uses alpha / n, as the original cuda-convnet code and ``torch.nn.LocalResponseNorm``
    do, so ``LocalResponseNorm(5, 1e-4, 0.75, 2, convention="per_size")`` equals
    ``torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2)``.
    """

    def __init__(
        self,
        size: int = 5,
        alpha: float = 1e-4,
        beta: float = 0.75,
        k: float = 2.0,
        convention: str = "paper",
        groups: int = 1,
        kernel: str = "eager",
    ) -> None:
        super().__init__()
        if convention not in ("paper", "per_size"):
            raise ValueError(f"convention={convention!r}: use 'paper' or 'per_size'")
        if size < 1 or size % 2 == 0:
            raise ValueError(f"LRN size={size}: must be a positive odd number")
        if kernel not in LRN_KERNELS:
            raise ValueError(f"LRN kernel={kernel!r}: use one of {LRN_KERNELS}")
        self.size, self.beta, self.k, self.groups = size, beta, k, groups
        self.convention, self.kernel = convention, kernel
        self.alpha = alpha / size if convention == "per_size" else alpha

    def forward(self, x: Tensor) -> Tensor:
        return local_response_norm(x, self.size, self.alpha, self.beta, self.k, self.groups, self.kernel)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha:g}, beta={self.beta}, k={self.k}, groups={self.groups}"


# ---------------------------------------------------------------------------------------------
# Partition-invariant dropout
# ---------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer finaliser (Wellons' lowbias32) on uint32 values in int64 tensors or ints.

    Every product stays below 2**63, so int64 arithmetic is exact on CPU and GPU alike.
    """
    x = ((x >> 16) ^ x) * 0x7FEB352D & _M32
    x = ((x >> 15) ^ x) * 0x846CA68B & _M32
    return (x >> 16) ^ x


def _key32(*values: int) -> int:
    """Fold integers into one 32-bit key (Python side, once per layer call)."""
    h = 0x9E3779B9
    for v in values:
        h = (_mix32(h ^ (v & _M32)) + 0x632BE5AB) & _M32  # same ops on a Python int
    return h


@dataclass(frozen=True)
class StepContext:
    """What the random parts of a forward pass are a function of.

    ``sample_index`` holds the global index (within the step's global batch) of each
    row of the micro-batch, shape (B,), int64; ``None`` means rows 0..B-1.
    """

    seed: int = 0
    step: int = 0
    sample_index: Tensor | None = None

    @staticmethod
    def required(ctx: StepContext | None, where: str) -> StepContext:
        """``ctx``, or the error of a training-mode forward that draws dropout masks without one.

        A silent default would be one fixed (seed, step): the same masks every step.
        """
        if ctx is None:
            raise ValueError(
                f"{where} draws dropout masks in training mode: pass "
                "ctx=StepContext(seed=cfg.seed, step=step, sample_index=rows) with this step's number "
                "(the masks are a function of it), or call .eval() for inference"
            )
        return ctx

    def indices(self, batch: int, device: torch.device) -> Tensor:
        if self.sample_index is None:
            return torch.arange(batch, device=device, dtype=torch.int64)
        if self.sample_index.shape != (batch,):
            raise ValueError(f"sample_index has shape {tuple(self.sample_index.shape)}, expected ({batch},)")
        return self.sample_index.to(device=device, dtype=torch.int64)


def dropout_masks(
    ctx: StepContext,
    layer_columns: Sequence[tuple[int, int]],
    batch: int,
    units: int,
    p: float,
    device: torch.device,
) -> Tensor:
    """Keep-masks of several (layer, column) pairs in one pass: bool (B, len(layer_columns), units).

    ``[:, i]`` equals ``dropout_mask(ctx, *layer_columns[i], ...)`` bit for bit. One hash pass
    over all of them costs the same few dozen elementwise ops as one mask does, which is what
    matters on a CPU, where each op on a (B, units) int64 tensor is cheap but not free.
    """
    if torch.compiler.is_compiling():
        return _dropout_masks_graph_break(ctx, layer_columns, batch, units, p, device)
    keys = [_key32(ctx.seed, ctx.step, layer, column) for layer, column in layer_columns]
    rows = ctx.indices(batch, device) * 0x9E3779B1  # (B,)
    # each key enters as a Python scalar (a kernel argument): no tensor built from host data,
    # which on a GPU would be a host-to-device copy per dropout layer and step
    row_key = torch.stack([_mix32((rows + key) & _M32) for key in keys], dim=1)  # (B, K)
    cols = torch.arange(units, device=device, dtype=torch.int64) * 0x85EBCA6B & _M32  # (U,)
    h = _mix32(_mix32(row_key[:, :, None] ^ cols))  # (B, K, U) uniform uint32
    return h >= int(p * 2**32)


# A graph break under train.compile: the keys are Python ints of (seed, step), which a compiled
# graph would bake in as constants and so recompile at every step. Reached only while Dynamo
# traces (the masks are then made eagerly, where is_compiling() is False), through torch's lazy
# form of ``torch.compiler.disable``: an eager process never imports Dynamo for it (with sympy,
# ~1.3 s of CPU in every trainer rank of a run).
_dropout_masks_graph_break = getattr(torch, "_disable_dynamo", torch.compiler.disable)(dropout_masks)


def dropout_mask(
    ctx: StepContext, layer: int, column: int, batch: int, units: int, p: float, device: torch.device
) -> Tensor:
    """Boolean keep-mask (B, units): a function of (seed, step, layer, column, sample, unit) only."""
    return dropout_masks(ctx, [(layer, column)], batch, units, p, device)[:, 0]


class SeededDropout(nn.Module):
    """Inverted dropout (kept units scaled by 1/(1-p) in training, identity in eval).

    The paper halves the outputs at test time instead; the two are the same function
    up to that constant factor on the following layer's input. The mask comes from
    :func:`dropout_mask`, keyed by this layer's id and column.
    """

    def __init__(self, p: float, layer: int, column: int) -> None:
        super().__init__()
        self.p, self.layer, self.column = p, layer, column

    def forward(self, x: Tensor, ctx: StepContext | None) -> Tensor:
        """``x`` (B, units); ``ctx`` is required in training mode (unless p is 0)."""
        if not self.training or self.p == 0.0:
            return x
        ctx = StepContext.required(ctx, "dropout")
        mask = dropout_mask(ctx, self.layer, self.column, x.shape[0], x.shape[1], self.p, x.device)
        return x * mask.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, layer={self.layer}, column={self.column}"
