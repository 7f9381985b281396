"""The one decision path: cache hit, or measure, decide "torch's op or ours", and store.

`search()` (public as `autotune.search`) is what the CLI, `bench`, the `tune` dispatch policy and
the training example call; `benchmark()` is the `benchmark` policy's quicker variant, timing each
algorithm's default config on a layer's real tensors. Both end in `decide()`, the only place
where our kernel is preferred to torch's op, and in one `Entry`, which dispatch then follows.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import torch

from autotune import device as devices
from autotune import measure, registry
from autotune.cache import Cache
from autotune.confirm import Candidate, confirm
from autotune.entry import VENDOR, Entry, OwnKernel, stamp
from autotune.errors import AutotuneError, CacheWriteError, UnknownNameError
from autotune.problem import Problem
from autotune.space import Config

# What a layer pays per call for leaving torch's native op for our autograd.Function (measured by
# benchmarks/dispatch_overhead.py on the 2-core dev CPU: 12-24 µs). A kernel that saves less than
# this per call would make the layer slower, so torch's op keeps the layer.
LAYER_OVERHEAD_MS = 0.02
BENCHMARK_REP_MS = 10.0  # per-algorithm timing budget of the "benchmark" policy (once per shape)


def decide(best_own: Candidate | None, vendor: Candidate | None, *,
           overhead_ms: float = LAYER_OVERHEAD_MS) -> tuple[Candidate, str]:
    """(the candidate a layer should run, why). Ours only when it beats torch's op by more than
    the measured noise AND by more than a layer pays for leaving torch's op; a tie is torch's."""
    if best_own is None and vendor is None:
        raise ValueError("nothing to decide between")
    if vendor is None:
        return best_own, "torch's op was not measured"
    if best_own is None:
        return vendor, "no kernel of ours passed verification"
    ours, theirs = best_own.measurement, vendor.measurement
    if not measure.clearly_faster(ours, theirs):
        return vendor, (f"ours ({best_own.algorithm}, {ours.median:.4g} ms) is not faster than torch's "
                        f"op ({theirs.median:.4g} ms) beyond the noise")
    saved = theirs.median - ours.median
    if saved <= overhead_ms:
        return vendor, (f"ours saves {saved * 1e3:.1f} µs per call, less than the {overhead_ms * 1e3:.0f} µs "
                        "a layer pays for leaving torch's op")
    return best_own, f"{theirs.median / ours.median:.2f}x faster than torch's op beyond the noise"


def default_study_name(problem: Problem, device: str, *, sampler: str = "hybrid", seed: int | None = 0,
               threads: int | None = None) -> str:
    """The Optuna study a search of `problem` records its trials in, e.g.
    conv2d-64x3x32x32-6x5x5-s1p0d1-float32-cpu1t-3fa2c1-hybrid-seed0: the thread count on the CPU
    (a study measured on 2 threads must not resume on 1) and the machine's hardware tag (workers
    on other hardware sharing the database get their own study, not a mix of both timings)."""
    where = f"cpu{threads or torch.get_num_threads()}t" if device == "cpu" else device
    return f"{problem.slug()}-{where}-{devices.machine_tag(device)}-{sampler}-seed{seed}"


def search(problem: Problem, *, device: str = "cpu", cache: Cache | None = None, trials: int = 40,
           timeout: float | None = None, sampler: str = "hybrid", storage: str | None = None,
           study_name: str | None = None, seed: int | None = 0, specs: Sequence | None = None,
           force: bool = False, progress=False, threads: int | None = None, evaluate=None,
           source: str = "search", unwritable_ok: bool = False, warm_start: bool = True,
           stop_calls: int | None = None, in_process: bool = False,
           compile_budget: float | None = None, new_generation: bool | None = None) -> Entry:
    """The cached entry for `problem`, or tune it (Optuna), decide, and cache a trustworthy result.

    threads pins torch's CPU thread count for the search (None: as it is); it is part of the
    cache key. An untrustworthy result (the noise guard) is returned with `trustworthy=False` and
    its reason, and not cached. Raises AutotuneError when no candidate passed verification, and
    CacheWriteError when the cache cannot be written (unless `unwritable_ok`: then a warning, and
    the entry is returned uncached, as training needs). warm_start measures the winners of
    cached neighbouring shapes (same op, other batch size or channels) right after the defaults.
    stop_calls (`--stop auto`) ends the search early when the rest of the budget cannot pay for
    itself over that many calls of the kernel (autotune.stopping). Candidates run in an isolated
    worker process unless `in_process` (or a custom `evaluate` is given). compile_budget caps the
    seconds Triton candidates' first calls (their JIT compile) may take in all (`--compile-budget`).

    With a database `storage`, processes and machines running the same search share one study
    (autotune.claims): one budget, no config measured twice, the finalists re-timed once; the
    entry is also written to the database's results table (autotune.results_db). force starts a
    new generation of the study unless new_generation says otherwise (False: join the current
    one, as `search model` does for a problem another worker tuned).
    """
    specs = _specs(problem, device, specs)
    cache = cache if cache is not None else Cache()
    with measure.pinned_threads(threads if device == "cpu" else None) as count:
        if not force:
            hit = cache.find(problem, device, specs)
            if hit is not None:
                return hit
        from autotune.tuner import tune  # optuna is loaded only when a search runs

        name = study_name or default_study_name(problem, device, sampler=sampler, seed=seed, threads=count)
        warm = warm_configs(cache.neighbours(problem, device)) if warm_start else []
        result = tune(problem, device=device, trials=trials, timeout=timeout, sampler=sampler,
                      storage=storage, study_name=name, seed=seed, specs=specs, progress=progress,
                      fresh=force if new_generation is None else new_generation, evaluate=evaluate,
                      warm_start=warm, stop_calls=stop_calls, in_process=in_process, compile_budget=compile_budget)
        if result.best_own is None and result.vendor is None:
            counts = ", ".join(f"{k} {v}" for k, v in result.counts().items())
            raise AutotuneError(f"no candidate passed verification for {problem.describe()} ({counts}); "
                                "nothing was cached")
        entry = _entry(problem, device, specs, result.best_own, result.vendor, trials=result.counts(),
                       threads=count, distrust=result.distrust, source=source)
        entry = dataclasses.replace(entry, valid_configs=result.valid_configs, stopped=result.stopped,
                                    created=stamp())
    _store(cache, entry, unwritable_ok)
    if storage is not None and entry.trustworthy:
        share(storage, entry)
    return entry


def share(storage: str, entry: Entry) -> None:
    """The entry into the database's results table, for `autotune cache pull` on other machines
    (a storage without one, e.g. Optuna's journal files, is skipped; a failure is a warning: the
    local cache has the entry)."""
    from autotune import claims, results_db

    if not claims.is_database_url(storage):
        return

    try:
        results_db.for_url(storage).put([entry])
    except AutotuneError as exc:
        warnings.warn(f"{exc}; the entry is in the local cache only", stacklevel=3)


def benchmark(problem: Problem, *, device: str, inputs: Sequence[torch.Tensor], cache: Cache,
              specs: Sequence | None = None) -> Entry:
    """The `benchmark` policy: every algorithm's default config verified and timed on the layer's
    real tensors, the finalists re-timed by the noise guard, then decided and cached like a search
    (an unwritable cache is a warning: the choice then lasts for this process)."""
    from autotune.reference import reference

    specs = _specs(problem, device, specs)
    by_name = {s.algorithm: s for s in specs}
    inputs = tuple(t.detach() for t in inputs)
    ref = reference(problem, inputs)

    def evaluate(problem_, spec, knobs):
        return measure.evaluate_on(problem_, spec, spec.full_knobs(problem_, knobs), inputs, ref,
                                   device=device, rep_ms=BENCHMARK_REP_MS)

    first = []
    for spec in specs:
        knobs = spec.default_config(problem).as_dict()
        outcome = evaluate(problem, spec, knobs)
        if outcome.status is measure.Status.OK:  # a kernel that fails here is simply not chosen
            first.append(Candidate(config=Config.make(spec.algorithm, spec.full_knobs(problem, knobs)),
                                   measurement=outcome.measurement))
    own = min((c for c in first if c.algorithm != VENDOR), key=lambda c: c.measurement.median, default=None)
    vendor = next((c for c in first if c.algorithm == VENDOR), None)
    finalists = [c for c in (own, vendor) if c is not None]
    if not finalists:
        raise AutotuneError(f"no kernel passed verification for {problem.describe()} on {device}")
    # No bar of its own: dispatch's bar over the shapes being measured says which one this is.
    confirmed, distrust = confirm(finalists, problem, by_name, evaluate, progress=False)
    own = next((c for c in confirmed if c.algorithm != VENDOR), None)
    vendor = next((c for c in confirmed if c.algorithm == VENDOR), None)
    if own is None and vendor is None:
        raise AutotuneError(f"no kernel passed its re-timing for {problem.describe()} on {device}")
    entry = _entry(problem, device, specs, own, vendor, trials={"ok": len(first)},
                   threads=torch.get_num_threads(), distrust=distrust, source="benchmark")
    _store(cache, entry, unwritable_ok=True)
    return entry


def _store(cache: Cache, entry: Entry, unwritable_ok: bool) -> None:
    if not entry.trustworthy:
        return  # reported by the caller, never cached
    try:
        cache.store(entry)
    except CacheWriteError as exc:
        if not unwritable_ok:
            raise
        warnings.warn(f"{exc}; the choice is kept for this process only", stacklevel=4)


def warm_configs(neighbours: Sequence[Entry]) -> list[Config]:
    """The configs that won for neighbouring shapes (our best and the chosen one), nearest first."""
    configs = []
    for entry in neighbours:
        if entry.best_own is not None:
            configs.append(Config.make(entry.best_own.algorithm, entry.best_own.knobs))
        configs.append(Config.make(entry.algorithm, entry.knobs))
    return list(dict.fromkeys(configs))


def _specs(problem: Problem, device: str, specs: Sequence | None) -> list:
    if specs is None:
        specs = registry.kernels_for(problem, device)
    if not specs:
        raise UnknownNameError(f"no registered kernel supports {problem.describe()} on {device}")
    return list(specs)


def _hashes(specs) -> dict[str, str]:
    return {s.algorithm: s.source_hash for s in specs}


def _entry(problem: Problem, device: str, specs, best_own: Candidate | None, vendor: Candidate | None,
           *, trials: dict, threads: int, distrust: str, source: str) -> Entry:
    chosen, why = decide(best_own, vendor)
    m = chosen.measurement
    return Entry(
        problem=problem, device=devices.fingerprint(device), versions=devices.versions(),
        algorithm=chosen.algorithm, knobs=chosen.config.as_dict(), kernel_hashes=_hashes(specs),
        median_ms=m.median, p20_ms=m.p20, p80_ms=m.p80,
        vendor_ms=vendor.measurement.median if vendor else None,
        best_own=OwnKernel(algorithm=best_own.algorithm, knobs=best_own.config.as_dict(),
                           median_ms=best_own.measurement.median) if best_own else None,
        trials=dict(trials), threads=threads, trustworthy=not distrust, reason=distrust or why,
        source=source,
    )


__all__ = ["LAYER_OVERHEAD_MS", "benchmark", "decide", "search"]
