"""The paper's update rule as an optimizer, and the choice between it and torch's SGD.

The paper (section 5) and cuda-convnet's ``weights.cu`` keep the learning rate inside the
momentum buffer::

    v <- momentum * v - weight_decay * lr * w - lr * grad
    w <- w + v

``torch.optim.SGD`` keeps it outside: ``b <- momentum * b + grad + weight_decay * w``,
``w <- w - lr * b``. The two give the same weights while ``lr`` is constant (``v = -lr * b``);
after a /10 torch's next step is about 8x smaller at once (the whole buffer is rescaled),
where the paper's shrinks over ~10 steps as the old momentum decays. And cuda-convnet gives the
biases no weight decay (``wc = 0`` in its layer definitions), where the job used to decay them too.

``OPTIM_RULES``:

* ``"paper"`` (:class:`PaperSGD`): the rule above, weight decay on weights only. Its momentum
  buffer ``v`` holds the last step's displacement of the weights (weight units, lr inside);
* ``"torch"``: ``torch.optim.SGD`` exactly as before (weight decay on every parameter), whose
  buffer ``b`` holds the decayed sum of gradients (gradient units, lr outside).

Both keep their buffer as ``state[p]["momentum_buffer"]``, so a checkpoint's optimizer file has
one tensor per parameter under the parameter's canonical name either way. The buffers mean
different things, so a run resumes only with the rule that wrote them (``v = -lr b`` would
convert them only for a run whose rate never changed, and not for the biases' weight decay):
:func:`check_resume_rule`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor, nn

OPTIM_RULES = ("paper", "torch")


class PaperSGD:
    """The paper's momentum SGD: ``v <- mu v - wd lr w - lr g; w <- w + v`` (see the module doc).

    Per parameter group: ``lr``, ``momentum``, ``weight_decay`` (give biases a group with 0:
    :func:`make_optimizer` does). The buffers start at zero, so the first step is ``-lr (g + wd w)``,
    as torch's. The update is ``torch._foreach_*`` over each group's tensors, with ``lr`` a Python
    float: no per-parameter kernel loop on the host and no host-device synchronisation.

    Not a ``torch.optim.Optimizer``: that base class imports Dynamo (with sympy, about as much CPU
    as torch itself) on its first call, which every trainer rank paid at start-up for an update of
    four lines. This class keeps the part of its interface that its callers and
    ``torch.amp.GradScaler`` use: ``param_groups``, ``state`` (``state[p]["momentum_buffer"]``),
    :meth:`step`, :meth:`zero_grad`, and :meth:`state_dict` / :meth:`load_state_dict` in torch's
    layout.
    """

    def __init__(
        self, params: Iterable, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(
                f"PaperSGD(lr={lr}, momentum={momentum}, weight_decay={weight_decay}): "
                "use lr >= 0, momentum in [0, 1), weight_decay >= 0"
            )
        self.defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups: list[dict] = [{**self.defaults, **g, "params": list(g["params"])} for g in groups]
        self.state: defaultdict[Tensor, dict[str, Tensor]] = defaultdict(dict)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self._buffer(p) for p in params]
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            torch._foreach_mul_(bufs, mu)  # v <- mu v
            torch._foreach_add_(bufs, grads, alpha=-lr)  # ... - lr g
            if wd != 0:
                torch._foreach_add_(bufs, params, alpha=-lr * wd)  # ... - wd lr w (the old w)
            torch._foreach_add_(params, bufs)  # w <- w + v
        return loss

    def _buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every parameter's gradient (``set_to_none``) or zero it in place."""
        for p in self._params():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().requires_grad_(False).zero_()

    def state_dict(self) -> dict:
        """``{"state": {i: {"momentum_buffer": v}}, "param_groups": [...]}``, parameters by their
        index across the groups, as ``torch.optim.Optimizer.state_dict`` lays it out."""
        index = {id(p): i for i, p in enumerate(self._params())}
        groups, start = [], 0
        for g in self.param_groups:
            groups.append(
                {
                    **{k: v for k, v in g.items() if k != "params"},
                    "params": list(range(start, start + len(g["params"]))),
                }
            )
            start += len(g["params"])
        state = {index[id(p)]: dict(st) for p, st in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Take a :meth:`state_dict` of an optimizer over parameters of the same shapes, in the same
        order: the hyperparameters of each group and a copy of each buffer, on its parameter's
        device and in its dtype."""
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("PaperSGD.load_state_dict: the saved groups hold other parameters than these")
        for group, g in zip(self.param_groups, saved, strict=True):
            group.update({k: v for k, v in g.items() if k != "params"})
        params = self._params()
        self.state = defaultdict(dict)
        for i, st in state_dict["state"].items():
            p = params[int(i)]
            self.state[p] = {k: v.detach().clone().to(p.device, p.dtype) for k, v in st.items()}


def is_bias(name: str) -> bool:
    """Whether parameter ``name`` (``conv1.0.bias``, ``fc8.bias``) is a bias: no weight decay
    under the paper's rule."""
    return name.rsplit(".", 1)[-1] == "bias"


def make_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]],
    rule: str = "paper",
    lr: float = 0.0,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> PaperSGD | torch.optim.SGD:
    """The optimizer of ``rule`` (``OPTIM_RULES``) over named parameters.

    ``"paper"``: :class:`PaperSGD` with two groups, the weights (``weight_decay``) then the biases
    (none). ``"torch"``: ``torch.optim.SGD(momentum, weight_decay)`` on every parameter in one group.
    The caller sets ``group["lr"]`` before each step when the rate changes.
    """
    if rule not in OPTIM_RULES:
        raise ValueError(f"optim.rule={rule!r}: use one of {OPTIM_RULES}")
    named = list(named_params)
    if rule == "torch":
        return torch.optim.SGD([p for _, p in named], lr=lr, momentum=momentum, weight_decay=weight_decay)
    weights = [p for n, p in named if not is_bias(n)]
    biases = [p for n, p in named if is_bias(n)]
    groups = [{"params": weights, "weight_decay": weight_decay}, {"params": biases, "weight_decay": 0.0}]
    return PaperSGD([g for g in groups if g["params"]], lr=lr, momentum=momentum, weight_decay=weight_decay)


def check_resume_rule(saved: str, rule: str, where: str) -> None:
    """Refuse to resume momentum buffers written under another rule (see the module doc).

    ``saved``: the checkpoint config's ``optim.rule``; ``where``: the checkpoint, for the message.
    """
    if saved != rule:
        raise ValueError(
            f"{where}: its momentum buffers were written with optim.rule={saved!r}, this run has "
            f"optim.rule={rule!r}; the buffers mean different things under the two rules: resume with "
            f"--set optim.rule={saved} (or start a new --run-dir)"
        )
