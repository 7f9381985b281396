"""Winograd against torch's op and our im2col/col2im on ResNet-18's 3x3 layers (a benchmark).

For conv2d and conv2d_bwd_data at batch 1 and 16: torch's op, Winograd F(2x2,3x3) and F(4x4,3x3),
and im2col_gemm (forward) or gemm_col2im (grad input), each timed on the same inputs, median of
3 interleaved rounds, one torch thread. Prints ms and torch / Winograd ratios (> 1: ours faster).

    .venv/bin/python benchmarks/winograd.py
"""

from __future__ import annotations

import statistics

import torch

from autotune import measure, registry
from autotune.problem import Conv2dProblem
from autotune.reference import empty_output, make_inputs

LAYERS = ((6, 14, 16), (64, 56, 64), (128, 28, 128), (256, 14, 256))  # (C, H=W, K)


def main() -> None:
    torch.set_num_threads(1)
    for c, h, k in LAYERS:
        for n in (1, 16):
            for op in ("conv2d", "conv2d_bwd_data"):
                problem = Conv2dProblem(op=op, n=n, c=c, h=h, w=h, k=k, r=3, s=3, padding=1)
                inputs, out = make_inputs(problem), empty_output(problem)
                gemm = "im2col_gemm" if op == "conv2d" else "gemm_col2im"
                contenders = {"torch": ("vendor", {}), "wino2": ("winograd", {"tile": 2}),
                              "wino4": ("winograd", {"tile": 4}), gemm: (gemm, {})}
                times = {name: [] for name in contenders}
                for _ in range(3):
                    for name, (algorithm, knobs) in contenders.items():
                        spec = registry.get(op, algorithm, "cpu")
                        full = spec.full_knobs(problem, knobs)
                        times[name].append(measure.bench(lambda s=spec, f=full, p=problem, i=inputs, o=out: s.run(p, f, i, o),
                                                         device="cpu", rep_ms=60).median)
                med = {name: statistics.median(t) for name, t in times.items()}
                print(f"{op:<16} N{n:<3} C{c:<4} {h}x{h}  " + "  ".join(f"{nm} {ms:.3f}" for nm, ms in med.items())
                      + f"   torch/wino2 {med['torch'] / med['wino2']:.2f}  torch/wino4 {med['torch'] / med['wino4']:.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
