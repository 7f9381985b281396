"""A plugin GEMM kernel that sleeps before it computes, for the multi-worker tests
(tests/test_many_workers.py): `AUTOTUNE_PLUGINS=sleepy_kernels` with tests/ on PYTHONPATH.

It sleeps $SLEEPY_SECONDS (default 0) and then computes the right answer with torch.matmul, so a
test can hold one worker inside a candidate long enough to kill it there. Its one knob,
`variant`, does nothing but make ten distinct configs (tests/sleepy_kernels.toml).
"""

import os
import time

import torch

from autotune import KernelSpec


def _sleepy(problem, knobs, inputs, out):
    time.sleep(float(os.environ.get("SLEEPY_SECONDS", "0")))
    a, b = inputs
    return torch.matmul(a.T if problem.trans_a else a, b.T if problem.trans_b else b, out=out)


KERNELS = [KernelSpec(op="gemm", algorithm="sleepy", backend="numpy", run=_sleepy, defaults={"variant": 0})]
