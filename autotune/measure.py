"""Check a candidate, then time it.

Correct first: every candidate runs on fresh random inputs into a NaN-poisoned output and is
compared with a float64 reference; only then is it timed. Timing warms up, repeats within a
millisecond budget and reports the median and the 20th/80th percentiles. GPU timing uses
`triton.testing.do_bench` (CUDA events, L2 flushed between runs); CPU timing uses
`time.perf_counter` over back-to-back runs, caches warm (no flush: a small kernel's time inside a
training step can be 2-3x its time here, which is what the layer and step checks are for; see
the README's "Measured on the development machine").
"""

from __future__ import annotations

import contextlib
import enum
import functools
import io
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from autotune.problem import Problem
from autotune.reference import empty_output, make_inputs, reference


class Status(enum.StrEnum):
    OK = "ok"
    INVALID = "invalid"  # the kernel's constraints reject this config for this problem
    COMPILE_ERROR = "compile_error"
    OUT_OF_RESOURCES = "out_of_resources"
    WRONG_ANSWER = "wrong_answer"
    TIMEOUT = "timeout"
    CRASHED = "crashed"


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """Times in milliseconds."""

    median: float
    p20: float
    p80: float
    n: int

    def spread(self) -> float:
        """Relative half-width of the p20..p80 band: the noise a comparison must beat."""
        return (self.p80 - self.p20) / (2 * self.median) if self.median > 0 else 0.0

    def as_dict(self) -> dict:
        return {"median_ms": self.median, "p20_ms": self.p20, "p80_ms": self.p80, "n": self.n}

    @classmethod
    def from_dict(cls, data: dict) -> Measurement:
        return cls(median=data["median_ms"], p20=data["p20_ms"], p80=data["p80_ms"], n=data["n"])


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What evaluating one candidate gave: a status, a time when ok, an error otherwise."""

    status: Status
    measurement: Measurement | None = None
    error: float | None = None  # max relative error against the reference
    message: str = ""
    # Wall seconds of the first call (the verification run). For a Triton kernel that call
    # JIT-compiles it, which on a GPU is most of what a candidate costs (autotune compile-check:
    # ~1 s typical, up to 45 s); tune(compile_budget=...) adds these up.
    first_call_s: float | None = None

    def as_dict(self) -> dict:
        """Plain data (for a worker's pipe or a study's user attrs)."""
        return {"status": self.status.value,
                "measurement": self.measurement.as_dict() if self.measurement else None,
                "error": self.error if self.error is not None and math.isfinite(self.error) else None,
                "message": self.message, "first_call_s": self.first_call_s}

    @classmethod
    def from_dict(cls, data: dict) -> Outcome:
        m = data.get("measurement")
        return cls(status=Status(data["status"]), measurement=Measurement.from_dict(m) if m else None,
                   error=data.get("error"), message=data.get("message", ""),
                   first_call_s=data.get("first_call_s"))


# Relative tolerance (max |out - ref| / max |ref|) per dtype. The bound grows like the square root
# of the reduction length, the usual behaviour of rounding errors in long sums.
BASE_TOLERANCE = {"float64": 1e-12, "float32": 2e-6, "tf32": 1e-3, "float16": 1e-3, "bfloat16": 8e-3}


def tolerance(dtype: str, reduction_length: int) -> float:
    return BASE_TOLERANCE[dtype] * max(1.0, reduction_length**0.5)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error over max |ref|; NaN or inf anywhere in `out` counts as infinitely wrong."""
    out64 = out.detach().to(device="cpu", dtype=torch.float64)
    if out64.shape != ref.shape:
        return float("inf")
    if not torch.isfinite(out64).all():
        return float("inf")
    scale = ref.abs().max().item() or 1.0
    return (out64 - ref).abs().max().item() / scale


def verify(problem: Problem, out: torch.Tensor, ref: torch.Tensor, *, dtype: str | None = None) -> tuple[bool, float]:
    """(ok, error): whether `out` matches the float64 reference within the dtype's tolerance."""
    error = relative_error(out, ref)
    return error <= tolerance(dtype or problem.dtype, problem.reduction_length()), error


def bench_cpu(fn: Callable[[], object], *, warmup_ms: float = 5.0, rep_ms: float = 40.0,
              max_reps: int = 1000) -> Measurement:
    """Median of repeated perf_counter timings within a time budget (at least 5 runs)."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    warmups = max(1, min(50, int(warmup_ms / 1e3 / max(once, 1e-7))))
    for _ in range(warmups):
        fn()
    reps = max(5, min(max_reps, int(rep_ms / 1e3 / max(once, 1e-7))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def bench_gpu(fn: Callable[[], object], *, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Measurement:
    from triton.testing import do_bench

    p20, median, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    # do_bench decides the repetition count from rep_ms; estimate it for the record.
    return Measurement(median=median, p20=p20, p80=p80, n=max(1, int(rep_ms / max(median, 1e-3))))


def bench(fn: Callable[[], object], *, device: str, warmup_ms: float | None = None,
          rep_ms: float | None = None) -> Measurement:
    options = {k: v for k, v in (("warmup_ms", warmup_ms), ("rep_ms", rep_ms)) if v is not None}
    return bench_gpu(fn, **options) if device == "cuda" else bench_cpu(fn, **options)


def summarize(times: list[float]) -> Measurement:
    """Median and p20/p80 of timings in milliseconds."""
    times = sorted(times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return Measurement(median=statistics.median(times), p20=q[1], p80=q[7], n=len(times))


# The noise guard. Two measurements of the same config agree when their medians differ by less
# than this factor, widened by their own spread (a config that jitters by ±30% may move that much).
# Seen on the 2-core dev machine with the other core busy: torch's 2-thread OpenMP op measured
# 0.7-0.9 ms during a search and 24 ms in the final re-timing (a whole scheduler slice per call).
AGREE_FACTOR = 1.5
# A timing more than this many times another of the same config is impossible, whatever its spread.
IMPOSSIBLE_FACTOR = 10.0
# Differences below this are never a disagreement: microsecond kernels jitter by more than 1.5x on
# a shared machine, and a gap this small is less than a layer call costs (decision.LAYER_OVERHEAD_MS),
# so it cannot turn a decision.
AGREE_ABS_MS = 0.02


def agree(a: Measurement, b: Measurement) -> bool:
    """Whether two timings of one config tell the same story (see AGREE_FACTOR)."""
    lo, hi = sorted((a.median, b.median))
    if hi - lo <= AGREE_ABS_MS:
        return True
    if lo <= 0:
        return False
    allowed = min(IMPOSSIBLE_FACTOR, AGREE_FACTOR + 3 * max(a.spread(), b.spread()))
    return hi / lo <= allowed


@contextlib.contextmanager
def pinned_threads(count: int | None) -> Iterator[int]:
    """torch's CPU thread count fixed to `count` (None: leave it) for the block; yields the count
    in force. NumPy's OpenBLAS runs on one thread whenever our NumPy kernels are loaded (see the
    registry), so torch's pool is the one to pin."""
    before = torch.get_num_threads()
    if count is not None and count != before:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def clearly_faster(ours: Measurement, theirs: Measurement) -> bool:
    """Whether `ours` wins by more than the measured noise (the larger relative spread)."""
    return ours.median * (1 + max(ours.spread(), theirs.spread())) < theirs.median


COMPILE_ERRORS = ("CompilationError", "CompileTimeAssertionFailure", "UnsupportedLanguageConstruct",
                  "PTXASError")


def classify_exception(exc: BaseException) -> Status:
    """Map a kernel failure to a trial status (a failure is a result, not a crash)."""
    name = type(exc).__name__
    text = str(exc)
    # MemoryError: a host allocation that failed (numpy's "Unable to allocate 9.1 PiB").
    if (name == "OutOfResources" or "out of resource" in text.lower()
            or isinstance(exc, (torch.OutOfMemoryError, MemoryError))):
        return Status.OUT_OF_RESOURCES
    # Triton's front end (CompilationError and subclasses), ptxas (PTXASError, e.g. "Insufficient
    # registers") and its MLIR passes (a RuntimeError "PassManager::run failed").
    if (name in COMPILE_ERRORS or "compil" in name.lower()
            or any(cls.__name__ in COMPILE_ERRORS for cls in type(exc).__mro__)
            or "PassManager::run failed" in text):
        return Status.COMPILE_ERROR
    return Status.CRASHED


@functools.lru_cache(maxsize=2)
def _inputs_and_reference(problem: Problem, device: str, seed: int):
    """Random inputs and their float64 answer, computed once per search rather than per
    candidate (the reference of a 4096³ GEMM takes seconds on the CPU)."""
    inputs = make_inputs(problem, device=device, seed=seed)
    return inputs, reference(problem, inputs)


def precision_of(problem: Problem, knobs) -> str:
    """The arithmetic a config asks for: TF32 knobs loosen a float32 tolerance to TF32's."""
    if problem.dtype == "float32" and (knobs.get("input_precision") == "tf32" or knobs.get("allow_tf32")):
        return "tf32"
    return problem.dtype


def check_candidate(problem: Problem, spec, knobs, *, device: str, seed: int = 0) -> Outcome:
    """Verify only (no timing): OK, or why not. What the correctness tests assert on."""
    return evaluate(problem, spec, knobs, device=device, seed=seed, timed=False)


def evaluate(problem: Problem, spec, knobs, *, device: str, seed: int = 0,
             rep_ms: float | None = None, timed: bool = True) -> Outcome:
    """Verify `spec` with `knobs` on fresh random inputs, then time it. Never raises for a bad
    candidate."""
    inputs, ref = _inputs_and_reference(problem, device, seed)
    return evaluate_on(problem, spec, spec.full_knobs(problem, knobs), inputs, ref, device=device,
                       rep_ms=rep_ms, timed=timed)


def evaluate_on(problem: Problem, spec, knobs, inputs, ref, *, device: str,
                rep_ms: float | None = None, timed: bool = True) -> Outcome:
    """Check the config, run once on `inputs` into a NaN-poisoned output, compare with the float64
    answer `ref`, then (if timed) time it on the same tensors. The dispatch `benchmark` policy
    calls this on a layer's real tensors."""
    reason = spec.check(problem, knobs)
    if reason is not None:
        return Outcome(status=Status.INVALID, message=reason)
    inputs = tuple(t.clone() for t in inputs)  # a kernel that writes its inputs spoils only its own copy
    out = empty_output(problem, device=device)
    out.fill_(float("nan"))
    start = time.perf_counter()
    try:
        # Triton prints the whole PTX (tens of KB) to stdout when ptxas fails; the exception
        # carries ptxas's own message, so the dump is dropped.
        with contextlib.redirect_stdout(io.StringIO()):
            result = spec.run(problem, knobs, inputs, out)
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - any kernel failure is a trial result
        return Outcome(status=classify_exception(exc), message=f"{type(exc).__name__}: {exc}"[:500],
                       first_call_s=time.perf_counter() - start)
    first_call_s = time.perf_counter() - start
    ok, error = verify(problem, result, ref, dtype=precision_of(problem, knobs))
    if not ok:
        return Outcome(status=Status.WRONG_ANSWER, error=error, first_call_s=first_call_s,
                       message=f"max relative error {error:.2e} above tolerance")
    if not timed:
        return Outcome(status=Status.OK, error=error, first_call_s=first_call_s)
    measurement = bench(lambda: spec.run(problem, knobs, inputs, out), device=device, rep_ms=rep_ms)
    return Outcome(status=Status.OK, measurement=measurement, error=error, first_call_s=first_call_s)
