"""Launch and tile helpers shared by the Triton kernels (kernels/triton_gemm.py, triton_conv.py).

Not a kernel module (no KERNELS list, not in the registry's MODULES): it counts towards the cache
hash of each module that imports it, so editing a helper here invalidates both modules' results.

Split-K writes float32 partial tiles into a workspace and `split_k_reduce` sums them in a second
pass; see kernels/triton_gemm.py for why that beats atomic adds.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from autotune import device

DTYPES = ("float32", "float16", "bfloat16")
INPUT_PRECISIONS = ("ieee", "tf32")
MIN_DOT = 16  # tl.dot's smallest tile edge
WARPS = (1, 2, 4, 8, 16)
# Opt-in shared memory per block by compute capability (CUDA programming guide, table of
# technical specifications), for targets compiled without a GPU (autotune compile-check).
SHARED_MEMORY_BY_CAPABILITY = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024,
                               89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
# Fallback when nothing can tell: an H100's opt-in shared memory per block (227 KiB).
DEFAULT_SHARED_MEMORY = 227 * 1024
DEFAULT_CAPABILITY = 90
# An accumulator above this many float32 registers per thread spills to local memory.
MAX_ACC_REGISTERS = 128
# A block's threads share 64K registers and a thread has at most 255: with 16 warps (512 threads)
# a thread gets 128. Besides its accumulator a tl.dot loop keeps operand fragments, addresses and
# loop state live; ptxas refuses a 256x256 tile on 16 warps ("(C7602) Insufficient registers
# (128)": the accumulator alone is 128), so that much is kept free.
REGISTERS_PER_BLOCK = 64 * 1024
MAX_THREAD_REGISTERS = 255
REGISTER_RESERVE = 32
REDUCE_BLOCK = 1024
# Programs a default tries to launch: two per SM of an H100/H200 (132 SMs), so no SM idles while
# another runs the last, unevenly sized program.
TARGET_PROGRAMS = 264
# Offsets in our kernels are int32 (index x stride products of int32 program ids, aranges and
# int32 sizes): a tensor with more elements than this would wrap and read or write out of bounds.
MAX_ELEMENTS = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# Device kernels


@triton.jit
def _split_k_reduce_kernel(
    ws_ptr, c_ptr, bias_ptr, M, N, stride_cm, stride_cn,
    SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
):
    """Second split-K pass: C = epilogue(sum of the SPLIT_K float32 partial results)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=inside, other=0.0)
    row = offs // N
    col = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col, mask=inside, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(c_ptr + row * stride_cm + col * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------
# Launch helpers


def is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def require_device(kernel, tensor: torch.Tensor) -> None:
    """A CPU tensor only works with the interpreter, which must be chosen before the import, or
    while compiling for a target without a GPU (autotune compile-check: nothing is launched)."""
    if tensor.device.type != "cuda" and not is_interpreted(kernel) and device.compile_target() is None:
        raise RuntimeError(
            "Triton kernels need CUDA tensors; to run them on the CPU set TRITON_INTERPRET=1 "
            "before kernels.triton_* is imported"
        )


def dot_precision(dtype: torch.dtype, knobs) -> str:
    """tf32 only means something for float32 inputs; other dtypes always pass 'ieee'."""
    return str(knobs.get("input_precision", "ieee")) if dtype == torch.float32 else "ieee"


def split_k_reduce(workspace: torch.Tensor, out2d: torch.Tensor, bias=None, relu=False) -> None:
    """Sum a contiguous (split, M, N) float32 workspace into the 2-D view `out2d`."""
    split, m, n = workspace.shape
    grid = (triton.cdiv(m * n, REDUCE_BLOCK),)
    _split_k_reduce_kernel[grid](
        workspace, out2d, bias if bias is not None else workspace, m, n,
        out2d.stride(0), out2d.stride(1),
        SPLIT_K=split, BLOCK=REDUCE_BLOCK, HAS_BIAS=bias is not None, RELU=relu,
    )


def k_per_split(k: int, split_k: int, block_k: int) -> int:
    """Reduction length per split, a whole number of BLOCK_K steps."""
    return triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k


def splits_launched(k: int, split_k: int, block_k: int) -> int:
    """Programs per output tile a launch really makes: k_per_split rounds each split up to whole
    BLOCK_K steps, so the last splits of a large split_k may have nothing left to reduce."""
    return triton.cdiv(k, k_per_split(k, split_k, block_k))


def check_split(k: int, split_k: int, block_k: int, what: str = "K") -> str | None:
    """A split_k (a power of two) that launches as many programs as split_k // 2 does is a
    duplicate of it; splits_launched grows with split_k, so comparing with the half suffices."""
    if split_k < 1:
        return f"split_k={split_k} must be >= 1"
    if split_k > 1 and splits_launched(k, split_k, block_k) == splits_launched(k, split_k // 2, block_k):
        return (f"split_k={split_k} launches no more programs than split_k={split_k // 2} with "
                f"{what}={k}, BLOCK_K={block_k} (a duplicate)")
    return None


def fill_splits(tiles: int, k: int, block_k: int, most: int, target_programs: int = TARGET_PROGRAMS,
                min_steps: int = 4) -> int:
    """The smallest power-of-two split_k (up to `most`) that gives `target_programs` programs,
    keeping at least `min_steps` BLOCK_K steps per split: a default for a long reduction into a
    small output (conv bwd_weight) that a split of 1 would leave on a handful of SMs."""
    split = 1
    while (tiles * split < target_programs and split * 2 <= most
           and k_per_split(k, split * 2, block_k) >= min_steps * block_k
           and check_split(k, split * 2, block_k) is None):
        split *= 2
    return split


def shared_memory_limit() -> int:
    """Bytes of shared memory one program may use on the target (see autotune.device)."""
    target = device.compile_target()
    if target is not None:
        return SHARED_MEMORY_BY_CAPABILITY.get(target, DEFAULT_SHARED_MEMORY)
    return _gpu_shared_memory()


@functools.cache
def _gpu_shared_memory() -> int:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        limit = getattr(props, "shared_memory_per_block_optin", 0)
        if limit:
            return int(limit)
    return DEFAULT_SHARED_MEMORY


def check_int32_offsets(problem) -> str | None:
    """supports(): refuse problems whose tensors the kernels' int32 offsets cannot address."""
    shapes = [*problem.input_shapes(), problem.output_shape()]
    return check_elements(max(math.prod(shape) for shape in shapes), "a tensor of the problem")


def check_elements(elements: int, what: str) -> str | None:
    if elements > MAX_ELEMENTS:
        return (f"{what} has {elements} elements, more than the 2^31 - 1 the Triton kernels' int32 "
                "offsets can address; split the problem or use another algorithm")
    return None


def capability() -> int:
    """The compute capability check() plans shared memory for: the compile target, else this
    GPU's, else sm_90 (the limit's fallback too)."""
    return device.cuda_capability() or DEFAULT_CAPABILITY


def check_dot_tile(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int,
                   shared: int) -> str | None:
    """Constraints every tl.dot kernel shares: tile minimum, warps, registers, shared memory
    (`shared`: the kernel's own estimate, kernels/triton_smem.py)."""
    for name, value in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", block_k)):
        if value < MIN_DOT or value & (value - 1):
            return f"{name}={value}: tl.dot needs a power of two >= {MIN_DOT}"
    reason = check_warps(block_m * block_n, num_warps)
    if reason:
        return reason
    if num_stages < 1:
        return f"num_stages={num_stages} must be >= 1"
    limit = shared_memory_limit()
    if shared > limit:
        return (f"needs ~{shared // 1024} KiB shared memory ({block_m}x{block_k} + {block_k}x{block_n} "
                f"tiles, {num_stages} stages, epilogue), sm_{capability()} has {limit // 1024} KiB")
    return None


def dot_tile_resources(block_m: int, block_n: int, num_warps: int, shared: int) -> dict[str, int]:
    """What check_dot_tile believes a config needs (KernelSpec.resources)."""
    return {"shared": shared, "shared_limit": shared_memory_limit(),
            "registers": block_m * block_n // (num_warps * 32)}


def check_warps(tile_elements: int, num_warps: int) -> str | None:
    """Warps caps: each warp owns at least one 16x16 MMA tile; accumulators fit in registers."""
    if num_warps not in WARPS:
        return f"num_warps={num_warps} must be one of {WARPS}"
    if tile_elements < num_warps * 256:
        return f"num_warps={num_warps} is too many for a {tile_elements}-element tile (idle warps)"
    if tile_elements > num_warps * 32 * MAX_ACC_REGISTERS:
        return (f"a {tile_elements}-element tile needs more than {MAX_ACC_REGISTERS} accumulator "
                f"registers per thread with num_warps={num_warps} (spills)")
    return check_registers(tile_elements // (num_warps * 32), num_warps)


def check_registers(acc_registers: int, num_warps: int) -> str | None:
    """The accumulator plus the loop's working set must fit the registers a thread can have."""
    cap = thread_register_cap(num_warps)
    if acc_registers + REGISTER_RESERVE > cap:
        return (f"the accumulator needs {acc_registers} registers per thread and the loop ~{REGISTER_RESERVE} "
                f"more; with num_warps={num_warps} a thread has {cap} (ptxas: insufficient registers)")
    return None


def thread_register_cap(num_warps: int) -> int:
    return min(MAX_THREAD_REGISTERS, REGISTERS_PER_BLOCK // (num_warps * 32))


def warps_for(tile_elements: int, per_warp: int, most: int = 8) -> int:
    """The most warps (from `most`, halving) that each get at least `per_warp` tile elements."""
    warps = most
    while warps > 1 and tile_elements < warps * per_warp:
        warps //= 2
    return warps


def pow2_at_least(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))
