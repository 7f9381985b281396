"""`autotune bench`: our kernels against torch's own op, re-measured now, same inputs, same run.

For each shape (the cached ones, or the LeNet suite) the best own kernel, torch's op and the
tuned choice are timed in interleaved rounds, so a slow spell of a shared machine hits all three
alike. Figures are speed-ups over torch, torch time / our time (above 1: ours is faster), for our
best kernel and for the tuned choice; never absolute claims. (The JSON keeps chosen_over_torch,
its inverse, for older readers.)
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from pathlib import Path

from autotune import measure, registry
from autotune.cache import Cache
from autotune.decision import search
from autotune.entry import Entry
from autotune.errors import AutotuneError
from autotune.problem import Problem
from autotune.progress import bar as progress_bar
from autotune.reference import empty_output, make_inputs
from autotune.report import format_table, ms, problem_text


def lenet_suite(batches: list[int], dtype: str = "float32") -> list[Problem]:
    """The problems of a LeNet training step at each batch size (autotune.lenet: one description
    of LeNet's layers, shared with `autotune search lenet` and the training example)."""
    from autotune.lenet import lenet_problems
    from autotune.reference import torch_dtype

    return [problem for n in batches for problem in lenet_problems(n, torch_dtype(dtype))]


def _parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise AutotuneError(f"--batches {text!r} must be comma-separated integers, e.g. 1,16,64") from None
    if not batches or any(b <= 0 for b in batches):
        raise AutotuneError(f"--batches {text!r} must list positive batch sizes")
    return batches


def _cached_problems(cache: Cache, device: str) -> list[Problem]:
    from autotune import device as devices

    fp = devices.fingerprint(device)
    return [entry.problem for entry in cache.entries().values() if entry.device == fp]


def run_bench(args) -> int:
    if args.trials <= 0 or args.rounds <= 0:
        raise AutotuneError("--trials and --rounds must be positive")
    if args.threads is not None and args.threads <= 0:
        raise AutotuneError(f"--threads must be a positive integer, got {args.threads}")
    with measure.pinned_threads(args.threads if args.device == "cpu" else None):
        return _bench(args)


def _bench(args) -> int:
    cache = Cache(args.cache_dir)
    if args.suite == "lenet":
        problems = lenet_suite(_parse_batches(args.batches))
    else:
        problems = _cached_problems(cache, args.device)
        if not problems:
            raise AutotuneError(f"no cached results for this {args.device} in {cache.path}; run "
                                "`autotune search ...` first or use `autotune bench --suite lenet`")
    rows = []
    # One bar over the shapes (which one, and whether it is being tuned or timed), and the
    # search's own bar below it while a shape is tuned.
    with progress_bar(desc="bench", unit="shape", total=len(problems), enabled=False if args.json else None,
                      leave=True) as bar:
        for problem in problems:
            specs = registry.kernels_for(problem, args.device)
            bar.set_postfix_str(f"tuning {problem_text(problem)} ({problem.op})")
            entry = search(problem, device=args.device, cache=cache, trials=args.trials, specs=specs,
                           progress=not args.json)
            bar.set_postfix_str(f"timing {problem_text(problem)} ({problem.op})")
            rows.append(_measure_row(problem, specs, entry, args.device, args.rounds))
            bar.update(1)
    summary = _summarize(rows)
    output = args.output or (args.cache_dir / f"bench-{args.device}.json")
    _write_json(output, {"device": args.device, "rows": rows, "summary": summary})
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary, "output": str(output)}, indent=1))
        return 0
    print(format_table(
        ("op", "problem", "best own", "own ms", "torch ms", "own speed-up", "chosen", "chosen speed-up"),
        [(r["op"], r["short"], r["own_algorithm"] or "-", ms(r["own_ms"]), ms(r["torch_ms"]),
          f"{r['torch_over_own']:.2f}x" if r["torch_over_own"] else "-", r["chosen"],
          f"{r['torch_over_chosen']:.2f}x{'' if r['chosen_within_noise'] else ' !'}") for r in rows]))
    print("\nspeed-up = torch ms / ms (> 1: faster than torch's op)")
    print(f"geomean own speed-up over {summary['shapes_with_own']} shapes: {summary['geomean_torch_over_own']:.3f}"
          f"   shapes where our own kernel wins: {summary['own_wins']}"
          f"\nchosen slower than torch beyond the noise ('!'): {summary['chosen_slower_than_noise']}"
          f"\nfigures written to {output}")
    return 0


def _measure_row(problem: Problem, specs, entry: Entry, device: str, rounds: int) -> dict:
    by_name = {s.algorithm: s for s in specs}
    own = entry.best_own

    def full(algorithm: str, knobs: dict) -> tuple[str, dict]:
        return algorithm, by_name[algorithm].full_knobs(problem, knobs)

    wanted = {"torch": full("vendor", {}), "chosen": full(entry.algorithm, entry.knobs)}
    if own is not None and own.algorithm in by_name:
        wanted["own"] = full(own.algorithm, own.knobs)
    # The chosen config is usually torch's or our best one: time each distinct config once, so
    # a config is never compared with itself (which would only measure noise).
    alias = {}
    contenders = {}
    for name, (algorithm, knobs) in wanted.items():
        same = next((n for n, (a, k) in wanted.items() if (a, k) == (algorithm, knobs) and n in contenders), None)
        if same is None:
            contenders[name] = (by_name[algorithm], knobs)
        else:
            alias[name] = same
    inputs = make_inputs(problem, device=device)
    out = empty_output(problem, device=device)
    samples: dict[str, list[measure.Measurement]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, (spec, knobs) in contenders.items():
            samples[name].append(measure.bench(lambda s=spec, k=knobs: s.run(problem, k, inputs, out),
                                               device=device, rep_ms=15.0))
    med = {name: statistics.median(m.median for m in ms_) for name, ms_ in samples.items()}
    noise = {name: statistics.median(m.spread() for m in ms_) for name, ms_ in samples.items()}
    for name, same in alias.items():
        med[name], noise[name] = med[same], noise[same]
    chosen_over_torch = med["chosen"] / med["torch"]
    return {
        "problem": problem.describe(),
        "op": problem.op,
        "short": problem_text(problem),
        "own_algorithm": own.algorithm if own else None,
        "own_knobs": own.knobs if own else None,
        "own_ms": med.get("own"),
        "torch_ms": med["torch"],
        "torch_over_own": med["torch"] / med["own"] if "own" in med else None,
        "chosen": entry.algorithm,
        "trustworthy": entry.trustworthy,
        "chosen_ms": med["chosen"],
        "chosen_over_torch": chosen_over_torch,
        "torch_over_chosen": 1 / chosen_over_torch,
        "noise": max(noise["chosen"], noise["torch"]),
        "chosen_within_noise": chosen_over_torch <= 1 + max(noise["chosen"], noise["torch"]),
    }


def _summarize(rows: list[dict]) -> dict:
    ratios = [r["torch_over_own"] for r in rows if r["torch_over_own"]]
    return {
        "shapes": len(rows),
        "shapes_with_own": len(ratios),
        "geomean_torch_over_own": math.exp(statistics.fmean(math.log(x) for x in ratios)) if ratios else 0.0,
        "own_wins": sum(1 for x in ratios if x > 1),
        "chosen_slower_than_noise": sum(1 for r in rows if not r["chosen_within_noise"]),
    }


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bench-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)
