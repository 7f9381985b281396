"""torch's own ops as candidates: oneDNN/MKL on the CPU, cuDNN/cuBLAS on a GPU.

Like PyTorch Inductor choosing between ATen and its own templates, the tuner weighs the vendor
library beside our kernels, so a tuned choice never loses to the default and the report shows
where our own kernels win.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import KernelSpec


def _geometry(problem):
    return dict(stride=problem.stride, padding=problem.padding, dilation=problem.dilation)


def _tf32(knobs):
    """Set TF32 for this call only where the config asks (it matters on Ampere+ GPUs)."""
    allow = bool(knobs.get("allow_tf32", False))
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def conv2d(problem, knobs, inputs, out):
    _tf32(knobs)
    x, w = inputs
    return F.conv2d(x, w, **_geometry(problem))


def conv2d_bwd_data(problem, knobs, inputs, out):
    _tf32(knobs)
    dy, w = inputs
    return torch.ops.aten.convolution_backward(
        dy, dy.new_empty(problem.x_shape), w, None,
        (problem.stride,) * 2, (problem.padding,) * 2, (problem.dilation,) * 2,
        False, (0, 0), 1, (True, False, False),
    )[0]


def conv2d_bwd_weight(problem, knobs, inputs, out):
    _tf32(knobs)
    x, dy = inputs
    return torch.ops.aten.convolution_backward(
        dy, x, x.new_empty(problem.w_shape), None,
        (problem.stride,) * 2, (problem.padding,) * 2, (problem.dilation,) * 2,
        False, (0, 0), 1, (False, True, False),
    )[1]


def gemm(problem, knobs, inputs, out):
    _tf32(knobs)
    a, b = inputs
    return torch.matmul(a.T if problem.trans_a else a, b.T if problem.trans_b else b, out=out)


KERNELS = [
    KernelSpec(op="conv2d", algorithm="vendor", backend="torch", run=conv2d),
    KernelSpec(op="conv2d_bwd_data", algorithm="vendor", backend="torch", run=conv2d_bwd_data),
    KernelSpec(op="conv2d_bwd_weight", algorithm="vendor", backend="torch", run=conv2d_bwd_weight),
    KernelSpec(op="gemm", algorithm="vendor", backend="torch", run=gemm),
]
