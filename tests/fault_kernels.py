"""A plugin module of misbehaving GEMM kernels, for the fault-injection tests (tests/test_faults.py).

Used as a user would use a plugin: `AUTOTUNE_PLUGINS=fault_kernels` with tests/ on PYTHONPATH, so
the registry loads it in the CLI's process and again in the isolated worker, where each kernel
misbehaves in its own way. Every algorithm starts with `fault_`; the test maps each to the trial
status the search must record.
"""

import ctypes
import os
import resource
import time

import numpy as np

from autotune import KernelSpec


def _raises(problem, knobs, inputs, out):
    raise RuntimeError("injected fault: this kernel always raises")


def _wrong(problem, knobs, inputs, out):
    out.fill_(1.0)  # every element written, none of them right
    return out


def _nan(problem, knobs, inputs, out):
    out.fill_(float("nan"))
    return out


def _hangs(problem, knobs, inputs, out):
    time.sleep(3600)
    return out


def _exits(problem, knobs, inputs, out):
    os._exit(7)


def _segfault(problem, knobs, inputs, out):
    # No core file for an intended crash (the limit is the worker's own; it dies next line).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.string_at(0)
    return out


def _oom(problem, knobs, inputs, out):
    # 10**16 bytes (8.9 PiB) is beyond any machine's memory and beyond the 128 TiB of a 47-bit
    # user address space, so the allocation fails up front under every overcommit mode (no OOM
    # killer): numpy raises MemoryError.
    np.empty(10**16, dtype=np.uint8)
    return out


FAULTS = {
    "fault_raises": _raises,
    "fault_wrong": _wrong,
    "fault_nan": _nan,
    "fault_hangs": _hangs,
    "fault_exits": _exits,
    "fault_segfault": _segfault,
    "fault_oom": _oom,
}

KERNELS = [KernelSpec(op="gemm", algorithm=name, backend="numpy", run=run) for name, run in FAULTS.items()]
