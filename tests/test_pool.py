"""Max-pooling as a tuned op: the NumPy and compiled (Numba) kernels, the layer and patching against torch (the
`correctness` tests compare exactly: pooling moves values, it computes none)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autotune
from autotune.problem import Pool2dProblem
from autotune.reference import empty_output, make_inputs
from kernels import numpy_pool

try:
    from kernels import numba_pool
except ImportError:  # the GPU machines' image has no Numba
    numba_pool = None

CASES = [  # (n, c, h, w, window, dtype)
    (16, 6, 28, 28, 2, torch.float32),  # LeNet's first pool at batch 16
    (3, 4, 11, 13, 3, torch.float32),  # rows and columns past the last window (floor)
    (2, 3, 10, 10, 2, torch.float64),
    (1, 1, 5, 4, 1, torch.float32),  # a 1x1 window copies
]


def _torch(x, window, dy):
    x = x.detach().clone().requires_grad_(True)
    y = F.max_pool2d(x, window)
    y.backward(dy)
    return y.detach(), x.grad


# Every kernel of ours with its forward knobs: the NumPy kernel in both orders, the loop nest.
KERNELS = [*((numpy_pool, {"order": order}) for order in numpy_pool.ORDERS),
           *([(numba_pool, {})] if numba_pool is not None else [])]


def _ours(x, window, dy, kernel):
    module, knobs = kernel
    n, c, h, w = x.shape
    dtype = str(x.dtype).split(".")[-1]
    forward = Pool2dProblem(op="max_pool2d", n=n, c=c, h=h, w=w, window=window, dtype=dtype)
    y = empty_output(forward)
    module.forward(forward, knobs, (x,), y)
    backward = forward.with_op("max_pool2d_bwd")
    dx = empty_output(backward)
    module.backward(backward, {}, (x, y, dy), dx)
    return y, dx


def _same(a, b):  # equal, NaN where NaN
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: "-".join([k[0].__name__.split(".")[-1], *k[1].values()]))
@pytest.mark.parametrize("special", ["finite", "nan", "inf", "nan_grad", "signed_zeros"])
def test_correctness_cpu_max_pool_matches_torch_exactly_with_ties_and_nans(case, kernel, special):
    n, c, h, w, window, dtype = case
    gen = torch.Generator().manual_seed(0)
    # After a ReLU most windows tie at zero: the gradient must go to the element torch picks
    # (the first in row-major order). "nan": some windows hold NaNs (torch's maximum is NaN
    # there and the gradient goes to the window's last NaN); "inf": an infinite gradient, which
    # the finite-only path must not turn into NaNs (inf * 0); "nan_grad": a NaN gradient goes to
    # torch's element only; "signed_zeros": -0.0 and 0.0 tie, the gradient goes to the first.
    x = F.relu(torch.randn(n, c, h, w, generator=gen, dtype=dtype))
    x[0, 0, : min(2, h), : 2 * window] = 0.5  # whole windows tied at a positive value
    dy = torch.randn(*y_shape(x, window), generator=gen, dtype=dtype)
    if special == "nan":
        x[0, 0, 0, : 2 * window] = float("nan")
        x[-1, -1, -1, -1] = float("nan")
    elif special == "inf":
        dy[0, 0, 0, 0], dy[-1, -1, -1, -1] = float("inf"), -float("inf")
    elif special == "nan_grad":
        dy[0, 0, 0, 0] = dy[-1, -1, -1, -1] = float("nan")
    elif special == "signed_zeros":
        x[x == 0] = -0.0
        x[1::2, :, ::2, ::2] = 0.0
    y_ref, dx_ref = _torch(x, window, dy)
    y, dx = _ours(x, window, dy, kernel)
    assert _same(y, y_ref) and _same(dx, dx_ref)
    assert (dx != 0).sum() <= dy.numel()  # one element per window at most


def y_shape(x, window):
    n, c, h, w = x.shape
    return n, c, h // window, w // window


def test_gradient_inputs_are_the_forwards_output():
    # A search times the gradient on make_inputs(problem): its y must be max_pool2d(x), or the
    # kernel (which finds each maximum by equality with y) would have nothing to find.
    problem = Pool2dProblem(op="max_pool2d_bwd", n=2, c=3, h=8, w=8, window=2)
    x, y, dy = make_inputs(problem)
    assert torch.equal(y, F.max_pool2d(x, 2)) and dy.shape == y.shape


@pytest.fixture(params=["cached", "benchmark"])
def _policy(request, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with autotune.policy(request.param, cache_dir=tmp_path):
            yield request.param


def test_correctness_max_pool_layer_matches_torch(_policy):
    from autotune import dispatch

    gen = torch.Generator().manual_seed(1)
    x = F.relu(torch.randn(4, 6, 12, 12, generator=gen)).requires_grad_(True)
    dy = torch.randn(4, 6, 6, 6, generator=gen)
    y = autotune.max_pool2d(x, 2)
    (dx,) = torch.autograd.grad(y, x, dy)
    y_ref, dx_ref = _torch(x, 2, dy)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    if _policy == "benchmark":  # the benchmark measured our kernels for both products
        chosen = {p.op: choice.spec.algorithm for p, choice in dispatch.chosen().items()}
        assert {"max_pool2d", "max_pool2d_bwd"} <= set(chosen)


def test_patch_swaps_only_non_overlapping_unpadded_pools():
    model = nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2), nn.MaxPool2d(2, padding=1),
                          nn.MaxPool2d(2, ceil_mode=True))
    autotune.patch(model)
    assert [type(m) for m in model] == [autotune.MaxPool2d, nn.MaxPool2d, nn.MaxPool2d, nn.MaxPool2d]
    with pytest.raises(ValueError, match="non-overlapping"):
        autotune.max_pool2d(torch.randn(1, 1, 4, 4), 3, stride=2)


def test_search_max_pool_measures_checked_kernels(tmp_path):
    problem = autotune.parse_problem("max_pool2d_bwd", "6x28x28", batch=4)
    entry = autotune.search(problem, device="cpu", trials=3, cache=autotune.Cache(tmp_path))
    assert entry.algorithm in {"vendor", "strided", "loop_nest"} and entry.median_ms > 0
    assert entry.vendor_ms is not None and entry.best_own is not None
    assert entry.best_own.algorithm in {"strided", "loop_nest"}

