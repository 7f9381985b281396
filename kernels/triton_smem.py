"""How many bytes of shared memory Triton gives a tl.dot kernel: the model check() compares with
the device's limit (163 KiB on sm_80, 227 KiB on sm_90).

Fitted to the compiler's own figure (metadata.shared) over the configs `autotune compile-check
--arch 80,90 --samples 5` compiles (Triton 3.8; ~610 configs of the GEMM and the implicit-GEMM
convolutions in float32, float16 and bfloat16), and read off the TTGIR of a few (local_alloc and
convert_layout ops). Three rules:

1. The K loop's operand tiles. An operand whose global loads can be cp.async'd is software-
   pipelined: num_stages buffers when the dot is a Hopper wgmma, num_stages - 1 otherwise
   (mma.sync on sm_80, or the FMA dot of float32 "ieee"). cp.async moves at least 4 bytes, so a
   2-byte operand qualifies only when its loads are vectorised: contiguous along the tile and
   16-element aligned (the kernel knows from the problem's sizes; gathered conv loads never are).
   Any other operand is staged once for the dot: one buffer whatever num_stages is.
2. The epilogue. The accumulator is converted through shared memory to the store's layout, in
   the output's type (float32 for a split-K workspace): BLOCK_M x BLOCK_N x its size with a
   wgmma. The FMA dot's accumulator already has a store-friendly layout and needs none (16 warps
   excepted). mma.sync converts a thread's whole accumulator at once while it is at most 128
   bytes in the output's type, and otherwise in rounds of half of it, at most 256 bytes a thread
   (a grid of epilogue-only kernels, every tile and warp count, never needed more than 256; the
   half-accumulator rounds took the sm_80 sample from 514 to 523 of 539 within ±10%). Some
   configs with 16-aligned outputs convert in quarters, and some wgmma epilogues with 2-byte
   outputs in halves: both are overestimates this model keeps. What the exact rule would take
   (read in Triton's GenericSwizzling.cpp and Allocation.cpp): the scratch is the swizzled
   tile's size divided by its `reps`, the "segment" address bits (the lowest ones no vector or
   ld/st/stmatrix tile uses) that are register bits in both the accumulator's layout and the
   store's coalesced blocked layout; so it needs those two linear layouts (the mma warps
   split, the wgmma instruction shape, the store's vector width from the output's alignment).
   A few compiler totals (5120, 8704, 11264, 20480 bytes) are also not one buffer but a scratch
   placed above one still live, i.e. the allocator's offsets, not only sizes.
3. The loop's buffers are dead by the epilogue and the allocator reuses them: the total is the
   larger of the two, not the sum.

On the seed-0 sample the model was fitted to (539 configs with an estimate), 523 (97%) are within
±10% of the compiler and none is above the estimate; the rest are overestimates of rule 2's
rounds (down to 0.50 of the estimate, never a config wrongly admitted).
"""

from __future__ import annotations

import torch

# mma.sync's epilogue converts a thread's whole accumulator at once up to this many bytes (in the
# output's type); above it in rounds of half the accumulator, at most ROUND_BYTES_PER_THREAD.
WHOLE_BYTES_PER_THREAD = 128
ROUND_BYTES_PER_THREAD = 256
# wgmma: one warpgroup (4 warps) owns 64 rows of the tile at least.
WGMMA_WARPS = 4
WGMMA_ROWS = 64


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def tensor_cores(dtype: str, input_precision: str) -> bool:
    """float32 "ieee" products run on FMA units; everything else on tensor cores."""
    return dtype != "float32" or input_precision == "tf32"


def uses_wgmma(capability: int, dtype: str, input_precision: str, block_m: int, num_warps: int) -> bool:
    """Hopper's warpgroup MMA: sm_90+, tensor cores, a whole warpgroup with 64 rows for it
    (otherwise Triton falls back to mma.sync, pipelined one stage shallower)."""
    return (capability >= 90 and tensor_cores(dtype, input_precision)
            and num_warps >= WGMMA_WARPS and block_m >= WGMMA_ROWS)


def operand_buffers(pipelined: bool, num_stages: int, wgmma: bool) -> int:
    """Copies of an operand tile in shared memory (rule 1)."""
    if not pipelined:
        return 1
    return max(1, num_stages if wgmma else num_stages - 1)


def async_copyable(dtype: str, vectorised: bool) -> bool:
    """Whether cp.async can load the operand: 4 bytes a copy at least, so float32 always, and a
    2-byte type only where the loads are vectorised (contiguous and 16-element aligned)."""
    return element_size(dtype) >= 4 or vectorised


def epilogue_bytes(block_m: int, block_n: int, num_warps: int, out_size: int, *, fma: bool,
                   wgmma: bool) -> int:
    """Scratch of the accumulator's layout conversion for the store (rule 2)."""
    tile = block_m * block_n * out_size
    if fma:
        return tile if num_warps == 16 else 0
    if not wgmma:
        threads = num_warps * 32
        per_thread = tile // threads  # the accumulator's bytes a thread holds, in the output type
        if per_thread <= WHOLE_BYTES_PER_THREAD:
            return tile
        return threads * min(per_thread // 2, ROUND_BYTES_PER_THREAD)
    return tile


def dot_shared(block_m: int, block_n: int, block_k: int, dtype: str, *, capability: int,
               num_warps: int, num_stages: int, input_precision: str, a_vectorised: bool,
               b_vectorised: bool, out_size: int | None, a_gathered: bool = False,
               b_gathered: bool = False) -> int:
    """Bytes of shared memory Triton allocates for a tl.dot kernel (rule 3: the larger of loop
    and epilogue). `*_vectorised`: the operand's loads are contiguous and 16-element aligned;
    `*_gathered`: computed addresses (conv), pipelined only for 4-byte types. out_size None: the
    store needs no conversion."""
    size = element_size(dtype)
    wgmma = uses_wgmma(capability, dtype, input_precision, block_m, num_warps)

    def buffers(vectorised: bool, gathered: bool) -> int:
        pipelined = size >= 4 if gathered else async_copyable(dtype, vectorised)
        return operand_buffers(pipelined, num_stages, wgmma)

    loop = (buffers(a_vectorised, a_gathered) * block_m
            + buffers(b_vectorised, b_gathered) * block_n) * block_k * size
    if out_size is None:
        return loop
    return max(loop, epilogue_bytes(block_m, block_n, num_warps, out_size,
                                    fma=not tensor_cores(dtype, input_precision), wgmma=wgmma))
