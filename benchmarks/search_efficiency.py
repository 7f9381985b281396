"""Search efficiency: which sampler gets closest to the optimum for a given budget? (replay)

Kernel Tuner's simulation mode, applied to our tuner: each landscape (benchmarks/landscapes.py) is
a table of every valid config of a search space and its time, measured once on this CPU or priced
by an H100 model (benchmarks/gpu_model.py). The replay calls autotune.tuner.tune with an `evaluate`
that looks the config up instead of running it (confirm_top=0), so "best found / optimum" is a
property of the search alone, not of timing noise between runs.

    .venv/bin/python benchmarks/search_efficiency.py            # every landscape and sampler, 10 seeds
    .venv/bin/python benchmarks/search_efficiency.py --overhead 800   # sampler cost at 800 configs
    .venv/bin/python benchmarks/search_efficiency.py --quick    # smoke run, < 60 s
    .venv/bin/python benchmarks/search_efficiency.py --landscape my_table.json --sampler tpe hybrid

Budgets are fractions of the valid space (2%, 5%, 15%; at least one config). Most plans never
look at their budget, so the first n configs of a run with budget N > n are exactly a run with
budget n: such a (landscape, sampler, seed) runs once at the largest budget and the smaller
budgets read the best of its first configs (tests/test_samplers.py checks this). A plan whose
random start scales with the budget (hybrid) runs once per budget.

With the default sampler's runs it also prices cost-aware stopping (`--stop auto --calls N`)
against the fixed 15% budget, with a stated model of what measuring a config costs (STOP_CALLS).
Sampler time is the wall time of tune() minus the time spent in evaluate, per config measured:
the tuner's own cost (proposals, rejected proposals, the study), on this shared 2-core machine.
Writes results/search_efficiency.json and prints a Markdown table (the README's).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import landscapes
import optuna

from autotune import device
from autotune.stopping import StopRule
from autotune.tuner import SamplerPlan, make_sampler, sampler_plan, tune

FRACTIONS = (0.02, 0.05, 0.15)
# The default plan before its polish (SamplerPlan.local_tail / local_rank), for the record.
HYBRID_V3 = dataclasses.replace(sampler_plan("hybrid"), local_tail=0.0, local_tail_from=0, local_metric="scaled",
                                local_rank="random")
SEEDS = 10
# The samplers compared: names of autotune.tuner's SAMPLERS, or variants (SamplerPlans) made here.
VARIANTS = {
    "tpe": "tpe",  # multivariate + group, 8 random startup configs (the tuner's TPE)
    "tpe-s32": SamplerPlan(model=lambda seed: optuna.samplers.TPESampler(
        seed=seed, multivariate=True, group=True, n_startup_trials=32)),
    "tpe-indep": SamplerPlan(model=lambda seed: optuna.samplers.TPESampler(seed=seed)),  # Optuna's default
    # hybrid: random for max(16, 1% of the space) but ≤ 25% of the budget, then TPE, 1 turn in 3
    # random; budgets of >= 32 configs end with a polish (the last 20%: one-knob changes of the
    # best configs, ranked by main effects); a budget of ≤ 8 configs past the defaults only
    # hill-climbs (SamplerPlan.local_when_short)
    "hybrid": "hybrid",
    # hybrid before the polish (the default until 2026-11-28), and variants of it
    "hybrid-v3": HYBRID_V3,
    # ... before the short-budget rule, and with a longer one
    "hybrid-v2": dataclasses.replace(HYBRID_V3, local_when_short=0),
    "hybrid-s16": dataclasses.replace(HYBRID_V3, local_when_short=16),
    # ... before the random start scaled with the budget and drew the algorithm first
    "hybrid-v1": SamplerPlan(model=functools.partial(make_sampler, "hybrid"), random_first=16,
                             random_fraction=0.01, random_every=3),
    "hybrid-16": SamplerPlan(model=functools.partial(make_sampler, "hybrid"), random_first=16, random_every=3),
    "hybrid-r2": SamplerPlan(model=functools.partial(make_sampler, "hybrid"), random_first=16, random_every=2),
    # ... with hill-climbing turns (SamplerPlan.local_every)
    "hybrid-local": "hybrid-local",  # hybrid-l1 (the tuner's sampler of that name)
    "hybrid-l2": dataclasses.replace(HYBRID_V3, local_every=2),
    "hybrid-l4": dataclasses.replace(HYBRID_V3, local_every=4),
    # ... whose hill-climbing counts one per knob step (SamplerPlan.local_metric), and ending with
    # local turns (SamplerPlan.local_tail: the last 10% / 20% of the budget)
    "hybrid-steps": dataclasses.replace(HYBRID_V3, local_metric="steps"),
    "hybrid-tail10": dataclasses.replace(HYBRID_V3, local_tail=0.1),
    "hybrid-tail20": dataclasses.replace(HYBRID_V3, local_tail=0.2),
    "hybrid-tail10-steps": dataclasses.replace(HYBRID_V3, local_tail=0.1, local_metric="steps"),
    # today's hybrid without parts of its polish: the equally near changes in random order, and
    # a polish at every budget
    "hybrid-polish-random": dataclasses.replace(sampler_plan("hybrid"), local_rank="random"),
    "hybrid-polish-always": dataclasses.replace(sampler_plan("hybrid"), local_tail_from=0),
    "random": "random",
    "cmaes": "cmaes",
    "gp": SamplerPlan(model=lambda seed: optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)),
}
QUICK_SAMPLERS = ("tpe", "hybrid", "random", "cmaes")
DEFAULT_LANDSCAPES = ("cpu-gemm-blocked-512", "cpu-conv2d-lenet2", "h100-gemm-4096-fp16",
                      "h100-gemm-1024-fp32", "h100-gemm-8192x8192x128-fp16", "h100-conv2d-resnet",
                      "h100-conv2d-bwd-weight-resnet")
QUICK_LANDSCAPES = ("cpu-gemm-blocked-512", "cpu-conv2d-lenet2", "h100-conv2d-resnet")
# GPSampler's proposals cost seconds once a hundred configs are measured (1.9 s per config over
# 112 configs of cpu-gemm-blocked-512 here): it replays only landscapes whose largest budget is at
# most this many configs.
GP_MAX_CONFIGS = 40
RESULTS = Path(__file__).resolve().parent.parent / "results"


def budgets(valid: int, fractions=FRACTIONS) -> dict[float, int]:
    return {f: max(1, round(f * valid)) for f in fractions}


def replay(landscape: landscapes.Landscape, sampler: str, seed: int, budget: int) -> dict:
    """One search of `budget` configs whose measurements are table lookups."""
    spent = 0.0

    def lookup(problem, spec, knobs):
        nonlocal spent
        start = time.perf_counter()
        outcome = landscape.evaluate(problem, spec, knobs)
        spent += time.perf_counter() - start
        return outcome

    start, cpu = time.perf_counter(), time.process_time()
    result = tune(landscape.problem, device="cpu", trials=budget, sampler=VARIANTS[sampler], seed=seed,
                  evaluate=lookup, specs=landscape.specs(), confirm_top=0, study_name="replay")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    trace = [t.median_ms if t.median_ms is not None else math.inf
             for t in sorted(result.trials, key=lambda t: t.number)]
    return {"seed": seed, "trace": trace, "sampler_s": wall - spent, "sampler_cpu_s": cpu - spent,
            "configs": len(trace),
            "rejected": result.rejected}


def _plan(sampler: str) -> SamplerPlan:
    plan = VARIANTS[sampler]
    return sampler_plan(plan) if isinstance(plan, str) else plan


def _depends_on_budget(sampler: str) -> bool:
    return _plan(sampler).depends_on_budget


def best_within(trace: list[float], n: int) -> float:
    return min(trace[:n], default=math.inf)


def run_landscape(landscape, samplers, seeds: int, fractions=FRACTIONS, *, progress=print,
                  stop_sampler: str = "hybrid") -> dict:
    sizes = budgets(landscape.valid, fractions)
    largest = max(sizes.values())
    optimum = landscape.optimum
    out = {"valid": landscape.valid, "grid": landscape.grid, "optimum_ms": optimum,
           "source": landscape.source, "budgets": {str(f): n for f, n in sizes.items()}, "samplers": {}}
    for sampler in samplers:
        if sampler == "gp" and largest > GP_MAX_CONFIGS:
            out["samplers"][sampler] = {"skipped": f"largest budget {largest} > {GP_MAX_CONFIGS} configs"}
            continue
        start = time.perf_counter()
        runs = [replay(landscape, sampler, seed, largest) for seed in range(seeds)]
        # A plan whose random start scales with the budget runs once per budget; any other
        # plan's smaller budgets are the start of its largest run.
        per_budget = {n: runs if n == largest or not _depends_on_budget(sampler) else
                      [replay(landscape, sampler, seed, n) for seed in range(seeds)] for n in sizes.values()}
        row = {"per_config_ms": 1e3 * statistics.median(r["sampler_s"] / r["configs"] for r in runs),
               "per_config_cpu_ms": 1e3 * statistics.median(r["sampler_cpu_s"] / r["configs"] for r in runs),
               "rejected_median": statistics.median(r["rejected"] for r in runs), "by_budget": {}}
        for f, n in sizes.items():
            ratios = [best_within(r["trace"], n) / optimum for r in per_budget[n]]
            row["by_budget"][str(f)] = {"configs": n, "median": statistics.median(ratios),
                                        "worst": max(ratios), "ratios": ratios}
        out["samplers"][sampler] = row
        if sampler == stop_sampler:
            out["stopping"] = {"sampler": sampler, **stopping_rows(landscape, sampler, [r["trace"] for r in runs])}
        cells = "  ".join(f"{f:.0%} {row['by_budget'][str(f)]['median']:.3f}/{row['by_budget'][str(f)]['worst']:.3f}"
                          for f in sizes)
        progress(f"  {sampler:<10} {cells}  {row['per_config_ms']:.1f} ms/config  "
                 f"({time.perf_counter() - start:.0f} s)")
    return out


# Cost-aware stopping (`--stop auto --calls N`) against the fixed 15% budget, on each landscape's
# default-sampler runs. A replayed config costs nothing, so the search's time is modelled: measuring
# a config costs MEASURE_RUNS runs of its kernel (warm-up, timing and the correctness check) plus a
# fixed cost per config: the worker round trip and reference check on the CPU tables, a Triton
# compile on the modelled GPU ones. StopRule never changes what is proposed, so the stopped search
# is the start of the fixed-budget run, cut where the rule (fed these modelled seconds) says stop.
STOP_CALLS = (10**3, 10**5, 10**7)
MEASURE_RUNS = 100
FIXED_S = {"cpu": 0.05, "gpu": 1.0}


def _calls_label(calls: int) -> str:
    return f"{calls:.0e}".replace("e+0", "e").replace("e+", "e")


def config_seconds(landscape, ms: float) -> float:
    fixed = FIXED_S["gpu" if landscape.source.startswith("modelled") else "cpu"]
    return fixed + (MEASURE_RUNS * ms / 1e3 if math.isfinite(ms) else 0.0)


def stopped(landscape, sampler: str, trace: list[float], calls: int) -> int:
    """How many configs of `trace` a search with --stop auto --calls `calls` measures."""
    plan = _plan(sampler)
    # as the tuner's: the defaults (one per algorithm here) and the random start come first
    start = len(landscape.algorithms) + (plan.random_turns(landscape.valid, len(trace)) if plan.model else 0)
    rule = StopRule(budget=len(trace), calls=calls, start=start)
    best = math.inf
    for i, ms in enumerate(trace, 1):
        best = min(best, ms)
        if rule.update(best if math.isfinite(best) else None, config_seconds(landscape, ms)):
            return i
    return len(trace)


def stopping_rows(landscape, sampler: str, traces: list[list[float]], calls_list=STOP_CALLS) -> dict:
    """Median configs, modelled search seconds and best/optimum: fixed budget, then per --calls."""
    def seconds(t, n):
        return sum(config_seconds(landscape, ms) for ms in t[:n])

    rows = {}
    for label, calls in [("fixed", None), *((_calls_label(c), c) for c in calls_list)]:
        cut = [len(t) if calls is None else stopped(landscape, sampler, t, calls) for t in traces]
        runs = list(zip(traces, cut, strict=True))
        rows[label] = {
            "configs": statistics.median(cut),
            "search_s": statistics.median(seconds(t, n) for t, n in runs),
            "best": statistics.median(best_within(t, n) / landscape.optimum for t, n in runs),
            # per seed, against the same seed's fixed-budget search
            "time_saved": statistics.median(1 - seconds(t, n) / seconds(t, len(t)) for t, n in runs),
            "speed_lost": statistics.median(best_within(t, n) / best_within(t, len(t)) - 1 for t, n in runs),
        }
    return rows


def markdown(report: dict) -> str:
    """The README's table: median / worst best-found / optimum per budget, and ms per config."""
    fractions = report["fractions"]
    head = "| landscape (valid / grid) | sampler | " + " | ".join(f"{f:.0%}" for f in fractions) + " | ms/config wall / CPU |"
    lines = [head, "|" + "---|" * (3 + len(fractions))]
    for name, land in report["landscapes"].items():
        first = True
        for sampler, row in land["samplers"].items():
            label = f"{name} ({land['valid']} / {land['grid']})" if first else ""
            first = False
            if "skipped" in row:
                lines.append(f"| {label} | {sampler} | " + " | ".join("—" for _ in fractions)
                             + f" | skipped: {row['skipped']} |")
                continue
            cells = []
            for f in fractions:
                b = row["by_budget"][str(f)]
                cells.append(f"{b['median']:.3f} / {b['worst']:.3f} ({b['configs']})")
            lines.append(f"| {label} | {sampler} | " + " | ".join(cells)
                         + f" | {row['per_config_ms']:.1f} / {row.get('per_config_cpu_ms', math.nan):.1f} |")
    return "\n".join(lines)


def stopping_markdown(report: dict) -> str:
    """The README's stopping table: configs, modelled search seconds, best/optimum (medians)."""
    labels = ["fixed", *(_calls_label(c) for c in STOP_CALLS)]
    lines = ["| landscape | fixed 15% | " + " | ".join(f"--stop auto --calls {_calls_label(c)}" for c in STOP_CALLS) + " |",
             "|" + "---|" * (1 + len(labels))]
    for name, land in report["landscapes"].items():
        stop = land.get("stopping")
        if stop:
            cells = [f"{stop[k]['configs']:.0f} cfg, {stop[k]['search_s']:.0f} s, {stop[k]['best']:.3f}" if k == "fixed"
                     else (f"{stop[k]['configs']:.0f} cfg, {stop[k]['search_s']:.0f} s (−{stop[k]['time_saved']:.0%}), "
                           f"{stop[k]['best']:.3f} (+{stop[k]['speed_lost']:.1%})") for k in labels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(report: dict, candidate: str) -> list[str]:
    """The issue's targets for `candidate`, landscape by landscape."""
    notes = []
    for name, land in report["landscapes"].items():
        row, rnd = land["samplers"].get(candidate), land["samplers"].get("random")
        if row is None or "skipped" in row:
            continue
        for f in report["fractions"]:
            b = row["by_budget"][str(f)]
            if rnd and "by_budget" in rnd and b["median"] > rnd["by_budget"][str(f)]["median"] + 1e-9:
                notes.append(f"{name} {f:.0%}: median {b['median']:.3f} > random's "
                             f"{rnd['by_budget'][str(f)]['median']:.3f}")
        top = row["by_budget"][str(max(report["fractions"]))]
        if top["median"] > 1.01:
            notes.append(f"{name} {max(report['fractions']):.0%}: median {top['median']:.3f} > 1.01")
        if top["worst"] > 1.03:
            notes.append(f"{name} {max(report['fractions']):.0%}: worst seed {top['worst']:.3f} > 1.03")
    return notes


def overhead(configs: int, names, samplers) -> int:
    """The tuner's own cost per config over one long search (the issue's 800-config target)."""
    for name in names:
        land = landscapes.synthetic() if name == "synthetic" else landscapes.get(name)
        print(f"{land.name}: {land.valid} valid configs; one search of {configs} per sampler")
        for sampler in samplers:
            r = replay(land, sampler, 0, configs)
            print(f"  {sampler:<10} {1e3 * r['sampler_s'] / r['configs']:6.1f} ms/config wall, "
                  f"{1e3 * r['sampler_cpu_s'] / r['configs']:6.1f} ms/config CPU, best/optimum "
                  f"{min(r['trace']) / land.optimum:.3f}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 seeds, fewer landscapes "
                        "and samplers (under a minute)")
    parser.add_argument("--landscape", nargs="+", help="landscape names (see benchmarks/landscapes.py "
                        "and gpu_model.py; 'synthetic' for a tiny made-up one) or table files (.json)")
    parser.add_argument("--sampler", nargs="+", choices=list(VARIANTS), help="samplers to compare")
    parser.add_argument("--seeds", type=int, help=f"seeds per sampler (default {SEEDS}; --quick 3)")
    parser.add_argument("--default", default="hybrid", help="the sampler whose targets are checked")
    parser.add_argument("--overhead", type=int, metavar="N",
                        help="instead: sampler ms per config over one search of N configs (seed 0) on "
                             "each landscape (default: h100-gemm-4096-fp16-large)")
    parser.add_argument("--out", type=Path, help="report file (default results/search_efficiency[_quick].json)")
    args = parser.parse_args(argv)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.overhead:
        return overhead(args.overhead, args.landscape or ["h100-gemm-4096-fp16-large"],
                        args.sampler or [s for s in VARIANTS if s != "gp"])
    seeds = args.seeds or (3 if args.quick else SEEDS)
    names = args.landscape or (QUICK_LANDSCAPES if args.quick else DEFAULT_LANDSCAPES)
    samplers = args.sampler or (QUICK_SAMPLERS if args.quick else tuple(VARIANTS))
    fp = device.fingerprint("cpu")
    report = {"machine": f"{fp['cpu']}, {fp['cores']} cores shared with other work",
              "seeds": seeds, "fractions": list(FRACTIONS), "landscapes": {}}
    start = time.perf_counter()
    for name in names:
        land = landscapes.synthetic() if name == "synthetic" else landscapes.get(name)
        print(f"{land.name}: {land.valid} valid of {land.grid} configs, optimum {land.optimum:.4g} ms, "
              f"budgets {budgets(land.valid)}", flush=True)
        report["landscapes"][land.name] = run_landscape(land, samplers, seeds, stop_sampler=args.default,
                                                        progress=lambda s: print(s, flush=True))
    report["seconds"] = round(time.perf_counter() - start, 1)
    out = args.out or RESULTS / f"search_efficiency{'_quick' if args.quick else ''}.json"
    landscapes.write_json(out, report)
    print()
    print(markdown(report))
    print(f"\n{seeds} seeds; cells: median / worst best-found/optimum (configs measured). "
          f"{report['seconds']:.0f} s. Wrote {out}")
    if any("stopping" in land for land in report["landscapes"].values()):
        print(f"\n--stop auto vs the fixed 15% budget ({args.default}; medians over {seeds} seeds: configs "
              f"measured, modelled search seconds, best/optimum):\n")
        print(stopping_markdown(report))
    misses = verdict(report, args.default)
    print(f"\ntargets for {args.default}: " + ("all met" if not misses else "missed: " + "; ".join(misses)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
