"""One flat buffer for a model's parameters and one for their gradients, so an elementwise
optimizer updates them all in a handful of whole-buffer ops.

Why: a small model's optimizer step is dispatch-bound on a CPU. torch's Adadelta runs ~10 ops per
step; per parameter tensor (foreach=False) or as multi-tensor ops (foreach=True) that is still
~10 ops x 10 tensors of LeNet's 61,706 parameters, ~1 ms a step on one core, as much as LeNet's
forward and backward at batch 1. The same ops over one 61,706-element buffer cost ~0.4 ms with
torch's Adadelta class and ~0.2 ms as FlatAdadelta (below). This is what multi-tensor-apply (Apex)
and contiguous-parameter libraries do, with torch's own ops doing the arithmetic, so the update is
the same elementwise sequence (tests/test_flat_params.py compares it with torch's per-tensor
update bit for bit).

How: every parameter's storage becomes a view of one flat tensor (per device and dtype), and its
`.grad` a view of one flat gradient tensor that autograd accumulates into in place. The optimizer
sees one parameter per buffer. Only optimizers whose update is elementwise may see parameters
flattened (FLATTENABLE): LAMB-like per-tensor norms or Adafactor's factored moments would change.
The views are contiguous: a channels_last parameter becomes a contiguous one.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable

import torch
from torch import nn

from autotune import fused_adadelta
from autotune.errors import OptimizerError

# torch.optim classes whose update of an element depends only on that element's own history.
FLATTENABLE = ("SGD", "Adam", "AdamW", "Adadelta", "Adagrad", "Adamax", "RMSprop", "NAdam", "RAdam", "ASGD")


class FlatParameters:
    """The parameters (those that require grad) re-pointed into flat buffers, one per
    (device, dtype); `parameters` are the flat buffers as nn.Parameters, for an optimizer."""

    def __init__(self, params: Iterable[nn.Parameter]):
        params = [p for p in dict.fromkeys(params) if p.requires_grad]
        if not params:
            raise OptimizerError("no parameters that require grad to flatten")
        groups: dict[tuple, list[nn.Parameter]] = {}
        for p in params:
            groups.setdefault((p.device, p.dtype), []).append(p)
        self.parameters: list[nn.Parameter] = []
        self.views: list[tuple[nn.Parameter, torch.Tensor]] = []  # (parameter, its gradient view)
        for (device, dtype), members in groups.items():
            numel = sum(p.numel() for p in members)
            data = torch.empty(numel, device=device, dtype=dtype)
            grad = torch.zeros(numel, device=device, dtype=dtype)
            offset = 0
            for p in members:
                n = p.numel()
                data[offset:offset + n].copy_(p.detach().reshape(-1))
                if p.grad is not None:
                    grad[offset:offset + n].copy_(p.grad.reshape(-1))
                p.data = data[offset:offset + n].view_as(p)
                p.grad = grad[offset:offset + n].view_as(p)
                self.views.append((p, p.grad))
                offset += n
            flat = nn.Parameter(data)
            flat.grad = grad
            self.parameters.append(flat)

    def zero_grad(self) -> None:
        """Zero every gradient in one op per buffer (set_to_none would cut the views)."""
        self.reattach()
        for flat in self.parameters:
            flat.grad.zero_()

    def reattach(self) -> None:
        """A gradient someone replaced (model.zero_grad() sets them to None; autograd then makes
        new ones) is copied back into its view, so the flat gradient is whole again."""
        for p, view in self.views:
            if p.grad is not view:
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
                p.grad = view


class FlatAdadelta(torch.optim.Adadelta):
    """torch's Adadelta (its single-tensor update, op for op) with the two temporaries it
    allocates each step (std, delta) kept between steps. Over one flat buffer the allocations were
    what was left: two 247 KB tensors a step for LeNet, each above malloc's mmap threshold, so each
    step mapped and faulted in fresh pages (a 64 us `aten::add` where the in-place ops took 15 us).
    Same state_dict layout as torch's Adadelta (step, square_avg, acc_delta per parameter)."""

    def __init__(self, params, *, fused: bool | None = None, **kwargs):
        """fused: the update of a CPU float32/float64 buffer as one compiled pass
        (autotune.fused_adadelta; not bit for bit torch's ops, an ulp or so a step); None (the
        default) where Numba is installed. False: torch's ops, bit for bit torch's Adadelta."""
        if kwargs.get("capturable") or kwargs.get("differentiable"):
            raise OptimizerError("FlatAdadelta does not support capturable or differentiable; use "
                                 "flat_optimizer(..., torch.optim.Adadelta) without them")
        kwargs.pop("foreach", None)  # one tensor per buffer: nothing to fuse
        super().__init__(params, **kwargs)
        if fused is None:
            from autotune.registry import numba_available

            fused = numba_available()
        self.fused = bool(fused)
        self._scratch: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:  # as torch initialises it (a scalar step in its scalar dtype)
            scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.zeros((), dtype=scalar)
            state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["acc_delta"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            rho, eps, weight_decay = group["rho"], group["eps"], group["weight_decay"]
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p):
                    raise OptimizerError("FlatAdadelta takes real parameters only")
                state = self._state(p)
                std, delta, grad_scratch = self._scratch.get(p) or self._scratch.setdefault(
                    p, (torch.empty_like(p), torch.empty_like(p), torch.empty_like(p)))
                grad = p.grad
                if group["maximize"]:
                    grad = torch.neg(grad, out=grad_scratch)
                if weight_decay != 0:
                    grad = torch.add(grad, p, alpha=weight_decay, out=grad_scratch)
                state["step"] += 1
                square_avg, acc_delta = state["square_avg"], state["acc_delta"]
                if self.fused and p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64):
                    fused_adadelta.update(p, grad, square_avg, acc_delta, rho=rho, eps=eps, lr=lr)
                    continue
                square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
                torch.add(square_avg, eps, out=std).sqrt_()
                torch.add(acc_delta, eps, out=delta).sqrt_()
                delta.div_(std).mul_(grad)
                acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
                p.add_(delta, alpha=-lr)
        return loss


class _OnFlatBuffers:
    """Mixed into the optimizer's class: zero_grad zeroes the flat gradients in place (setting
    them to None would cut the parameters' views); the class's step (_flat_step) first takes back
    any gradient that was replaced. A subclass rather than patched methods, so LR schedulers and
    torch's step hooks work as with the plain class."""

    flat_parameters: FlatParameters

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.flat_parameters.zero_grad()


@functools.cache
def _flat_class(base: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    name = f"Flat{base.__name__}" if base is not FlatAdadelta else base.__name__
    return type(name, (_OnFlatBuffers, base),
                {"__module__": __name__, "__doc__": base.__doc__, "step": _flat_step(base)})


def _flat_step(base: type[torch.optim.Optimizer]):
    """The flat class's step: the base class's update, wrapped as torch wraps every optimizer's
    step (a profiler label, the step pre/post hooks) only while a profiler listens or a hook is
    registered: torch's wrapper costs ~40 µs a call even with nothing to do, a fifth of
    FlatAdadelta's step over LeNet. Marked `hooked` so Optimizer.__init__ does not wrap it again.
    Once any instance of `base` exists, torch has wrapped base.step itself: that wrapper is
    skipped (its `__wrapped__` called), or the hooks would run twice."""
    module = sys.modules.get(torch.optim.Optimizer.__module__)  # torch.optim.optimizer
    global_pre = getattr(module, "_global_optimizer_pre_hooks", None)
    global_post = getattr(module, "_global_optimizer_post_hooks", None)

    def update(self, closure=None):
        self.flat_parameters.reattach()
        step = base.step
        return (step.__wrapped__ if getattr(step, "hooked", False) else step)(self, closure)

    hooked = torch.optim.Optimizer.profile_hook_step(update)

    def step(self, closure=None):
        if (global_pre is None or global_post is None or global_pre or global_post
                or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or torch.autograd.profiler._is_profiler_enabled):
            return hooked(self, closure)
        return update(self, closure)

    step.hooked = True
    step.__doc__ = base.step.__doc__
    return step


def flat_optimizer(params: Iterable[nn.Parameter], optimizer_class: type[torch.optim.Optimizer],
                   **kwargs) -> torch.optim.Optimizer:
    """`optimizer_class(params, **kwargs)`, updating flat buffers instead of each parameter.

    The parameters are re-pointed into the buffers (their values and gradients are kept). The
    optimizer is an instance of a subclass of `optimizer_class` (FlatAdadelta for Adadelta): its
    zero_grad zeroes the flat gradients in place, and each step first takes back any gradient
    that was replaced. Its state_dict has one entry per buffer, not per parameter."""
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)
            and optimizer_class.__name__ in FLATTENABLE):
        name = getattr(optimizer_class, "__name__", repr(optimizer_class))
        raise OptimizerError(f"{name} cannot update flattened parameters: its update is not "
                             f"elementwise (flattenable: {', '.join(FLATTENABLE)})")
    flat = FlatParameters(params)
    lean = optimizer_class is torch.optim.Adadelta and not (kwargs.get("capturable") or kwargs.get("differentiable"))
    optimizer = _flat_class(FlatAdadelta if lean else optimizer_class)(flat.parameters, **kwargs)
    optimizer.flat_parameters = flat
    return optimizer
