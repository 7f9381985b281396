"""PyTorch integration: conv2d and linear whose forward and both gradients are tuned kernels,
and max-pooling whose forward and gradient are.

Each of the three products of a layer (forward, grad input, grad weight) is its own problem and
is dispatched on its own, as cuDNN picks FwdAlgo, BwdDataAlgo and BwdFilterAlgo separately. Our
kernels show up in torch.profiler as `autotune::<op>:<algorithm>`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autotune import dispatch, registry
from autotune.problem import Conv2dProblem, GemmProblem, Pool2dProblem, Problem

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


def run(problem: Problem, *inputs: torch.Tensor) -> torch.Tensor:
    """Dispatch `problem` and run the chosen kernel on `inputs` (one lookup, then _launch)."""
    inputs = tuple(t if t.is_contiguous() else t.contiguous() for t in inputs)
    return _launch(dispatch.select(problem, "cuda" if inputs[0].is_cuda else "cpu", inputs), problem, *inputs)


def _launch(choice: dispatch.Choice, problem: Problem, *inputs: torch.Tensor) -> torch.Tensor:
    """Run an already chosen kernel. This is the hot path of every layer call, so it does only
    what the kernel needs: our NumPy kernels take their numpy views themselves (a plugin's get
    detached tensors, as numpy views refuse tensors that require grad), and a kernel whose
    library allocates its own result gets no output buffer."""
    if not all(t.is_contiguous() for t in inputs):
        inputs = tuple(t.contiguous() for t in inputs)
    spec = choice.spec
    if spec.plugin and spec.backend == "numpy":
        inputs = tuple(t.detach() for t in inputs)
    out = None if spec.allocates else inputs[0].new_empty(_output_shape(problem))
    if not _profiling():
        return spec.run(problem, choice.knobs, inputs, out)
    # Labels cost microseconds per call, so they are only made while a profiler listens.
    with torch.profiler.record_function(f"autotune::{problem.op}:{spec.algorithm}"):
        return spec.run(problem, choice.knobs, inputs, out)


@functools.lru_cache(maxsize=4096)
def _output_shape(problem: Problem) -> tuple[int, ...]:
    return tuple(problem.output_shape())


def _profiling() -> bool:
    return torch.autograd.profiler._is_profiler_enabled


def _single(value, name: str) -> int:
    """Our problems use square geometry; accept 2 or (2, 2) and refuse (1, 2) clearly."""
    if isinstance(value, int):
        return value
    first, *rest = tuple(value)
    if any(v != first for v in rest):
        raise ValueError(f"autotune.conv2d supports equal {name} in both dims, got {tuple(value)}")
    return int(first)


def conv_problem(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation) -> Conv2dProblem:
    return _conv_problem(tuple(x.shape), tuple(w.shape), _pair_key(stride), _pair_key(padding),
                         _pair_key(dilation), x.dtype)


def _pair_key(value):
    return value if isinstance(value, int) else tuple(value)


@functools.lru_cache(maxsize=4096)
def _conv_problem(x_shape, w_shape, stride, padding, dilation, dtype) -> Conv2dProblem:
    """Problems are validated on construction; a layer sees the same few shapes every step,
    so they are built once per shape rather than on every call."""
    n, c, h, wd = x_shape
    k, wc, r, s = w_shape
    if wc != c:
        raise ValueError(f"weight expects {wc} input channels, input has {c}")
    return Conv2dProblem(op="conv2d", n=n, c=c, h=h, w=wd, k=k, r=r, s=s,
                         stride=_single(stride, "stride"), padding=_single(padding, "padding"),
                         dilation=_single(dilation, "dilation"), dtype=_DTYPE_NAMES[dtype])


@functools.lru_cache(maxsize=4096)
def _gemm_problem(m: int, n: int, k: int, trans_a: bool, trans_b: bool, dtype) -> GemmProblem:
    return GemmProblem(m=m, n=n, k=k, trans_a=trans_a, trans_b=trans_b, dtype=_DTYPE_NAMES[dtype])


@functools.lru_cache(maxsize=4096)
def _pool_problem(x_shape, window: int, dtype) -> Pool2dProblem:
    n, c, h, w = x_shape
    return Pool2dProblem(op="max_pool2d", n=n, c=c, h=h, w=w, window=window, dtype=_DTYPE_NAMES[dtype])


@functools.lru_cache(maxsize=4096)
def _with_op(problem: Conv2dProblem | Pool2dProblem, op: str) -> Conv2dProblem | Pool2dProblem:
    return problem.with_op(op)


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """What one layer call runs: the forward, grad-input and grad-weight choices (None where
    that gradient is not needed), resolved once per shape and held until a choice may change
    (dispatch.generation), so a call on the hot path does one dict lookup, not one per product."""

    generation: int
    forward: Problem
    grad_input: Problem | None
    grad_weight: Problem | None
    forward_choice: dispatch.Choice
    grad_input_choice: dispatch.Choice | None
    grad_weight_choice: dispatch.Choice | None
    on_gpu: bool = False

    @functools.cached_property
    def torch_only(self) -> bool:
        """torch's op for every product, so the layer can be torch's own (native autograd) --
        except on a GPU where a tuned choice pins TF32 on or off: torch's autograd would run the
        gradients under whatever the global flags say then, so the Function applies the knobs."""
        chosen = [c for c in (self.forward_choice, self.grad_input_choice, self.grad_weight_choice) if c is not None]
        return all(c.spec.algorithm == VENDOR for c in chosen) and not (
            self.on_gpu and any("allow_tf32" in c.knobs for c in chosen))

    @functools.cached_property
    def torch_gradients(self) -> bool:
        return all(c is None or c.spec.algorithm == VENDOR for c in (self.grad_input_choice, self.grad_weight_choice))

    @functools.cached_property
    def torch_gradient_knobs(self) -> dict:
        """The knobs of torch's one convolution_backward call for both gradients: TF32 only where
        every gradient it computes was chosen (and verified) with TF32."""
        chosen = [c for c in (self.grad_input_choice, self.grad_weight_choice) if c is not None]
        if all(c.source == "default" for c in chosen):
            return {}  # untuned: the user's flags, as plain torch
        return {"allow_tf32": all(c.knobs.get("allow_tf32", False) for c in chosen)}

    @functools.cached_property
    def hands_indices_to_torch(self) -> bool:
        """A pool whose forward is ours and whose gradient is torch's, the forward able to write
        the argmax indices torch's gradient reads (otherwise that gradient would run torch's
        forward again to find them)."""
        forward, gradient = self.forward_choice.spec, self.grad_input_choice
        return (forward.algorithm != VENDOR and forward.run_with_indices is not None
                and gradient is not None and gradient.spec.algorithm == VENDOR)


VENDOR = "vendor"
_plans: dict[tuple, _Plan] = {}


def _plan(key: tuple, call: LayerCall, x: torch.Tensor, w: torch.Tensor, need_dx: bool, need_dw: bool) -> _Plan:
    plan = _plans.get(key)
    if plan is not None and plan.generation == dispatch.generation():
        return plan
    device = "cuda" if x.is_cuda else "cpu"
    choices = _choices(call, x, w, need_dx, need_dw, device)
    if torch.is_grad_enabled() and any(c is not None and c.source in MEASURED_NOW and c.spec.algorithm != VENDOR
                                       for c in choices):
        # The benchmark/tune policy just chose a kernel of ours product by product: confirm it on
        # the layer as training calls it before the layer runs it (autotune.layer_check).
        from autotune import layer_check

        layer_check.check_layers([call], cache=dispatch.cache(), device=device)
        dispatch.forget([p for p in call.problems if p is not None], device)
        choices = _choices(call, x, w, need_dx, need_dw, device)
    forward, grad_input, grad_weight = call.problems
    plan = _Plan(generation=dispatch.generation(), forward=forward, grad_input=grad_input,
                 grad_weight=grad_weight, forward_choice=choices[0], grad_input_choice=choices[1],
                 grad_weight_choice=choices[2], on_gpu=x.is_cuda)
    # A default choice is re-resolved on the next call unless the policy keeps defaults (as the
    # dispatch memo does): "benchmark" or "tune" will measure it.
    if dispatch.get_policy() == "cached" or all(c is None or c.source != "default" for c in choices):
        _plans[key] = plan
    return plan


MEASURED_NOW = ("benchmark", "tune")  # dispatch sources of a choice measured in this process


def _choices(call: LayerCall, x, w, need_dx: bool, need_dw: bool, device: str) -> tuple:
    forward, grad_input, grad_weight = call.problems
    # Gradients are chosen on random tensors of their shape when benchmarked (not computed yet).
    return (dispatch.select(forward, device, (x,) if w is None else (x, w)),
            dispatch.select(grad_input, device) if need_dx else None,
            dispatch.select(grad_weight, device) if need_dw else None)


def _label(name: str):
    return torch.profiler.record_function(name) if _profiling() else contextlib.nullcontext()


class _Conv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, plan: _Plan):
        ctx.save_for_backward(x, w)
        ctx.plan = plan
        problem = plan.forward
        if plan.forward_choice.spec.algorithm == VENDOR:
            # torch's conv adds the bias in the same call; a separate add would cost a pass.
            with _label("autotune::conv2d:vendor"):
                return _VENDOR_OPS().conv2d_bias(problem, x, w, b, plan.forward_choice.knobs)
        if b is not None and plan.forward_choice.spec.bias_epilogue:
            return _launch(plan.forward_choice, problem, x, w, b)  # the kernel adds the bias
        y = _launch(plan.forward_choice, problem, x, w)
        return y if b is None else y.add_(b.view(1, -1, 1, 1))

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        plan: _Plan = ctx.plan
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dy = dy if dy.is_contiguous() else dy.contiguous()
        if plan.torch_gradients:
            # Each gradient is chosen on its own, as cuDNN picks BwdData and BwdFilter; where
            # torch's op wins both, one convolution_backward computes dx, dw and db together,
            # exactly as torch's own autograd would.
            with _label("autotune::conv2d_bwd:vendor"):
                dx, dw, db = _VENDOR_OPS().conv2d_backward(plan.forward, x, w, dy, (need_dx, need_dw, need_db),
                                                           plan.torch_gradient_knobs)
            return dx, dw, db, None
        dx = _launch(plan.grad_input_choice, plan.grad_input, dy, w) if need_dx else None
        dw = _launch(plan.grad_weight_choice, plan.grad_weight, x, dy) if need_dw else None
        db = dy.sum(dim=(0, 2, 3)) if need_db else None
        return dx, dw, db, None


@functools.cache
def _VENDOR_OPS():  # noqa: N802 - a constant, resolved once through the registry
    return registry.module("vendor")


def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1) -> torch.Tensor:
    """Like torch.nn.functional.conv2d (groups=1, zero padding), on tuned kernels."""
    grad = torch.is_grad_enabled()
    need_dx, need_dw = grad and x.requires_grad, grad and w.requires_grad
    key = (x.shape, w.shape, _pair_key(stride), _pair_key(padding), _pair_key(dilation), x.dtype,
           x.is_cuda, need_dx, need_dw)
    plan = _plans.get(key)
    if plan is None or plan.generation != dispatch.generation():
        problem = conv_problem(x, w, stride, padding, dilation)
        call = LayerCall(kind="conv2d", x_shape=tuple(x.shape), x_requires_grad=need_dx, dtype=x.dtype,
                         weight_shape=tuple(w.shape), has_bias=b is not None,
                         geometry=(problem.stride, problem.padding, problem.dilation),
                         problems=(problem, _with_op(problem, "conv2d_bwd_data") if need_dx else None,
                                   _with_op(problem, "conv2d_bwd_weight") if need_dw else None))
        plan = _plan(key, call, x, w, need_dx, need_dw)
    else:
        dispatch.measuring_done()  # a layer runs on choices made before: first-time measuring is over
    if plan.torch_only:
        # The choice was made (and cached): torch's op with torch's own autograd, no Function.
        p = plan.forward
        if not _profiling():
            return F.conv2d(x, w, b, p.stride, p.padding, p.dilation)
        with _label("autotune::conv2d:vendor"):
            return F.conv2d(x, w, b, p.stride, p.padding, p.dilation)
    return _Conv2dFunction.apply(x, w, b, plan)


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, w, b, plan: _Plan):
        ctx.save_for_backward(x2d, w)
        ctx.plan = plan
        if plan.forward_choice.spec.algorithm == VENDOR:
            with _label("autotune::gemm:vendor"), _VENDOR_OPS().tf32_as(plan.forward_choice.knobs, x2d):
                return torch.addmm(b, x2d, w.t()) if b is not None else x2d @ w.t()  # bias fused, as F.linear
        y = _launch(plan.forward_choice, plan.forward, x2d, w)
        return y if b is None else y.add_(b)

    @staticmethod
    def backward(ctx, dy):
        x2d, w = ctx.saved_tensors
        plan: _Plan = ctx.plan
        dy = dy if dy.is_contiguous() else dy.contiguous()
        dx = _launch(plan.grad_input_choice, plan.grad_input, dy, w) if ctx.needs_input_grad[0] else None  # dY·W
        dw = _launch(plan.grad_weight_choice, plan.grad_weight, dy, x2d) if ctx.needs_input_grad[1] else None  # dYᵀ·X
        db = dy.sum(dim=0) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Like torch.nn.functional.linear, on tuned kernels (leading dims are flattened)."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    grad = torch.is_grad_enabled()
    need_dx, need_dw = grad and x.requires_grad, grad and w.requires_grad
    key = (x2d.shape, w.shape, x.dtype, x.is_cuda, need_dx, need_dw)
    plan = _plans.get(key)
    if plan is None or plan.generation != dispatch.generation():
        batch, fan_in = x2d.shape
        fan_out = w.shape[0]
        call = LayerCall(kind="linear", x_shape=(batch, fan_in), x_requires_grad=need_dx, dtype=x.dtype,
                         weight_shape=tuple(w.shape), has_bias=b is not None,
                         problems=(_gemm_problem(batch, fan_out, fan_in, False, True, x.dtype),  # y = x·Wᵀ
                                   _gemm_problem(batch, fan_in, fan_out, False, False, x.dtype)  # dX = dY·W
                                   if need_dx else None,
                                   _gemm_problem(fan_out, fan_in, batch, True, False, x.dtype)  # dW = dYᵀ·X
                                   if need_dw else None))
        plan = _plan(key, call, x2d, w, need_dx, need_dw)
    else:
        dispatch.measuring_done()  # a layer runs on choices made before: first-time measuring is over
    if plan.torch_only:
        if not _profiling():
            return F.linear(x, w, b)
        with _label("autotune::gemm:vendor"):
            return F.linear(x, w, b)
    y = _LinearFunction.apply(x2d, w, b, plan)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], w.shape[0])


class _MaxPool2dFunction(torch.autograd.Function):
    """A pool whose gradient is ours (its forward ours or torch's), or whose forward is ours and
    cannot write torch's indices: our gradient kernels take (x, y, dy)."""

    @staticmethod
    def forward(ctx, x, plan: _Plan):
        ctx.plan = plan
        if plan.forward_choice.spec.algorithm == VENDOR:
            with _label("autotune::max_pool2d:vendor"):
                y = F.max_pool2d(x, plan.forward.window)
        else:
            y = _launch(plan.forward_choice, plan.forward, x)
        # The gradient kernels take (x, y, dy): y, each window's maximum, locates the argmax.
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y = ctx.saved_tensors
        plan: _Plan = ctx.plan
        dy = dy if dy.is_contiguous() else dy.contiguous()
        return _launch(plan.grad_input_choice, plan.grad_input, x, y, dy), None


def _pool(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """A max-pool layer on a plan that is not torch's alone."""
    if not plan.hands_indices_to_torch:
        return _MaxPool2dFunction.apply(x, plan)
    # Our forward finds each window's argmax (torch's int64 indices); the output is then a
    # gather of x at those indices, whose autograd node is torch's own (C++): its backward
    # scatters dy to the argmax exactly as torch's pool gradient does, with no Python in the
    # backward pass (a Python autograd node cost ~50 us a pool in LeNet's step).
    x = x if x.is_contiguous() else x.contiguous()
    forward, shape = plan.forward_choice.spec, _output_shape(plan.forward)
    values, indices = _empty(x, shape), _empty(x, shape, torch.int64)  # the values go unused
    with _label(f"autotune::max_pool2d:{forward.algorithm}"):
        forward.run_with_indices(plan.forward, plan.forward_choice.knobs, (x,), values, indices)
    return x.flatten(2).gather(2, _as_tensor(indices).flatten(2)).view(shape)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64}


def _empty(x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None):
    """An output buffer for a kernel that takes NumPy arrays or tensors: a NumPy array on the CPU
    (a third of new_empty's cost, on the hot path of every call), else a tensor like x."""
    dtype = dtype or x.dtype
    if not x.is_cuda and dtype in _NUMPY_DTYPES:
        return np.empty(shape, _NUMPY_DTYPES[dtype])
    return x.new_empty(shape, dtype=dtype)


def _as_tensor(buffer) -> torch.Tensor:
    return torch.from_numpy(buffer) if isinstance(buffer, np.ndarray) else buffer


def max_pool2d(x: torch.Tensor, kernel_size, stride=None) -> torch.Tensor:
    """Like torch.nn.functional.max_pool2d for non-overlapping square windows (stride equal to
    the window, no padding), on tuned kernels: the forward and the gradient are chosen apart."""
    window = _single(kernel_size, "kernel_size")
    if stride is not None and _single(stride, "stride") != window:
        raise ValueError(f"autotune.max_pool2d pools non-overlapping windows (stride = kernel_size), "
                         f"got kernel_size {kernel_size} and stride {stride}")
    need_dx = torch.is_grad_enabled() and x.requires_grad
    key = ("max_pool2d", x.shape, window, x.dtype, x.is_cuda, need_dx)
    plan = _plans.get(key)
    if plan is None or plan.generation != dispatch.generation():
        problem = _pool_problem(tuple(x.shape), window, x.dtype)
        call = LayerCall(kind="max_pool2d", x_shape=tuple(x.shape), x_requires_grad=need_dx, dtype=x.dtype,
                         weight_shape=(), has_bias=False, geometry=(window,),
                         problems=(problem, _with_op(problem, "max_pool2d_bwd") if need_dx else None, None))
        plan = _plan(key, call, x, None, need_dx, False)
    else:
        dispatch.measuring_done()
    if plan.torch_only:
        if not _profiling():
            return F.max_pool2d(x, window)
        with _label("autotune::max_pool2d:vendor"):
            return F.max_pool2d(x, window)
    return _pool(x, plan)


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose forward and gradients run on tuned kernels (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


class Linear(nn.Linear):
    """nn.Linear whose forward and gradients run on tuned kernels (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d (non-overlapping windows) whose forward and gradient run on tuned kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2d(x, self.kernel_size, self.stride)


# Our layer classes and the torch classes they stand in for (patch swaps one for the other).
TORCH_CLASS = {Conv2d: nn.Conv2d, Linear: nn.Linear, MaxPool2d: nn.MaxPool2d}


def _patchable_pool(m: nn.MaxPool2d) -> bool:
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    window, stride = pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size)
    return (window[0] == window[1] and stride == window and pair(m.padding) == (0, 0)
            and pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices)


def _patchable_conv(m: nn.Conv2d) -> bool:
    square = all(len(set(v)) == 1 for v in (m.stride, m.padding if not isinstance(m.padding, str) else (0,), m.dilation))
    return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str) and square


def patch(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """Swap the model's nn.Conv2d / nn.Linear / nn.MaxPool2d for autotune's, in place; returns
    the model.

    The class of each module is swapped rather than the module replaced, so parameters keep
    their identity (an optimizer built before patching still updates them) and state_dict keys
    are unchanged. Convs we cannot run (groups, non-zero padding modes, unequal strides) and
    pools with overlapping or padded windows stay torch's.

    With `example` (an input batch, or a tensor of its shape), a layer whose every product
    (forward and gradients) for that shape is cached as torch's op stays torch's own module, as
    the step check timed it (autotune.step_check): no wrapper, no lookups. Layers with a kernel of
    ours or an uncached product are patched (the policy chooses at their first call). The layer
    still runs torch's op for other shapes, uncached: patch without `example` to dispatch every
    shape.
    """
    torch_only = _cached_torch_only(model, example) if example is not None else set()
    for module in model.modules():
        if id(module) in torch_only:
            continue
        if type(module) is nn.Conv2d and _patchable_conv(module):
            module.__class__ = Conv2d
        elif type(module) is nn.Linear:
            module.__class__ = Linear
        elif type(module) is nn.MaxPool2d and _patchable_pool(module):
            module.__class__ = MaxPool2d
    return model


def _cached_torch_only(model: nn.Module, example: torch.Tensor) -> set[int]:
    """ids of the model's modules whose layer call on `example`'s shape has every product cached
    as torch's op (in the current policy's cache)."""
    found: dict[int, Problem] = {}
    calls = {c.problems[0]: c for c in layer_calls(model, example, by_module=found)}
    device = "cuda" if example.is_cuda else "cpu"
    cache = dispatch.cache()

    def torch_only(call: LayerCall) -> bool:
        entries = [cache.find(p, device, registry.kernels_for(p, device)) for p in call.problems if p is not None]
        return all(e is not None and e.algorithm == VENDOR for e in entries)

    verdicts = {problem: torch_only(call) for problem, call in calls.items()}
    for problem, call in calls.items():
        if verdicts[problem]:  # a cache hit, never a measurement: the choice table lists the layer
            for p in call.problems:
                if p is not None:
                    dispatch.select(p, device)
    return {module_id for module_id, problem in found.items() if verdicts.get(problem)}


@dataclass(frozen=True)
class LayerCall:
    """One conv2d/linear/max-pool layer as a training step calls it: the input's shape and whether it
    needs a gradient, the layer's parameters, and the problems the call dispatches (forward,
    grad input, grad weight; grad input is None where autograd skips it, at the first layer)."""

    kind: str  # "conv2d", "linear" or "max_pool2d"
    x_shape: tuple[int, ...]
    x_requires_grad: bool
    dtype: torch.dtype
    weight_shape: tuple[int, ...]
    has_bias: bool
    geometry: tuple = ()  # conv: (stride, padding, dilation); max_pool2d: (window,)
    problems: tuple = ()  # (forward, grad input | None, grad weight)


def layer_calls(model: nn.Module, example: torch.Tensor, *, by_module: dict | None = None) -> list[LayerCall]:
    """Every distinct conv2d/linear/max-pool call one training step of `model` on inputs like
    `example` makes, in order. Found by a forward pass with hooks; layers patch() leaves to torch
    are skipped.
    `by_module`, if given, receives id(module) -> its call's forward problem."""
    calls: list[LayerCall] = []

    def hook(module, args, _output):
        x = args[0]
        grad_input = x.requires_grad
        if isinstance(module, nn.Conv2d):
            if not _patchable_conv(module):
                return  # patch() leaves it to torch (groups, padding modes, unequal strides)
            fwd = conv_problem(x, module.weight, module.stride, module.padding, module.dilation)
            calls.append(LayerCall(kind="conv2d", x_shape=tuple(x.shape), x_requires_grad=grad_input,
                                   dtype=x.dtype, weight_shape=tuple(module.weight.shape),
                                   has_bias=module.bias is not None,
                                   geometry=(fwd.stride, fwd.padding, fwd.dilation),
                                   problems=(fwd, fwd.with_op("conv2d_bwd_data") if grad_input else None,
                                             fwd.with_op("conv2d_bwd_weight"))))
        elif isinstance(module, nn.MaxPool2d):
            if not _patchable_pool(module):
                return  # patch() leaves it to torch (overlapping or padded windows)
            fwd = _pool_problem(tuple(x.shape), _single(module.kernel_size, "kernel_size"), x.dtype)
            calls.append(LayerCall(kind="max_pool2d", x_shape=tuple(x.shape), x_requires_grad=grad_input,
                                   dtype=x.dtype, weight_shape=(), has_bias=False, geometry=(fwd.window,),
                                   problems=(fwd, fwd.with_op("max_pool2d_bwd") if grad_input else None, None)))
        elif isinstance(module, nn.Linear):
            batch, fan_in, fan_out = x.reshape(-1, x.shape[-1]).shape[0], module.in_features, module.out_features
            calls.append(LayerCall(kind="linear", x_shape=(batch, fan_in), x_requires_grad=grad_input,
                                   dtype=x.dtype, weight_shape=tuple(module.weight.shape),
                                   has_bias=module.bias is not None,
                                   problems=(_gemm_problem(batch, fan_out, fan_in, False, True, x.dtype),
                                             _gemm_problem(batch, fan_in, fan_out, False, False, x.dtype)
                                             if grad_input else None,
                                             _gemm_problem(fan_out, fan_in, batch, True, False, x.dtype))))
        else:
            return
        if by_module is not None:
            by_module[id(module)] = calls[-1].problems[0]

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, nn.MaxPool2d))]
    try:
        with dispatch.policy("cached"), torch.enable_grad():
            _plain_forward(model, example)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(calls))


def layer_problems(model: nn.Module, example: torch.Tensor) -> list[Problem]:
    """Every problem a training step of `model` on inputs like `example` dispatches, in order
    (grad-input problems left out where the layer's input needs no gradient, as autograd does)."""
    return problems_of(layer_calls(model, example))


def problems_of(calls: list[LayerCall]) -> list[Problem]:
    """The distinct problems of the calls, in order."""
    return list(dict.fromkeys(p for call in calls for p in call.problems if p is not None))


def run_layer(call: LayerCall, choices: tuple, x: torch.Tensor, w: torch.Tensor,
              b: torch.Tensor | None) -> torch.Tensor:
    """The layer `call` with the given (forward, grad input, grad weight) dispatch choices, as
    the layer API would run it with those choices cached (all torch's: torch's own layer). For
    autotune.layer_check, which times the alternatives the way training calls them."""
    forward, grad_input, grad_weight = call.problems
    plan = _Plan(generation=-1, forward=forward, grad_input=grad_input, grad_weight=grad_weight,
                 forward_choice=choices[0], grad_input_choice=choices[1], grad_weight_choice=choices[2],
                 on_gpu=x.is_cuda)
    if call.kind == "conv2d":
        if plan.torch_only:
            return F.conv2d(x, w, b, *call.geometry)
        return _Conv2dFunction.apply(x, w, b, plan)
    if call.kind == "max_pool2d":
        return F.max_pool2d(x, *call.geometry) if plan.torch_only else _pool(x, plan)
    return F.linear(x, w, b) if plan.torch_only else _LinearFunction.apply(x, w, b, plan)


def _plain_forward(model: nn.Module, example: torch.Tensor) -> None:
    """A forward pass with torch's own ops (the model may be patched: undo it meanwhile)."""
    patched = [(m, type(m)) for m in model.modules() if type(m) in TORCH_CLASS]
    for m, cls in patched:
        m.__class__ = TORCH_CLASS[cls]
    try:
        model(example)
    finally:
        for m, cls in patched:
            m.__class__ = cls
