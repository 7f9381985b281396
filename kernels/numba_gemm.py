"""CPU GEMM as a compiled loop nest (Numba) called with the tensors' addresses: for small products.

A linear layer at batch 1 multiplies a row by a matrix: 840 to 48,000 multiply-adds, a
microsecond of arithmetic. NumPy's BLAS call (kernels/numpy_gemm.py) first needs NumPy views of
the three tensors, 1-2 us each, so it took 2-3x torch's time however fast its BLAS. This kernel
passes each tensor's address and strides to compiled loops (kernels/numba_gemm_loops.py): no
array is built on the Python side, and the call costs about what torch's own does. The loops
are simple (no cache blocking, no packing), so BLAS stays ahead once a product is large; the
tuner times both and keeps what wins for each shape.

Knob `unroll` (1 or 4): how many products share one pass over memory. In the rows form (op(B)'s
rows contiguous) 4 reduction steps update C's row in one pass instead of four; in the dots form
(A·Bᵀ, a linear layer's forward) 4 columns of C share each load of A's row.
"""

from __future__ import annotations

import torch

from autotune.registry import KernelSpec

DTYPES = ("float32", "float64")
UNROLLS = (1, 4)
_compiled = {}


def _loops(dtype: torch.dtype):
    """The compiled entry point for `dtype`, imported (and, on a new machine, compiled) once."""
    from kernels import numba_gemm_loops

    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TypeError(f"the compiled GEMM runs {' and '.join(DTYPES)} only, not {name}")
    fn = _compiled[dtype] = getattr(numba_gemm_loops, f"gemm_{name}")
    return fn


def supports(problem) -> str | None:
    if problem.dtype not in DTYPES:
        return f"compiled GEMM runs {' and '.join(DTYPES)} only, not {problem.dtype}"
    return None


def check(problem, knobs) -> str | None:
    if knobs.get("unroll") not in UNROLLS:
        return f"unroll must be one of {', '.join(map(str, UNROLLS))}, got {knobs.get('unroll')!r}"
    return None


def loop_nest(problem, knobs, inputs, out):
    a, b = inputs
    # The loops read and write raw memory, so every extent, stride and the dtype come from the
    # tensors themselves, and a mismatch among them is refused before anything is touched.
    m, k = a.shape
    kb, n = b.shape
    sam, sak = a.stride()
    sbk, sbn = b.stride()
    if problem.trans_a:  # op(A) = Aᵀ: a transpose only swaps the extents and the strides
        m, k, sam, sak = k, m, sak, sam
    if problem.trans_b:
        kb, n, sbk, sbn = n, kb, sbn, sbk
    dtype = out.dtype
    if k != kb or out.shape != (m, n) or a.dtype != dtype or b.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"compiled GEMM: {tuple(a.shape)} {a.dtype} by {tuple(b.shape)} {b.dtype} into "
                         f"{tuple(out.shape)} {dtype}{'' if out.is_contiguous() else ' (strided)'} is not "
                         f"{problem.describe()} with a contiguous output")
    (_compiled.get(dtype) or _loops(dtype))(a.data_ptr(), b.data_ptr(), out.data_ptr(), m, n, k,
                                            sam, sak, sbk, sbn, knobs["unroll"])
    return out


KERNELS = [
    KernelSpec(op="gemm", algorithm="loop_nest", backend="numba", run=loop_nest, supports=supports,
               check=check,
               # Four products a pass: fewer loads and stores of C's row, at any size.
               defaults={"unroll": 4}),
]
