"""The kernel contract and the registry: (op, algorithm) -> KernelSpec.

Kernel code lives in `kernels/`, one module per (backend, op family), each with a module-level
`KERNELS` list of `KernelSpec`s. Kernel modules import this module (the contract); the core never
imports them directly, only through `module(name)` here, by name. The registry loads a module only
when its backend can run (Triton modules need a GPU, or the interpreter in tests), attaches the
knob domains from `search_spaces/<module>.toml` and a hash of the module's source and of the
project modules it imports (a changed kernel or helper invalidates its cache entries).

A kernel's `run(problem, knobs, inputs, out)` reads torch tensors and returns the result. A kernel
that writes into a buffer writes into `out` and returns it; the verifier fills `out` with NaN
first, so an element the kernel forgets to write shows up as a wrong answer. A kernel whose
library allocates its own result (torch's ops, numpy's FFT) may return that instead of copying.

Users' own kernel modules (plugins) follow the same contract: a module with a `KERNELS` list of
`autotune.KernelSpec`s, named in the environment variable `AUTOTUNE_PLUGINS` (comma-separated
module names, importable from sys.path) or registered by an installed package under the entry
point group `autotune.kernels`. Its search spaces live beside it, in `<module file stem>.toml`
(same format as search_spaces/*.toml), and its hash covers its own file and the autotune modules
it imports. A plugin may not reuse a built-in (op, algorithm): names must stay unambiguous in
caches and in `--algorithms`.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from autotune import precision
from autotune.errors import PluginError, SearchSpaceError, UnknownNameError
from autotune.problem import Problem
from autotune.space import Config, Param, Space, Value, load_spaces

# The package that holds our kernel modules, and the top-level packages of this project whose
# imports count towards a kernel's source hash.
KERNEL_PACKAGE = "kernels"
PROJECT_PACKAGES = ("kernels", "autotune")
# Module name -> backend. "numpy" and "numba" (compiled loop nests) run on the CPU, "triton" on a
# CUDA GPU, "torch" on both.
# Helper modules without kernels (kernels/triton_tiles.py) are not listed: they count through the
# source hash of the modules that import them.
MODULES = {
    "numpy_conv": "numpy",
    "numpy_gemm": "numpy",
    "numpy_winograd": "numpy",
    "numpy_pool": "numpy",
    "numba_pool": "numba",
    "numba_gemm": "numba",
    "vendor": "torch",
    "triton_gemm": "triton",
    "triton_conv": "triton",
}
# Where users name their own kernel modules (see the module docstring).
PLUGIN_ENV = "AUTOTUNE_PLUGINS"
PLUGIN_GROUP = "autotune.kernels"
BACKENDS_BY_DEVICE = {"cpu": ("numpy", "numba", "torch"), "cuda": ("triton", "torch")}
ALL_BACKENDS = ("numpy", "numba", "torch", "triton")
# The dtypes each backend computes in (a kernel's supports() may narrow this further): NumPy has
# no bfloat16 and its float16 matmul is not BLAS; Triton's tl.dot has no float64 fast path.
BACKEND_DTYPES = {
    "numpy": ("float32", "float64"),
    "numba": ("float32", "float64"),
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
    # True when run() also takes a layer's bias as a third input, (x, w, b), and adds it in the
    # kernel's epilogue (forward convs): the layer then skips a separate pass over the output.
    bias_epilogue: bool = False
    # Max-pool forwards only: run(problem, knobs, inputs, out, indices) that also writes torch's
    # argmax indices (int64, flat within each plane, as max_pool2d_with_indices) into `indices`,
    # so a layer can run our forward and torch's gradient, which needs them. out and indices are
    # contiguous NumPy arrays or CPU tensors.
    run_with_indices: Callable[..., Any] | None = None
    # What check() believes a config needs on a GPU, e.g. {"shared": bytes, "registers": per
    # thread}; `autotune compile-check` compares it with the compiler's figures.
    resources: Callable[[Problem, Knobs], Mapping[str, int]] | None = None
    # Configs that practice has found fast on the GPUs of the day (partial knobs; the rest keep
    # their default), measured right after the defaults and warm-start configs. A GPU search
    # measures a few dozen configs at a second of compiling each, so where it starts matters.
    seeds: Callable[[Problem], Sequence[Knobs]] | None = None
    # Knobs that change nothing on a CPU (torch's TF32 flags): a CPU search keeps them at their
    # default instead of measuring the same kernel twice under two names.
    gpu_only_knobs: tuple[str, ...] = ()
    # Filled in by the registry:
    space: Space = Space()
    source_hash: str = ""
    module: str = ""  # "numpy_gemm" for ours (kernels/numpy_gemm.py), the dotted name for a plugin
    plugin: bool = False

    def default_config(self, problem: Problem) -> Config:
        knobs = self.defaults(problem) if callable(self.defaults) else self.defaults
        return Config.make(self.algorithm, knobs)

    def seed_configs(self, problem: Problem) -> list[Config]:
        if self.seeds is None:
            return []
        return [Config.make(self.algorithm, self.full_knobs(problem, knobs)) for knobs in self.seeds(problem)]

    def full_knobs(self, problem: Problem, knobs: Knobs) -> dict[str, Value]:
        """Knobs the space does not search keep their default value."""
        return {**self.default_config(problem).as_dict(), **knobs}


def search_spaces_dir() -> Path:
    override = os.environ.get("AUTOTUNE_SEARCH_SPACES")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "search_spaces"


# ---------------------------------------------------------------------------------------------
# Loading kernel modules (the core's only way in)


@cache
def module(name: str) -> ModuleType:
    """The kernel module `kernels.<name>`, imported once (later calls are a dict lookup).

    The core reaches kernel code only through here, e.g. nn.py's `module("vendor").conv2d_bias`.
    """
    if name not in MODULES:
        raise UnknownNameError(f"unknown kernel module {name!r}; choose one of {', '.join(MODULES)}")
    if MODULES[name] == "numpy":
        _single_threaded_numpy_blas()
    return importlib.import_module(f"{KERNEL_PACKAGE}.{name}")


@cache
def _load_module(name: str) -> tuple[KernelSpec, ...]:
    mod = module(name)
    path = Path(mod.__file__).resolve()
    # The folder that holds the kernels package holds the rest of the project too (source tree
    # or site-packages), so the hash can follow imports of autotune.* from there.
    source_hash = source_hash_of(path, path.parent.parent)
    return _registered(mod.KERNELS, name, search_spaces_dir() / f"{name}.toml", source_hash, plugin=False)


def _registered(kernels, name: str, spaces_path: Path, source_hash: str, *, plugin: bool) -> tuple[KernelSpec, ...]:
    """A module's KERNELS with their knob domains (from `spaces_path`, if it exists) and hash."""
    spaces = load_spaces(spaces_path) if spaces_path.exists() else {}
    specs = []
    for spec in kernels:
        space = spaces.pop((spec.op, spec.algorithm), Space())
        knob_names = set(spec.defaults(None) if callable(spec.defaults) else spec.defaults)
        unknown = [p.name for p in space if p.name not in knob_names]
        if unknown:
            raise SearchSpaceError(
                f"{spaces_path}: [{spec.op}.{spec.algorithm}] has unknown knob(s) {unknown}; "
                f"known knobs: {sorted(knob_names)}"
            )
        specs.append(
            dataclasses.replace(spec, space=space, source_hash=source_hash, module=name, plugin=plugin)
        )
    if spaces:
        extra = ", ".join(f"[{op}.{algo}]" for op, algo in spaces)
        raise SearchSpaceError(f"{spaces_path}: no kernel is registered for {extra}")
    return tuple(specs)


# ---------------------------------------------------------------------------------------------
# Plugins: users' own kernel modules


def plugin_modules() -> dict[str, str]:
    """Plugin module name -> where it was named ("AUTOTUNE_PLUGINS" or "entry point <name>"), in
    that order. Read on every call: the variable may change between searches (tests do)."""
    found: dict[str, str] = {}
    for name in os.environ.get(PLUGIN_ENV, "").split(","):
        if name.strip():
            found.setdefault(name.strip(), PLUGIN_ENV)
    for point_name, module_name in _entry_points():
        found.setdefault(module_name, f"entry point {point_name!r} of group {PLUGIN_GROUP!r}")
    return found


@cache
def _entry_points() -> tuple[tuple[str, str], ...]:
    """(entry point name, module name) of the installed `autotune.kernels` entry points."""
    points = importlib.metadata.entry_points(group=PLUGIN_GROUP)
    return tuple((point.name, point.module) for point in points)


@cache
def _load_plugin(name: str, origin: str) -> tuple[KernelSpec, ...]:
    """A plugin module's kernels; anything wrong with it is one PluginError line, no traceback."""
    where = f"plugin module {name!r} (from {origin})"
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        hint = " (is its folder on PYTHONPATH?)" if exc.name and name.startswith(exc.name) else ""
        raise PluginError(f"{where} failed to import: {_one_line(exc)}{hint}") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a user's module may raise anything
        raise PluginError(f"{where} failed to import: {_one_line(exc)}") from None
    kernels = getattr(mod, "KERNELS", None)
    if not isinstance(kernels, (list, tuple)):
        raise PluginError(f"{where} has no KERNELS list (a module-level list of autotune.KernelSpec)")
    for i, spec in enumerate(kernels):
        if not isinstance(spec, KernelSpec):
            raise PluginError(f"{where}: KERNELS[{i}] is a {type(spec).__name__}, not an autotune.KernelSpec")
        if spec.backend not in BACKEND_DTYPES:
            raise PluginError(f"{where}: {spec.op}.{spec.algorithm} has backend {spec.backend!r}; "
                              f"choose one of {', '.join(BACKEND_DTYPES)}")
    if getattr(mod, "__file__", None) is None:
        raise PluginError(f"{where} has no source file to hash (a namespace package?)")
    if any(spec.backend == "numpy" for spec in kernels):
        _single_threaded_numpy_blas()
    path = Path(mod.__file__).resolve()
    # The hash covers the plugin's file and the autotune modules it imports, under the folder
    # that holds the autotune package.
    source_hash = source_hash_of(path, Path(__file__).resolve().parent.parent)
    try:
        return _registered(kernels, name, path.with_suffix(".toml"), source_hash, plugin=True)
    except SearchSpaceError as exc:
        raise PluginError(f"{where}: {exc}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _plugins() -> list[KernelSpec]:
    """Every plugin's kernels, checked for clashes with ours (of every backend this machine can
    load, so a name that works on the CPU does not break on a GPU) and with each other."""
    modules = plugin_modules()
    if not modules:
        return []
    taken = {(s.op, s.algorithm): f"built-in kernels.{s.module}" for s in _builtins(BACKEND_DTYPES)}
    specs = []
    for name, origin in modules.items():
        for spec in _load_plugin(name, origin):
            owner = taken.get((spec.op, spec.algorithm))
            if owner is not None:
                raise PluginError(f"plugin module {name!r} (from {origin}): {spec.op}.{spec.algorithm} is "
                                  f"already registered by {owner}; rename the algorithm")
            taken[(spec.op, spec.algorithm)] = f"plugin {name}"
            specs.append(spec)
    return specs


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


# ---------------------------------------------------------------------------------------------
# Source hashes


def source_hash_of(path: Path, root: Path) -> str:
    """16 hex digits of sha256 over a module's source and the project modules it imports.

    Imports of kernels.* and autotune.* are found by parsing (ast; nothing is imported), followed
    transitively, and resolved to files under `root` (the folder that holds both packages).
    Every file contributes its path relative to `root` and its bytes, in sorted order, so the
    hash does not depend on where the project lives. Only the modules named in an import count,
    not the packages above them: `from autotune.registry import KernelSpec` pulls in
    autotune/registry.py (and what it imports) but not autotune/__init__.py, which would drag in
    the whole core and invalidate every cache entry on any edit.
    """
    root = root.resolve()
    digest = hashlib.sha256()
    for file in _project_closure(path.resolve(), root):
        # A plugin's own file lies outside the project: it counts by its name.
        name = file.relative_to(root).as_posix() if file.is_relative_to(root) else file.name
        digest.update(name.encode() + b"\0")
        digest.update(file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _project_closure(path: Path, root: Path) -> list[Path]:
    """`path` and the project files it imports, directly or not, sorted by path."""
    seen = {path}
    todo = [path]
    while todo:
        for dep in _project_imports(todo.pop(), root):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return sorted(seen)


def _project_imports(path: Path, root: Path) -> set[Path]:
    """Files under `root` that the module at `path` imports (at any depth of its code)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = _package_of(path, root)
    found: set[Path] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module or "", node.level, package)
            # `from kernels import triton_tiles` names a module; `from kernels.x import f` names
            # something in kernels/x.py.
            names = [f"{base}.{alias.name}" for alias in node.names]
            # `from autotune import KernelSpec` (how plugins import the contract) names a public
            # re-export: it counts as autotune/registry.py, where __init__ imports it from, not
            # as the whole package.
            names = [_reexported_from(name, root) for name in names]
            if any(_module_file(name, root) is None for name in names):
                names.append(base)
        else:
            continue
        for name in names:
            if name.split(".")[0] in PROJECT_PACKAGES:
                file = _module_file(name, root)
                if file is not None:
                    found.add(file)
    return found


def _reexported_from(name: str, root: Path) -> str:
    """`autotune.KernelSpec` -> `autotune.registry` when autotune/__init__.py says `from
    autotune.registry import KernelSpec`; any other name unchanged."""
    package, _, attr = name.rpartition(".")
    init = _module_file(package, root)
    if init is None or init.name != "__init__.py" or _module_file(name, root) is not None:
        return name
    for node in ast.parse(init.read_bytes(), filename=str(init)).body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == attr for a in node.names):
            source = _absolute(node.module or "", node.level, package)
            if _module_file(source, root) is not None:
                return source
    return name


def _package_of(path: Path, root: Path) -> str:
    """Dotted package of the module at `path` ('kernels' for kernels/triton_conv.py)."""
    try:
        parts = path.relative_to(root).parent.parts
    except ValueError:  # a file outside the project: relative imports cannot reach the project
        return ""
    return ".".join(parts)


def _absolute(name: str, level: int, package: str) -> str:
    """`from ..x import y` inside `package` -> the absolute name of `..x`."""
    if level == 0:
        return name
    parts = package.split(".") if package else []
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _module_file(name: str, root: Path) -> Path | None:
    if not name:
        return None
    stem = root.joinpath(*name.split("."))
    for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# Queries


def available_backends(device_kind: str) -> tuple[str, ...]:
    return BACKENDS_BY_DEVICE[device_kind]


def load(backends: Sequence[str] = ALL_BACKENDS) -> list[KernelSpec]:
    """Every registered kernel of the given backends (Triton and Numba skipped where they do not
    import): ours, then the plugins'."""
    backends = [b for b in backends if backend_importable(b)]
    plugins = [spec for spec in _plugins() if spec.backend in backends]
    return [*_builtins(backends), *plugins]


def _builtins(backends) -> list[KernelSpec]:
    specs: list[KernelSpec] = []
    for name, backend in MODULES.items():
        if backend in backends:
            specs.extend(_load_module(name))
    return specs


def kernels_for(problem: Problem, device_kind: str) -> list[KernelSpec]:
    """Kernels that can run `problem` on this device, in registry order, as a search there sees
    them (for_device; on a GPU, TF32 only where torch's switch allows it: autotune.precision)."""
    return [
        for_device(spec, device_kind, problem)
        for spec in load(available_backends(device_kind))
        if spec.op == problem.op
        and problem.dtype in BACKEND_DTYPES[spec.backend]
        and spec.supports(problem) is None
    ]


def for_device(spec: KernelSpec, device_kind: str, problem: Problem | None = None) -> KernelSpec:
    """The spec as a search on this device sees it: on a CPU without its GPU-only knobs; on a GPU,
    for a float32 `problem` whose TF32 switch is off, without TF32 values and with IEEE defaults."""
    if device_kind != "cuda":
        if not spec.gpu_only_knobs:
            return spec
        kept = tuple(p for p in spec.space if p.name not in spec.gpu_only_knobs)
        return dataclasses.replace(spec, space=Space(params=kept))
    if problem is None or problem.dtype != "float32" or precision.tf32_allowed(problem.op):
        return spec
    pinned = tuple(Param(name=p.name, values=tuple(v for v in p.values if v != precision.TF32_KNOBS[p.name][0]))
                   if p.name in precision.TF32_KNOBS else p for p in spec.space)
    defaults = spec.defaults

    def ieee_defaults(prob):
        knobs = defaults(prob) if callable(defaults) else defaults
        return knobs if prob is None else precision.ieee_only(dict(knobs))

    return dataclasses.replace(spec, space=Space(params=tuple(p for p in pinned if p.values)),
                               defaults=ieee_defaults)


def valid_configs(problem: Problem, specs: Sequence[KernelSpec]) -> list[Config]:
    """Every config the kernels' own constraints admit for `problem`: torch's op first, then each
    algorithm's default, then the rest in space order. A search measures nothing else, so
    `--trials N` is N real measurements (or the whole valid space when it is smaller)."""
    ordered = sorted(specs, key=lambda spec: spec.algorithm != "vendor")
    configs = [Config.make(s.algorithm, s.full_knobs(problem, s.default_config(problem).as_dict()))
               for s in ordered]
    for spec in ordered:
        configs += [Config.make(spec.algorithm, spec.full_knobs(problem, knobs)) for knobs in spec.space.configs()]
    by_name = {spec.algorithm: spec for spec in specs}
    return [c for c in dict.fromkeys(configs) if by_name[c.algorithm].check(problem, c.as_dict()) is None]


def get(op: str, algorithm: str, device_kind: str | None = None) -> KernelSpec:
    backends = available_backends(device_kind) if device_kind else ALL_BACKENDS
    specs = load(backends)
    for spec in specs:
        if spec.op == op and spec.algorithm == algorithm:
            return for_device(spec, device_kind) if device_kind else spec
    known = sorted({s.algorithm for s in specs if s.op == op})
    raise UnknownNameError(
        f"unknown algorithm {algorithm!r} for {op}; choose one of {', '.join(known) or '(none)'}"
    )


def backend_importable(backend: str) -> bool:
    """Triton and Numba are imported only where they exist (the GPU machines have no Numba, a
    CPU-only install may have no Triton); NumPy and torch always do."""
    if backend == "triton":
        return triton_available()
    if backend == "numba":
        return numba_available()
    return True


@cache
def numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


@cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
