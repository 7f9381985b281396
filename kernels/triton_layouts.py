"""The register layouts Triton gives a tl.dot's accumulator and a coalesced tl.store, and the
shared memory that converting one into the other needs, asked of Triton's own allocator.

A tensor-core accumulator lives in an MMA layout; the store wants a "blocked" layout in which a
thread holds a contiguous vector of the output row. The conversion goes through shared memory, and
how much it takes depends on both layouts (Triton swizzles the tile and converts it in as many
rounds as the two layouts' register bits allow: from 1/16 of the tile to all of it). Rather than
re-deriving that from Triton's C++ (GenericSwizzling.cpp), we build the two layouts the compiler
would choose, write the one conversion as a TTGIR module and run Triton's shared-memory allocation
pass on it: a few milliseconds, exact for the given layouts, and the same Triton version that
compiles the kernel. The layouts follow Triton 3.x's passes:

- AccelerateMatmul: mma.sync (v2) spreads warps to balance the M and N repeats of its 16x8 tile;
  Hopper's wgmma (v3) starts at 4 warps along M and picks the widest instruction N (a multiple
  of 8 up to 256) that divides the tile's N and the warps' share of it.
- Coalesce: the store's thread vector is 16 bytes when the output's rows are 16-element aligned
  (Triton specialises sizes and strides divisible by 16), else one element; never more than a
  thread's share of the tile. Threads, then warps, fill the contiguous dimension first.

Where the allocator cannot be asked (a Triton without the NVIDIA backend's passes, a changed IR
syntax), `conversion_scratch` returns None and the caller falls back to the whole tile, the most
any conversion takes.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading

THREADS_PER_WARP = 32
STORE_VECTOR_BYTES = 16  # the widest global store (st.global.v4.b32)
ALIGNMENT = 16  # Triton's divisibility specialisation of integer arguments
MMA_V2_TILE = (16, 8)
WGMMA_MIN_WARPS = (4, 1)
WGMMA_N = tuple(range(256, 7, -8))  # instruction N, widest first


def mma_v2(block_m: int, block_n: int, num_warps: int) -> str:
    warps = [1, 1]
    reps = [-(-block_m // MMA_V2_TILE[0]), -(-block_n // MMA_V2_TILE[1])]
    while warps[0] * warps[1] < num_warps:
        if reps[0] >= reps[1]:
            warps[0] *= 2
            reps[0] = max(reps[0] // 2, 1)
        else:
            warps[1] *= 2
            reps[1] //= 2
    return (f"#ttg.nvidia_mma<{{versionMajor = 2, versionMinor = 0, warpsPerCTA = {_list(warps)}, "
            f"instrShape = {_list(MMA_V2_TILE)}}}>")


def wgmma(block_m: int, block_n: int, num_warps: int, operand_bits: int) -> str:
    m_warps = max(block_m // 16, 1)
    max_n = max(block_n // max(num_warps // m_warps, 1), 8)
    n = next(n for n in WGMMA_N if block_n % n == 0 and n <= max_n)
    warps = list(WGMMA_MIN_WARPS)
    while warps[0] * warps[1] < num_warps:
        if block_m > 16 * warps[0]:
            warps[0] *= 2
        else:
            warps[1] *= 2
    return (f"#ttg.nvidia_mma<{{versionMajor = 3, versionMinor = 0, warpsPerCTA = {_list(warps)}, "
            f"instrShape = [16, {n}, {256 // operand_bits}]}}>")


def store_vector(block_m: int, block_n: int, num_warps: int, out_size: int, rows_aligned: bool) -> int:
    """Elements a thread stores at once along a row."""
    vector = STORE_VECTOR_BYTES // out_size if rows_aligned else 1
    return min(vector, max(block_m * block_n // (num_warps * THREADS_PER_WARP), 1))


def store_layout(block_m: int, block_n: int, num_warps: int, vector: int) -> str:
    """The coalesced blocked layout of a row-major [block_m, block_n] store."""
    # Triton's BlockedEncodingAttr::get: the threads along the row first (as many as the row's
    # vectors, at most a warp's), then the warps that the rest of the row's vectors need.
    row_threads = min(max(block_n // vector, 1), num_warps * THREADS_PER_WARP)
    threads_n = min(row_threads, THREADS_PER_WARP)
    warps_n = min(max(row_threads // threads_n, 1), num_warps)
    return (f"#ttg.blocked<{{sizePerThread = [1, {vector}], "
            f"threadsPerWarp = [{THREADS_PER_WARP // threads_n}, {threads_n}], "
            f"warpsPerCTA = [{num_warps // warps_n}, {warps_n}], order = [1, 0]}}>")


_MODULE = """#src = {src}
#dst = {dst}
module attributes {{"ttg.num-ctas" = 1 : i32, "ttg.num-warps" = {warps} : i32, ttg.target = "cuda:{arch}", \
"ttg.threads-per-warp" = {lanes} : i32}} {{
  tt.func public @epilogue(%arg0: tensor<{shape}x{ty}, #src>) -> tensor<{shape}x{ty}, #dst> {{
    %0 = ttg.convert_layout %arg0 : tensor<{shape}x{ty}, #src> -> tensor<{shape}x{ty}, #dst>
    tt.return %0 : tensor<{shape}x{ty}, #dst>
  }}
}}
"""
_TYPES = {2: "f16", 4: "f32"}
_lock = threading.Lock()  # one MLIR context, not thread-safe


@functools.lru_cache(maxsize=4096)
def conversion_scratch(capability: int, num_warps: int, block_m: int, block_n: int, out_size: int,
                       src: str, dst: str) -> int | None:
    """Bytes of shared memory Triton allocates to convert a [block_m, block_n] tensor of
    `out_size`-byte elements from layout `src` to `dst` (TTGIR attribute syntax); None where
    Triton's allocator cannot be run here."""
    text = _MODULE.format(src=src, dst=dst, warps=num_warps, arch=capability, lanes=THREADS_PER_WARP,
                          shape=f"{block_m}x{block_n}", ty=_TYPES[out_size])
    try:
        with _lock:
            return _allocate(text, capability)
    except Exception:  # noqa: BLE001 - any failure means "not known here": the caller bounds it
        return None


def _allocate(text: str, capability: int) -> int:
    from triton._C.libtriton import ir, nvidia

    context = _context()
    fd, path = tempfile.mkstemp(suffix=".ttgir")
    try:
        with os.fdopen(fd, "w") as sink:
            sink.write(text)
        module = ir.parse_mlir_module(path, context)
    finally:
        os.unlink(path)
    passes = ir.pass_manager(context)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(passes, capability, _ptx_version(capability))
    passes.run(module, "allocate_shared_memory")
    return int(module.get_int_attr("ttg.shared"))


@functools.cache
def _context():
    from triton._C.libtriton import ir, nvidia

    context = ir.context()
    ir.load_dialects(context)
    nvidia.load_dialects(context)
    return context


# The PTX version make_llir passes the allocator; a conversion's scratch does not depend on it
# (240 mma/wgmma -> blocked layout pairs gave the same bytes at PTX 7.0, 8.0 and 8.8), so where
# this Triton's ptxas lookup has another signature, this one stands in.
FALLBACK_PTX_VERSION = 80


@functools.cache
def _ptx_version(capability: int) -> int:
    """The PTX version Triton would target with its bundled ptxas (what make_llir passes)."""
    from triton.backends.nvidia import compiler

    try:
        tool = compiler.get_ptxas(capability)
        return compiler.ptx_get_version(tool.version)
    except Exception:  # noqa: BLE001 - older Triton: get_ptxas() without arguments, a tuple, ...
        return FALLBACK_PTX_VERSION


def _list(values) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"
