"""`autotune search|show|bench|cache|info`: the command line.

Bad input exits with status 2 and one line that says what is wrong; nothing is written before
the input has been validated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from autotune import device as devices
from autotune import registry
from autotune.cache import Cache, CacheWarning, default_dir
from autotune.errors import AutotuneError
from autotune.problem import DTYPES, OPS, Problem, parse_problem
from autotune.report import format_pairs, format_table, knobs_text, ms, ratio

SAMPLER_CHOICES = ("tpe", "random", "grid", "cmaes")
STUDIES_FILE = "studies.db"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a machine-readable result on stdout")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where tuned results live (default: $AUTOTUNE_CACHE_DIR or ./results)")
    parser.add_argument("--device", default="auto", choices=devices.DEVICE_CHOICES,
                        help="auto picks cuda when a GPU and Triton are usable, else cpu")


def _shape_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", help="conv: CxHxW or NxCxHxW; gemm: MxNxK")
    parser.add_argument("--batch", type=int, help="conv batch size N when --shape is CxHxW (default 64)")
    parser.add_argument("--filters", help="conv filters KxRxS or KxCxRxS (default 6x5x5, LeNet's conv1)")
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--padding", type=int, default=0)
    parser.add_argument("--dilation", type=int, default=1)
    parser.add_argument("--trans-a", action="store_true", help="gemm: A is stored as KxM")
    parser.add_argument("--trans-b", action="store_true", help="gemm: B is stored as NxK")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="float32/float64 on the CPU; float16/bfloat16 where the backend has them")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autotune", description=(
        "Tune convolution and GEMM kernels on this machine with Optuna, check every candidate "
        "against a float64 reference, and cache the fastest per shape."))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    search = sub.add_parser("search", help="tune one op for one shape (or every LeNet layer)",
                            description="Tune an op for a shape and cache the winner. Examples:\n"
                            "  autotune search conv2d --shape 3x32x32\n"
                            "  autotune search conv2d --shape 64x3x32x32 --filters 6x5x5 --trials 100\n"
                            "  autotune search gemm --shape 512x512x512\n"
                            "  autotune search lenet --batch 64",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    search.add_argument("op", help=f"one of {', '.join(OPS)}, or 'lenet' for every LeNet layer")
    _shape_options(search)
    search.add_argument("--trials", type=int, default=40, help="distinct configs to measure (default 40)")
    search.add_argument("--timeout", type=float, help="stop the search after this many seconds")
    search.add_argument("--sampler", default="tpe", choices=SAMPLER_CHOICES,
                        help="tpe (default), random, grid (exhaustive) or cmaes")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--storage", help="Optuna storage URL (default: sqlite in the cache dir, "
                        "so an interrupted search resumes)")
    search.add_argument("--algorithms", help="comma-separated algorithms to consider (default: all)")
    search.add_argument("--force", action="store_true", help="re-tune even if the shape is cached")
    _common(search)

    show = sub.add_parser("show", help="print the cache as a table")
    show.add_argument("--op", choices=OPS, help="only this op")
    _common(show)

    bench = sub.add_parser("bench", help="tuned vs torch, ratio per shape (re-measured now)",
                           description="Re-time cached winners against torch's own op on the same "
                           "inputs in the same run. --suite lenet tunes and times the LeNet layer "
                           "shapes (conv 1->6 28x28 pad 2, 3->6 32x32, 6->16 14x14; fc 400-120-84-10; "
                           "forward and backward) at each --batches size.")
    bench.add_argument("--suite", choices=("cache", "lenet"), default="cache",
                       help="cache: every cached shape of this device (default); lenet: the LeNet suite")
    bench.add_argument("--batches", default="1,16,64,256", help="batch sizes for --suite lenet")
    bench.add_argument("--trials", type=int, default=16, help="tuning budget for uncached shapes")
    bench.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per shape")
    bench.add_argument("--output", type=Path, help="write the figures as JSON here "
                       "(default: <cache-dir>/bench-<device>.json)")
    _common(bench)

    cache = sub.add_parser("cache", help="where the cache is, or clear it")
    cache.add_argument("action", choices=("path", "clear"))
    _common(cache)

    info = sub.add_parser("info", help="device fingerprint, library versions and registered kernels")
    _common(info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default", CacheWarning)
    warnings.showwarning = _warning_line
    try:
        if args.cache_dir is None:
            args.cache_dir = default_dir()
        args.device = devices.resolve(args.device)
        return COMMANDS[args.command](args)
    except AutotuneError as exc:
        print(f"autotune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autotune: interrupted; run the same command again to resume the search", file=sys.stderr)
        return 130


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"autotune: warning: {message}", file=sys.stderr)


# search ----------------------------------------------------------------------------------------
def _problem_from_args(args) -> Problem:
    if not args.shape:
        raise AutotuneError(f"{args.op} needs --shape (conv: CxHxW or NxCxHxW, gemm: MxNxK)")
    return parse_problem(args.op, args.shape, batch=args.batch, filters=args.filters,
                         stride=args.stride, padding=args.padding, dilation=args.dilation,
                         trans_a=args.trans_a, trans_b=args.trans_b, dtype=args.dtype)


def _check_search_args(args) -> None:
    if args.trials <= 0:
        raise AutotuneError(f"--trials must be a positive integer, got {args.trials}")
    if args.timeout is not None and args.timeout <= 0:
        raise AutotuneError(f"--timeout must be positive seconds, got {args.timeout}")


def _specs_for(problem: Problem, device: str, algorithms: str | None):
    specs = registry.kernels_for(problem, device)
    if not specs:
        raise AutotuneError(f"no registered kernel supports {problem.describe()} on {device}")
    if algorithms:
        wanted = [a.strip() for a in algorithms.split(",") if a.strip()]
        known = {s.algorithm for s in specs}
        for name in wanted:
            if name not in known:
                registry.get(problem.op, name, device)  # unknown names raise with the known list
                raise AutotuneError(f"algorithm {name!r} does not support {problem.describe()}")
        specs = [s for s in specs if s.algorithm in wanted]
    return specs


def _check_cache_dir(path: Path) -> None:
    """Fail before tuning, not after, when the results could not be written (creates nothing)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise AutotuneError(f"cannot write results under --cache-dir {path}: {existing} is not a "
                            "writable folder; pass another --cache-dir")


def cmd_search(args) -> int:
    _check_search_args(args)
    _check_cache_dir(args.cache_dir)
    if args.op == "lenet":
        return _search_lenet(args)
    problem = _problem_from_args(args)
    specs = _specs_for(problem, args.device, args.algorithms)
    cache = Cache(args.cache_dir)
    entry = None if args.force else cache.find(problem, args.device, _hashes(specs))
    if entry is not None:
        _print_result(args, problem, entry.record, cache, from_cache=True)
        return 0
    result = _tune(args, problem, specs, progress=not args.json)
    if result.best is None:
        counts = ", ".join(f"{k} {v}" for k, v in result.counts().items())
        raise AutotuneError(f"no candidate passed verification ({counts}); nothing was cached")
    from autotune.dispatch import save_result

    save_result(cache, result, args.device)
    record = cache.find(problem, args.device, _hashes(specs)).record
    _print_result(args, problem, record, cache, from_cache=False)
    return 0


def _tune(args, problem: Problem, specs, progress):
    from autotune.tuner import tune

    storage = args.storage
    if storage is None:
        try:
            args.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AutotuneError(f"cannot create --cache-dir {args.cache_dir}: {exc.strerror or exc}") from None
        storage = f"sqlite:///{(args.cache_dir / STUDIES_FILE).resolve()}"
    return tune(problem, device=args.device, trials=args.trials, timeout=args.timeout,
                sampler=args.sampler, storage=storage, seed=args.seed, specs=specs,
                progress=progress, fresh=args.force,
                study_name=f"{problem.key()}|{args.device}|{args.sampler}|{args.seed}")


def _hashes(specs) -> dict[str, str]:
    return {s.algorithm: s.source_hash for s in specs}


def _print_result(args, problem: Problem, record: dict, cache: Cache, *, from_cache: bool) -> None:
    if args.json:
        print(json.dumps({"problem": record["problem"], "from_cache": from_cache, "cache": str(cache.path),
                          **{k: record.get(k) for k in ("algorithm", "knobs", "median_ms", "p20_ms", "p80_ms",
                                                        "vendor_ms", "trials", "best_own")}}, indent=1))
        return
    own = record.get("best_own") or {}
    rows = [
        ("problem", problem.describe()),
        ("best", f"{record['algorithm']}  {knobs_text(record['knobs'])}"),
        ("time (median)", f"{ms(record.get('median_ms'))} ms  (p20 {ms(record.get('p20_ms'))}, "
                          f"p80 {ms(record.get('p80_ms'))})"),
        ("torch (vendor)", f"{ms(record.get('vendor_ms'))} ms"),
        ("torch / best", ratio(record.get("vendor_ms"), record.get("median_ms"))),
    ]
    if own:
        rows.append(("best own kernel", f"{own['algorithm']}  {knobs_text(own['knobs'])}  "
                                        f"{ms(own['median_ms'])} ms  "
                                        f"(torch / own {ratio(record.get('vendor_ms'), own['median_ms'])})"))
    trials = record.get("trials") or {}
    if trials:
        rows.append(("trials", ", ".join(f"{k} {v}" for k, v in trials.items())))
    rows.append(("cached in", f"{cache.path}" + ("  (answered from the cache, no tuning)" if from_cache else "")))
    print(format_pairs(rows))


def _search_lenet(args) -> int:
    from tqdm.auto import tqdm

    from autotune.dispatch import save_result
    from autotune.lenet import lenet_problems
    from autotune.reference import torch_dtype

    batch = args.batch or 64
    if batch <= 0:
        raise AutotuneError(f"--batch must be positive, got {batch}")
    problems = lenet_problems(batch, torch_dtype(args.dtype))
    cache = Cache(args.cache_dir)
    plan = []
    for problem in problems:
        specs = _specs_for(problem, args.device, args.algorithms)
        hit = None if args.force else cache.find(problem, args.device, _hashes(specs))
        plan.append((problem, specs, hit))
    todo = [p for p in plan if p[2] is None]
    budget = sum(min(args.trials, sum(s.space.size() for s in specs)) for _, specs, _ in todo)
    rows, records = [], []
    with tqdm(total=budget, desc=f"tuning LeNet batch {batch}", unit="cfg", disable=args.json) as bar:
        for problem, specs, hit in plan:
            from_cache = hit is not None
            if hit is None:
                bar.set_description(f"{problem.op} {problem.describe().split(' ', 2)[1]}")
                result = _tune(args, problem, specs, progress=bar)
                if result.best is None:
                    raise AutotuneError(f"no candidate passed verification for {problem.describe()}")
                save_result(cache, result, args.device)
                hit = cache.find(problem, args.device, _hashes(specs))
            record = hit.record
            records.append({"problem": record["problem"], "algorithm": record["algorithm"],
                            "knobs": record["knobs"], "median_ms": record.get("median_ms"),
                            "vendor_ms": record.get("vendor_ms"), "from_cache": from_cache})
            rows.append((problem.describe(), record["algorithm"], knobs_text(record["knobs"]),
                         ms(record.get("median_ms")), ms(record.get("vendor_ms")),
                         ratio(record.get("vendor_ms"), record.get("median_ms"))))
    if args.json:
        print(json.dumps({"batch": batch, "layers": records, "cache": str(cache.path)}, indent=1))
    else:
        print(format_table(("problem", "algorithm", "knobs", "ms", "torch ms", "torch/best"), rows))
        print(f"cached in {cache.path}")
    return 0


# show / cache / info ----------------------------------------------------------------------------
def cmd_show(args) -> int:
    cache = Cache(args.cache_dir)
    entries = [e for e in cache.entries().values() if isinstance(e, dict) and (not args.op or e.get("op") == args.op)]
    if args.json:
        print(json.dumps({"cache": str(cache.path), "entries": entries}, indent=1))
        return 0
    if not entries:
        print(f"no cached results in {cache.path}" + (f" for {args.op}" if args.op else ""))
        return 0
    rows = []
    for e in sorted(entries, key=lambda e: (e.get("op", ""), json.dumps(e.get("problem"), sort_keys=True))):
        try:
            from autotune.problem import problem_from_dict

            desc = problem_from_dict(e["problem"]).describe()
        except (AutotuneError, KeyError, TypeError):
            desc = str(e.get("problem"))
        device = e.get("device", {})
        rows.append((desc, device.get("gpu") or device.get("kind", "?"), e.get("algorithm"),
                     knobs_text(e.get("knobs") or {}), ms(e.get("median_ms")), ms(e.get("vendor_ms")),
                     ratio(e.get("vendor_ms"), e.get("median_ms")), e.get("source", "")))
    print(format_table(("problem", "device", "algorithm", "knobs", "ms", "torch ms", "torch/best", "source"), rows))
    print(f"{len(rows)} entries in {cache.path}")
    return 0


def cmd_cache(args) -> int:
    cache = Cache(args.cache_dir)
    if args.action == "path":
        print(json.dumps({"cache": str(cache.path)}) if args.json else cache.path)
        return 0
    removed = cache.clear()
    print(json.dumps({"removed": removed}) if args.json else f"removed {removed} entries from {cache.path}")
    return 0


def cmd_info(args) -> int:
    specs = registry.load(registry.available_backends(args.device))
    info = {
        "device": args.device,
        "fingerprint": devices.fingerprint(args.device),
        "versions": devices.versions(),
        "cache": str(Cache(args.cache_dir).path),
        "kernels": [{"op": s.op, "algorithm": s.algorithm, "backend": s.backend,
                     "knobs": [p.name for p in s.space], "configs": s.space.size(),
                     "source_hash": s.source_hash} for s in specs],
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(format_pairs([*info["fingerprint"].items(), *info["versions"].items(), ("cache", info["cache"])]))
    print()
    print(format_table(("op", "algorithm", "backend", "knobs", "configs"),
                       [(k["op"], k["algorithm"], k["backend"], " ".join(k["knobs"]) or "-", k["configs"])
                        for k in info["kernels"]]))
    return 0


def cmd_bench(args) -> int:
    from autotune.bench import run_bench

    return run_bench(args)


COMMANDS = {"search": cmd_search, "show": cmd_show, "bench": cmd_bench, "cache": cmd_cache, "info": cmd_info}

__all__ = ["main", "build_parser"]
