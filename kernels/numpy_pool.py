"""CPU max-pooling in NumPy over non-overlapping windows: forward and gradient.

torch's CPU max_pool2d on NCHW tensors walks every output with its window and records the argmax
index (int64) for autograd: on LeNet's 16x6x28x28 activation it took ~0.5 ms on one thread here,
more than the convolution before it. With stride = window, pooling is a few elementwise maxima
over strided views of the input, which NumPy runs as flat SIMD loops (~10x faster there).

- forward `strided`: `order` picks which axis is reduced first. "rows_first" takes the maximum of
  whole input rows (long contiguous runs) into a half-height buffer, then of its column pairs;
  "cols_first" reduces neighbouring columns first (stride-2 reads over the full input).
- gradient `strided`: from x, the forward's output y and dy (no int64 index tensor: the layer
  saves x and y), torch's rule: dy goes to the first maximum of each window in row-major order,
  so the all-zero windows after a ReLU send their gradient where torch's does. In two stages
  with 0/1 float masks: the window's first row whose maximum over the window's columns is the
  window's maximum, then that row's first maximal column, three passes (mask, take, rest) per
  row and column but the last, ~0.21 ms for LeNet's 16x6x28x28 activation alone (torch's
  index-based gradient ~0.06 ms; its forward ~0.5 ms, ours ~0.05). Where dy is not finite
  (0 * inf is NaN, not 0) or y is not (a NaN window, whose gradient torch gives to the last
  NaN), the equality rule instead: per window offset, the elements equal to the maximum that no
  earlier offset claimed (~4x slower).
"""

from __future__ import annotations

import numpy as np

from autotune.registry import KernelSpec
from kernels.numpy_buffers import as_numpy as _np
from kernels.numpy_buffers import scratch

ORDERS = ("rows_first", "cols_first")


def supports(problem) -> str | None:
    if problem.dtype not in ("float32", "float64"):
        return f"NumPy pooling runs float32/float64, not {problem.dtype}"
    return None


def _max_into(parts, out: np.ndarray) -> np.ndarray:
    np.maximum(parts[0], parts[1], out=out) if len(parts) > 1 else np.copyto(out, parts[0])
    for part in parts[2:]:
        np.maximum(out, part, out=out)
    return out


def forward(problem, knobs, inputs, out):
    (x,) = (_np(t) for t in inputs)
    y = _np(out)
    k, p, q = problem.window, problem.p, problem.q
    if k == 1:
        np.copyto(y, x)
        return out
    if knobs["order"] == "rows_first":
        rows = scratch("pool rows", (problem.n, problem.c, p, q * k), x.dtype)
        _max_into([x[:, :, i:i + p * k:k, :q * k] for i in range(k)], rows)
        _max_into([rows[:, :, :, j::k] for j in range(k)], y)
    else:
        cols = scratch("pool cols", (problem.n, problem.c, p * k, q), x.dtype)
        _max_into([x[:, :, :p * k, j:j + q * k:k] for j in range(k)], cols)
        _max_into([cols[:, :, i::k, :] for i in range(k)], y)
    return out


def _windows(a: np.ndarray, k: int, p: int, q: int) -> list[np.ndarray]:
    """The k·k strided (N, C, P, Q) views of `a`, one per window offset (i, j) in row-major
    order; rows and columns past the last whole window are left out (torch's floor mode)."""
    return [a[:, :, i:i + p * k:k, j:j + q * k:k] for i in range(k) for j in range(k)]


def backward(problem, knobs, inputs, out):
    x, y, dy = (_np(t) for t in inputs)
    dx = _np(out)
    k, p, q = problem.window, problem.p, problem.q
    if problem.h != p * k or problem.w != q * k:
        dx.fill(0)  # rows and columns no window covers get no gradient
    if k == 1:
        np.copyto(dx, dy)
    elif _finite(dy, y):
        _split_gradient(x, y, dy, dx, k, p, q)
    else:  # NaN windows, infinite gradients (inf * 0 is not 0) or maxima: the equality rule
        _equality_gradient(x, y, dy, dx, k, p, q)
    return out


def _finite(*arrays: np.ndarray) -> bool:
    with np.errstate(invalid="ignore", over="ignore"):  # a sum is finite only if every term is
        return all(np.isfinite(np.sum(a)) for a in arrays)


def _split_gradient(x, y, dy, dx, k: int, p: int, q: int) -> None:
    """torch's rule in two stages with 0/1 float masks (NumPy's bool-times-float is ~5x slower
    than float-times-float): dy goes to the window's first row whose maximum over the window's
    columns is the window's maximum, then within that row to its first maximal column. For
    finite dy only (dy * 0 must be 0)."""
    n, c = x.shape[:2]
    columns = [x[:, :, :p * k, j:j + q * k:k] for j in range(k)]
    row_max = _max_into(columns, scratch("pool cols", (n, c, p * k, q), x.dtype))
    d_row_max = scratch("pool dcols", row_max.shape, x.dtype)
    _first_max([row_max[:, :, i::k] for i in range(k)], y, dy, [d_row_max[:, :, i::k] for i in range(k)])
    _first_max(columns, row_max, d_row_max, [dx[:, :, :p * k, j:j + q * k:k] for j in range(k)])


def _first_max(parts, top, grad, targets) -> None:
    """targets[i] = grad where parts[i] is the first of the parts equal to `top` (their maximum),
    else 0: three passes a part (mask, take, what is left)."""
    mask = scratch("pool mask", top.shape, top.dtype)
    left = grad  # the gradient no earlier part took
    for i, (part, target) in enumerate(zip(parts[:-1], targets[:-1], strict=False)):
        np.greater_equal(part, top, out=mask, casting="unsafe")  # part <= top: 1.0 where equal
        np.multiply(left, mask, out=target)
        rest = targets[-1] if i == len(parts) - 2 else scratch("pool left", top.shape, top.dtype)
        left = np.subtract(left, target, out=rest)


def _equality_gradient(x, y, dy, dx, k: int, p: int, q: int) -> None:
    """For each window offset in row-major order, dy goes to the elements equal to their window's
    maximum that no earlier offset claimed (torch's rule: the first maximum); a window holding a
    NaN sends it to its last NaN. Exact for any values, ~3x slower than _split_gradient."""
    shape = y.shape
    views, targets = _windows(x, k, p, q), _windows(dx, k, p, q)
    hit = scratch("pool hit", shape, np.bool_)
    taken = scratch("pool taken", shape, np.bool_)
    last = len(views) - 1
    for index, (view, target) in enumerate(zip(views, targets, strict=True)):
        np.equal(view, y, out=hit)
        if index:
            np.greater(hit, taken, out=hit)  # hit and not taken
        np.copyto(target, 0)
        np.copyto(target, dy, where=hit)
        if index == 0:
            np.copyto(taken, hit)
        elif index < last:
            np.logical_or(taken, hit, out=taken)
    nan = np.isnan(y)
    if nan.any():  # no element equals a NaN maximum; torch gives its gradient to the window's
        _nan_windows(views, targets, dy, nan)  # last NaN


def _nan_windows(views, targets, dy: np.ndarray, nan: np.ndarray) -> None:
    left = nan.copy()
    for view, target in zip(reversed(views), reversed(targets), strict=True):
        here = np.isnan(view) & left
        target[here] = dy[here]
        left &= ~here


def check(problem, knobs) -> str | None:
    if knobs["order"] not in ORDERS:
        return f"order={knobs['order']!r}: choose one of {ORDERS}"
    return None


KERNELS = [
    KernelSpec(op="max_pool2d", algorithm="strided", backend="numpy", run=forward, supports=supports,
               check=check, defaults={"order": "rows_first"}),
    KernelSpec(op="max_pool2d_bwd", algorithm="strided", backend="numpy", run=backward, supports=supports),
]
