"""Pick the kernel for a problem at run time: in-process memo -> cache -> policy.

Policies (what to do when the cache has no entry for a shape):
- "cached":    use the algorithm's default config (vendor first) and warn once per shape;
- "benchmark": time every supported algorithm (its cached or default config) on the real tensors,
               keep the fastest correct one, write it to the cache. Like cudnn.benchmark, but it
               survives the process;
- "tune":      run a short Optuna search and cache the winner.
A cache hit is remembered in the memo, so the next call is one dict lookup.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from autotune import registry
from autotune.cache import Cache
from autotune.errors import CacheWriteError, UnknownNameError
from autotune.problem import Problem
from autotune.registry import KernelSpec

POLICIES = ("cached", "benchmark", "tune")
TUNE_TRIALS = 12  # the "tune" policy's budget per shape: a short search, it runs inside training
BENCHMARK_REP_MS = 10.0  # per-algorithm timing budget of the "benchmark" policy (once per shape)
# What a layer pays per call for leaving torch's native op for our autograd.Function (measured by
# benchmarks/dispatch_overhead.py on the 2-core dev CPU: 12-24 µs). A kernel that saves less than
# this per call would make the layer slower, so torch's op keeps the layer.
LAYER_OVERHEAD_MS = 0.02


@dataclass(frozen=True, kw_only=True)
class Choice:
    spec: KernelSpec
    knobs: dict
    source: str  # "cache", "benchmark", "tune" or "default"
    median_ms: float | None = None

    def run(self, problem: Problem, inputs: Sequence[torch.Tensor], out: torch.Tensor | None = None):
        return self.spec.run(problem, self.knobs, inputs, out)


class _State:
    def __init__(self) -> None:
        self.policy = "cached"
        self.cache_dir: Path | None = None
        self.memo: dict[tuple[Problem, str], Choice] = {}
        self.warned: set[tuple[Problem, str]] = set()
        self.stats: Counter[str] = Counter()


_state = _State()


def set_policy(name: str, cache_dir: str | Path | None = None) -> None:
    if name not in POLICIES:
        raise UnknownNameError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    _state.policy = name
    if cache_dir is not None:
        _state.cache_dir = Path(cache_dir)
        _state.memo.clear()


def get_policy() -> str:
    return _state.policy


@contextlib.contextmanager
def policy(name: str, cache_dir: str | Path | None = None) -> Iterator[None]:
    """`with autotune.policy("benchmark"): train(model)`: the policy inside the block only."""
    before = (_state.policy, _state.cache_dir)
    set_policy(name, cache_dir)
    try:
        yield
    finally:
        _state.policy, _state.cache_dir = before
        if cache_dir is not None:
            _state.memo.clear()


def stats() -> dict[str, int]:
    """How each selection was answered so far: memo, cache, benchmark, tune, default."""
    return dict(_state.stats)


def chosen() -> dict[Problem, Choice]:
    """Current choice per problem (for per-layer reports)."""
    return {problem: choice for (problem, _), choice in _state.memo.items()}


def reset() -> None:
    """Forget the memo and statistics (the cache on disk stays)."""
    _state.memo.clear()
    _state.warned.clear()
    _state.stats.clear()


def select(problem: Problem, device: str, inputs: Sequence[torch.Tensor] | None = None) -> Choice:
    """The kernel to run `problem` with on `device` (hot path: a dict lookup on a memo hit)."""
    memo_key = (problem, device)
    choice = _state.memo.get(memo_key)
    if choice is not None and (choice.source != "default" or _state.policy == "cached"):
        _state.stats["memo"] += 1
        return choice
    choice = _select_slow(problem, device, inputs)
    _state.memo[memo_key] = choice
    _state.stats[choice.source] += 1
    return choice


def _select_slow(problem: Problem, device: str, inputs) -> Choice:
    specs = registry.kernels_for(problem, device)
    cache = Cache(_state.cache_dir)
    entry = cache.find(problem, device, {s.algorithm: s.source_hash for s in specs})
    by_name = {s.algorithm: s for s in specs}
    if entry is not None and entry.algorithm in by_name:
        spec = by_name[entry.algorithm]
        median, vendor_ms = entry.record.get("median_ms"), entry.record.get("vendor_ms")
        if "vendor" in by_name and not _worth_leaving_torch(median, vendor_ms):
            spec = by_name["vendor"]
            return Choice(spec=spec, knobs=spec.default_config(problem).as_dict(), source="cache",
                          median_ms=vendor_ms)
        return Choice(spec=spec, knobs=spec.full_knobs(problem, entry.knobs), source="cache",
                      median_ms=median)
    if _state.policy == "benchmark":
        return _benchmark(problem, device, specs, inputs, cache, entry)
    if _state.policy == "tune":
        return _tune(problem, device, specs, cache)
    return _default(problem, device, by_name)


def _worth_leaving_torch(ours_ms: float | None, vendor_ms: float | None) -> bool:
    """Whether our kernel saves more per call than running it outside torch's op costs."""
    if ours_ms is None or vendor_ms is None:
        return True  # nothing to compare with: the cached winner stands
    return vendor_ms - ours_ms > LAYER_OVERHEAD_MS


def _default(problem: Problem, device: str, by_name: dict) -> Choice:
    if (problem, device) not in _state.warned:
        _state.warned.add((problem, device))
        warnings.warn(f"no tuned kernel cached for {problem.describe()} on {device}; using torch's "
                      "op (run `autotune search` or use policy 'benchmark')", stacklevel=4)
    spec = by_name.get("vendor") or next(iter(by_name.values()))
    return Choice(spec=spec, knobs=spec.default_config(problem).as_dict(), source="default")


def _benchmark(problem, device, specs, inputs, cache: Cache, entry) -> Choice:
    from autotune import measure
    from autotune.reference import make_inputs, reference

    if inputs is None:
        inputs = make_inputs(problem, device=device)
    inputs = tuple(t.detach() for t in inputs)
    ref = reference(problem, inputs)
    results = []
    for spec in specs:
        knobs = spec.default_config(problem).as_dict()
        if entry is not None and entry.algorithm == spec.algorithm:
            knobs = spec.full_knobs(problem, entry.knobs)
        outcome = measure.evaluate_on(problem, spec, knobs, inputs, ref, device=device,
                                      rep_ms=BENCHMARK_REP_MS)
        if outcome.status is measure.Status.OK:  # a kernel that fails here is simply not chosen
            results.append((outcome.measurement.median, spec, knobs, outcome.measurement))
    if not results:
        return _default(problem, device, {s.algorithm: s for s in specs})
    median, spec, knobs, m = min(results, key=lambda r: r[0])
    vendor_result = next((r for r in results if r[1].algorithm == "vendor"), None)
    vendor = vendor_result[3] if vendor_result else None
    if vendor is not None and not (measure.clearly_faster(m, vendor)
                                   and _worth_leaving_torch(m.median, vendor.median)):
        median, spec, knobs, m = vendor_result  # a tie goes to torch's op
    _remember(lambda: cache.save(problem, device, algorithm=spec.algorithm, knobs=knobs,
                                 kernel_hash=spec.source_hash, result=_summary(m, vendor, "benchmark")))
    return Choice(spec=spec, knobs=knobs, source="benchmark", median_ms=median)


def _tune(problem, device, specs, cache: Cache) -> Choice:
    from autotune.tuner import tune

    result = tune(problem, device=device, trials=TUNE_TRIALS, specs=specs)
    if result.best is None:
        return _default(problem, device, {s.algorithm: s for s in specs})
    spec = next(s for s in specs if s.algorithm == result.best.algorithm)
    knobs = result.best.config.as_dict()
    _remember(lambda: save_result(cache, result, device, source="tune"))
    return Choice(spec=spec, knobs=knobs, source="tune", median_ms=result.best.measurement.median)


def _remember(write) -> None:
    """Write a choice to the cache; training goes on (with a warning) if the cache is unwritable,
    the choice then lasting for this process only."""
    try:
        write()
    except CacheWriteError as exc:
        warnings.warn(f"{exc}; the choice is kept for this process only", stacklevel=4)


def _summary(best, vendor, source: str) -> dict:
    return {
        "median_ms": best.median,
        "p20_ms": best.p20,
        "p80_ms": best.p80,
        "vendor_ms": vendor.median if vendor is not None else None,
        "source": source,
    }


def save_result(cache: Cache, result, device: str, *, source: str = "search") -> None:
    """Write a TuneResult's winner to the cache (the CLI's search and the tune policy)."""
    spec = registry.get(result.problem.op, result.best.algorithm, device)
    vendor = result.vendor.measurement if result.vendor else None
    summary = _summary(result.best.measurement, vendor, source)
    summary["trials"] = result.counts()
    if result.best_own is not None:
        summary["best_own"] = {"algorithm": result.best_own.algorithm,
                               "knobs": result.best_own.config.as_dict(),
                               "median_ms": result.best_own.measurement.median}
    cache.save(result.problem, device, algorithm=result.best.algorithm,
               knobs=result.best.config.as_dict(), kernel_hash=spec.source_hash, result=summary)
