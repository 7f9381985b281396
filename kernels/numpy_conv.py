"""CPU convolution kernels in NumPy: forward, grad input (bwd_data) and grad weight (bwd_weight).

NumPy has no fused convolution, so every algorithm here turns the convolution into BLAS calls
(np.matmul) plus as few elementwise passes as it can. On small LeNet-sized problems the cost is
memory traffic, not arithmetic, and the algorithms differ in where they pay it:

- `im2col_gemm` materialises the patch matrix of a block of images from a strided view (one
  copy) and multiplies it with the filters. The `layout` knob picks how patch rows are cut:
  `exact` (N, C·R·S, P·Q), any geometry, but copies runs of only Q pixels; `wide` (stride 1)
  takes P·W' pixels per row, one long run, at the price of W'/Q garbage columns; `batch_inner`
  puts the images innermost, so a row is one run of Q·images pixels and one GEMM covers a block.
- `per_tap` never builds a patch matrix: in the "wide" layout below every filter tap (r, s) is a
  plain column offset, so each tap is one GEMM straight on a view of the input (stride 1 only).
- `tensordot` / `einsum` hand the strided window view to NumPy's own contraction routines.
- `fft` multiplies spectra (numpy's pocketfft); stride 1, dilation by zero-inserted filters.
- bwd_data `gemm_col2im` scatters a GEMM's columns back with strided adds; `direct_transpose`
  runs the forward im2col kernel on the zero-upsampled, padded dy with flipped filters.

The wide layout (per_tap): the zero-padded input is stored channel-major as (C, N·H'·W') with a
zero tail.
An output pixel (n, p, q) lives at flat index l = (n·H' + p)·W' + q, and its tap (r, s) reads the
input at l + (r·W' + s)·dilation, a fixed offset per tap. Columns with q >= Q or p >= P compute
garbage that is cropped away; that waste (H'W'/PQ, ~1.3x for LeNet) buys GEMMs without copies.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from autotune.registry import KernelSpec
from kernels.numpy_buffers import as_numpy as _np
from kernels.numpy_buffers import scratch as _scratch
from kernels.numpy_buffers import workspace as _workspace

# ---------------------------------------------------------------------------------------------
# Geometry and layout helpers


def _input_windows(x: np.ndarray, pad: int, r: int, s: int, p: int, q: int, stride: int, dil: int,
                   layout: str) -> tuple[np.ndarray, int]:
    """(N, C, R, S, P, width) window view of x zero-padded, and its width (W' for the wide layout,
    whose rows are runs of P·W' pixels; Q for the exact one). The padded copy is a kept buffer:
    only its interior is written, so the padding stays zero."""
    n, c, h, w = x.shape
    hp, wp = h + 2 * pad, w + 2 * pad

    def build():
        if layout == "wide":
            flat = np.zeros(n * c * hp * wp + (s - 1) * dil, x.dtype)
            interior = flat[:n * c * hp * wp].reshape(n, c, hp, wp)[:, :, pad:pad + h, pad:pad + w]
            view = _image_rows(flat, (n, c, hp, wp), r, s, dil).reshape(n, c, r, s, p, wp)
            return (interior, view, wp), flat.nbytes
        xp = np.zeros((n, c, hp, wp), x.dtype)
        return (xp[:, :, pad:pad + h, pad:pad + w], _windows(xp, r, s, p, q, stride, dil), q), xp.nbytes

    interior, view, width = _workspace(("windows", layout, x.shape, x.dtype.str, pad, r, s, p, q, stride, dil),
                                       build)
    interior[...] = x
    return view, width


def _padded(x: np.ndarray, pad: int) -> np.ndarray:
    """x with `pad` zeros around H and W (x itself when pad is 0, to save the copy)."""
    if pad == 0:
        return x
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), x.dtype)
    xp[:, :, pad:pad + h, pad:pad + w] = x
    return xp


def _windows(xp: np.ndarray, r: int, s: int, p: int, q: int, stride: int, dil: int) -> np.ndarray:
    """Read-only (N, C, R, S, P, Q) view of the padded input: element [n,c,r,s,p,q] is the input
    pixel that filter tap (r, s) multiplies for output pixel (p, q)."""
    sn, sc, sh, sw = xp.strides
    return as_strided(xp, shape=(xp.shape[0], xp.shape[1], r, s, p, q),
                      strides=(sn, sc, sh * dil, sw * dil, sh * stride, sw * stride), writeable=False)


def _wide_input(x: np.ndarray, pad: int, tail: int) -> np.ndarray:
    """(C, N·H'·W' + tail) channel-major, zero-padded copy of x (see the module docstring)."""
    n, c, h, w = x.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    flat = np.zeros((c, n * hp * wp + tail), x.dtype)
    flat[:, :n * hp * wp].reshape(c, n, hp, wp)[:, :, pad:pad + h, pad:pad + w] = x.transpose(1, 0, 2, 3)
    return flat


def _wide_output(y: np.ndarray, hp: int, wp: int) -> np.ndarray:
    """(N, K, P, Q) as a zero-filled wide (K, N·H'·W') matrix: garbage columns become zeros, so a
    GEMM that reduces over columns (bwd_weight) or scatters them (bwd_data) ignores them."""
    n, k, p, q = y.shape
    wide = np.zeros((k, n, hp, wp), y.dtype)
    wide[:, :, :p, :q] = y.transpose(1, 0, 2, 3)
    return wide.reshape(k, n * hp * wp)


def _tap_offsets(p, wp: int) -> list[tuple[int, int, int]]:
    """(r, s, flat offset) of every filter tap in the wide layout."""
    return [(r, s, (r * wp + s) * p.dilation) for r in range(p.r) for s in range(p.s)]


def _wide_tail(p) -> int:
    """Zeros after the last image so the largest tap offset stays inside the buffer."""
    return ((p.r - 1) * (p.w + 2 * p.padding) + p.s - 1) * p.dilation


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(total, start + size)


def _stride_one(problem) -> str | None:
    return None if problem.stride == 1 else "needs stride 1 (uses the wide stride-1 layout)"


# ---------------------------------------------------------------------------------------------
# Knob validation shared by every kernel: `choices` lists allowed values, `positive` int knobs.


def _checker(choices: dict[str, tuple], positive: tuple[str, ...] = ()):
    def check(problem, knobs) -> str | None:
        for name, allowed in choices.items():
            if knobs.get(name) not in allowed:
                return f"{name}={knobs.get(name)!r} is not one of {list(allowed)}"
        for name in positive:
            value = knobs.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return f"{name} must be a positive integer, got {value!r}"
        return None

    return check


# ---------------------------------------------------------------------------------------------
# Forward: im2col + GEMM


def _image_rows(flat: np.ndarray, shape, r: int, s: int, dil: int, offset: int = 0) -> np.ndarray:
    """(N, C, R, S, P·W') view of a flat zero-padded (N·C·H'·W' + tail,) copy of the input (see
    _input_windows): row (n, c, r, s) is the stretch of image
    n, channel c that tap (r, s) reads for the output rows 0..P-1, full padded width W' each (so
    one contiguous run; the columns q >= Q of every row are garbage, cropped by the caller)."""
    n, c, hp, wp = shape
    p = hp - (r - 1) * dil
    item = flat.itemsize
    return as_strided(flat[offset:], shape=(n, c, r, s, p * wp),
                      strides=(c * hp * wp * item, hp * wp * item, dil * wp * item, dil * item, item),
                      writeable=False)


def _store(dest: np.ndarray, block: np.ndarray, bias: np.ndarray | None) -> None:
    """dest = block (+ bias per output channel): the bias rides on the copy every layout makes
    anyway (the epilogue), instead of a separate pass over the whole output."""
    if bias is None:
        dest[...] = block
    else:
        np.add(block, bias, out=dest)


def _im2col_forward(x, w, out, *, pad, stride, dil, batch_chunk, gemm_order, layout="exact", bias=None):
    """y = conv(x, w) (+ bias) into `out` (N, K, P, Q), one patch matrix per block of images."""
    bias = None if bias is None else bias.reshape(-1, 1, 1)  # broadcasts over (N, K, P, Q)
    if layout == "batch_inner":
        return _im2col_forward_batch_inner(x, w, out, pad=pad, stride=stride, dil=dil,
                                           batch_chunk=batch_chunk, bias=bias)
    n, c = x.shape[:2]
    k, _, r, s = w.shape
    p, q = out.shape[2:]
    view, width = _input_windows(x, pad, r, s, p, q, stride, dil, layout)
    crs, pix = c * r * s, p * width
    wm = w.reshape(k, crs)
    b = min(batch_chunk, n)
    if gemm_order == "w_by_block":
        # Images side by side in the columns: one (K, C·R·S)·(C·R·S, images·pixels) GEMM per block,
        # a better BLAS shape than one thin GEMM per image, paid for by a transposing store.
        cols = _scratch("cols", (c, r, s, b, p, width), x.dtype)
        y = _scratch("y", (k, b, p, width), x.dtype)
        for n0, n1 in _chunks(n, b):
            m = n1 - n0
            np.copyto(cols[:, :, :, :m], view[n0:n1].transpose(1, 2, 3, 0, 4, 5))
            np.matmul(wm, cols[:, :, :, :m].reshape(crs, m * pix), out=y[:, :m].reshape(k, m * pix))
            _store(out[n0:n1], y[:, :m, :, :q].transpose(1, 0, 2, 3), bias)
    elif gemm_order == "w_by_cols":
        # cols[n] is (C·R·S, pixels): W·cols[n] is out[n] itself (exact layout: written in place).
        cols = _scratch("cols", (b, c, r, s, p, width), x.dtype)
        y = out if layout == "exact" else _scratch("y", (b, k, p, width), x.dtype)
        for n0, n1 in _chunks(n, b):
            m = n1 - n0
            np.copyto(cols[:m], view[n0:n1])
            dest = out[n0:n1] if layout == "exact" else y[:m]
            np.matmul(wm, cols[:m].reshape(m, crs, pix), out=dest.reshape(m, k, pix))
            if layout != "exact":
                _store(out[n0:n1], dest[..., :q], bias)
            elif bias is not None:
                dest += bias  # while the block is still in cache
    else:
        # Classic im2col rows (pixels x taps): colsᵀ·Wᵀ gives (pixels, K), transposed on the way out.
        cols = _scratch("cols", (b, p, q, c, r, s), x.dtype)
        prod = _scratch("prod", (b * p * q, k), x.dtype)
        for n0, n1 in _chunks(n, b):
            m = (n1 - n0) * p * q
            block = cols[:n1 - n0]
            np.copyto(block, view[n0:n1].transpose(0, 4, 5, 1, 2, 3))
            np.matmul(block.reshape(m, crs), wm.T, out=prod[:m])
            _store(out[n0:n1], prod[:m].reshape(n1 - n0, p, q, k).transpose(0, 3, 1, 2), bias)
    return out


def _batch_inner_windows(x: np.ndarray, pad: int, r: int, s: int, p: int, q: int, stride: int,
                         dil: int) -> np.ndarray:
    """x padded and transposed to (C, H', W', N), returned as its (C, R, S, P, Q, N) window view.
    With the images innermost, a stride-1 patch row (q, n) is one run of Q·N contiguous values,
    not N runs of Q: far longer copies for small images."""
    n, c, h, w = x.shape
    xt = np.zeros((c, h + 2 * pad, w + 2 * pad, n), x.dtype)
    xt[:, pad:pad + h, pad:pad + w] = x.transpose(1, 2, 3, 0)
    sc, sh, sw, sn = xt.strides
    return as_strided(xt, shape=(c, r, s, p, q, n),
                      strides=(sc, sh * dil, sw * dil, sh * stride, sw * stride, sn), writeable=False)


def _im2col_forward_batch_inner(x, w, out, *, pad, stride, dil, batch_chunk, bias=None):
    """One GEMM per block of images: W (K, C·R·S) · cols (C·R·S, P·Q·images), then the
    (K, P, Q, images) result is transposed into out."""
    n, c = x.shape[:2]
    k, _, r, s = w.shape
    p, q = out.shape[2:]
    wm = w.reshape(k, c * r * s)
    b = min(batch_chunk, n)
    cols = np.empty((c, r, s, p, q, b), x.dtype)
    y = np.empty((k, p * q * b), x.dtype)
    for n0, n1 in _chunks(n, b):
        m = n1 - n0
        block = cols[..., :m] if m < b else cols
        np.copyto(block, _batch_inner_windows(x[n0:n1], pad, r, s, p, q, stride, dil))
        prod = y[:, :p * q * m]
        np.matmul(wm, block.reshape(c * r * s, p * q * m), out=prod)
        _store(out[n0:n1], prod.reshape(k, p, q, m).transpose(3, 0, 1, 2), bias)
    return out


def conv2d_im2col_gemm(problem, knobs, inputs, out):
    """inputs (x, w) or, from a layer with a bias, (x, w, b): the bias is fused (bias_epilogue)."""
    x, w, *bias = (_np(t) for t in inputs)
    _im2col_forward(x, w, _np(out), pad=problem.padding, stride=problem.stride, dil=problem.dilation,
                    batch_chunk=knobs["batch_chunk"], gemm_order=knobs["gemm_order"], layout=knobs["layout"],
                    bias=bias[0] if bias else None)
    return out


# ---------------------------------------------------------------------------------------------
# Forward: one GEMM per filter tap on the wide layout


def conv2d_per_tap(problem, knobs, inputs, out):
    x, w = (_np(t) for t in inputs)
    p = problem
    hp, wp = p.h + 2 * p.padding, p.w + 2 * p.padding
    xw = _wide_input(x, p.padding, _wide_tail(p))
    total = p.n * hp * wp
    y = np.empty((p.k, total), x.dtype)
    tmp = np.empty((p.k, min(total, knobs["col_chunk"])), x.dtype)
    if knobs["loop_order"] == "taps_outer":
        taps = _tap_offsets(p, wp)
        w_taps = np.ascontiguousarray(w.transpose(2, 3, 0, 1))  # (R, S, K, C): one (K, C) per tap
        for l0, l1 in _chunks(total, knobs["col_chunk"]):
            acc, part = y[:, l0:l1], tmp[:, :l1 - l0]
            for i, (r, s, off) in enumerate(taps):
                # The first tap initialises the accumulator; the rest add a GEMM into it.
                np.matmul(w_taps[r, s], xw[:, l0 + off:l1 + off], out=acc if i == 0 else part)
                if i:
                    acc += part
    else:
        # channels_outer: one (R·S, cols) patch matrix per input channel, one GEMM per channel.
        item = xw.itemsize
        w_chan = np.ascontiguousarray(w.transpose(1, 0, 2, 3)).reshape(p.c, p.k, p.r * p.s)
        for l0, l1 in _chunks(total, knobs["col_chunk"]):
            acc, part = y[:, l0:l1], tmp[:, :l1 - l0]
            for c in range(p.c):
                taps = as_strided(xw[c, l0:], shape=(p.r, p.s, l1 - l0),
                                  strides=(wp * p.dilation * item, p.dilation * item, item), writeable=False)
                cols = taps.reshape(p.r * p.s, l1 - l0)  # copies: the tap rows overlap in memory
                np.matmul(w_chan[c], cols, out=acc if c == 0 else part)
                if c:
                    acc += part
    _np(out)[...] = y.reshape(p.k, p.n, hp, wp)[:, :, :p.p, :p.q].transpose(1, 0, 2, 3)
    return out


# ---------------------------------------------------------------------------------------------
# Forward: NumPy's contractions on the window view


def conv2d_tensordot(problem, knobs, inputs, out):
    x, w = (_np(t) for t in inputs)
    p, o = problem, _np(out)
    view = _windows(_padded(x, p.padding), p.r, p.s, p.p, p.q, p.stride, p.dilation)
    for n0, n1 in _chunks(p.n, knobs["batch_chunk"]):
        # tensordot reshapes the window view to (C·R·S, N·P·Q), which is its im2col copy.
        y = np.tensordot(w, view[n0:n1], axes=([1, 2, 3], [1, 2, 3]))  # (K, N, P, Q)
        o[n0:n1] = y.transpose(1, 0, 2, 3)
    return out


def conv2d_einsum(problem, knobs, inputs, out):
    x, w = (_np(t) for t in inputs)
    p, o = problem, _np(out)
    view = _windows(_padded(x, p.padding), p.r, p.s, p.p, p.q, p.stride, p.dilation)
    optimize = {"none": False, "greedy": "greedy"}[knobs["optimize"]]
    for n0, n1 in _chunks(p.n, knobs["batch_chunk"]):
        o[n0:n1] = np.einsum("kcrs,ncrspq->nkpq", w, view[n0:n1], optimize=optimize)
    return out


# ---------------------------------------------------------------------------------------------
# FFT: correlation as a product of spectra. For stride 1, a circular correlation of the padded
# input's size never wraps for a valid output pixel, so that size suffices ("exact"); "pow2"
# rounds it up to FFT-friendly sizes.


def _fft_shape(size_h: int, size_w: int, mode: str) -> tuple[int, int]:
    if mode == "pow2":
        return 1 << (size_h - 1).bit_length(), 1 << (size_w - 1).bit_length()
    return size_h, size_w


def _dilated(w: np.ndarray, dil: int) -> np.ndarray:
    """Filters with dil-1 zeros between taps: a dilated filter is a plain one with holes."""
    if dil == 1:
        return w
    k, c, r, s = w.shape
    wd = np.zeros((k, c, (r - 1) * dil + 1, (s - 1) * dil + 1), w.dtype)
    wd[:, :, ::dil, ::dil] = w
    return wd


def _contract(a: np.ndarray, b: np.ndarray, how: str) -> np.ndarray:
    """out[i, j, f] = sum_m a[i, m, f] · b[m, j, f] for spectra a (I, M, F), b (M, J, F)."""
    if how == "einsum":
        return np.einsum("imf,mjf->ijf", a, b)
    # matmul: one small complex GEMM per frequency, frequencies as the batch dimension.
    prod = np.matmul(a.transpose(2, 0, 1), b.transpose(2, 0, 1))  # (F, I, J)
    return prod.transpose(1, 2, 0)


def _fft_forward(x, w, *, pad, dil, fft_size, contraction):
    """Stride-1 conv2d via rfft2; returns a fresh (N, K, P, Q) array."""
    n, c, h, wd = x.shape
    k = w.shape[0]
    wdil = _dilated(w, dil)
    hp, wp = h + 2 * pad, wd + 2 * pad
    p, q = hp - wdil.shape[2] + 1, wp - wdil.shape[3] + 1
    shape = _fft_shape(hp, wp, fft_size)
    xf = np.fft.rfft2(_padded(x, pad), s=shape)  # zero-pads up to `shape`
    wf = np.conj(np.fft.rfft2(wdil, s=shape))  # conjugate: correlation, not convolution
    f = xf.shape[2] * xf.shape[3]
    yf = _contract(xf.reshape(n, c, f), wf.reshape(k, c, f).transpose(1, 0, 2), contraction)
    y = np.fft.irfft2(yf.reshape(n, k, *xf.shape[2:]), s=shape)
    return y[:, :, :p, :q].astype(x.dtype, copy=False)


def conv2d_fft(problem, knobs, inputs, out):
    x, w = (_np(t) for t in inputs)
    _np(out)[...] = _fft_forward(x, w, pad=problem.padding, dil=problem.dilation,
                                    fft_size=knobs["fft_size"], contraction=knobs["contraction"])
    return out


# ---------------------------------------------------------------------------------------------
# bwd_data


def bwd_data_gemm_col2im(problem, knobs, inputs, out):
    """dx: GEMM Wᵀ·dy gives every tap's contribution (C·R·S, pixels); col2im adds them back."""
    if knobs["layout"] == "wide":
        return _gemm_col2im_wide(problem, knobs, inputs, out)
    dy, w = (_np(t) for t in inputs)
    p, o = problem, _np(out)
    wt = w.reshape(p.k, -1).T  # (C·R·S, K); a transposed view, BLAS reads it as is
    hp, wp = p.h + 2 * p.padding, p.w + 2 * p.padding
    b = min(knobs["batch_chunk"], p.n)
    dx = np.empty((b, p.c, hp, wp), dy.dtype)
    cols = np.empty((b, p.c, p.r, p.s, p.p, p.q), dy.dtype)
    rows = (p.p - 1) * p.stride + 1
    width = (p.q - 1) * p.stride + 1
    for n0, n1 in _chunks(p.n, b):
        m = n1 - n0
        np.matmul(wt, dy[n0:n1].reshape(m, p.k, p.p * p.q), out=cols[:m].reshape(m, -1, p.p * p.q))
        acc = dx[:m]
        acc.fill(0)
        for r in range(p.r):
            for s in range(p.s):
                h0, w0 = r * p.dilation, s * p.dilation
                acc[:, :, h0:h0 + rows:p.stride, w0:w0 + width:p.stride] += cols[:m, :, r, s]
        o[n0:n1] = acc[:, :, p.padding:p.padding + p.h, p.padding:p.padding + p.w]
    return out


def _gemm_col2im_wide(problem, knobs, inputs, out):
    """Stride 1: dy widened to P·W' columns (zeros past Q), so each tap's contribution is one
    contiguous run per (image, channel) and col2im is 25 long adds instead of strided ones."""
    dy, w = (_np(t) for t in inputs)
    p = problem
    hp, wp = p.h + 2 * p.padding, p.w + 2 * p.padding
    wt = w.reshape(p.k, -1).T
    b = min(knobs["batch_chunk"], p.n)
    dyw = np.zeros((b, p.k, p.p, wp), dy.dtype)
    cols = np.empty((b, p.c, p.r, p.s, p.p * wp), dy.dtype)
    image = p.c * hp * wp
    dx = np.zeros(p.n * image + (p.s - 1) * p.dilation, dy.dtype)
    item = dx.itemsize
    for n0, n1 in _chunks(p.n, b):
        m = n1 - n0
        dyw[:m, :, :, :p.q] = dy[n0:n1]
        np.matmul(wt, dyw[:m].reshape(m, p.k, -1), out=cols[:m].reshape(m, -1, p.p * wp))
        for r, s, off in _tap_offsets(p, wp):
            # (images, C, P·W') window of dx that tap (r, s) feeds; rows do not overlap.
            target = as_strided(dx[n0 * image + off:], shape=(m, p.c, p.p * wp),
                                strides=(image * item, hp * wp * item, item))
            target += cols[:m, :, r, s]
    dxp = dx[:p.n * image].reshape(p.n, p.c, hp, wp)
    _np(out)[...] = dxp[:, :, p.padding:p.padding + p.h, p.padding:p.padding + p.w]
    return out


def _transposed_input(problem, dy: np.ndarray) -> np.ndarray:
    """dy upsampled by the stride (zeros between pixels) and padded so that dx is a stride-1,
    unpadded forward conv of it with the flipped filters (size H + (R-1)·d by W + (S-1)·d)."""
    p = problem
    lead_h = (p.r - 1) * p.dilation - p.padding
    lead_w = (p.s - 1) * p.dilation - p.padding
    hz, wz = p.h + (p.r - 1) * p.dilation, p.w + (p.s - 1) * p.dilation
    # Kept between calls: the same pixels are written every time, the zeros between stay zero.
    z = _scratch("dy_upsampled", (p.n, p.k, hz, wz), dy.dtype, zero_key=(p.p, p.q, p.r, p.s, p.stride, p.padding, p.dilation))
    # Rows of dy that land outside z only feed dx pixels outside the image: drop them.
    ph = [i for i in range(p.p) if 0 <= lead_h + i * p.stride < hz]
    pw = [j for j in range(p.q) if 0 <= lead_w + j * p.stride < wz]
    if ph and pw:
        h0, w0 = lead_h + ph[0] * p.stride, lead_w + pw[0] * p.stride
        z[:, :, h0:h0 + (len(ph) - 1) * p.stride + 1:p.stride,
          w0:w0 + (len(pw) - 1) * p.stride + 1:p.stride] = dy[:, :, ph[0]:ph[-1] + 1, pw[0]:pw[-1] + 1]
    return z


def _flipped(w: np.ndarray) -> np.ndarray:
    """(C, K, R, S) filters rotated by 180°: the transpose of the conv as a conv."""
    return np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])


def bwd_data_direct_transpose(problem, knobs, inputs, out):
    dy, w = (_np(t) for t in inputs)
    _im2col_forward(_transposed_input(problem, dy), _flipped(w), _np(out), pad=0, stride=1,
                    dil=problem.dilation, batch_chunk=knobs["batch_chunk"], gemm_order=knobs["gemm_order"],
                    layout=knobs["layout"])
    return out


def bwd_data_fft(problem, knobs, inputs, out):
    dy, w = (_np(t) for t in inputs)
    _np(out)[...] = _fft_forward(_transposed_input(problem, dy), _flipped(w), pad=0,
                                    dil=problem.dilation, fft_size=knobs["fft_size"],
                                    contraction=knobs["contraction"])
    return out


def bwd_data_per_tap(problem, knobs, inputs, out):
    """Stride 1: each tap scatters Wᵀ_rs·dy (one GEMM on the wide layout) at its offset."""
    dy, w = (_np(t) for t in inputs)
    p = problem
    hp, wp = p.h + 2 * p.padding, p.w + 2 * p.padding
    total = p.n * hp * wp
    dyw = _wide_output(dy, hp, wp)
    dxw = np.zeros((p.c, total + _wide_tail(p)), dy.dtype)
    tmp = np.empty((p.c, min(total, knobs["col_chunk"])), dy.dtype)
    w_taps = w.transpose(2, 3, 1, 0)  # (R, S, C, K) views: Wᵀ per tap
    taps = _tap_offsets(p, wp)
    for l0, l1 in _chunks(total, knobs["col_chunk"]):
        part = tmp[:, :l1 - l0]
        for r, s, off in taps:
            np.matmul(w_taps[r, s], dyw[:, l0:l1], out=part)
            dxw[:, l0 + off:l1 + off] += part
    dx = dxw[:, :total].reshape(p.c, p.n, hp, wp)
    _np(out)[...] = dx[:, :, p.padding:p.padding + p.h, p.padding:p.padding + p.w].transpose(1, 0, 2, 3)
    return out


# ---------------------------------------------------------------------------------------------
# bwd_weight


def bwd_weight_im2col_gemm(problem, knobs, inputs, out):
    """dW (K, C·R·S) = Σ_n dy[n] (K, pixels) · cols[n]ᵀ, cols from the same windows as forward.

    layout=wide (stride 1) takes each patch row as one run of P·W' pixels and widens dy with
    zeros past Q, so the garbage columns add nothing to the reduction."""
    x, dy = (_np(t) for t in inputs)
    p = problem
    crs = p.c * p.r * p.s
    view, width = _input_windows(x, p.padding, p.r, p.s, p.p, p.q, p.stride, p.dilation, knobs["layout"])
    rows = p.p
    pix = rows * width
    b = min(knobs["batch_chunk"], p.n)
    dw = np.zeros((p.k, crs), x.dtype)
    folded = knobs["gemm_order"] == "batch_folded"
    # batch_folded puts the images side by side in the columns: one long-reduction GEMM per block.
    cols = _scratch("cols", (p.c, p.r, p.s, b, rows, width) if folded else (b, p.c, p.r, p.s, rows, width), x.dtype)
    # dy widened to the patch width; its columns past Q stay zero (only [..., :Q] is ever written).
    dyb = _scratch("dy_wide", (p.k, b, rows, width) if folded else (b, p.k, rows, width), x.dtype,
                   zero_key=(p.q,))
    prod = None if folded else _scratch("prod", (b, p.k, crs), x.dtype)
    for n0, n1 in _chunks(p.n, b):
        m = n1 - n0
        if folded:
            np.copyto(cols[:, :, :, :m], view[n0:n1].transpose(1, 2, 3, 0, 4, 5))
            dyb[:, :m, :, :p.q] = dy[n0:n1].transpose(1, 0, 2, 3)
            dw += dyb[:, :m].reshape(p.k, m * pix) @ cols[:, :, :, :m].reshape(crs, m * pix).T
        else:
            np.copyto(cols[:m], view[n0:n1])
            dyb[:m, :, :, :p.q] = dy[n0:n1]
            np.matmul(dyb[:m].reshape(m, p.k, pix), cols[:m].reshape(m, crs, pix).transpose(0, 2, 1),
                      out=prod[:m])
            dw += prod[:m].sum(axis=0)
    _np(out)[...] = dw.reshape(p.k, p.c, p.r, p.s)
    return out


def bwd_weight_per_tap(problem, knobs, inputs, out):
    """Stride 1: dW[:, :, r, s] = dy_wide · (input shifted by the tap)ᵀ, one GEMM per tap, with no
    patch matrix; dy's garbage columns are zeros, so the long reduction ignores them."""
    x, dy = (_np(t) for t in inputs)
    p = problem
    hp, wp = p.h + 2 * p.padding, p.w + 2 * p.padding
    total = p.n * hp * wp
    xw = _wide_input(x, p.padding, _wide_tail(p))
    dyw = _wide_output(dy, hp, wp)
    dw = np.zeros((p.r, p.s, p.k, p.c), x.dtype)
    part = np.empty((p.k, p.c), x.dtype)
    for l0, l1 in _chunks(total, knobs["col_chunk"]):
        for r, s, off in _tap_offsets(p, wp):
            np.matmul(dyw[:, l0:l1], xw[:, l0 + off:l1 + off].T, out=part)
            dw[r, s] += part
    _np(out)[...] = dw.transpose(2, 3, 0, 1)
    return out


def bwd_weight_fft(problem, knobs, inputs, out):
    """Stride 1: dW is the correlation of the padded input with dy, summed over the batch;
    a dilated filter reads every d-th lag of it."""
    x, dy = (_np(t) for t in inputs)
    p = problem
    hp, wp = p.h + 2 * p.padding, p.w + 2 * p.padding
    shape = _fft_shape(hp, wp, knobs["fft_size"])
    xf = np.fft.rfft2(_padded(x, p.padding), s=shape)
    dyf = np.conj(np.fft.rfft2(dy, s=shape))
    f = xf.shape[2] * xf.shape[3]
    gf = _contract(dyf.reshape(p.n, p.k, f).transpose(1, 0, 2), xf.reshape(p.n, p.c, f), knobs["contraction"])
    g = np.fft.irfft2(gf.reshape(p.k, p.c, *xf.shape[2:]), s=shape)
    span_r, span_s = (p.r - 1) * p.dilation + 1, (p.s - 1) * p.dilation + 1
    _np(out)[...] = g[:, :, :span_r:p.dilation, :span_s:p.dilation]
    return out


# ---------------------------------------------------------------------------------------------
# Registry

_BATCHED = _checker({}, positive=("batch_chunk",))
_IM2COL_CHOICES = {"gemm_order": ("w_by_cols", "w_by_block", "cols_by_w"), "layout": ("exact", "wide", "batch_inner")}


def _wide_rules(stride_of):
    """check() for knobs with a stride-1-only "wide" layout; stride_of(problem) is the stride of
    the convolution the kernel actually runs (bwd_data's transpose always runs stride 1)."""
    base = _checker(_IM2COL_CHOICES, positive=("batch_chunk",))

    def check(problem, knobs):
        reason = base(problem, knobs)
        if reason is None and knobs["layout"] == "batch_inner" and knobs["gemm_order"] != "w_by_cols":
            return "layout=batch_inner computes W·cols only (gemm_order=w_by_cols)"
        if reason is None and knobs["layout"] == "wide":
            if stride_of(problem) != 1:
                return "layout=wide needs stride 1"
            if knobs["gemm_order"] == "cols_by_w":
                return "layout=wide computes W·cols only (gemm_order=w_by_cols or w_by_block)"
        return reason

    return check


def _bwd_weight_im2col_check(problem, knobs):
    choices = {"gemm_order": ("per_image", "batch_folded"), "layout": ("exact", "wide")}
    reason = _checker(choices, positive=("batch_chunk",))(problem, knobs)
    if reason is None and knobs["layout"] == "wide" and problem.stride != 1:
        return "layout=wide needs stride 1"
    return reason


def _col2im_check(problem, knobs):
    reason = _checker({"layout": ("exact", "wide")}, positive=("batch_chunk",))(problem, knobs)
    if reason is None and knobs["layout"] == "wide" and problem.stride != 1:
        return "layout=wide needs stride 1"
    return reason


_FFT_CHOICES = {"fft_size": ("exact", "pow2"), "contraction": ("matmul", "einsum")}


def _prefer_wide(knobs):
    """Defaults that use the wide layout where it is valid (stride 1), else the exact one. The
    registry calls defaults(None) to learn the knob names, hence the None case."""

    def defaults(problem):
        wide = problem is None or problem.stride == 1
        return {**knobs, "layout": "wide" if wide else "exact"}

    return defaults


def _spec(op, algorithm, run, defaults, check, supports=None, bias_epilogue=False):
    extra = {"supports": supports} if supports else {}
    return KernelSpec(op=op, algorithm=algorithm, backend="numpy", run=run, check=check,
                      defaults=defaults, bias_epilogue=bias_epilogue, **extra)


KERNELS = [
    _spec("conv2d", "im2col_gemm", conv2d_im2col_gemm,
          _prefer_wide({"batch_chunk": 4, "gemm_order": "w_by_cols"}),
          _wide_rules(lambda problem: problem.stride), bias_epilogue=True),
    _spec("conv2d", "per_tap", conv2d_per_tap,
          {"loop_order": "taps_outer", "col_chunk": 16384},
          _checker({"loop_order": ("taps_outer", "channels_outer")}, positive=("col_chunk",)),
          _stride_one),
    _spec("conv2d", "tensordot", conv2d_tensordot, {"batch_chunk": 16}, _BATCHED),
    _spec("conv2d", "einsum", conv2d_einsum, {"batch_chunk": 16, "optimize": "greedy"},
          _checker({"optimize": ("greedy", "none")}, positive=("batch_chunk",))),
    _spec("conv2d", "fft", conv2d_fft, {"fft_size": "exact", "contraction": "einsum"},
          _checker(_FFT_CHOICES), _stride_one),
    _spec("conv2d_bwd_data", "gemm_col2im", bwd_data_gemm_col2im, {"batch_chunk": 16, "layout": "exact"},
          _col2im_check),
    _spec("conv2d_bwd_data", "direct_transpose", bwd_data_direct_transpose,
          {"batch_chunk": 4, "gemm_order": "w_by_cols", "layout": "wide"},
          _wide_rules(lambda problem: 1)),
    _spec("conv2d_bwd_data", "per_tap", bwd_data_per_tap, {"col_chunk": 16384},
          _checker({}, positive=("col_chunk",)), _stride_one),
    _spec("conv2d_bwd_data", "fft", bwd_data_fft, {"fft_size": "exact", "contraction": "einsum"},
          _checker(_FFT_CHOICES)),
    _spec("conv2d_bwd_weight", "im2col_gemm", bwd_weight_im2col_gemm,
          _prefer_wide({"batch_chunk": 8, "gemm_order": "per_image"}),
          _bwd_weight_im2col_check),
    _spec("conv2d_bwd_weight", "per_tap", bwd_weight_per_tap, {"col_chunk": 16384},
          _checker({}, positive=("col_chunk",)), _stride_one),
    _spec("conv2d_bwd_weight", "fft", bwd_weight_fft, {"fft_size": "exact", "contraction": "einsum"},
          _checker(_FFT_CHOICES), _stride_one),
]
