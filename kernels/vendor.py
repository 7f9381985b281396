"""torch's own ops as candidates: oneDNN/MKL on the CPU, cuDNN/cuBLAS on a GPU.

Like PyTorch Inductor choosing between ATen and its own templates, the tuner weighs the vendor
library beside our kernels, so a tuned choice never loses to the default and the report shows
where our own kernels win.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from autotune.registry import KernelSpec

DEFAULTS = {"allow_tf32": False}


def _geometry(problem):
    return dict(stride=problem.stride, padding=problem.padding, dilation=problem.dilation)


_UNCHANGED = contextlib.nullcontext()


def tf32_as(knobs, tensor):
    """TF32 as the config says while torch's op launches, then the caller's flags back.

    A tuned config says it (default off: IEEE float32, as our float32 kernels compute by default;
    cuDNN allows TF32 by default, which would fail a float32 tolerance). Knobs without
    allow_tf32 (an untuned layer's torch op) leave the user's flags as they are. The flags are
    global: left set, they would change every later op of the user's model. They are read when
    a kernel is launched, so restoring them after the (asynchronous) call is enough. They matter
    on Ampere+ GPUs only, so the CPU path gets a shared no-op context: it is inside every timed
    call of torch's op, and a generator-based context manager cost ~1.3 µs there, a third of a
    small fc GEMM's time, charged to torch in every comparison.
    """
    if not tensor.is_cuda or "allow_tf32" not in knobs:
        return _UNCHANGED
    return _Tf32(bool(knobs["allow_tf32"]))


class _Tf32:
    def __init__(self, allow: bool):
        self.allow = allow

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.allow

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
        return False


def conv2d(problem, knobs, inputs, out):
    x, w = inputs
    with tf32_as(knobs, x):
        return F.conv2d(x, w, **_geometry(problem))


def conv2d_bwd_data(problem, knobs, inputs, out):
    dy, w = inputs
    with tf32_as(knobs, dy):
        return torch.ops.aten.convolution_backward(
            dy, dy.new_empty(problem.x_shape), w, None,
            (problem.stride,) * 2, (problem.padding,) * 2, (problem.dilation,) * 2,
            False, (0, 0), 1, (True, False, False),
        )[0]


def conv2d_bwd_weight(problem, knobs, inputs, out):
    x, dy = inputs
    with tf32_as(knobs, x):
        return torch.ops.aten.convolution_backward(
            dy, x, x.new_empty(problem.w_shape), None,
            (problem.stride,) * 2, (problem.padding,) * 2, (problem.dilation,) * 2,
            False, (0, 0), 1, (False, True, False),
        )[1]


def gemm(problem, knobs, inputs, out):
    a, b = inputs
    with tf32_as(knobs, a):
        return torch.matmul(a.T if problem.trans_a else a, b.T if problem.trans_b else b, out=out)


def conv2d_bias(problem, x, w, b, knobs=None):
    """Forward with the bias added inside torch's conv (the layer's fused fast path); knobs as
    the layer's choice (None: the user's TF32 flags)."""
    with tf32_as(knobs or {}, x):
        return F.conv2d(x, w, b, **_geometry(problem))


def conv2d_backward(problem, x, w, dy, mask, knobs=None):
    """dx, dw, db in one convolution_backward call, as torch's autograd computes them; entries
    whose mask is False come back as None."""
    with tf32_as(knobs or {}, x):
        return torch.ops.aten.convolution_backward(
            dy, x, w, [problem.k] if mask[2] else None,
            (problem.stride,) * 2, (problem.padding,) * 2, (problem.dilation,) * 2,
            False, (0, 0), 1, mask,
        )


def max_pool2d(problem, knobs, inputs, out):
    (x,) = inputs
    return F.max_pool2d(x, problem.window)


def max_pool2d_bwd(problem, knobs, inputs, out):
    """torch's gradient needs the argmax indices of its forward: computed here from x, as a layer
    that ran another forward kernel would have to (torch's own layer keeps them from its forward)."""
    x, _, dy = inputs
    k = [problem.window] * 2
    _, indices = torch.ops.aten.max_pool2d_with_indices(x, k, k)
    return torch.ops.aten.max_pool2d_with_indices_backward(dy, x, k, k, [0, 0], [1, 1], False, indices)


def check(problem, knobs):
    if knobs.get("allow_tf32") and problem.dtype != "float32":
        return "TF32 applies to float32 problems only"
    return None


def seeds(problem):
    """cuDNN/cuBLAS in TF32 right after the defaults: a float32 search on a GPU may pick our TF32
    kernels, so it must weigh them against torch's TF32 op, not only its IEEE one (on an H200,
    cuBLAS's TF32 4096^3 GEMM took 0.38 ms against 2.70 ms IEEE and our TF32 kernel's 0.84)."""
    return [{"allow_tf32": True}] if problem.dtype == "float32" else []


KERNELS = [
    KernelSpec(op=op, algorithm="vendor", backend="torch", run=run, defaults=DEFAULTS, allocates=True,
               check=check, seeds=seeds, gpu_only_knobs=("allow_tf32",))
    for op, run in (("conv2d", conv2d), ("conv2d_bwd_data", conv2d_bwd_data),
                    ("conv2d_bwd_weight", conv2d_bwd_weight), ("gemm", gemm))
] + [
    KernelSpec(op=op, algorithm="vendor", backend="torch", run=run, allocates=True)
    for op, run in (("max_pool2d", max_pool2d), ("max_pool2d_bwd", max_pool2d_bwd))
]
