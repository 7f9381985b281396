"""Misbehaving kernels for tests/test_worker.py, found by the worker through `kernel_modules`.

Nothing here is registered: only a worker told to import this module can see these kernels.
"""

import os
import time

from autotune import KernelSpec


def _exit(problem, knobs, inputs, out):
    # What a CUDA context killed by an illegal memory access looks like from outside: the
    # process is gone without a Python exception.
    os._exit(13)


def _sleep(problem, knobs, inputs, out):
    time.sleep(knobs["seconds"])
    return out


KERNELS = [
    KernelSpec(op="gemm", algorithm="exits", backend="torch", run=_exit),
    KernelSpec(op="gemm", algorithm="sleeps", backend="torch", run=_sleep, defaults={"seconds": 60}),
]


def _illegal_address(problem, knobs, inputs, out):
    # A store far outside any allocation: CUDA reports an illegal address, and the error sticks
    # to the process's context (GPU only).
    import triton
    import triton.language as tl

    @triton.jit
    def wild_store(ptr):
        tl.store(ptr + (1 << 40), 1.0)

    wild_store[(1,)](out)
    return out


KERNELS.append(KernelSpec(op="gemm", algorithm="illegal_address", backend="triton", run=_illegal_address))
