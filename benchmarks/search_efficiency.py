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

Budgets are fractions of the valid space (2%, 5%, 15%; at least one config). The tuner's search is
sequential and never looks at its budget, so the first n configs of a run with budget N > n are
exactly a run with budget n: each (landscape, sampler, seed) runs once at the largest budget and
the smaller budgets read the best of its first configs (tests/test_samplers.py checks this).
Sampler time is the wall time of tune() minus the time spent in evaluate, per config measured:
the tuner's own cost (proposals, rejected proposals, the study), on this shared 2-core machine.
Writes results/search_efficiency.json and prints a Markdown table (the README's).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import landscapes
import optuna

from autotune import device
from autotune.tuner import SamplerPlan, make_sampler, tune

FRACTIONS = (0.02, 0.05, 0.15)
SEEDS = 10
# The samplers compared: names of autotune.tuner's SAMPLERS, or variants (SamplerPlans) made here.
VARIANTS = {
    "tpe": "tpe",  # multivariate + group, 8 random startup configs (the tuner's TPE)
    "tpe-s32": SamplerPlan(model=lambda seed: optuna.samplers.TPESampler(
        seed=seed, multivariate=True, group=True, n_startup_trials=32)),
    "tpe-indep": SamplerPlan(model=lambda seed: optuna.samplers.TPESampler(seed=seed)),  # Optuna's default
    "hybrid": "hybrid",  # random for max(16, 1% of the valid space), then TPE with one turn in 3 random
    "hybrid-16": SamplerPlan(model=functools.partial(make_sampler, "hybrid"), random_first=16, random_every=3),
    "hybrid-r2": SamplerPlan(model=functools.partial(make_sampler, "hybrid"), random_first=16, random_every=2),
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


def best_within(trace: list[float], n: int) -> float:
    return min(trace[:n], default=math.inf)


def run_landscape(landscape, samplers, seeds: int, fractions=FRACTIONS, *, progress=print) -> dict:
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
        row = {"per_config_ms": 1e3 * statistics.median(r["sampler_s"] / r["configs"] for r in runs),
               "per_config_cpu_ms": 1e3 * statistics.median(r["sampler_cpu_s"] / r["configs"] for r in runs),
               "rejected_median": statistics.median(r["rejected"] for r in runs), "by_budget": {}}
        for f, n in sizes.items():
            ratios = [best_within(r["trace"], n) / optimum for r in runs]
            row["by_budget"][str(f)] = {"configs": n, "median": statistics.median(ratios),
                                        "worst": max(ratios), "ratios": ratios}
        out["samplers"][sampler] = row
        cells = "  ".join(f"{f:.0%} {row['by_budget'][str(f)]['median']:.3f}/{row['by_budget'][str(f)]['worst']:.3f}"
                          for f in sizes)
        progress(f"  {sampler:<10} {cells}  {row['per_config_ms']:.1f} ms/config  "
                 f"({time.perf_counter() - start:.0f} s)")
    return out


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
        report["landscapes"][land.name] = run_landscape(land, samplers, seeds,
                                                        progress=lambda s: print(s, flush=True))
    report["seconds"] = round(time.perf_counter() - start, 1)
    out = args.out or RESULTS / f"search_efficiency{'_quick' if args.quick else ''}.json"
    landscapes.write_json(out, report)
    print()
    print(markdown(report))
    print(f"\n{seeds} seeds; cells: median / worst best-found/optimum (configs measured). "
          f"{report['seconds']:.0f} s. Wrote {out}")
    misses = verdict(report, args.default)
    print(f"\ntargets for {args.default}: " + ("all met" if not misses else "missed: " + "; ".join(misses)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
