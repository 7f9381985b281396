"""Per-call cost of run-time dispatch on a cache hit (a benchmark, never a test).

Three ways to run the same already chosen kernel on the same tensors, timed interleaved:
  direct    the kernel called by hand (allocating its output, as any call must);
  dispatch  autotune.nn.run(problem, ...): memo lookup, profiler check, output, kernel;
  layer     autotune.conv2d / autotune.linear: problem lookup, torch.autograd.Function, dispatch.
"dispatch - direct" is what run-time selection costs (target on the 2-core dev CPU: <= 10 µs);
"layer - direct" adds torch's own autograd.Function machinery, paid by any custom layer.

    python benchmarks/dispatch_overhead.py
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

import autotune
from autotune import dispatch
from autotune.nn import conv_problem, run
from autotune.problem import GemmProblem


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def compare(name: str, variants: dict, calls: int, rounds: int = 7) -> dict[str, float]:
    for fn in variants.values():
        fn()
    samples = {key: [] for key in variants}
    for _ in range(rounds):
        for key, fn in variants.items():
            samples[key].append(per_call_us(fn, calls))
    med = {key: statistics.median(v) for key, v in samples.items()}
    print(f"{name:<26} {med['direct']:9.2f} {med['dispatch']:9.2f} {med['layer']:9.2f}"
          f" {med['dispatch'] - med['direct']:10.2f} {med['layer'] - med['direct']:10.2f}")
    return med


def direct(problem, choice, inputs):
    out = None if choice.spec.allocates else torch.empty(problem.output_shape())
    return choice.spec.run(problem, choice.knobs, inputs, out)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 6, 14, 14)
    w = torch.randn(16, 6, 5, 5, requires_grad=True)
    a = torch.randn(1, 84)
    fc = torch.randn(10, 84, requires_grad=True)
    with tempfile.TemporaryDirectory() as tmp, autotune.policy("benchmark", cache_dir=tmp):
        conv = conv_problem(x, w, 1, 0, 1)
        gemm = GemmProblem(m=1, n=10, k=84, trans_b=True)
        conv_choice = dispatch.select(conv, "cpu", (x, w.detach()))
        gemm_choice = dispatch.select(gemm, "cpu", (a, fc.detach()))
        wd, fcd = w.detach(), fc.detach()
        print(f"{'batch 1, cache hit':<26} {'direct':>9} {'dispatch':>9} {'layer':>9}"
              f" {'dispatch-':>10} {'layer-':>10}   (µs per call)")
        results = [
            compare(f"conv2d [{conv_choice.spec.algorithm}]",
                    {"direct": lambda: direct(conv, conv_choice, (x, wd)),
                     "dispatch": lambda: run(conv, x, wd),
                     "layer": lambda: autotune.conv2d(x, w)}, calls=300),
            compare(f"linear [{gemm_choice.spec.algorithm}]",
                    {"direct": lambda: direct(gemm, gemm_choice, (a, fcd)),
                     "dispatch": lambda: run(gemm, a, fcd),
                     "layer": lambda: autotune.linear(a, fc)}, calls=3000),
        ]
    dispatch_cost = statistics.median(r["dispatch"] - r["direct"] for r in results)
    layer_cost = statistics.median(r["layer"] - r["direct"] for r in results)
    print(f"\ndispatch overhead: {dispatch_cost:.2f} µs per call (target <= 10 µs); "
          f"whole layer API incl. torch.autograd.Function: {layer_cost:.2f} µs")


if __name__ == "__main__":
    main()
