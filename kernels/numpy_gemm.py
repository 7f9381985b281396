"""CPU GEMM in NumPy: a blocked kernel with tunable tiles and loop order, and one BLAS call.

`blocked` splits C = op(A)·op(B) into BLOCK_M x BLOCK_N tiles of C and BLOCK_K slabs of the
reduction, and multiplies tile by tile with np.matmul into views of the output. The knobs trade
Python overhead (many small tiles) against cache reuse (tiles that stay in L1/L2), and the loop
order decides which operand's tile stays hot between consecutive products. `blas` is the baseline
that hands the whole product to the BLAS library at once.

Transposed operands are strided views (A.T, B.T), never copies: np.matmul passes a transposed
tile to BLAS as a transpose flag.
"""

from __future__ import annotations

import itertools

import numpy as np

from autotune.registry import KernelSpec
from kernels.numpy_buffers import as_numpy

DTYPES = ("float32", "float64")
LOOP_ORDERS = ("mnk", "mkn", "nmk", "nkm", "kmn", "knm")
BLAS_CALLS = ("matmul", "dot")
BLOCK_KNOBS = {"BLOCK_M": "m", "BLOCK_N": "n", "BLOCK_K": "k"}


def _operands(problem, inputs, out):
    """op(A) as (M, K), op(B) as (K, N) and C as (M, N): NumPy views sharing torch's memory."""
    # Spelled out, not a generator: at batch 1 these conversions cost more than the product.
    a = as_numpy(inputs[0])
    b = as_numpy(inputs[1])
    return (a.T if problem.trans_a else a), (b.T if problem.trans_b else b), out.numpy()


def supports(problem) -> str | None:
    if problem.dtype not in DTYPES:
        # NumPy has no bfloat16, and its float16 matmul does not use BLAS (it would be a slow
        # loop, not a candidate worth timing).
        return f"numpy GEMM runs {' and '.join(DTYPES)} only, not {problem.dtype}"
    return None


# --- blas -------------------------------------------------------------------------------------


def blas(problem, knobs, inputs, out):
    a, b, c = _operands(problem, inputs, out)
    # np.dot hands a 2-D product to BLAS directly; np.matmul goes through the ufunc machinery
    # (~0.4 us more a call) and, for an outer product (K=1), misses BLAS: 86 us for 120x400x1
    # against np.dot's 15. np.matmul is faster on some transposed operands (120x400x16 tn: 12
    # against 16 us), so which call is a knob.
    if knobs["call"] == "dot":
        try:
            np.dot(a, b, out=c)
            return out
        except ValueError:  # np.dot writes only into a C-contiguous out (asking costs ~0.1 us)
            pass
    np.matmul(a, b, out=c)
    return out


def check_blas(problem, knobs) -> str | None:
    if knobs.get("call") not in BLAS_CALLS:
        return f"call must be one of {', '.join(BLAS_CALLS)}, got {knobs.get('call')!r}"
    return None


# --- blocked ----------------------------------------------------------------------------------


def check_blocked(problem, knobs) -> str | None:
    """Reject malformed knobs, and tiles so large that half the tile would give the same tiling.

    A block of at least twice its dimension covers the dimension in one tile, exactly as the
    block half its size does: timing both would measure the same computation twice. For a
    dimension smaller than every listed block, the `blas` algorithm is the one-tile candidate.
    """
    order = knobs.get("loop_order")
    if order not in LOOP_ORDERS:
        return f"loop_order must be one of {', '.join(LOOP_ORDERS)}, got {order!r}"
    for knob, dim_name in BLOCK_KNOBS.items():
        block = knobs.get(knob)
        if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
            return f"{knob} must be a positive integer, got {block!r}"
        dim = getattr(problem, dim_name)
        if block >= 2 * dim:
            return (f"{knob}={block} is at least twice {dim_name.upper()}={dim}: "
                    f"{knob}={block // 2} already covers it in one tile")
    return None


def _tiles(size: int, block: int) -> list[slice]:
    """The blocks of one dimension; the last one is ragged when `block` does not divide `size`."""
    return [slice(start, min(start + block, size)) for start in range(0, size, block)]


def blocked(problem, knobs, inputs, out):
    a, b, c = _operands(problem, inputs, out)
    tiles = {
        "m": _tiles(problem.m, knobs["BLOCK_M"]),
        "n": _tiles(problem.n, knobs["BLOCK_N"]),
        "k": _tiles(problem.k, knobs["BLOCK_K"]),
    }
    order = knobs["loop_order"]
    # Partial products of the later k slabs land here before being added into C; preallocated
    # once so the inner loop allocates nothing.
    scratch = np.empty((knobs["BLOCK_M"], knobs["BLOCK_N"]), dtype=c.dtype)
    first_k = tiles["k"][0]
    # itertools.product nests the loops in the order given (first letter outermost). For any
    # fixed (m, n) tile its k slabs still come in ascending order, so the first slab always
    # initialises the tile before the others accumulate into it.
    for blocks in itertools.product(*(tiles[axis] for axis in order)):
        at = dict(zip(order, blocks, strict=True))
        ms, ns, ks = at["m"], at["n"], at["k"]
        c_tile = c[ms, ns]
        if ks is first_k:
            np.matmul(a[ms, ks], b[ks, ns], out=c_tile)
        else:
            partial = scratch[: c_tile.shape[0], : c_tile.shape[1]]
            np.matmul(a[ms, ks], b[ks, ns], out=partial)
            np.add(c_tile, partial, out=c_tile)
    return out


KERNELS = [
    KernelSpec(
        op="gemm", algorithm="blocked", backend="numpy", run=blocked, supports=supports,
        check=check_blocked,
        # Large square tiles with k innermost: few Python iterations, each a BLAS call big
        # enough to run near peak, and the C tile stays in cache while its k slabs add up.
        defaults={"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 256, "loop_order": "mnk"},
    ),
    KernelSpec(op="gemm", algorithm="blas", backend="numpy", run=blas, supports=supports, check=check_blas,
               defaults={"call": "matmul"}),
]
