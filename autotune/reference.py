"""Fresh inputs for a problem and the float64 answer every candidate is checked against."""

from __future__ import annotations

import torch

from autotune.problem import Conv2dProblem, GemmProblem, Pool2dProblem, Problem

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def make_inputs(problem: Problem, *, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random operands in the problem's dtype (uniform in [-1, 1], contiguous). A max-pool
    gradient's y is not random: it is the forward's output, max_pool2d(x)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for shape in problem.input_shapes():
        t = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
        tensors.append(t.to(device=device, dtype=torch_dtype(problem.dtype)))
    if isinstance(problem, Pool2dProblem) and problem.op == "max_pool2d_bwd":
        tensors[1] = torch.nn.functional.max_pool2d(tensors[0], problem.window)
    return tuple(tensors)


def footprint_bytes(problem: Problem) -> int:
    """Memory a search of `problem` holds at once: the float64 draw of each input and its copy in
    the problem's dtype, a candidate's clone of the inputs and its output, and the float64
    reference (inputs upcast, output). Kernel workspaces (im2col, split-K) come on top."""
    size = torch.empty((), dtype=torch_dtype(problem.dtype)).element_size()
    inputs = sum(_numel(shape) for shape in problem.input_shapes())
    output = _numel(problem.output_shape())
    return inputs * (8 + 2 * size + 8) + output * (size + 8)


def _numel(shape) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def empty_output(problem: Problem, *, device: str = "cpu") -> torch.Tensor:
    return torch.empty(problem.output_shape(), device=device, dtype=torch_dtype(problem.dtype))


def reference(problem: Problem, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The exact-as-possible answer: torch in float64 on the CPU."""
    if isinstance(problem, Pool2dProblem):
        return pool_reference(problem, *(t.detach().to(device="cpu", dtype=torch.float64) for t in inputs))
    a, b = (t.detach().to(device="cpu", dtype=torch.float64) for t in inputs)
    if isinstance(problem, GemmProblem):
        return (a.T if problem.trans_a else a) @ (b.T if problem.trans_b else b)
    return conv_reference(problem, a, b)


def conv_reference(problem: Conv2dProblem, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    geometry = dict(stride=problem.stride, padding=problem.padding, dilation=problem.dilation)
    if problem.op == "conv2d":
        return torch.nn.functional.conv2d(a, b, **geometry)
    if problem.op == "conv2d_bwd_data":
        return torch.nn.grad.conv2d_input(problem.x_shape, b, a, **geometry)
    return torch.nn.grad.conv2d_weight(a, problem.w_shape, b, **geometry)


def pool_reference(problem: Pool2dProblem, x: torch.Tensor, y: torch.Tensor | None = None,
                   dy: torch.Tensor | None = None) -> torch.Tensor:
    """torch's max_pool2d (float64 keeps every value exactly, so the maxima and ties are the same
    elements as in the problem's dtype); the gradient through torch's autograd."""
    if problem.op == "max_pool2d":
        return torch.nn.functional.max_pool2d(x, problem.window)
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (dx,) = torch.autograd.grad(torch.nn.functional.max_pool2d(x, problem.window), x, dy)
    return dx
