"""Convolutions in Triton (NCHW): implicit GEMM for all three ops, and a direct kernel.

Implicit GEMM never builds the im2col matrix: each program gathers its tile of the virtual
matrix straight from the input, with masks for padding, and feeds it to `tl.dot`.

  op                 GEMM rows (M)      GEMM columns (N)   reduction
  conv2d             output pixels NPQ  filters K          channels x taps   C·R·S
  conv2d_bwd_data    input pixels NHW   channels C         filters x taps    K·R·S
  conv2d_bwd_weight  filters K          C·R·S              output pixels     N·P·Q

`loop_order` (conv2d, conv2d_bwd_data) says how the reduction is walked:
  "flat"            one index over (channel, r, s), BLOCK_K at a time, the order the weight has in
                    memory; best for few channels (LeNet's 1 or 6), one div/mod per element.
  "taps_outer"      for each filter tap (r, s), BLOCK_K channels at a time: the spatial offset and
                    padding mask are the same for the whole step; best for many channels.
  "channels_outer"  for each BLOCK_K channels, all taps: the same input rows are revisited tap
                    after tap while they are still in L1.
In the two tap orders a step covers one tap, so BLOCK_K beyond the channel count adds only zeros.

bwd_data finds, for each input pixel, the output pixels that read it: h + pad - r·dil must be a
multiple of the stride. Those are masks on the gather (no zero-inserted copy of dY); the price is
that with stride s only 1/s² of the loaded tile is non-zero.

bwd_weight reduces over N·P·Q, which is long while the output (K x C·R·S) is small, so it takes
`split_k` like kernels/triton_gemm.py (helpers in kernels/triton_tiles.py): float32 partial tiles, then a deterministic sum pass.

`direct` does no tl.dot: each program holds a BLOCK_FILTERS x (BLOCK_ROWS x BLOCK_COLS) output
block and adds outer products weight[filters] x input[pixels] for every (channel, r, s). It suits
tiny channel counts such as LeNet's 1 -> 6, where a 16-wide tl.dot would be mostly padding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autotune.problem import Conv2dProblem
from autotune.registry import KernelSpec
from kernels.triton_smem import dot_shared, element_size
from kernels.triton_tiles import (
    DTYPES,
    INPUT_PRECISIONS,
    capability,
    check_dot_tile,
    check_elements,
    check_int32_offsets,
    check_registers,
    check_split,
    dot_precision,
    dot_tile_resources,
    fill_splits,
    k_per_split,
    pow2_at_least,
    require_device,
    split_k_reduce,
    splits_launched,
    warps_for,
)

LOOP_ORDERS = ("flat", "taps_outer", "channels_outer")
DEFAULT_STAGES = 2
DIRECT_MAX_ACC_REGISTERS = 128
# The implicit GEMM's operand tiles are gathers: each element comes with its own computed address
# and mask. Measured (autotune compile-check, sm_80/sm_90): up to 96 gathered elements per thread
# spill at most ~5 KB; from 136 up, 4-20 KB per thread and 8-40 s compiles (one at 288 did not
# compile in 120 s).
MAX_GATHERED_PER_THREAD = 128
# The largest split_k of bwd_weight's search space (search_spaces/triton_conv.toml).
MAX_SPLIT_K = 256

# ---------------------------------------------------------------------------------------------
# Device kernels


@triton.jit
def _reduction_slice(step, chunks, CH, R: tl.constexpr, S: tl.constexpr, BLOCK_K: tl.constexpr,
                     LOOP_ORDER: tl.constexpr):
    """Channel, filter row, filter column (each [BLOCK_K]) and validity of reduction step `step`."""
    lanes = tl.arange(0, BLOCK_K)
    if LOOP_ORDER == 0:
        idx = step * BLOCK_K + lanes
        ch = idx // (R * S)
        r = (idx // S) % R
        s = idx % S
        ok = idx < CH * R * S
    else:
        if LOOP_ORDER == 1:
            tap = step // chunks
            chunk = step % chunks
        else:
            tap = step % (R * S)
            chunk = step // (R * S)
        ch = chunk * BLOCK_K + lanes
        ok = ch < CH
        # One tap for the whole step: a splat, which Triton's axis analysis sees as constant.
        r = tl.zeros((BLOCK_K,), dtype=tl.int32) + tap // S
        s = tl.zeros((BLOCK_K,), dtype=tl.int32) + tap % S
    return ch, r, s, ok


@triton.jit
def _pixel_tile(pid, N, ROWS, COLS, BLOCK_M: tl.constexpr):
    """Tile `pid` of the N·ROWS·COLS pixels in NCHW order: which are in range, and each one's
    image, row and column."""
    offs = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs < N * ROWS * COLS, offs // (ROWS * COLS), (offs // COLS) % ROWS, offs % COLS


@triton.jit
def _reduction_steps(CH, R: tl.constexpr, S: tl.constexpr, BLOCK_K: tl.constexpr,
                     LOOP_ORDER: tl.constexpr):
    chunks = tl.cdiv(CH, BLOCK_K)
    if LOOP_ORDER == 0:
        steps = tl.cdiv(CH * R * S, BLOCK_K)
    else:
        steps = chunks * R * S
    return steps, chunks


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr,
    N, C, H, W, K, P, Q,
    sxn, sxc, sxh, sxw, swk, swc, swr, sws, syn, syk, syp, syq,
    R: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LOOP_ORDER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
):
    m_ok, nb, p, q = _pixel_tile(tl.program_id(0), N, P, Q, BLOCK_M)  # output pixels (n, p, q)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # filters
    n_ok = offs_n < K
    x_pix = x_ptr + nb * sxn
    ih0 = p * STRIDE - PAD
    iw0 = q * STRIDE - PAD
    steps, chunks = _reduction_steps(C, R, S, BLOCK_K, LOOP_ORDER)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(steps):
        ch, r, s, k_ok = _reduction_slice(step, chunks, C, R, S, BLOCK_K, LOOP_ORDER)
        ih = ih0[:, None] + r[None, :] * DIL
        iw = iw0[:, None] + s[None, :] * DIL
        a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_pix[:, None] + ch[None, :] * sxc + ih * sxh + iw * sxw, mask=a_ok, other=0.0)
        w_off = ch * swc + r * swr + s * sws
        b = tl.load(w_ptr + w_off[:, None] + offs_n[None, :] * swk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y = y_ptr + (nb * syn + p * syp + q * syq)[:, None] + offs_n[None, :] * syk
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv_bwd_data_kernel(
    dy_ptr, w_ptr, dx_ptr,
    N, C, H, W, K, P, Q,
    sdn, sdk, sdp, sdq, swk, swc, swr, sws, sxn, sxc, sxh, sxw,
    R: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LOOP_ORDER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    m_ok, nb, h, w = _pixel_tile(tl.program_id(0), N, H, W, BLOCK_M)  # input pixels (n, h, w)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # channels
    n_ok = offs_n < C
    dy_pix = dy_ptr + nb * sdn
    steps, chunks = _reduction_steps(K, R, S, BLOCK_K, LOOP_ORDER)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(steps):
        kf, r, s, k_ok = _reduction_slice(step, chunks, K, R, S, BLOCK_K, LOOP_ORDER)
        # Output pixel (p, q) read input pixel (h, w) through tap (r, s) when
        # p·stride = h + pad - r·dil (and likewise for q); other taps contribute nothing.
        ph = h[:, None] + PAD - r[None, :] * DIL
        pw = w[:, None] + PAD - s[None, :] * DIL
        p = ph // STRIDE
        q = pw // STRIDE
        a_ok = (m_ok[:, None] & k_ok[None, :] & (ph >= 0) & (pw >= 0)
                & (p * STRIDE == ph) & (q * STRIDE == pw) & (p < P) & (q < Q))
        a = tl.load(dy_pix[:, None] + kf[None, :] * sdk + p * sdp + q * sdq, mask=a_ok, other=0.0)
        w_off = kf * swk + r * swr + s * sws
        b = tl.load(w_ptr + w_off[:, None] + offs_n[None, :] * swc,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    dx = dx_ptr + (nb * sxn + h * sxh + w * sxw)[:, None] + offs_n[None, :] * sxc
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv_bwd_weight_kernel(
    x_ptr, dy_ptr, dw_ptr,
    N, C, H, W, K, P, Q, npq_per_split,
    sxn, sxc, sxh, sxw, sdn, sdk, sdp, sdq, s_split, s_dwk,
    R: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # filters
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (c, r, s)
    split = tl.program_id(2)
    m_ok = offs_m < K
    n_ok = offs_n < C * R * S
    ch = offs_n // (R * S)
    r = (offs_n // S) % R
    s = offs_n % S
    x_ch = x_ptr + ch * sxc
    npq = N * P * Q
    j_start = split * npq_per_split
    j_end = tl.minimum(j_start + npq_per_split, npq)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)  # output pixels (n, p, q)
        j_ok = j < j_end
        nb = j // (P * Q)
        p = (j // Q) % P
        q = j % Q
        a = tl.load(dy_ptr + offs_m[:, None] * sdk + (nb * sdn + p * sdp + q * sdq)[None, :],
                    mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        ih = (p * STRIDE - PAD)[:, None] + r[None, :] * DIL
        iw = (q * STRIDE - PAD)[:, None] + s[None, :] * DIL
        b_ok = j_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_ch[None, :] + (nb * sxn)[:, None] + ih * sxh + iw * sxw, mask=b_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    dw = dw_ptr + split * s_split + offs_m[:, None] * s_dwk + offs_n[None, :]
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv_direct_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr,
    N, C, H, W, K, P, Q,
    sxn, sxc, sxh, sxw, swk, swc, swr, sws, syn, syk, syp, syq,
    R: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
    BLOCK_FILTERS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
):
    tiles_p = tl.cdiv(P, BLOCK_ROWS)
    tiles_q = tl.cdiv(Q, BLOCK_COLS)
    pid = tl.program_id(0)
    nb = pid // (tiles_p * tiles_q)
    tile = pid % (tiles_p * tiles_q)
    pix = tl.arange(0, BLOCK_ROWS * BLOCK_COLS)
    p = (tile // tiles_q) * BLOCK_ROWS + pix // BLOCK_COLS
    q = (tile % tiles_q) * BLOCK_COLS + pix % BLOCK_COLS
    kf = tl.program_id(1) * BLOCK_FILTERS + tl.arange(0, BLOCK_FILTERS)
    k_ok = kf < K
    pix_ok = (p < P) & (q < Q)
    acc = tl.zeros((BLOCK_FILTERS, BLOCK_ROWS * BLOCK_COLS), dtype=tl.float32)
    for c in range(C):
        x_c = x_ptr + nb * sxn + c * sxc
        w_c = w_ptr + kf * swk + c * swc
        for r in tl.static_range(R):
            ih = p * STRIDE - PAD + r * DIL
            row_ok = pix_ok & (ih >= 0) & (ih < H)
            for s in tl.static_range(S):
                iw = q * STRIDE - PAD + s * DIL
                xv = tl.load(x_c + ih * sxh + iw * sxw, mask=row_ok & (iw >= 0) & (iw < W), other=0.0)
                wv = tl.load(w_c + r * swr + s * sws, mask=k_ok, other=0.0)
                acc += wv.to(tl.float32)[:, None] * xv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + kf, mask=k_ok, other=0.0).to(tl.float32)[:, None]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y = y_ptr + nb * syn + kf[:, None] * syk + (p * syp + q * syq)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=k_ok[:, None] & pix_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers: (problem, knobs, tensors) -> output


def _geometry(problem: Conv2dProblem) -> dict:
    return dict(R=problem.r, S=problem.s, STRIDE=problem.stride, PAD=problem.padding,
                DIL=problem.dilation)


def _sizes(problem: Conv2dProblem) -> tuple[int, ...]:
    return (problem.n, problem.c, problem.h, problem.w, problem.k, problem.p, problem.q)


def _launch_options(knobs) -> dict:
    return dict(num_warps=knobs["num_warps"], num_stages=knobs.get("num_stages", DEFAULT_STAGES))


def conv2d_implicit_gemm(problem, knobs, x, w, out, bias=None, relu=False):
    require_device(_conv_fwd_kernel, x)
    m = problem.n * problem.p * problem.q
    grid = (triton.cdiv(m, knobs["BLOCK_M"]), triton.cdiv(problem.k, knobs["BLOCK_N"]))
    _conv_fwd_kernel[grid](
        x, w, out, bias if bias is not None else x, *_sizes(problem),
        *x.stride(), *w.stride(), *out.stride(), **_geometry(problem),
        BLOCK_M=knobs["BLOCK_M"], BLOCK_N=knobs["BLOCK_N"], BLOCK_K=knobs["BLOCK_K"],
        LOOP_ORDER=LOOP_ORDERS.index(knobs["loop_order"]),
        INPUT_PRECISION=dot_precision(x.dtype, knobs),
        HAS_BIAS=bias is not None, RELU=relu, **_launch_options(knobs),
    )
    return out


def conv2d_direct(problem, knobs, x, w, out, bias=None, relu=False):
    require_device(_conv_direct_kernel, x)
    tiles = triton.cdiv(problem.p, knobs["BLOCK_ROWS"]) * triton.cdiv(problem.q, knobs["BLOCK_COLS"])
    grid = (problem.n * tiles, triton.cdiv(problem.k, knobs["BLOCK_FILTERS"]))
    _conv_direct_kernel[grid](
        x, w, out, bias if bias is not None else x, *_sizes(problem),
        *x.stride(), *w.stride(), *out.stride(), **_geometry(problem),
        BLOCK_FILTERS=knobs["BLOCK_FILTERS"], BLOCK_ROWS=knobs["BLOCK_ROWS"],
        BLOCK_COLS=knobs["BLOCK_COLS"], HAS_BIAS=bias is not None, RELU=relu,
        num_warps=knobs["num_warps"],
    )
    return out


def conv2d_bwd_data(problem, knobs, dy, w, out):
    require_device(_conv_bwd_data_kernel, dy)
    m = problem.n * problem.h * problem.w
    grid = (triton.cdiv(m, knobs["BLOCK_M"]), triton.cdiv(problem.c, knobs["BLOCK_N"]))
    _conv_bwd_data_kernel[grid](
        dy, w, out, *_sizes(problem), *dy.stride(), *w.stride(), *out.stride(),
        **_geometry(problem),
        BLOCK_M=knobs["BLOCK_M"], BLOCK_N=knobs["BLOCK_N"], BLOCK_K=knobs["BLOCK_K"],
        LOOP_ORDER=LOOP_ORDERS.index(knobs["loop_order"]),
        INPUT_PRECISION=dot_precision(dy.dtype, knobs), **_launch_options(knobs),
    )
    return out


def conv2d_bwd_weight(problem, knobs, x, dy, out):
    require_device(_conv_bwd_weight_kernel, x)
    crs = problem.c * problem.r * problem.s
    npq = problem.n * problem.p * problem.q
    per_split = k_per_split(npq, knobs["split_k"], knobs["BLOCK_K"])
    splits = triton.cdiv(npq, per_split)
    # dw is stored (K, C, R, S): as a matrix it is (K, C·R·S) with unit column stride.
    out2d = out.view(problem.k, crs)
    target = out2d if splits == 1 else torch.empty((splits, problem.k, crs), device=x.device,
                                                    dtype=torch.float32)
    s_split = 0 if splits == 1 else target.stride(0)
    grid = (triton.cdiv(problem.k, knobs["BLOCK_M"]), triton.cdiv(crs, knobs["BLOCK_N"]), splits)
    _conv_bwd_weight_kernel[grid](
        x, dy, target, *_sizes(problem), per_split, *x.stride(), *dy.stride(),
        s_split, crs, **_geometry(problem),
        BLOCK_M=knobs["BLOCK_M"], BLOCK_N=knobs["BLOCK_N"], BLOCK_K=knobs["BLOCK_K"],
        INPUT_PRECISION=dot_precision(x.dtype, knobs), **_launch_options(knobs),
    )
    if splits > 1:
        split_k_reduce(target, out2d)
    return out


def conv2d_bias_act(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                    stride: int = 1, padding: int = 0, dilation: int = 1, relu: bool = False,
                    algorithm: str = "implicit_gemm", knobs=None) -> torch.Tensor:
    """act(conv2d(x, w) + bias) with the bias (length K) and ReLU fused into the store."""
    n, c, h, wd = x.shape
    k, c2, r, s = w.shape
    if c != c2:
        raise ValueError(f"x has {c} channels but w expects {c2}")
    if bias is not None and bias.shape != (k,):
        raise ValueError(f"bias must have shape ({k},), got {tuple(bias.shape)}")
    problem = Conv2dProblem(n=n, c=c, h=h, w=wd, k=k, r=r, s=s, stride=stride, padding=padding,
                            dilation=dilation, dtype=str(x.dtype).split(".")[-1])
    launch = {"implicit_gemm": conv2d_implicit_gemm, "direct": conv2d_direct}[algorithm]
    if knobs is None:
        knobs = (implicit_gemm_defaults if algorithm == "implicit_gemm" else direct_defaults)(problem)
    out = torch.empty(problem.y_shape, device=x.device, dtype=x.dtype)
    return launch(problem, knobs, x, w, out, bias=bias, relu=relu)


# ---------------------------------------------------------------------------------------------
# Registry hooks: run, constraints, defaults


def _run_fwd_implicit(problem, knobs, inputs, out):
    return conv2d_implicit_gemm(problem, knobs, *inputs, out)


def _run_fwd_direct(problem, knobs, inputs, out):
    return conv2d_direct(problem, knobs, *inputs, out)


def _run_bwd_data(problem, knobs, inputs, out):
    return conv2d_bwd_data(problem, knobs, *inputs, out)


def _run_bwd_weight(problem, knobs, inputs, out):
    return conv2d_bwd_weight(problem, knobs, *inputs, out)


def supports(problem) -> str | None:
    if problem.dtype not in DTYPES:
        return f"Triton conv runs {', '.join(DTYPES)}, not {problem.dtype}"
    return check_int32_offsets(problem)


def gemm_dims(problem: Conv2dProblem) -> tuple[int, int, int]:
    """(M, N, reduction) of the op's implicit GEMM (see the table at the top)."""
    p = problem
    return {
        "conv2d": (p.n * p.p * p.q, p.k, p.c * p.r * p.s),
        "conv2d_bwd_data": (p.n * p.h * p.w, p.c, p.k * p.r * p.s),
        "conv2d_bwd_weight": (p.k, p.c * p.r * p.s, p.n * p.p * p.q),
    }[p.op]


def _oversized(name: str, block: int, extent: int) -> str | None:
    """A tile wider than the (power-of-two padded) extent only computes zeros: a duplicate config."""
    if block > pow2_at_least(extent, 16, 1 << 30):
        return f"{name}={block} is wider than needed for an extent of {extent} (use a smaller tile)"
    return None


def _check_precision(problem, knobs) -> str | None:
    if knobs["input_precision"] not in INPUT_PRECISIONS:
        return f"input_precision={knobs['input_precision']!r}: choose one of {INPUT_PRECISIONS}"
    if knobs["input_precision"] != "ieee" and problem.dtype != "float32":
        return "input_precision only applies to float32 (a duplicate of 'ieee' here)"
    return None


def check_implicit_gemm(problem: Conv2dProblem, knobs) -> str | None:
    m, n, red = gemm_dims(problem)
    order = knobs.get("loop_order", "flat")
    if order not in LOOP_ORDERS:
        return f"loop_order={order!r}: choose one of {LOOP_ORDERS}"
    # In the tap orders one step covers the channels of one tap only.
    per_step = red if order == "flat" else red // (problem.r * problem.s)
    for reason in (
        _check_precision(problem, knobs),
        _oversized("BLOCK_M", knobs["BLOCK_M"], m),
        _oversized("BLOCK_N", knobs["BLOCK_N"], n),
        _oversized("BLOCK_K", knobs["BLOCK_K"], per_step),
    ):
        if reason:
            return reason
    if problem.op == "conv2d_bwd_weight":
        split_k = knobs["split_k"]
        reason = (check_split(red, split_k, knobs["BLOCK_K"], "N·P·Q")
                  or check_elements(split_k * m * n, "the split-K workspace"))
        if reason:
            return reason
    if (problem.dtype != "float32" and problem.op != "conv2d_bwd_weight"
            and knobs["num_stages"] != DEFAULT_STAGES):
        # Measured: the cubins of num_stages 1-4 are byte-identical here (see implicit_gemm_shared).
        return (f"num_stages={knobs['num_stages']} compiles to the same kernel as num_stages={DEFAULT_STAGES} "
                f"for {problem.dtype} {problem.op} (its gathered loads are not pipelined): a duplicate")
    gathered = knobs["BLOCK_K"] * (knobs["BLOCK_M"] + knobs["BLOCK_N"]) // (32 * knobs["num_warps"])
    if gathered > MAX_GATHERED_PER_THREAD:
        return (f"the gathered operand tiles put {gathered} elements (and their addresses) on each thread, "
                f"more than {MAX_GATHERED_PER_THREAD}: ptxas spills kilobytes per thread and compiles for "
                "tens of seconds")
    return check_dot_tile(knobs["BLOCK_M"], knobs["BLOCK_N"], knobs["BLOCK_K"], knobs["num_warps"],
                          knobs["num_stages"], implicit_gemm_shared(problem, knobs))


def implicit_gemm_shared(problem: Conv2dProblem, knobs) -> int:
    """kernels/triton_smem.py's model. Every operand is a gather (computed addresses): pipelined
    for float32, one buffer for 2-byte types, whose loads cp.async cannot take. fwd and
    bwd_data store straight from the accumulator's layout (no conversion measured); bwd_weight
    converts it, in float32 for a split-K workspace, into rows of C*R*S elements."""
    out_size = None
    single_step = False
    if problem.op in ("conv2d", "conv2d_bwd_data"):
        # The reduction's channel count is a run-time argument unless it is 1 (Triton specialises
        # it): then the flat loop's cdiv(R*S, BLOCK_K) steps, or the others' R*S, are constants.
        channels = problem.c if problem.op == "conv2d" else problem.k
        taps = problem.r * problem.s
        steps = -(-taps // knobs["BLOCK_K"]) if knobs.get("loop_order", "flat") == "flat" else taps
        single_step = channels == 1 and steps == 1
    if problem.op == "conv2d_bwd_weight":
        red = gemm_dims(problem)[2]
        split = splits_launched(red, knobs["split_k"], knobs["BLOCK_K"]) > 1
        out_size = 4 if split else element_size(problem.dtype)
    return dot_shared(knobs["BLOCK_M"], knobs["BLOCK_N"], knobs["BLOCK_K"], problem.dtype,
                      capability=capability(), num_warps=knobs["num_warps"],
                      num_stages=knobs.get("num_stages", DEFAULT_STAGES),
                      input_precision=knobs.get("input_precision", "ieee"), a_vectorised=False,
                      b_vectorised=False, a_gathered=True, b_gathered=True, out_size=out_size,
                      out_rows_aligned=problem.c * problem.r * problem.s % 16 == 0, single_step=single_step)


def implicit_gemm_resources(problem: Conv2dProblem, knobs) -> dict[str, int]:
    return dot_tile_resources(knobs["BLOCK_M"], knobs["BLOCK_N"], knobs["num_warps"],
                              implicit_gemm_shared(problem, knobs))


def check_direct(problem: Conv2dProblem, knobs) -> str | None:
    tile = knobs["BLOCK_FILTERS"] * knobs["BLOCK_ROWS"] * knobs["BLOCK_COLS"]
    for name in ("BLOCK_FILTERS", "BLOCK_ROWS", "BLOCK_COLS"):
        if knobs[name] < 1 or knobs[name] & (knobs[name] - 1):
            return f"{name}={knobs[name]} must be a power of two"
    for name, extent in (("BLOCK_FILTERS", problem.k), ("BLOCK_ROWS", problem.p), ("BLOCK_COLS", problem.q)):
        if knobs[name] > triton.next_power_of_2(extent):
            return f"{name}={knobs[name]} is wider than needed for an extent of {extent}"
    threads = knobs["num_warps"] * 32
    # One warp is the least a program has, so only extra warps count as idle.
    if knobs["num_warps"] not in (1, 2, 4, 8, 16) or (knobs["num_warps"] > 1 and tile < threads):
        return f"num_warps={knobs['num_warps']} leaves threads idle on a {tile}-element tile"
    if tile > threads * DIRECT_MAX_ACC_REGISTERS:
        return f"a {tile}-element tile needs > {DIRECT_MAX_ACC_REGISTERS} registers per thread (spills)"
    return check_registers(-(-tile // threads), knobs["num_warps"])


def implicit_gemm_defaults(problem: Conv2dProblem | None, op: str = "conv2d") -> dict:
    """A safe first guess shrunk to the problem; the registry calls it with None for the names."""
    m, n, red = gemm_dims(problem.with_op(op)) if problem is not None else (128, 64, 32)
    wide = problem is not None and problem.dtype != "float32"
    block_m = pow2_at_least(m, 16, 128)
    block_n = pow2_at_least(n, 16, 64)
    block_k = pow2_at_least(red, 16, 64 if wide else 32)
    knobs = {
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
        "num_warps": warps_for(block_m * block_n, 256, 4), "num_stages": DEFAULT_STAGES,
        "input_precision": "ieee",
    }
    if op == "conv2d_bwd_weight":
        # N·P·Q is long and K x C·R·S small: one program per output tile would leave most SMs idle
        # (measured on an H100 with split_k 4: LeNet conv1's grad weight at batch 256 took 3.6 ms
        # against cuDNN's 0.05 ms), so the default splits the reduction until the GPU is full.
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        knobs["split_k"] = fill_splits(tiles, red, block_k, most=MAX_SPLIT_K)
    else:
        knobs["loop_order"] = "flat"
    return knobs


def direct_defaults(problem: Conv2dProblem | None) -> dict:
    k, p, q = (problem.k, problem.p, problem.q) if problem is not None else (8, 8, 32)
    block_filters = pow2_at_least(k, 1, 8)
    block_rows = pow2_at_least(p, 1, 8)
    block_cols = pow2_at_least(q, 1, 32)
    tile = block_filters * block_rows * block_cols
    return {
        "BLOCK_FILTERS": block_filters, "BLOCK_ROWS": block_rows, "BLOCK_COLS": block_cols,
        "num_warps": warps_for(tile, 32, 4),
    }


def _fwd_defaults(problem):
    return implicit_gemm_defaults(problem, "conv2d")


def _bwd_data_defaults(problem):
    return implicit_gemm_defaults(problem, "conv2d_bwd_data")


def _bwd_weight_defaults(problem):
    return implicit_gemm_defaults(problem, "conv2d_bwd_weight")


# Implicit-GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) in the shapes that suit gathered
# operands: 32-element K steps (gathers cost registers per element), 4-8 warps. Unmeasured
# except the first, the ResNet 3x3 forward winner of the first H100 run (benchmarks/gpu_check.sh).
_SEED_TILES = ((128, 64, 32, 8), (64, 64, 32, 4), (128, 128, 32, 8), (64, 128, 32, 4), (128, 32, 32, 4))


def implicit_gemm_seeds(problem: Conv2dProblem) -> list[dict]:
    """KernelSpec.seeds: the tiles above in the problem's best-guess loop order; float32 in TF32
    first (cuDNN's default for convolutions, torch.backends.cudnn.allow_tf32) then IEEE;
    bwd_weight with the split that fills the GPU for each tile."""
    m, n, red = gemm_dims(problem)
    out = []
    for block_m, block_n, block_k, warps in _SEED_TILES:
        # Shrunk to the problem (LeNet's 6 filters want a 16-wide tile, not 64).
        block_m, block_n = pow2_at_least(m, 16, block_m), pow2_at_least(n, 16, block_n)
        block_k = pow2_at_least(red, 16, block_k)
        warps = warps_for(block_m * block_n, 256, warps)
        knobs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}
        if problem.op == "conv2d_bwd_weight":
            tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
            knobs["split_k"] = fill_splits(tiles, red, block_k, most=MAX_SPLIT_K)
        else:
            taps_outer = red // (problem.r * problem.s) >= block_k
            knobs["loop_order"] = "taps_outer" if taps_outer else "flat"
        if problem.dtype == "float32":
            out.append({**knobs, "input_precision": "tf32"})
        out.append(knobs)
    return out


KERNELS = [
    KernelSpec(op="conv2d", algorithm="implicit_gemm", backend="triton", run=_run_fwd_implicit,
               supports=supports, check=check_implicit_gemm, defaults=_fwd_defaults,
               resources=implicit_gemm_resources, seeds=implicit_gemm_seeds),
    KernelSpec(op="conv2d", algorithm="direct", backend="triton", run=_run_fwd_direct,
               supports=supports, check=check_direct, defaults=direct_defaults),
    KernelSpec(op="conv2d_bwd_data", algorithm="implicit_gemm", backend="triton", run=_run_bwd_data,
               supports=supports, check=check_implicit_gemm, defaults=_bwd_data_defaults,
               resources=implicit_gemm_resources, seeds=implicit_gemm_seeds),
    KernelSpec(op="conv2d_bwd_weight", algorithm="implicit_gemm", backend="triton",
               run=_run_bwd_weight, supports=supports, check=check_implicit_gemm,
               defaults=_bwd_weight_defaults, resources=implicit_gemm_resources,
               seeds=implicit_gemm_seeds),
]
