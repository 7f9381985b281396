"""Adadelta's update as one compiled pass over a flat CPU buffer (Numba), for FlatAdadelta.

torch's single-tensor Adadelta is ~10 whole-buffer ops a step, each reading and writing the
buffer again: over LeNet's 61,706 parameters ~110-135 µs of torch ops a step on one core. One
loop over the elements reads gradient, parameter and both running averages once and writes three
of them: ~50 µs (this CPU, one thread, measured while other work ran).

The arithmetic is torch's, in its order (square_avg = square_avg * rho + (1 - rho) * g * g;
delta = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g; acc_delta likewise; p += -lr * delta),
but not bit for bit: torch rounds each op's result to the dtype and its compiled kernels may fuse
a multiply and an add (FMA), so the two differ by an ulp or so per step
(tests/test_flat_params.py bounds it). `error_model="numpy"` lets the compiler vectorise the
division (Numba's default error model checks each one for zero, a branch in the loop).
"""

from __future__ import annotations

import numpy as np

_compiled = None


def _loop(p, g, square_avg, acc_delta, rho, one_minus_rho, eps, neg_lr):
    for i in range(p.shape[0]):
        gi = g[i]
        s = square_avg[i] * rho + one_minus_rho * gi * gi
        square_avg[i] = s
        d = np.sqrt(acc_delta[i] + eps) / np.sqrt(s + eps) * gi
        acc_delta[i] = acc_delta[i] * rho + one_minus_rho * d * d
        p[i] = p[i] + neg_lr * d


def update(p, grad, square_avg, acc_delta, *, rho: float, eps: float, lr: float) -> None:
    """One Adadelta step in place on 1-D contiguous CPU tensors of one float dtype."""
    global _compiled
    if _compiled is None:
        import numba  # ~0.5 s to import: only once a fused step runs

        _compiled = numba.njit(cache=True, nogil=True, error_model="numpy")(_loop)
    scalar = np.float32 if p.dtype.itemsize == 4 else np.float64
    _compiled(p.detach().numpy(), grad.detach().numpy(), square_avg.numpy(), acc_delta.numpy(),
              scalar(rho), scalar(1 - rho), scalar(eps), scalar(-lr))
