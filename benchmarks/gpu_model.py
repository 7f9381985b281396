"""GPU-like search landscapes: the Triton GEMM and conv spaces priced by a model of an H100.

There is no GPU here, so the search efficiency benchmark replays the Triton spaces against times
from this model. Validity is the kernels' own check() (kernels/triton_gemm.py, triton_conv.py:
tile minimum, warps per tile, accumulator registers, shared memory, empty splits, oversized conv
tiles), so the invalid region is the one the tuner meets on a real GPU. The model is first
principles, not a fit; it aims at the *shape* a real table has (a few knobs that matter a lot,
several that barely matter, wide plateaus near the optimum, cliffs at resource limits), not at
exact times.

H100 SXM (H100_* constants): 132 SMs at 1.755 GHz; per SM and clock 4096 dense fp16/bf16
tensor-core flops (wgmma), 2048 tf32, 256 fp32 FMA flops; 228 KiB shared memory, 64K registers,
64 warps and 32 CTAs per SM; HBM3 2.9 TB/s achievable; L2 50 MiB (40 MiB usable for reuse) at
~10 TB/s to the SMs; shared memory 128 B/clock/SM; ~700 cycles global latency.

One program (CTA) computes a BLOCK_M x BLOCK_N tile over its K slice in BLOCK_K steps. Per step:
  - tensor-core cycles: 2*BM*BN*BK / peak. wgmma (Hopper) needs num_warps >= 4 and a 64-row
    warpgroup tile; otherwise mma.sync at 60% of the peak, using only min(warps, 4) of the SM's
    four sub-partitions. float32 "ieee" runs on FMA units (no tensor cores).
  - shared-memory cycles: each warpgroup (wgmma) or warp (mma.sync, FMA) reads its slice of A and
    B from shared memory: (tile_m + tile_n) * BK * bytes / 128. Small warp tiles starve the MMA.
  - L2 -> SM bytes: (BM + BN) * BK * bytes per step, at the SM's share of L2 bandwidth (small
    tiles re-read A and B many times: they run at L2 speed, not at tensor-core speed).
  - latency: with num_stages - 1 loads in flight, a step takes at least 700 / (stages - 1)
    cycles (num_stages = 1: latency plus compute, nothing overlaps).
  Concurrent CTAs on one SM (occupancy: shared memory per CTA, warps, registers = accumulators +
  operand fragments + 32, CTA cap) share its tensor cores, shared memory and L2 port, and hide
  each other's latency: a step of `occ` CTAs takes max(occ*mma, occ*smem, occ*l2, latency).
Wave quantization: the busiest SM runs ceil(programs / 132) CTAs, `occ` at a time; the last round
is shorter when it is partly empty. Each CTA adds an epilogue (store of its tile, ~500 cycles).
DRAM: compulsory reads of A and B and the write of C, times re-reads when a panel falls out of L2:
the launch order (GROUP_M, program_order) decides how many tile rows share a B panel while it is
resident (rows in flight = max(GROUP_M, concurrent CTAs / tile columns)); nothing is re-read when
both operands fit in L2. Kernel time = max(compute, DRAM) + 10% of the smaller (imperfect
overlap) + 2.5 us launch. split_k > 1 writes float32 partial tiles and launches a reduction pass
(its bytes at DRAM speed, plus its own launch).
Implicit-GEMM convolution: the same tile model on the op's GEMM (M, N, reduction), plus the
gather of the A tile (address arithmetic per element: "flat" does a div/mod per element, the tap
orders one per step; ALU cycles at 128 ops/clock/SM) and, for the tap orders, reduction steps
padded per tap (R*S*ceil(C/BK) steps instead of ceil(C*R*S/BK)).
Finally every config gets a fixed multiplicative noise, exp(0.025 * z) with z ~ N(0, 1) drawn from
a hash of the config (seeded): two configs the model prices the same differ by a few percent,
the way re-measured times on a real GPU do.
"""

from __future__ import annotations

import hashlib
import math
import os
import random

from autotune.problem import Conv2dProblem, GemmProblem
from autotune.space import Param, Space

SMS = 132
CLOCK = 1.755e9
PEAK = {"tensor16": 4096, "tf32": 2048, "fma32": 256}  # flops per clock per SM
SMEM_PER_SM = 228 * 1024
REGS_PER_SM = 65536
WARPS_PER_SM = 64
CTAS_PER_SM = 32
HBM = 2.9e12
L2_BYTES = 40 * 2 ** 20
L2_PER_SM_CLOCK = 10e12 / SMS / CLOCK  # ~43 bytes per clock per SM
SMEM_BW = 128
LATENCY = 700
LAUNCH_S = 2.5e-6
EPILOGUE = 500
NOISE = 0.025

# The landscapes (name -> builder arguments). The GEMM spaces are sub-spaces of
# search_spaces/triton_gemm.toml: the whole space has 33k (float16) to 54k (float32) valid
# configs, whose 15% (5-8k measurements per search) no one runs and Optuna's model-based samplers
# cannot replay in minutes. The sub-spaces keep every kind of knob (tiles, launch order, split-K,
# warps, stages, precision) with fewer values, ~2k valid configs each; GEMM_LARGE (6.6k valid in
# float16) is the one the sampler overhead is measured on at 800 configs. The conv spaces are
# search_spaces/triton_conv.toml's, whole.
GEMM_LARGE = {
    "BLOCK_M": [32, 64, 128, 256], "BLOCK_N": [32, 64, 128, 256], "BLOCK_K": [16, 32, 64, 128],
    "GROUP_M": [1, 8], "program_order": ["row_major", "column_major"], "split_k": [1, 2, 4],
    "num_warps": [2, 4, 8], "num_stages": [2, 3, 4, 5], "input_precision": ["ieee", "tf32"],
}
GEMM_FP16 = {**GEMM_LARGE, "split_k": [1, 4], "num_warps": [4, 8], "num_stages": [2, 3, 4]}
GEMM_FP32 = {**GEMM_FP16, "program_order": ["row_major"]}
RESNET_CONV = dict(n=32, c=64, h=56, w=56, k=64, r=3, s=3, padding=1, dtype="float16")
LANDSCAPES = {
    "h100-gemm-4096-fp16": ("gemm", GemmProblem(m=4096, n=4096, k=4096, dtype="float16"), GEMM_FP16),
    "h100-gemm-1024-fp32": ("gemm", GemmProblem(m=1024, n=1024, k=1024, dtype="float32"), GEMM_FP32),
    "h100-conv2d-resnet": ("conv", Conv2dProblem(op="conv2d", **RESNET_CONV), None),
    "h100-conv2d-bwd-weight-resnet": ("conv", Conv2dProblem(op="conv2d_bwd_weight", **RESNET_CONV), None),
    # Memory-bound (K = 128: writing C dominates): a wide plateau of configs at the DRAM roof.
    "h100-gemm-8192x8192x128-fp16": ("gemm", GemmProblem(m=8192, n=8192, k=128, dtype="float16"), GEMM_FP16),
    "h100-gemm-4096-fp16-large": ("gemm", GemmProblem(m=4096, n=4096, k=4096, dtype="float16"), GEMM_LARGE),
}


def _noise(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    z = random.Random(int.from_bytes(digest[:8], "little")).gauss(0.0, 1.0)
    return math.exp(NOISE * z)


def _split(elements: int, parts: int, least: int) -> tuple[int, int]:
    """A warp(group) tile of `elements / parts` outputs as square as powers of two allow."""
    per = max(1, elements // parts)
    tm = max(least, 2 ** math.ceil(math.log2(per) / 2))
    return tm, max(1, per // tm)


def tile_time(*, m: int, n: int, red: int, steps: int, bm: int, bn: int, bk: int, warps: int,
              stages: int, split: int, elt: int, out_elt: int, precision: str,
              alu_per_step: float = 0.0, a_bytes_factor: float = 1.0) -> tuple[float, int]:
    """Seconds of the main kernel's compute side (waves of CTAs), and its CTA count."""
    unit = "fma32" if precision == "ieee" and elt == 4 else ("tf32" if elt == 4 else "tensor16")
    wgmma = unit != "fma32" and warps >= 4 and bm >= 64
    peak = PEAK[unit] * (1.0 if wgmma or unit == "fma32" else 0.6)
    flops = 2 * bm * bn * bk
    if wgmma:
        groups = warps // 4
        tm, tn = _split(bm * bn, groups, 64)
        smem = groups * (tm + tn) * bk * elt / SMEM_BW
        mma = flops / peak
    else:
        tm, tn = _split(bm * bn, warps if unit != "fma32" else warps * 32, 1)
        readers = warps if unit != "fma32" else warps * 32
        # FMA: each thread reads its rows of A and columns of B, a warp's 32 lanes share a bank row.
        smem = readers * (tm + tn) * bk * elt / SMEM_BW / (32 if unit == "fma32" else 1) * 4
        mma = flops / peak / (min(warps, 4) / 4 if unit != "fma32" else 1)
    l2 = ((bm * a_bytes_factor) + bn) * bk * elt / L2_PER_SM_CLOCK
    alu = alu_per_step
    # Occupancy.
    smem_cta = stages * (bm + bn) * bk * elt + 1024
    acc_regs = bm * bn / (32 * warps)
    regs = min(255, 8 * math.ceil((acc_regs + (16 if wgmma else 32) + 32) / 8))
    occ = max(1, min(SMEM_PER_SM // smem_cta, WARPS_PER_SM // warps,
                     REGS_PER_SM // (regs * 32 * warps), CTAS_PER_SM))
    tiles = math.ceil(m / bm) * math.ceil(n / bn)
    programs = tiles * split
    per_sm = math.ceil(programs / SMS)
    total = 0.0
    left = per_sm
    while left > 0:
        j = min(occ, left)
        latency = LATENCY + mma + smem if stages == 1 else LATENCY / (stages - 1)
        step = max(j * (mma + alu), j * smem, j * l2, latency)
        total += steps * step + EPILOGUE * (1 + (bm * bn * (4 if split > 1 else out_elt)) / 4096 / 16)
        left -= j
    return total / CLOCK, programs


def dram_time(*, m: int, n: int, k: int, bm: int, bn: int, split: int, group: int, column_major: bool,
              programs: int, occ_guess: int, elt: int, out_elt: int) -> float:
    a_bytes, b_bytes = m * k * elt, k * n * elt
    if column_major:  # the roles of the axes swap
        m, n, bm, bn, a_bytes, b_bytes = n, m, bn, bm, b_bytes, a_bytes
    tiles_m, tiles_n = math.ceil(m / bm), math.ceil(n / bn)
    concurrent = min(programs // max(split, 1), SMS * occ_guess)
    if a_bytes + b_bytes <= L2_BYTES:
        reads = a_bytes + b_bytes
    else:
        rows_in_flight = max(min(group, tiles_m), concurrent // tiles_n, 1)
        b_reads = b_bytes * (1 if b_bytes <= L2_BYTES // 2 else math.ceil(tiles_m / rows_in_flight))
        a_panel = min(group, tiles_m) * bm * k * elt
        a_reads = a_bytes * (1 if a_panel <= L2_BYTES // 2 else max(1, tiles_n * min(group, tiles_m) // max(concurrent, 1)))
        reads = a_reads + b_reads
    writes = m * n * (4 * split if split > 1 else out_elt)
    return (reads + writes) / HBM


def _occupancy_guess(bm, bn, bk, warps, stages, elt) -> int:
    smem_cta = stages * (bm + bn) * bk * elt + 1024
    return max(1, min(SMEM_PER_SM // smem_cta, WARPS_PER_SM // warps))


def _combine(compute: float, dram: float, split: int, m: int, n: int, out_elt: int) -> float:
    t = max(compute, dram) + 0.1 * min(compute, dram) + LAUNCH_S
    if split > 1:  # the deterministic reduction pass: read the partials, write C
        t += (split * m * n * 4 + m * n * out_elt) / HBM + LAUNCH_S
    return t


def gemm_ms(problem: GemmProblem, knobs) -> float:
    from kernels.triton_tiles import k_per_split

    elt = 2 if problem.dtype in ("float16", "bfloat16") else 4
    bm, bn, bk, split = knobs["BLOCK_M"], knobs["BLOCK_N"], knobs["BLOCK_K"], knobs["split_k"]
    kp = k_per_split(problem.k, split, bk)
    compute, programs = tile_time(m=problem.m, n=problem.n, red=kp, steps=kp // bk, bm=bm, bn=bn, bk=bk,
                                  warps=knobs["num_warps"], stages=knobs["num_stages"], split=split,
                                  elt=elt, out_elt=elt, precision=knobs["input_precision"])
    dram = dram_time(m=problem.m, n=problem.n, k=problem.k, bm=bm, bn=bn, split=split,
                     group=knobs["GROUP_M"], column_major=knobs["program_order"] == "column_major",
                     programs=programs, elt=elt, out_elt=elt,
                     occ_guess=_occupancy_guess(bm, bn, bk, knobs["num_warps"], knobs["num_stages"], elt))
    return 1e3 * _combine(compute, dram, split, problem.m, problem.n, elt)


def conv_ms(problem: Conv2dProblem, knobs) -> float:
    from kernels.triton_conv import gemm_dims
    from kernels.triton_tiles import k_per_split

    elt = 2 if problem.dtype in ("float16", "bfloat16") else 4
    m, n, red = gemm_dims(problem)
    bm, bn, bk, warps = knobs["BLOCK_M"], knobs["BLOCK_N"], knobs["BLOCK_K"], knobs["num_warps"]
    taps = problem.r * problem.s
    split = knobs.get("split_k", 1)
    if problem.op == "conv2d_bwd_weight":
        kp = k_per_split(red, split, bk)
        steps = kp // bk
        # Both operands are gathers over (n, p, q): two div/mods per element of each tile.
        alu = (bm + bn) * bk * 8 / 128
        a_factor = 1.3
    else:
        order = knobs["loop_order"]
        channels = red // taps
        steps = math.ceil(red / bk) if order == "flat" else taps * math.ceil(channels / bk)
        ops = {"flat": 12, "taps_outer": 3, "channels_outer": 4}[order]
        alu = bm * bk * ops / 128
        a_factor = 1.3 if order == "flat" else (1.1 if order == "taps_outer" else 1.0)
        kp = steps * bk
    compute, programs = tile_time(m=m, n=n, red=kp, steps=steps, bm=bm, bn=bn, bk=bk, warps=warps,
                                  stages=knobs["num_stages"], split=split, elt=elt, out_elt=elt,
                                  precision=knobs["input_precision"], alu_per_step=alu,
                                  a_bytes_factor=a_factor)
    p = problem
    x_bytes, w_bytes, y_bytes = p.n * p.c * p.h * p.w * elt, p.k * p.c * taps * elt, p.n * p.k * p.p * p.q * elt
    reads = {"conv2d": x_bytes + w_bytes, "conv2d_bwd_weight": x_bytes + y_bytes}[p.op]
    out = {"conv2d": y_bytes, "conv2d_bwd_weight": w_bytes}[p.op]
    tiles_n = math.ceil(n / bn)
    if reads > L2_BYTES:
        reads *= 1 + 0.25 * (tiles_n - 1)  # column tiles of the same rows re-read what L2 dropped
    writes = out if split == 1 else m * n * 4 * split
    dram = (reads + writes) / HBM
    return 1e3 * _combine(compute, dram, split, m, n, elt)


def landscape(name: str, *, seed: int = 0):
    """The modelled landscape `name`: every valid config (the kernel's check) and its model time."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels' modules load without a GPU
    import landscapes

    from autotune import registry
    from autotune.space import Config

    kind, problem, subspace = LANDSCAPES[name]
    if kind == "gemm":
        spec = registry.get("gemm", "tiled", "cuda")
        price = gemm_ms
    else:
        spec = registry.get(problem.op, "implicit_gemm", "cuda")
        price = conv_ms
    space = spec.space
    if subspace is not None:
        space = Space(params=tuple(Param(name=p.name, values=tuple(subspace[p.name])) for p in spec.space))
    times = {}
    for knobs in space.configs():
        full = spec.full_knobs(problem, knobs)
        if spec.check(problem, full) is not None:
            continue
        key = Config.make(spec.algorithm, knobs).key()
        times[tuple(knobs.values())] = round(price(problem, full) * _noise(key, seed), 6)
    default = {p.name: spec.default_config(problem).as_dict()[p.name] for p in space}
    alg = landscapes.Algorithm(name=spec.algorithm, space=space, default=default, times=times)
    return landscapes.Landscape(name=name, problem=problem, algorithms=(alg,),
                                source=f"modelled: H100 SXM roofline/occupancy/wave model "
                                       f"(benchmarks/gpu_model.py), noise {NOISE:.1%} seed {seed}")


def _summary(name: str) -> None:
    land = landscape(name)
    alg = land.algorithms[0]
    ranked = sorted((ms, values) for values, ms in alg.times.items())
    names = [p.name for p in alg.space]
    best = ranked[0][0]
    default = alg.times.get(tuple(alg.default[n] for n in names))
    print(f"{name}: {land.valid} valid of {land.grid}; best {best:.4f} ms; default "
          f"{default if default is None else round(default / best, 2)}x; "
          f"within 2%: {sum(ms <= best * 1.02 for ms, _ in ranked)}, 5%: {sum(ms <= best * 1.05 for ms, _ in ranked)}, "
          f"15%: {sum(ms <= best * 1.15 for ms, _ in ranked)}; median {ranked[len(ranked) // 2][0] / best:.2f}x")
    problem = land.problem
    flops = 2 * problem.m * problem.n * problem.k if isinstance(problem, GemmProblem) else None
    for ms, values in ranked[:5]:
        extra = f"  {flops / ms / 1e9:.0f} TFLOP/s" if flops else ""
        print(f"   {ms:.4f} ms{extra}  {dict(zip(names, values, strict=True))}")


if __name__ == "__main__":
    import sys

    for landscape_name in sys.argv[1:] or list(LANDSCAPES):
        _summary(landscape_name)
