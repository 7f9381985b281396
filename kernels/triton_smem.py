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
   Any other operand is staged once for the dot: one buffer whatever num_stages is; so is every
   operand of a loop the compiler knows runs once (Triton specialises an argument equal to 1: a
   conv over one channel whose R*S taps fit one BLOCK_K step has a constant trip count of 1).
2. The epilogue. The accumulator is converted through shared memory to the store's coalesced
   layout, in the output's type (float32 for a split-K workspace). How much that takes depends on
   both layouts (from 1/16 of the tile to all of it): kernels/triton_layouts.py builds the MMA
   layout (mma.sync or wgmma) and the store's layout as the compiler would and asks Triton's own
   allocator for the conversion's scratch; where it cannot be asked, the whole tile. The FMA
   dot's accumulator already has a store-friendly layout and needs none (16 warps excepted: a
   whole tile). An earlier rule of thumb here (the whole accumulator up to 128 bytes a thread,
   else rounds of half of it) overestimated 16 of 539 sampled configs by up to 2x.
3. The loop's buffers are dead by the epilogue and the allocator reuses them: the total is the
   larger of the two, not the sum.

On the seed-0 sample (539 configs with an estimate, sm_80 and sm_90) 536 equal the compiler's
figure and all are within 10% of it (the three others: 16-warp sm_80 loops, 0.92-0.96).
"""

from __future__ import annotations

import torch

from kernels import triton_layouts

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


def epilogue_bytes(block_m: int, block_n: int, num_warps: int, out_size: int, *, dtype: str,
                   input_precision: str, capability: int, rows_aligned: bool) -> int:
    """Scratch of the accumulator's layout conversion for the store (rule 2). `rows_aligned`:
    the output's rows start 16-element aligned (its row stride divisible by 16)."""
    tile = block_m * block_n * out_size
    if not tensor_cores(dtype, input_precision):
        return tile if num_warps == 16 else 0
    if uses_wgmma(capability, dtype, input_precision, block_m, num_warps):
        src = triton_layouts.wgmma(block_m, block_n, num_warps, 8 * element_size(dtype))
    else:
        src = triton_layouts.mma_v2(block_m, block_n, num_warps)
    vector = triton_layouts.store_vector(block_m, block_n, num_warps, out_size, rows_aligned)
    dst = triton_layouts.store_layout(block_m, block_n, num_warps, vector)
    scratch = triton_layouts.conversion_scratch(capability, num_warps, block_m, block_n, out_size, src, dst)
    return tile if scratch is None else scratch


def dot_shared(block_m: int, block_n: int, block_k: int, dtype: str, *, capability: int,
               num_warps: int, num_stages: int, input_precision: str, a_vectorised: bool,
               b_vectorised: bool, out_size: int | None, out_rows_aligned: bool = False,
               a_gathered: bool = False, b_gathered: bool = False, single_step: bool = False) -> int:
    """Bytes of shared memory Triton allocates for a tl.dot kernel (rule 3: the larger of loop
    and epilogue). `*_vectorised`: the operand's loads are contiguous and 16-element aligned;
    `*_gathered`: computed addresses (conv), pipelined only for 4-byte types. out_size None: the
    store needs no conversion; `out_rows_aligned`: the output's row stride is a multiple of 16.
    `single_step`: the K loop is known at compile time to run once (Triton folds it away: nothing
    to pipeline, one buffer an operand)."""
    size = element_size(dtype)
    wgmma = uses_wgmma(capability, dtype, input_precision, block_m, num_warps)

    def buffers(vectorised: bool, gathered: bool) -> int:
        pipelined = size >= 4 if gathered else async_copyable(dtype, vectorised)
        return operand_buffers(pipelined and not single_step, num_stages, wgmma)

    loop = (buffers(a_vectorised, a_gathered) * block_m
            + buffers(b_vectorised, b_gathered) * block_n) * block_k * size
    if out_size is None:
        return loop
    return max(loop, epilogue_bytes(block_m, block_n, num_warps, out_size, dtype=dtype,
                                    input_precision=input_precision, capability=capability,
                                    rows_aligned=out_rows_aligned))
