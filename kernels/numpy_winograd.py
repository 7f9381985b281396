"""Winograd minimal filtering for stride-1 3x3 convolutions (Lavin & Gray 2015), in NumPy.

F(m x m, 3 x 3) computes an m x m output tile from an (m+2) x (m+2) input tile with (m+2)^2
multiplications instead of 9·m^2: 2.25x fewer for F(2x2), 4x fewer for F(4x4). Per tile,

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A,

summed over input channels before the output transform, so the channel sum is (m+2)^2
independent GEMMs of (K x C)·(C x tiles): the filter transform U = G g Gᵀ (once per call), the
input transform V = Bᵀ d B (a pass over the input), one batched matmul, the output transform.

The price is accuracy: the transforms' coefficients grow with m (F(4x4) has 1/24 and 8), so
rounding errors grow too. Max relative error against float64 on random inputs in [-1, 1]
(LeNet- and ResNet-sized layers, C 3-64, measured here):
    float32 F(2x2) 1.6e-7 to 3.4e-7,  F(4x4) 1.8e-6 to 7.2e-6  (tolerance 1.0e-5 to 4.8e-5)
    float64 F(2x2) 4e-16 to 1.1e-15,  F(4x4) 4.8e-15 to 1.1e-14
So F(4x4) costs 10-20x F(2x2)'s error and still passes float32's tolerance by 4-7x; with
float16's 10-bit mantissa (~1e-3 per rounding) it would not. The rule in `check`
(TILES_BY_DTYPE): float32 and float64 may use either tile, float16 only F(2x2); bfloat16 none.
The `tile` knob picks m; every candidate is still verified against float64 before it is timed.

conv2d_bwd_data at stride 1 is the same correlation on dy padded by R-1-padding with the
filters flipped and their channel axes swapped, so it reuses the forward kernel.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

from autotune.registry import KernelSpec

# Transform matrices (Bᵀ, G, Aᵀ) per output tile size m.
_TRANSFORMS = {
    2: (
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64),
    ),
    4: (
        np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                 dtype=np.float64),
    ),
}
TILES = tuple(_TRANSFORMS)
# Which output tiles each dtype's precision can afford (the measured errors above).
TILES_BY_DTYPE = {"float64": (2, 4), "float32": (2, 4), "float16": (2,), "bfloat16": ()}


def _apply(matrix: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """matrix (rows x cols) applied along `axis` of x, as sums of scaled slices: the transform
    matrices are tiny and sparse with small coefficients, so a few vectorised axpys over the
    whole tensor beat a batched matmul of 4x4 or 6x6 matrices by far."""
    x = np.moveaxis(x, axis, 0)
    out = np.zeros((matrix.shape[0], *x.shape[1:]), x.dtype)
    for i, row in enumerate(matrix):
        for j, coef in enumerate(row):
            if coef == 1:
                out[i] += x[j]
            elif coef == -1:
                out[i] -= x[j]
            elif coef != 0:
                out[i] += coef * x[j]
    return np.moveaxis(out, 0, axis)


def winograd_correlation(x: np.ndarray, w: np.ndarray, pad: int, m: int) -> np.ndarray:
    """Stride-1 3x3 cross-correlation of x (N, C, H, W) with w (K, C, 3, 3), zero padding `pad`."""
    bt, g, at = (t.astype(x.dtype) for t in _TRANSFORMS[m])
    n, c, h, wd = x.shape
    k = w.shape[0]
    p, q = h + 2 * pad - 2, wd + 2 * pad - 2
    tp, tq = -(-p // m), -(-q // m)  # tiles per column / row (ceil)
    a = m + 2
    # Zero-pad to whole tiles, channel-major: tile (t, u) reads rows t·m .. t·m+a-1.
    xp = np.zeros((c, n, tp * m + 2, tq * m + 2), x.dtype)
    xp[:, :, pad:pad + h, pad:pad + wd] = x.transpose(1, 0, 2, 3)
    sc, sn, sh, sw = xp.strides
    tiles = as_strided(xp, shape=(a, a, c, n, tp, tq), strides=(sh, sw, sc, sn, sh * m, sw * m),
                       writeable=False)
    v = _apply(bt, _apply(bt, tiles, 0), 1).reshape(a * a, c, n * tp * tq)  # Bᵀ d B
    u = _apply(g, _apply(g, w.transpose(2, 3, 0, 1), 0), 1).reshape(a * a, k, c)  # G g Gᵀ
    mm = np.matmul(u, v).reshape(a, a, k, n, tp, tq)  # the channel sum: a*a GEMMs
    y = _apply(at, _apply(at, mm, 0), 1)  # Aᵀ M A: (m, m, K, N, tp, tq)
    y = y.transpose(3, 2, 4, 0, 5, 1).reshape(n, k, tp * m, tq * m)
    return y[:, :, :p, :q]


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy()


def conv2d_winograd(problem, knobs, inputs, out):
    x, w = inputs
    y = winograd_correlation(_np(x), _np(w), problem.padding, knobs["tile"])
    out.numpy()[...] = y
    return out


def bwd_data_winograd(problem, knobs, inputs, out):
    dy, w = inputs
    flipped = np.ascontiguousarray(_np(w)[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # (C, K, 3, 3)
    dx = winograd_correlation(_np(dy), flipped, problem.r - 1 - problem.padding, knobs["tile"])
    out.numpy()[...] = dx
    return out


def supports(problem) -> str | None:
    if (problem.r, problem.s) != (3, 3) or problem.stride != 1 or problem.dilation != 1:
        return "Winograd F(m, 3x3) needs 3x3 filters, stride 1 and no dilation"
    if problem.padding > 2:
        return "padding above 2 would make grad-input's padding negative"
    return None


def check(problem, knobs) -> str | None:
    tile = knobs.get("tile")
    if tile not in TILES:
        return f"tile must be one of {TILES}, got {tile!r}"
    allowed = TILES_BY_DTYPE.get(problem.dtype, ())
    if tile not in allowed:
        return f"F({tile}x{tile}, 3x3) is too inexact for {problem.dtype} (allowed tiles: {allowed})"
    return None


KERNELS = [
    KernelSpec(op="conv2d", algorithm="winograd", backend="numpy", run=conv2d_winograd,
               supports=supports, check=check, defaults={"tile": 2}),
    KernelSpec(op="conv2d_bwd_data", algorithm="winograd", backend="numpy", run=bwd_data_winograd,
               supports=supports, check=check, defaults={"tile": 2}),
]
