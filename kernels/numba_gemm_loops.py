"""The compiled loops behind kernels/numba_gemm.py (imported on its first call: importing Numba
takes ~0.5 s, which a search worker that never runs a small GEMM should not pay).

Operands arrive as raw addresses and element strides, not arrays: turning a torch tensor into a
NumPy array costs 1-2 us (three of them are most of a batch-1 fc layer's GEMM), reading its
address and strides ~0.1 us each. Each function wraps the addresses as 1-D arrays that end at
the last element the strides reach, and hands them to the loops, which Numba compiles once per
dtype (cache=True: once per machine).

Three loop forms, by which operand axis is contiguous:
- rows (op(B)'s rows contiguous, sbn == 1): C[i, :] += A[i, p] * B[p, :], `unroll` reduction
  steps per pass over C's row (a pass loads and stores the row once for `unroll` products);
- dots (op(A)'s rows and op(B)'s columns contiguous: A·Bᵀ, a linear layer's forward): each
  C[i, j] is a dot product over k, `unroll` columns of C at a time sharing the loads of A's row;
- any other strides: a plain triple loop (correct, slow: the tuner will prefer BLAS there).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import carray, types
from numba.core import cgutils
from numba.extending import intrinsic

_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False)


@intrinsic
def _pointer(typingctx, address):
    """An integer address as a void pointer, for carray (Numba's documented recipe)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


# contract: a*b + c as one FMA (one rounding fewer, the order of the sum unchanged).
@numba.njit(fastmath={"contract"}, **_OPTIONS)
def _rows(a, b, c, m, n, k, sam, sak, sbk, unroll):
    for i in range(m):
        row = c[i * n:(i + 1) * n]
        base = i * sam
        row[:] = 0
        p = 0
        if unroll == 4:
            while p + 4 <= k:
                a0, a1 = a[base + p * sak], a[base + (p + 1) * sak]
                a2, a3 = a[base + (p + 2) * sak], a[base + (p + 3) * sak]
                b0, b1 = b[p * sbk:p * sbk + n], b[(p + 1) * sbk:(p + 1) * sbk + n]
                b2, b3 = b[(p + 2) * sbk:(p + 2) * sbk + n], b[(p + 3) * sbk:(p + 3) * sbk + n]
                for j in range(n):
                    row[j] += a0 * b0[j] + a1 * b1[j] + a2 * b2[j] + a3 * b3[j]
                p += 4
        while p < k:
            ap = a[base + p * sak]
            bp = b[p * sbk:p * sbk + n]
            for j in range(n):
                row[j] += ap * bp[j]
            p += 1


# reassoc too: a dot product vectorises only if its sum may be split into lanes (the order is
# then fixed by the compiled code, the same on every call).
@numba.njit(fastmath={"contract", "reassoc"}, **_OPTIONS)
def _dots(a, b, c, m, n, k, sam, sbn, unroll, zero):
    for i in range(m):
        ar = a[i * sam:i * sam + k]
        j = 0
        if unroll == 4:
            while j + 4 <= n:
                b0, b1 = b[j * sbn:j * sbn + k], b[(j + 1) * sbn:(j + 1) * sbn + k]
                b2, b3 = b[(j + 2) * sbn:(j + 2) * sbn + k], b[(j + 3) * sbn:(j + 3) * sbn + k]
                s0 = s1 = s2 = s3 = zero
                for p in range(k):
                    x = ar[p]
                    s0 += x * b0[p]
                    s1 += x * b1[p]
                    s2 += x * b2[p]
                    s3 += x * b3[p]
                c[i * n + j], c[i * n + j + 1], c[i * n + j + 2], c[i * n + j + 3] = s0, s1, s2, s3
                j += 4
        while j < n:
            bj = b[j * sbn:j * sbn + k]
            s = zero
            for p in range(k):
                s += ar[p] * bj[p]
            c[i * n + j] = s
            j += 1


@numba.njit(fastmath={"contract"}, **_OPTIONS)
def _plain(a, b, c, m, n, k, sam, sak, sbk, sbn, zero):
    for i in range(m):
        for j in range(n):
            s = zero
            for p in range(k):
                s += a[i * sam + p * sak] * b[p * sbk + j * sbn]
            c[i * n + j] = s


@numba.njit(**_OPTIONS)
def _gemm(a, b, c, m, n, k, sam, sak, sbk, sbn, unroll, zero):
    # `zero` is a 0 of the operands' dtype: the sums start from it, so they stay in that dtype
    # (float32 * 0, an integer, would make them float64: slower, and not the float32 product).
    if sbn == 1:
        _rows(a, b, c, m, n, k, sam, sak, sbk, unroll)
    elif sak == 1 and sbk == 1:
        _dots(a, b, c, m, n, k, sam, sbn, unroll, zero)
    else:
        _plain(a, b, c, m, n, k, sam, sak, sbk, sbn, zero)


def _entry(dtype):
    """The entry point for one dtype: carray's dtype must be known when the function compiles
    (a closure's variables are constants to Numba, and part of its cache key)."""
    @numba.njit(**_OPTIONS)
    def gemm(pa, pb, pc, m, n, k, sam, sak, sbk, sbn, unroll):
        a = carray(_pointer(pa), ((m - 1) * sam + (k - 1) * sak + 1,), dtype=dtype)
        b = carray(_pointer(pb), ((k - 1) * sbk + (n - 1) * sbn + 1,), dtype=dtype)
        c = carray(_pointer(pc), (m * n,), dtype=dtype)
        _gemm(a, b, c, m, n, k, sam, sak, sbk, sbn, unroll, dtype(0))

    return gemm


gemm_float32 = _entry(np.float32)
gemm_float64 = _entry(np.float64)
