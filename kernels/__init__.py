"""The kernel registry: (op, algorithm) -> KernelSpec.

Each module here holds the kernels of one (backend, op family) and lists them in a module-level
`KERNELS` list. The registry loads a module only when its backend can run (Triton modules need a
GPU, or the interpreter in tests), attaches the knob domains from `search_spaces/<module>.toml`
and a hash of the module's source (a changed kernel invalidates its cache entries).

A kernel's `run(problem, knobs, inputs, out)` reads torch tensors and returns the result. A kernel
that writes into a buffer writes into `out` and returns it; the verifier fills `out` with NaN
first, so an element the kernel forgets to write shows up as a wrong answer. A kernel whose
library allocates its own result (torch's ops, numpy's FFT) may return that instead of copying.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from autotune.errors import SearchSpaceError, UnknownNameError
from autotune.problem import Problem
from autotune.space import Config, Space, Value, load_spaces

# Module name -> backend. "numpy" runs on the CPU, "triton" on a CUDA GPU, "torch" on both.
MODULES = {
    "numpy_conv": "numpy",
    "numpy_gemm": "numpy",
    "vendor": "torch",
    "triton_gemm": "triton",
    "triton_conv": "triton",
}
BACKENDS_BY_DEVICE = {"cpu": ("numpy", "torch"), "cuda": ("triton", "torch")}
# The dtypes each backend computes in (a kernel's supports() may narrow this further): NumPy has
# no bfloat16 and its float16 matmul is not BLAS; Triton's tl.dot has no float64 fast path.
BACKEND_DTYPES = {
    "numpy": ("float32", "float64"),
    "triton": ("float32", "float16", "bfloat16"),
    "torch": ("float32", "float64", "float16", "bfloat16"),
}

Knobs = Mapping[str, Value]
RunFn = Callable[[Problem, Knobs, Sequence[Any], Any], Any]


def _always(*_: object) -> str | None:
    return None


@dataclass(frozen=True, kw_only=True)
class KernelSpec:
    """One algorithm for one op.

    supports(problem) and check(problem, knobs) return None when fine, else the reason in words
    (an unsupported problem skips the algorithm; a failed check makes the trial `invalid`).
    defaults is the knob setting tried first, or a function of the problem that returns it
    (called with None to learn the knob names, which must cover the search space).
    """

    op: str
    algorithm: str
    backend: str
    run: RunFn
    supports: Callable[[Problem], str | None] = _always
    check: Callable[[Problem, Knobs], str | None] = _always
    defaults: Knobs | Callable[[Problem], Knobs] = dataclasses.field(default_factory=dict)
    # True when the kernel's library allocates its result (torch's ops): run() then accepts
    # out=None, which spares the hot path an allocation.
    allocates: bool = False
    # Filled in by the registry:
    space: Space = Space()
    source_hash: str = ""
    module: str = ""

    def default_config(self, problem: Problem) -> Config:
        knobs = self.defaults(problem) if callable(self.defaults) else self.defaults
        return Config.make(self.algorithm, knobs)

    def full_knobs(self, problem: Problem, knobs: Knobs) -> dict[str, Value]:
        """Knobs the space does not search keep their default value."""
        return {**self.default_config(problem).as_dict(), **knobs}


def search_spaces_dir() -> Path:
    override = os.environ.get("AUTOTUNE_SEARCH_SPACES")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "search_spaces"


@cache
def _load_module(name: str) -> tuple[KernelSpec, ...]:
    if MODULES[name] == "numpy":
        _single_threaded_numpy_blas()
    module = importlib.import_module(f"kernels.{name}")
    source = Path(module.__file__).read_bytes()
    source_hash = hashlib.sha256(source).hexdigest()[:16]
    path = search_spaces_dir() / f"{name}.toml"
    spaces = load_spaces(path) if path.exists() else {}
    specs = []
    for spec in module.KERNELS:
        space = spaces.pop((spec.op, spec.algorithm), Space())
        knob_names = set(spec.defaults(None) if callable(spec.defaults) else spec.defaults)
        unknown = [p.name for p in space if p.name not in knob_names]
        if unknown:
            raise SearchSpaceError(
                f"{path}: [{spec.op}.{spec.algorithm}] has unknown knob(s) {unknown}; "
                f"known knobs: {sorted(knob_names)}"
            )
        specs.append(
            dataclasses.replace(spec, space=space, source_hash=source_hash, module=name)
        )
    if spaces:
        extra = ", ".join(f"[{op}.{algo}]" for op, algo in spaces)
        raise SearchSpaceError(f"{path}: no kernel is registered for {extra}")
    return tuple(specs)


@cache
def _single_threaded_numpy_blas() -> None:
    """Run NumPy's OpenBLAS on one thread while our NumPy kernels are in use.

    torch's OpenMP pool and OpenBLAS's pool each spin-wait for their threads; on a small CPU the
    two fight for the same cores. Measured on the 2-core dev machine: torch's matmul for a
    256x84x120 GEMM went from 0.04 ms to 8 ms per call after OpenBLAS had run, and a LeNet step
    with one NumPy kernel from 9 ms to 30 ms. With one OpenBLAS thread the LeNet suite's
    geomean (torch time / best NumPy time) moved from 0.67 to 0.65 and those stalls vanished.
    torch's own BLAS (MKL/oneDNN) keeps its threads.
    """
    from threadpoolctl import ThreadpoolController

    ThreadpoolController().select(internal_api="openblas").limit(limits=1)


def available_backends(device_kind: str) -> tuple[str, ...]:
    return BACKENDS_BY_DEVICE[device_kind]


def load(backends: Sequence[str] = ("numpy", "torch", "triton")) -> list[KernelSpec]:
    """Every registered kernel of the given backends (Triton skipped if it does not import)."""
    specs: list[KernelSpec] = []
    for name, backend in MODULES.items():
        if backend not in backends:
            continue
        if backend == "triton" and not triton_available():
            continue
        specs.extend(_load_module(name))
    return specs


def kernels_for(problem: Problem, device_kind: str) -> list[KernelSpec]:
    """Kernels that can run `problem` on this device, in registry order."""
    return [
        spec
        for spec in load(available_backends(device_kind))
        if spec.op == problem.op
        and problem.dtype in BACKEND_DTYPES[spec.backend]
        and spec.supports(problem) is None
    ]


def get(op: str, algorithm: str, device_kind: str | None = None) -> KernelSpec:
    backends = available_backends(device_kind) if device_kind else ("numpy", "torch", "triton")
    specs = load(backends)
    for spec in specs:
        if spec.op == op and spec.algorithm == algorithm:
            return spec
    known = sorted({s.algorithm for s in specs if s.op == op})
    raise UnknownNameError(
        f"unknown algorithm {algorithm!r} for {op}; choose one of {', '.join(known) or '(none)'}"
    )


@cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
