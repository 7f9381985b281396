"""CPU max-pooling as compiled loop nests (Numba): forward and gradient in one pass each.

NumPy pools in several whole-array passes over strided views (kernels/numpy_pool.py), and its
gradient, six or more of them, lost to torch's index-based one in LeNet's training step. A
compiled loop nest reads each window once and writes every output once. On LeNet's 16x6x28x28
activation (this CPU, one thread, alone): forward ~20 us against torch's ~430 (~310 on real
images, whose branches predict better) and NumPy's ~45; forward with indices ~75 us; gradient
~70 us against NumPy's ~210 (torch's from its indices: ~30).

- forward `loop_nest`: each window's maximum with max(), which the compiler vectorises, and a flag
  for NaNs: max() ignores them, so an input holding one is pooled again by torch's rule (a later
  element wins only if greater or NaN: NaN windows give NaN). Ties of -0.0 and 0.0 may keep
  either sign (they compare equal; torch keeps the first).
- gradient `loop_nest`: from x, the forward's output y and dy, dy goes to the first element of
  each window equal to y (torch's first maximum in row-major order), as selects, so an infinite
  or NaN dy lands as torch's does. Windows whose maximum is NaN send their gradient to the last
  NaN (torch's rule, where NaN compares unequal): when y holds a NaN, the indices of torch's
  argmax loop (as forward_with_indices writes them) place the gradient instead.
- forward_with_indices: the forward that also writes torch's int64 argmax indices, so a layer
  can follow our forward with torch's own gradient (autotune/nn.py: the output is a gather at
  the indices, whose native backward scatters dy to them).

2x2 windows (LeNet's) have their own loops: the compiler keeps the four loads in registers and
vectorises across windows; other windows run the general loops.
"""

from __future__ import annotations

import numpy as np

from autotune.registry import KernelSpec
from kernels.numpy_buffers import as_numpy


def _jit(loops):
    """Compile `loops` with Numba on its first call. Importing Numba takes ~0.5 s, and every
    search worker loads this module with the registry whether it pools or not, so the import
    waits until a pool runs. cache=True keeps the compiled code beside this file (or in
    NUMBA_CACHE_DIR): only the first run on a machine compiles (~1 s a dtype). nogil: a
    worker's timer thread keeps running."""
    compiled = None

    def run(*args):
        nonlocal compiled
        if compiled is None:
            import numba

            compiled = numba.njit(cache=True, nogil=True)(loops)
        return compiled(*args)

    return run


@_jit
def _forward_2x2(x, y):
    """Each window's maximum; True if a NaN was seen (max() ignores NaN: see _forward_exact)."""
    planes, rows, cols = y.shape
    nan = False
    for c in range(planes):
        for p in range(rows):
            top, bottom, out = x[c, 2 * p], x[c, 2 * p + 1], y[c, p]
            for q in range(cols):
                a, b, d, e = top[2 * q], top[2 * q + 1], bottom[2 * q], bottom[2 * q + 1]
                out[q] = max(max(a, b), max(d, e))
                nan |= (a != a) | (b != b) | (d != d) | (e != e)  # | not or: no branch
    return nan


@_jit
def _forward(x, y, k):
    planes, rows, cols = y.shape
    nan = False
    for c in range(planes):
        for p in range(rows):
            for q in range(cols):
                best = x[c, p * k, q * k]
                for i in range(k):
                    row = x[c, p * k + i]
                    for j in range(k):
                        value = row[q * k + j]
                        best = max(best, value)
                        nan |= value != value
                y[c, p, q] = best
    return nan


@_jit
def _forward_exact(x, y, k):
    """torch's rule: a later element replaces the maximum when greater or NaN (NaN windows give
    NaN). The fast loops' fallback when the input holds NaNs."""
    planes, rows, cols = y.shape
    for c in range(planes):
        for p in range(rows):
            for q in range(cols):
                best = x[c, p * k, q * k]
                for i in range(k):
                    for j in range(k):
                        value = x[c, p * k + i, q * k + j]
                        best = value if (value > best) | (value != value) else best
                y[c, p, q] = best


@_jit
def _forward_indices_2x2(x, y, indices):
    planes, rows, cols = y.shape
    width = x.shape[2]
    for c in range(planes):
        for p in range(rows):
            top, bottom, out, at = x[c, 2 * p], x[c, 2 * p + 1], y[c, p], indices[c, p]
            corner = 2 * p * width
            for q in range(cols):
                # Selects, not branches: the compiler vectorises across windows.
                a, b, d, e = top[2 * q], top[2 * q + 1], bottom[2 * q], bottom[2 * q + 1]
                take = (b > a) | (b != b)
                best = b if take else a
                where = 1 if take else 0
                take = (d > best) | (d != d)
                best = d if take else best
                where = width if take else where
                take = (e > best) | (e != e)
                out[q] = e if take else best
                at[q] = corner + 2 * q + (width + 1 if take else where)


@_jit
def _forward_indices(x, y, indices, k):
    planes, rows, cols = y.shape
    width = x.shape[2]
    for c in range(planes):
        for p in range(rows):
            for q in range(cols):
                best, where = x[c, p * k, q * k], p * k * width + q * k
                for i in range(k):
                    row = x[c, p * k + i]
                    for j in range(k):
                        value = row[q * k + j]
                        if (value > best) or (value != value):
                            best, where = value, (p * k + i) * width + q * k + j
                y[c, p, q], indices[c, p, q] = best, where


@_jit
def _gradient_2x2(x, y, dy, dx):
    """dy to each window's first element equal to its maximum y (y holds no NaN)."""
    planes, rows, cols = y.shape
    zero = dx.dtype.type(0)
    for c in range(planes):
        for p in range(rows):
            top, bottom = x[c, 2 * p], x[c, 2 * p + 1]
            d_top, d_bottom, most, grad = dx[c, 2 * p], dx[c, 2 * p + 1], y[c, p], dy[c, p]
            for q in range(cols):
                m, g = most[q], grad[q]
                # & and | (not `and`/`or`, which branch): the compiler vectorises the selects.
                first = top[2 * q] == m
                second = (top[2 * q + 1] == m) & (not first)
                third = (bottom[2 * q] == m) & (not (first | second))
                d_top[2 * q] = g if first else zero
                d_top[2 * q + 1] = g if second else zero
                d_bottom[2 * q] = g if third else zero
                d_bottom[2 * q + 1] = zero if (first | second | third) else g


@_jit
def _gradient(x, y, dy, dx, k):
    """Any window size; y holds no NaN."""
    planes, rows, cols = y.shape
    zero = dx.dtype.type(0)
    for c in range(planes):
        for p in range(rows):
            for q in range(cols):
                m, g, taken = y[c, p, q], dy[c, p, q], False
                for i in range(k):
                    for j in range(k):
                        hit = (x[c, p * k + i, q * k + j] == m) & (not taken)
                        dx[c, p * k + i, q * k + j] = g if hit else zero
                        taken = taken | hit


@_jit
def _scatter(dy, indices, dx):
    """dx = 0 but dy at each window's argmax (flat indices within a plane, as torch's)."""
    planes, rows, cols = dy.shape
    width = dx.shape[2]
    dx[:] = 0
    for c in range(planes):
        for p in range(rows):
            for q in range(cols):
                at = indices[c, p, q]
                dx[c, at // width, at % width] = dy[c, p, q]


def supports(problem) -> str | None:
    if problem.dtype not in ("float32", "float64"):
        return f"compiled pooling runs float32/float64, not {problem.dtype}"
    return None


def _planes(problem, t) -> np.ndarray:
    """(N, C, H, W) tensor or array -> (N*C, H, W) array view: the loops see one plane per channel."""
    return (t if isinstance(t, np.ndarray) else as_numpy(t)).reshape(problem.n * problem.c, *t.shape[2:])


def forward(problem, knobs, inputs, out):
    (x,) = inputs
    xs, y = _planes(problem, x), _planes(problem, out)
    nan = _forward_2x2(xs, y) if problem.window == 2 else _forward(xs, y, problem.window)
    if nan:
        _forward_exact(xs, y, problem.window)
    return out


def forward_with_indices(problem, knobs, inputs, out, indices):
    """The forward that also writes torch's argmax indices (int64, flat within each plane, as
    max_pool2d_with_indices returns them) into `indices`: torch's own gradient can then follow
    our forward without finding the maxima again. `out` and `indices` may be tensors or NumPy
    arrays (the layer passes arrays: cheaper to make)."""
    (x,) = inputs
    xs, y, at = _planes(problem, x), _planes(problem, out), _planes(problem, indices)
    if problem.window == 2:
        _forward_indices_2x2(xs, y, at)
    else:
        _forward_indices(xs, y, at, problem.window)
    return out


def backward(problem, knobs, inputs, out):
    x, y, dy = inputs
    k, p, q = problem.window, problem.p, problem.q
    xs, ys, dys, dx = _planes(problem, x), _planes(problem, y), _planes(problem, dy), _planes(problem, out)
    if problem.h != p * k or problem.w != q * k:
        dx.fill(0)  # rows and columns no window covers (floor mode) get no gradient
    if np.isnan(ys).any():  # torch's argmax loop replayed: a NaN window's gradient goes to its last NaN
        indices = np.empty(ys.shape, np.int64)
        _forward_indices(xs, np.empty_like(ys), indices, k)
        _scatter(dys, indices, dx)
    elif k == 2:
        _gradient_2x2(xs, ys, dys, dx)
    else:
        _gradient(xs, ys, dys, dx, k)
    return out


KERNELS = [
    KernelSpec(op="max_pool2d", algorithm="loop_nest", backend="numba", run=forward, supports=supports,
               run_with_indices=forward_with_indices),
    KernelSpec(op="max_pool2d_bwd", algorithm="loop_nest", backend="numba", run=backward, supports=supports),
]
