"""What to compute: a convolution, a GEMM or a max-pool of a given shape and dtype.

Problems are frozen dataclasses so they can key dictionaries (the dispatch memo) and caches.
`parse_problem` turns the CLI's shape grammar ("3x32x32", "64x3x32x32", "512x512x512") into one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from autotune.errors import ShapeError, UnknownNameError

CONV_OPS = ("conv2d", "conv2d_bwd_data", "conv2d_bwd_weight")
GEMM_OPS = ("gemm",)
POOL_OPS = ("max_pool2d", "max_pool2d_bwd")
OPS = CONV_OPS + GEMM_OPS + POOL_OPS
DTYPES = ("float32", "float64", "float16", "bfloat16")

# LeNet's first convolution: what `autotune search conv2d --shape 3x32x32` means when the
# user gives only the image.
DEFAULT_BATCH = 64
DEFAULT_FILTERS = (6, 5, 5)


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(frozen=True, kw_only=True)
class Conv2dProblem:
    """A 2-D convolution in NCHW layout with square stride/padding/dilation.

    The same shape describes all three ops: `conv2d` (x, w -> y), `conv2d_bwd_data`
    (dy, w -> dx) and `conv2d_bwd_weight` (x, dy -> dw).
    """

    op: str = "conv2d"
    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def p(self) -> int:
        """Output height."""
        return _conv_out(self.h, self.r, self.stride, self.padding, self.dilation)

    @property
    def q(self) -> int:
        """Output width."""
        return _conv_out(self.w, self.s, self.stride, self.padding, self.dilation)

    def validate(self) -> None:
        if self.op not in CONV_OPS:
            raise UnknownNameError(f"unknown conv op {self.op!r}; choose one of {', '.join(CONV_OPS)}")
        _check_dtype(self.dtype)
        for name in ("n", "c", "h", "w", "k", "r", "s", "stride", "dilation"):
            _check_positive(name, getattr(self, name))
        if self.padding < 0:
            raise ShapeError(f"padding must be >= 0, got {self.padding}")
        span_h = self.dilation * (self.r - 1) + 1
        span_w = self.dilation * (self.s - 1) + 1
        if span_h > self.h + 2 * self.padding or span_w > self.w + 2 * self.padding:
            raise ShapeError(
                f"filter {self.r}x{self.s} (dilation {self.dilation}) is larger than the padded "
                f"input {self.h + 2 * self.padding}x{self.w + 2 * self.padding}; "
                "use a smaller --filters or more --padding"
            )

    # Shapes of the tensors each op reads and writes.
    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    @property
    def w_shape(self) -> tuple[int, int, int, int]:
        return (self.k, self.c, self.r, self.s)

    @property
    def y_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.k, self.p, self.q)

    def input_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return {
            "conv2d": (self.x_shape, self.w_shape),
            "conv2d_bwd_data": (self.y_shape, self.w_shape),
            "conv2d_bwd_weight": (self.x_shape, self.y_shape),
        }[self.op]

    def output_shape(self) -> tuple[int, ...]:
        return {
            "conv2d": self.y_shape,
            "conv2d_bwd_data": self.x_shape,
            "conv2d_bwd_weight": self.w_shape,
        }[self.op]

    def reduction_length(self) -> int:
        """How many products are summed into one output element (drives the tolerance)."""
        return {
            "conv2d": self.c * self.r * self.s,
            "conv2d_bwd_data": self.k * self.r * self.s,
            "conv2d_bwd_weight": self.n * self.p * self.q,
        }[self.op]

    def flops(self) -> int:
        # Every op does the same multiply-adds as the forward pass.
        return 2 * self.n * self.k * self.p * self.q * self.c * self.r * self.s

    def with_op(self, op: str) -> Conv2dProblem:
        return dataclasses.replace(self, op=op)

    def describe(self) -> str:
        return (
            f"{self.op} {self.n}x{self.c}x{self.h}x{self.w} * {self.k}x{self.c}x{self.r}x{self.s}"
            f" stride {self.stride} pad {self.padding} dil {self.dilation} {self.dtype}"
        )

    def key(self) -> str:
        return _stable_key(self)

    def slug(self) -> str:
        """A short readable name (Optuna study names): conv2d-64x3x32x32-6x5x5-s1p0d1-float32."""
        return (f"{self.op}-{self.n}x{self.c}x{self.h}x{self.w}-{self.k}x{self.r}x{self.s}"
                f"-s{self.stride}p{self.padding}d{self.dilation}-{self.dtype}")


@dataclass(frozen=True, kw_only=True)
class GemmProblem:
    """C[M,N] = op(A)·op(B), where op transposes a stored operand when asked.

    A is stored as (M, K), or (K, M) with trans_a; B as (K, N), or (N, K) with trans_b. A linear
    layer's forward is x·Wᵀ (trans_b), its grad input dY·W, its grad weight dYᵀ·X (trans_a).
    """

    op: str = "gemm"
    m: int
    n: int
    k: int
    trans_a: bool = False
    trans_b: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.op not in GEMM_OPS:
            raise UnknownNameError(f"unknown gemm op {self.op!r}; use 'gemm'")
        _check_dtype(self.dtype)
        for name in ("m", "n", "k"):
            _check_positive(name, getattr(self, name))

    def input_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        a = (self.k, self.m) if self.trans_a else (self.m, self.k)
        b = (self.n, self.k) if self.trans_b else (self.k, self.n)
        return (a, b)

    def output_shape(self) -> tuple[int, int]:
        return (self.m, self.n)

    def reduction_length(self) -> int:
        return self.k

    def flops(self) -> int:
        return 2 * self.m * self.n * self.k

    def describe(self) -> str:
        ta = "ᵀ" if self.trans_a else ""
        tb = "ᵀ" if self.trans_b else ""
        return f"gemm A{ta}·B{tb} {self.m}x{self.n}x{self.k} {self.dtype}"

    def key(self) -> str:
        return _stable_key(self)

    def slug(self) -> str:
        """A short readable name (Optuna study names): gemm-64x10x84-nt-float32."""
        layout = ("t" if self.trans_a else "n") + ("t" if self.trans_b else "n")
        return f"gemm-{self.m}x{self.n}x{self.k}-{layout}-{self.dtype}"


@dataclass(frozen=True, kw_only=True)
class Pool2dProblem:
    """Max-pooling over non-overlapping window x window tiles (stride = window, no padding, the
    output floored as torch does), NCHW: `max_pool2d` (x -> y) and its gradient `max_pool2d_bwd`
    ((x, y, dy) -> dx, y the forward's output: dy goes to the first maximum of each window in
    row-major order, torch's choice at ties). Overlapping or padded pools are left to torch
    (autotune.patch skips them)."""

    op: str = "max_pool2d"
    n: int
    c: int
    h: int
    w: int
    window: int = 2
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def p(self) -> int:
        return self.h // self.window

    @property
    def q(self) -> int:
        return self.w // self.window

    def validate(self) -> None:
        if self.op not in POOL_OPS:
            raise UnknownNameError(f"unknown pool op {self.op!r}; choose one of {', '.join(POOL_OPS)}")
        _check_dtype(self.dtype)
        for name in ("n", "c", "h", "w", "window"):
            _check_positive(name, getattr(self, name))
        if self.window > min(self.h, self.w):
            raise ShapeError(f"window {self.window} is larger than the input {self.h}x{self.w}")

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    @property
    def y_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.p, self.q)

    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.x_shape,) if self.op == "max_pool2d" else (self.x_shape, self.y_shape, self.y_shape)

    def output_shape(self) -> tuple[int, ...]:
        return self.y_shape if self.op == "max_pool2d" else self.x_shape

    def reduction_length(self) -> int:
        return self.window * self.window

    def flops(self) -> int:
        return self.n * self.c * self.p * self.q * self.window * self.window  # comparisons

    def with_op(self, op: str) -> Pool2dProblem:
        return dataclasses.replace(self, op=op)

    def describe(self) -> str:
        return f"{self.op} {self.n}x{self.c}x{self.h}x{self.w} window {self.window} {self.dtype}"

    def key(self) -> str:
        return _stable_key(self)

    def slug(self) -> str:
        """A short readable name (Optuna study names): max_pool2d-16x6x28x28-w2-float32."""
        return f"{self.op}-{self.n}x{self.c}x{self.h}x{self.w}-w{self.window}-{self.dtype}"


Problem = Conv2dProblem | GemmProblem | Pool2dProblem


def problem_to_dict(problem: Problem) -> dict:
    return dataclasses.asdict(problem)


def problem_from_dict(data: dict) -> Problem:
    """Rebuild a problem from the cache's JSON (validated like user input)."""
    if not isinstance(data, dict):
        raise ShapeError("a problem must be a JSON object")
    op = data.get("op")
    cls = GemmProblem if op in GEMM_OPS else Pool2dProblem if op in POOL_OPS else Conv2dProblem
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ShapeError(f"unknown problem fields {sorted(unknown)}")
    try:
        return cls(**data)
    except TypeError as exc:  # a missing field, or a value of the wrong type inside validate()
        raise ShapeError(f"malformed problem: {exc}") from None


def _stable_key(problem: Problem) -> str:
    return json.dumps(dataclasses.asdict(problem), sort_keys=True, separators=(",", ":"))


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ShapeError(f"{name} must be a positive integer, got {value!r}")


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UnknownNameError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def parse_dims(text: str, what: str, ranks: tuple[int, ...]) -> tuple[int, ...]:
    """'64x3x32x32' -> (64, 3, 32, 32), with a message that names the expected grammar."""
    parts = str(text).strip().lower().split("x")
    grammar = " or ".join("x".join(["N"] * r) for r in ranks)
    if len(parts) not in ranks:
        raise ShapeError(f"{what} {text!r} has {len(parts)} dimension(s); expected {grammar}")
    dims = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise ShapeError(f"{what} {text!r}: {part!r} is not an integer; expected {grammar}") from None
        if value <= 0:
            raise ShapeError(f"{what} {text!r}: every dimension must be positive, got {value}")
        dims.append(value)
    return tuple(dims)


def parse_problem(
    op: str,
    shape: str,
    *,
    batch: int | None = None,
    filters: str | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    trans_a: bool = False,
    trans_b: bool = False,
    dtype: str = "float32",
    window: int | None = None,
) -> Problem:
    """Build a problem from the CLI grammar.

    Conv ops take CxHxW (batch from --batch, default 64) or NxCxHxW; --filters is KxRxS or
    KxCxRxS (C must then match the input). gemm takes MxNxK. Pool ops take the conv input
    grammar and --window (default 2).
    """
    if op in GEMM_OPS:
        m, n, k = parse_dims(shape, "gemm shape", (3,))
        return GemmProblem(m=m, n=n, k=k, trans_a=trans_a, trans_b=trans_b, dtype=dtype)
    if op not in CONV_OPS + POOL_OPS:
        raise UnknownNameError(f"unknown op {op!r}; choose one of {', '.join(OPS)}")
    dims = parse_dims(shape, "pool shape" if op in POOL_OPS else "conv shape", (3, 4))
    if len(dims) == 4:
        n, c, h, w = dims
        if batch is not None and batch != n:
            raise ShapeError(f"--batch {batch} contradicts the batch {n} in --shape {shape}")
    else:
        c, h, w = dims
        n = DEFAULT_BATCH if batch is None else batch
    if op in POOL_OPS:
        return Pool2dProblem(op=op, n=n, c=c, h=h, w=w, window=2 if window is None else window, dtype=dtype)
    if filters is None:
        k, r, s = DEFAULT_FILTERS
    else:
        fdims = parse_dims(filters, "--filters", (3, 4))
        if len(fdims) == 4:
            k, fc, r, s = fdims
            if fc != c:
                raise ShapeError(
                    f"--filters {filters} expects {fc} input channels but --shape {shape} has {c}"
                )
        else:
            k, r, s = fdims
    return Conv2dProblem(
        op=op, n=n, c=c, h=h, w=w, k=k, r=r, s=s,
        stride=stride, padding=padding, dilation=dilation, dtype=dtype,
    )
