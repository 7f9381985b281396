"""Per-call cost of run-time dispatch on a cache hit (a benchmark, never a test).

Times `autotune.conv2d` / `autotune.linear` (problem construction, memo lookup, profiler label,
output allocation, kernel) against calling the already chosen kernel directly on the same
tensors, interleaved, and prints the difference per call. Target on the 2-core dev CPU: <= 10 µs.

    python benchmarks/dispatch_overhead.py
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

import autotune
from autotune import dispatch
from autotune.nn import conv_problem
from autotune.problem import GemmProblem


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def compare(name, through_autotune, direct, calls=2000, rounds=7):
    through_autotune()
    direct()
    pairs = [(per_call_us(through_autotune, calls), per_call_us(direct, calls)) for _ in range(rounds)]
    wrapped = statistics.median(p[0] for p in pairs)
    raw = statistics.median(p[1] for p in pairs)
    overhead = statistics.median(p[0] - p[1] for p in pairs)
    print(f"{name:<28} {wrapped:9.2f} {raw:9.2f} {overhead:9.2f}")
    return overhead


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 6, 14, 14)
    w = torch.randn(16, 6, 5, 5)
    a = torch.randn(1, 84)
    fc = torch.randn(10, 84)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), autotune.policy("benchmark", cache_dir=tmp):
        autotune.conv2d(x, w)
        autotune.linear(a, fc)
        conv = conv_problem(x, w, 1, 0, 1)
        gemm = GemmProblem(m=1, n=10, k=84, trans_b=True)
        conv_choice = dispatch.select(conv, "cpu")
        gemm_choice = dispatch.select(gemm, "cpu")
        conv_out = torch.empty(conv.output_shape())
        gemm_out = torch.empty(gemm.output_shape())
        print(f"{'call (batch 1, cache hit)':<28} {'autotune':>9} {'direct':>9} {'overhead':>9}  (µs per call)")
        results = [
            compare(f"conv2d [{conv_choice.spec.algorithm}]", lambda: autotune.conv2d(x, w),
                    lambda: conv_choice.run(conv, (x, w), conv_out), calls=500),
            compare(f"linear [{gemm_choice.spec.algorithm}]", lambda: autotune.linear(a, fc),
                    lambda: gemm_choice.run(gemm, (a, fc), gemm_out)),
        ]
    print(f"\nmedian dispatch overhead: {statistics.median(results):.2f} µs per call (target <= 10 µs)")


if __name__ == "__main__":
    main()
