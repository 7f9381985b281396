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
import dataclasses
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from autotune import registry
from autotune.cache import Cache
from autotune.errors import AutotuneError, UnknownNameError
from autotune.problem import Problem
from autotune.progress import Burst

POLICIES = ("cached", "benchmark", "tune")
TUNE_TRIALS = 12  # the "tune" policy's budget per shape: a short search, it runs inside training


@dataclass(frozen=True, kw_only=True)
class Choice:
    spec: object  # kernels.KernelSpec
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
        # With quiet=True (policy()), the shapes that ran torch's op for want of a cached entry
        # are collected here instead of warned about one by one; see uncached().
        self.quiet = False
        self.uncached: list[tuple[Problem, str]] = []
        self.stats: Counter[str] = Counter()
        # The shapes a step meets for the first time are measured one after another (LeNet's
        # first batch: 14 shapes, ~10 s): one bar over that run, which autotune.nn closes as
        # soon as a layer runs on choices already made.
        self.measuring = Burst(desc="autotune: measuring new shapes", unit="done")
        # Bumped whenever a choice may change (policy, cache folder, reset): layers that hold
        # their resolved choices (autotune.nn) re-resolve when it moves.
        self.generation = 0


_state = _State()


def set_policy(name: str, cache_dir: str | Path | None = None) -> None:
    if name not in POLICIES:
        raise UnknownNameError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    _state.policy = name
    _state.generation += 1
    if cache_dir is not None:
        _state.cache_dir = Path(cache_dir)
        _state.memo.clear()


def get_policy() -> str:
    return _state.policy


@contextlib.contextmanager
def policy(name: str, cache_dir: str | Path | None = None, *, quiet: bool = False,
           progress: bool | None = None) -> Iterator[None]:
    """`with autotune.policy("benchmark"): train(model)`: the policy inside the block only.
    quiet=True: no warning per uncached shape; read them with uncached() and say it once.
    progress: a bar on stderr while new shapes are measured for over a second (None: on a
    terminal, see autotune.progress; False: never; True: on a terminal or where forced)."""
    before = (_state.policy, _state.cache_dir, _state.quiet, _state.measuring.enabled)
    set_policy(name, cache_dir)
    _state.quiet = quiet
    _state.measuring.enabled = progress
    try:
        yield
    finally:
        _state.measuring.close()
        _state.policy, _state.cache_dir, _state.quiet, _state.measuring.enabled = before
        _state.generation += 1
        if cache_dir is not None:
            _state.memo.clear()


def stats() -> dict[str, int]:
    """How each selection was answered so far: memo, cache, benchmark, tune, default; and
    "untrusted": measurements the noise guard refused (torch's op ran; nothing was cached)."""
    return dict(_state.stats)


def chosen() -> dict[Problem, Choice]:
    """Current choice per problem (for per-layer reports)."""
    return {problem: choice for (problem, _), choice in _state.memo.items()}


def uncached() -> list[tuple[Problem, str]]:
    """(problem, device) pairs that ran on torch's op because nothing was cached for them
    (collected inside a policy(..., quiet=True) block, in the order first seen)."""
    return list(_state.uncached)


def cache() -> Cache:
    """The cache the current policy reads and writes."""
    return Cache(_state.cache_dir)


def forget(problems: Sequence[Problem], device: str) -> None:
    """Drop these problems' memo entries, so the next select() reads the cache again (the layer
    check re-caches a layer's products)."""
    for problem in problems:
        _state.memo.pop((problem, device), None)


def reset() -> None:
    """Forget the memo and statistics (the cache on disk stays)."""
    _state.memo.clear()
    _state.warned.clear()
    _state.uncached.clear()
    _state.stats.clear()
    _state.generation += 1


def generation() -> int:
    """Changes whenever a cached choice may no longer hold (see _State.generation)."""
    return _state.generation


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
    """Follow the cached entry; on a miss, the policy's way to one (every way goes through
    autotune.decision, so the choice here is exactly what `autotune show` prints)."""
    specs = registry.kernels_for(problem, device)
    by_name = {s.algorithm: s for s in specs}
    cache = Cache(_state.cache_dir)
    entry = cache.find(problem, device, specs)
    source = "cache"
    if entry is None and _state.policy in ("benchmark", "tune"):
        _state.measuring.begin(f"{_state.policy} {problem.slug()}")
        entry, source = _measure(problem, device, specs, inputs, cache), _state.policy
        _state.measuring.end()
    if entry is None or entry.algorithm not in by_name:
        return _default(problem, device, by_name)
    if not entry.trustworthy and "vendor" in by_name:
        # Not cached, and not followed either: torch's op is the safe choice for this process.
        _state.stats["untrusted"] += 1
        warnings.warn(f"{problem.describe()}: {entry.reason}; using torch's op", stacklevel=4)
        entry = dataclasses.replace(entry, algorithm="vendor", knobs={})
    spec = by_name[entry.algorithm]
    return Choice(spec=spec, knobs=spec.full_knobs(problem, entry.knobs), source=source,
                  median_ms=entry.median_ms)


def measuring_done() -> None:
    """The run of first-time measurements is over (a layer ran on choices already made): the
    measuring bar, if one is open, goes."""
    _state.measuring.close()


def _measure(problem: Problem, device: str, specs, inputs, cache: Cache):
    """The benchmark or tune policy's entry for a cache miss; None (torch's op by default) when
    nothing could be measured."""
    from autotune import decision
    from autotune.reference import make_inputs

    try:
        if _state.policy == "tune":
            # In process on the CPU: a worker would be spawned per shape (~2.5 s each), re-importing
            # the user's training script as multiprocessing's spawn does; training runs these
            # kernels in its own process anyway once chosen.
            return decision.search(problem, device=device, cache=cache, trials=TUNE_TRIALS, specs=specs,
                                   source="tune", unwritable_ok=True, in_process=device == "cpu")
        if inputs is None:  # a gradient not computed yet: random tensors of its shape
            inputs = make_inputs(problem, device=device)
        return decision.benchmark(problem, device=device, inputs=inputs, cache=cache, specs=specs)
    except AutotuneError as exc:
        warnings.warn(f"{exc}; using torch's op", stacklevel=5)
    return None


def _default(problem: Problem, device: str, by_name: dict) -> Choice:
    if (problem, device) not in _state.warned:
        _state.warned.add((problem, device))
        if _state.quiet:
            _state.uncached.append((problem, device))
        else:
            warnings.warn(f"no tuned kernel cached for {problem.describe()} on {device}; using torch's "
                          "op (run `autotune search` or use policy 'benchmark')", stacklevel=4)
    spec = by_name.get("vendor") or next(iter(by_name.values()))
    # torch's op untuned runs as the user's torch is set up (its TF32 flags, say), like plain torch.
    knobs = {} if spec.algorithm == "vendor" else spec.default_config(problem).as_dict()
    return Choice(spec=spec, knobs=knobs, source="default")
