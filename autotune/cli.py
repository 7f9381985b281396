"""`autotune search|show|bench|cache|info|report|compile-check`: the command line.

Bad input exits with status 2 and one line that says what is wrong; nothing is written before
the input has been validated.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path

from autotune import device as devices
from autotune import measure, registry
from autotune.cache import STUDIES_FILE, Cache, CacheWarning, default_dir
from autotune.errors import AutotuneError
from autotune.problem import DTYPES, OPS, POOL_OPS, Problem, parse_problem
from autotune.progress import bar as progress_bar
from autotune.report import format_pairs, format_table, knobs_text, ms, problem_text, ratio
from autotune.stopping import DEFAULT_CALLS

SAMPLER_CHOICES = ("hybrid", "hybrid-local", "tpe", "random", "grid", "cmaes")
DEFAULT_TRIALS = 40
SHOW_KNOBS_WIDTH = 30  # `show` fits in 100 columns: longer knob lists end in "…" (--json has them all)
SHOW_OP = {"conv2d": "conv", "conv2d_bwd_data": "conv.dx", "conv2d_bwd_weight": "conv.dw"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from autotune import __version__

    try:
        installed = version("kernel-autotune")
    except PackageNotFoundError:
        installed = __version__
    return f"autotune {__version__}" + ("" if installed == __version__ else f" (installed {installed})")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default where it has one
    (not for flags, nor where the help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a machine-readable result on stdout")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where tuned results live (default: $AUTOTUNE_CACHE_DIR or ./results)")
    parser.add_argument("--device", default="auto", choices=devices.DEVICE_CHOICES,
                        help="auto picks cuda when a GPU and Triton are usable, else cpu")


def _shape_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", help="conv and max_pool2d: CxHxW or NxCxHxW; gemm: MxNxK")
    parser.add_argument("--batch", type=int, help="conv/pool batch size N when --shape is CxHxW (default 64)")
    parser.add_argument("--window", type=int, default=None,
                        help="max_pool2d: the square window, also its stride (default 2)")
    parser.add_argument("--filters", help="conv filters KxRxS or KxCxRxS (default 6x5x5, LeNet's conv1)")
    parser.add_argument("--stride", type=int, default=1, help="conv stride")
    parser.add_argument("--padding", type=int, default=0, help="conv zero padding on each side")
    parser.add_argument("--dilation", type=int, default=1, help="conv dilation")
    parser.add_argument("--trans-a", action="store_true", help="gemm: A is stored as KxM")
    parser.add_argument("--trans-b", action="store_true", help="gemm: B is stored as NxK")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="float32/float64 on the CPU; float16/bfloat16 where the backend has them")


def _threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch's CPU threads while timing (default: torch's own choice); part of "
                        "the cache key, so training must run with the same count to use the result. "
                        "1 gives steady timings on a busy machine")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autotune", description=(
        "Tune convolution and GEMM kernels on this machine with Optuna, check every candidate "
        "against a float64 reference, and cache the fastest per shape."))
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    search = sub.add_parser("search", help="tune one op for one shape (or every LeNet layer)",
                            description="Tune an op for a shape and cache the winner. Examples:\n"
                            "  autotune search conv2d --shape 3x32x32\n"
                            "  autotune search conv2d --shape 64x3x32x32 --filters 6x5x5 --trials 100\n"
                            "  autotune search gemm --shape 512x512x512\n"
                            "  autotune search lenet --batch 64\n"
                            "  autotune search model torchvision:resnet18 --shape 3x224x224 --batch 1\n"
                            "  autotune search model mypackage.nets:build --shape 3x64x64")
    search.add_argument("op", help=f"one of {', '.join(OPS)}; 'model' for every layer of a model "
                        "(forward and both gradients); 'lenet' is 'model lenet'")
    search.add_argument("model", nargs="?", help="with 'model': lenet, torchvision:<name> (random "
                        "weights) or package.module:factory; --shape is one sample's CxHxW")
    _shape_options(search)
    search.add_argument("--trials", type=int, default=None, help=f"distinct configs to measure (default "
                        f"{DEFAULT_TRIALS}; on a cached shape, with --force)")
    search.add_argument("--timeout", type=float, help="stop the search after this many seconds")
    search.add_argument("--sampler", default="hybrid", choices=SAMPLER_CHOICES,
                        help="hybrid (default: random, then TPE; 32 configs or more end with one-knob changes of the "
                        "best), hybrid-local (random, then hill-climbing "
                        "from the best configs: better on small budgets), tpe, random, grid (exhaustive) or cmaes")
    search.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    search.add_argument("--storage", help="Optuna storage URL (default: sqlite in the cache dir, "
                        "so an interrupted search resumes)")
    search.add_argument("--algorithms", help="comma-separated algorithms to consider (default: all)")
    search.add_argument("--force", action="store_true", help="re-tune even if the shape is cached")
    search.add_argument("--stop", choices=("budget", "auto"), default="budget",
                        help="budget: measure --trials configs (default); auto: stop early once the best "
                        "has stalled and the rest of the budget cannot pay for itself over --calls calls")
    search.add_argument("--no-layer-check", action="store_true",
                        help="model/lenet searches: skip timing each layer, then the whole training "
                        "step, as training runs them, which gives back to torch the kernels of ours "
                        "that win alone but lose in the layer or the step")
    search.add_argument("--compile-budget", type=float, default=None, metavar="SECONDS",
                        help="stop proposing Triton configs once their first calls (the JIT compile, "
                        "most of a GPU search's time) have taken this many seconds in all")
    search.add_argument("--in-process", action="store_true",
                        help="evaluate candidates in this process instead of an isolated worker: "
                        "less overhead, but a kernel that crashes or hangs ends the search")
    search.add_argument("--calls", type=int, default=None, metavar="N",
                        help="with --stop auto: how often the kernel will run (default 10000)")
    _threads_option(search)
    _common(search)

    show = sub.add_parser("show", help="print the cache as a table")
    show.add_argument("--op", choices=OPS, help="only this op")
    _common(show)

    bench = sub.add_parser("bench", help="tuned vs torch, ratio per shape (re-measured now)",
                           description="Re-time cached winners against torch's own op on the same "
                           "inputs in the same run. --suite lenet tunes and times every problem of a "
                           "LeNet training step (autotune.lenet_problems: conv 1->6 28x28 pad 2, 6->16 "
                           "14x14; fc 400-120-84-10; forward and both gradients) at each --batches size.")
    bench.add_argument("--suite", choices=("cache", "lenet"), default="cache",
                       help="cache: every cached shape of this device (default); lenet: the LeNet suite")
    bench.add_argument("--batches", default="1,16,64,256", help="batch sizes for --suite lenet")
    bench.add_argument("--trials", type=int, default=16, help="tuning budget for uncached shapes")
    bench.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per shape")
    _threads_option(bench)
    bench.add_argument("--output", type=Path, help="write the figures as JSON here "
                       "(default: <cache-dir>/bench-<device>.json)")
    _common(bench)

    cache = sub.add_parser("cache", help="where the cache is, or clear it")
    cache.add_argument("action", nargs="?", choices=("path", "clear", "pull", "push"), default="path",
                       help="path (default): print where the cache file is; clear: move it aside "
                       "(kept as .cleared-<time>) and delete the Optuna studies next to it; pull: merge "
                       "the results tuned on other machines from --storage's results table into the "
                       "local cache; push: the local cache into that table (newest entry per key wins)")
    cache.add_argument("--keep-studies", action="store_true", help="with clear: keep studies.db")
    cache.add_argument("--storage", help="with pull/push: the database URL the workers share, e.g. "
                       "postgresql://user@host/db (a plain path: an SQLite file)")
    _common(cache)

    report = sub.add_parser("report", help="index.html with PNG figures of the cache, studies and training",
                            description="Write OUT/index.html with PNG figures (speed-up over torch per "
                            "cached shape, best-so-far time per Optuna study, GFLOP/s against this CPU's "
                            "roofline, and with --summary the training example's step times and curves) "
                            "and the same numbers as report.json, shapes.csv and studies.csv.")
    report.add_argument("--out", type=Path, default=Path("report"), help="folder to write (default: report)")
    report.add_argument("--summary", type=Path, metavar="PATH",
                        help="train_lenet.py --summary-json file: step times tuned vs untuned, loss, accuracy")
    report.add_argument("--peak-gflops", type=float, metavar="X",
                        help="this machine's fp32 peak (default: measured now, numpy sgemm 2048^3, ~2 s)")
    _common(report)

    info = sub.add_parser("info", help="device fingerprint, library versions and registered kernels")
    _common(info)

    from autotune import compile_check

    check = sub.add_parser("compile-check", help="compile every Triton kernel for GPU targets, no GPU needed",
                           description="Compile each Triton kernel's default and sampled configs for real "
                           "targets (sm_80, sm_90) with Triton's bundled ptxas, no GPU or driver: failures, "
                           "registers, spills, shared memory against check()'s estimate. Exit 1 if a config "
                           "check() admits does not compile. A compile proof, not a run.")
    compile_check.add_arguments(check)
    _common(check)
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
        raise AutotuneError(f"{args.op} needs --shape (conv, max_pool2d: CxHxW or NxCxHxW, gemm: MxNxK)")
    if args.batch is not None and args.batch <= 0:
        raise AutotuneError(f"--batch must be a positive integer, got {args.batch}")
    # Options that do not apply to the op are mistakes, not something to ignore silently.
    conv_only = (("--filters", args.filters, None), ("--stride", args.stride, 1), ("--padding", args.padding, 0),
                 ("--dilation", args.dilation, 1))
    gemm_only = (("--trans-a", args.trans_a, False), ("--trans-b", args.trans_b, False))
    pool_only = (("--window", args.window, None),)
    stray_options = {"gemm": (("--batch", args.batch, None), *conv_only, *pool_only)}
    for op in POOL_OPS:
        stray_options[op] = (*conv_only, *gemm_only)
    stray = [name for name, value, default in stray_options.get(args.op, (*gemm_only, *pool_only))
             if value != default]
    if stray:
        raise AutotuneError(f"{', '.join(stray)} do{'es' if len(stray) == 1 else ''} not apply to {args.op}")
    return parse_problem(args.op, args.shape, batch=args.batch, filters=args.filters,
                         stride=args.stride, padding=args.padding, dilation=args.dilation,
                         trans_a=args.trans_a, trans_b=args.trans_b, dtype=args.dtype, window=args.window)


def _check_search_args(args) -> None:
    args.trials_given = args.trials is not None
    if args.trials is None:
        args.trials = DEFAULT_TRIALS
    if args.trials <= 0:
        raise AutotuneError(f"--trials must be a positive integer, got {args.trials}")
    if args.threads is not None and args.threads <= 0:
        raise AutotuneError(f"--threads must be a positive integer, got {args.threads}")
    if args.calls is not None and (args.calls <= 0 or args.stop != "auto"):
        raise AutotuneError("--calls must be a positive integer and needs --stop auto")
    if args.timeout is not None and args.timeout <= 0:
        raise AutotuneError(f"--timeout must be positive seconds, got {args.timeout}")
    if args.compile_budget is not None and not args.compile_budget > 0:
        raise AutotuneError(f"--compile-budget must be positive seconds, got {args.compile_budget}")


def _specs_for(problem: Problem, device: str, algorithms: str | None):
    """The kernels to search; torch's op is always among them, so a tuned choice never loses to
    the default (with --algorithms it is measured as the baseline even when not listed)."""
    specs = registry.kernels_for(problem, device)
    if not any(s.algorithm != "vendor" for s in specs):
        raise AutotuneError(f"no kernel of ours computes {problem.describe()} on {device} (only torch's op "
                            "does: nothing to tune); on the CPU use --dtype float32 or float64")
    if algorithms:
        wanted = [a.strip() for a in algorithms.split(",") if a.strip()]
        known = {s.algorithm for s in specs}
        for name in wanted:
            if name not in known:
                registry.get(problem.op, name, device)  # unknown names raise with the known list
                raise AutotuneError(f"algorithm {name!r} does not support {problem.describe()}")
        specs = [s for s in specs if s.algorithm in wanted or s.algorithm == "vendor"]
    return specs


def _check_fits(problem: Problem, device: str) -> None:
    """Refuse, before anything is written, a problem whose tensors cannot fit in memory."""
    from autotune.reference import footprint_bytes

    needed, available = footprint_bytes(problem), devices.available_memory(device)
    if needed > available:
        raise AutotuneError(f"{problem.describe()} needs about {needed / 2**30:.3g} GiB for its inputs, "
                            f"output and float64 reference; {available / 2**30:.1f} GiB is available "
                            f"on {device}")


def _storage_url(storage: str) -> str:
    """An Optuna storage URL; a plain path (results/studies.db) means an SQLite file there. A
    plain postgresql:// URL means SQLAlchemy's psycopg2 driver; where only psycopg (v3, the
    `postgres` extra) is installed, it is used instead."""
    if "://" not in storage:
        return f"sqlite:///{Path(storage).expanduser().resolve()}"
    scheme, rest = storage.split("://", 1)
    if scheme in ("postgresql", "postgres") and importlib.util.find_spec("psycopg2") is None:
        return f"postgresql+psycopg://{rest}"
    return storage


def _existing_cache_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise AutotuneError(f"--cache-dir {path} is not a folder")


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
    if args.op in ("lenet", "model"):
        return _search_model(args, "lenet" if args.op == "lenet" else args.model)
    if args.model is not None:
        raise AutotuneError(f"unexpected argument {args.model!r}: only 'search model' takes a model")
    problem = _problem_from_args(args)
    specs = _specs_for(problem, args.device, args.algorithms)
    _check_fits(problem, args.device)
    cache = Cache(args.cache_dir)
    entry = _search(args, cache, problem, specs, progress=not args.json)
    _print_result(args, entry, cache)
    return 0


def _study_storage(args) -> str:
    """--storage as a URL, or the SQLite file next to the cache (so an interrupted search resumes)."""
    if args.storage:
        return _storage_url(args.storage)
    try:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AutotuneError(f"cannot create --cache-dir {args.cache_dir}: {exc.strerror or exc}") from None
    return f"sqlite:///{(args.cache_dir / STUDIES_FILE).resolve()}"


def _study_name(args, problem: Problem) -> str:
    from autotune.decision import default_study_name

    return default_study_name(problem, args.device, sampler=args.sampler, seed=args.seed, threads=args.threads)


def _search(args, cache: Cache, problem: Problem, specs, progress, join: bool = False):
    """autotune.search with the command line's options; the Optuna study lives in --storage or
    next to the cache. join: take the current generation of the study even with --force."""
    from autotune.decision import search

    storage = _study_storage(args)
    name = _study_name(args, problem)
    entry = search(problem, device=args.device, cache=cache, trials=args.trials, timeout=args.timeout,
                   sampler=args.sampler, storage=storage, seed=args.seed, specs=specs, progress=progress,
                   force=args.force, threads=args.threads, study_name=name,
                   stop_calls=(args.calls or DEFAULT_CALLS) if args.stop == "auto" else None,
                   in_process=args.in_process, compile_budget=args.compile_budget,
                   new_generation=False if join else None)
    args.study = (storage, name)  # printed with the result: open it with Optuna's own tools
    if not entry.trustworthy:
        warnings.warn(f"{problem.describe()}: timing not trustworthy: {entry.reason}; nothing was cached",
                      stacklevel=2)
    return entry


def _entry_json(entry, cache: Cache) -> dict:
    data = entry.as_dict()
    keep = ("problem", "algorithm", "knobs", "median_ms", "p20_ms", "p80_ms", "vendor_ms", "best_own",
            "trials", "valid_configs", "stopped", "threads", "trustworthy", "reason", "source")
    return {**{k: data[k] for k in keep}, "from_cache": entry.from_cache,
            "cached": entry.trustworthy, "cache": str(cache.path)}


def _study_json(args) -> dict:
    storage, name = getattr(args, "study", (None, None))
    return {"storage": storage, "study_name": name} if name else {}


def _print_result(args, entry, cache: Cache) -> None:
    if args.json:
        print(json.dumps({**_entry_json(entry, cache), **_study_json(args)}, indent=1))
        return
    rows = [
        ("problem", entry.problem.describe()),
        ("device", devices.label(entry.device)),
        ("chosen", f"{entry.algorithm}  {knobs_text(entry.knobs)}"),
        ("why", entry.reason),
        ("time (median)", f"{ms(entry.median_ms)} ms  (p20 {ms(entry.p20_ms)}, p80 {ms(entry.p80_ms)})"),
        ("torch (vendor)", f"{ms(entry.vendor_ms)} ms"),
    ]
    own = entry.best_own
    if own is not None:
        rows.append(("best own kernel", f"{own.algorithm}  {knobs_text(own.knobs)}  {ms(own.median_ms)} ms  "
                                        f"(torch / own {ratio(entry.vendor_ms, own.median_ms)})"))
    if entry.trials:
        measured = sum(entry.trials.values())
        space = ""
        if entry.valid_configs:
            space = ("  (the whole valid space)" if measured >= entry.valid_configs
                     else f"  (of {entry.valid_configs} valid configs)")
        rows.append(("configs measured", ", ".join(f"{k} {v}" for k, v in entry.trials.items()) + space))
    if entry.stopped and not entry.from_cache:
        rows.append(("stopped early", entry.stopped))
    rows.append(("trustworthy", "yes" if entry.trustworthy else "NO (not cached)"))
    if not entry.from_cache and getattr(args, "study", None):
        storage, name = args.study
        rows.append(("optuna study", f"{name}  in {storage}"))
    if entry.trustworthy:
        rows.append(("cached in", f"{cache.path}" + ("  (answered from the cache, no tuning)"
                                                     if entry.from_cache else "")))
    print(format_pairs(rows))
    if entry.from_cache and getattr(args, "trials_given", False):
        print(f"cached; use --force to re-tune (--trials {args.trials} was not used)")


def _search_model(args, spec: str | None) -> int:
    """Tune every problem of one training step of a model (shared progress bar, cached ones skipped)."""
    from autotune import registry
    from autotune.models import example_input, load_model, model_layers
    from autotune.nn import problems_of
    from autotune.reference import torch_dtype

    if not spec:
        raise AutotuneError("search model needs a model: lenet, torchvision:<name> or package.module:factory")
    batch = args.batch or 64
    example = example_input(args.shape, batch, spec, torch_dtype(args.dtype))
    model = load_model(spec)
    calls = model_layers(model, example)
    problems = problems_of(calls)
    cache = Cache(args.cache_dir)
    plan = []
    for problem in problems:
        _check_fits(problem, args.device)
        if any(s.algorithm != "vendor" for s in registry.kernels_for(problem, args.device)):
            plan.append((problem, _specs_for(problem, args.device, args.algorithms)))
        # else: only torch's op computes it (e.g. float16 on the CPU): nothing to tune, torch runs it
    # The bar's total is what will run: cached layers cost nothing, the others their budget.
    budget = sum(min(args.trials, len(registry.valid_configs(problem, specs))) for problem, specs in plan
                 if args.force or cache.find(problem, args.device, specs) is None)
    with progress_bar(desc=f"tuning {spec} batch {batch}", unit="cfg", total=budget,
                      enabled=False if args.json else None, leave=True) as bar:
        entries = _search_problems(args, cache, plan, bar)
    verdicts = [] if args.no_layer_check else _check_layers(args, cache, calls, entries, plan)
    step = None if args.no_layer_check else _check_step(args, cache, model, example, calls, entries, plan)
    if args.json:
        print(json.dumps({"model": spec, "batch": batch, "layers": [_entry_json(e, cache) for e in entries],
                          "layer_checks": [v.as_dict() for v in verdicts],
                          "step_check": step.as_dict() if step else None, "cache": str(cache.path)}, indent=1))
        return 0
    print(format_table(("op", "problem", "chosen", "knobs", "ms", "torch ms", "speed-up", "trusted"),
                       [(e.op, problem_text(e.problem), e.algorithm, knobs_text(e.knobs, SHOW_KNOBS_WIDTH),
                         ms(e.median_ms), ms(e.vendor_ms), ratio(e.vendor_ms, e.median_ms),
                         "yes" if e.trustworthy else "NO") for e in entries]))
    for v in verdicts:
        kept = f"keeps ours for {'+'.join(v.kept)}" if v.kept else "runs torch's layer"
        back = f"; gave {'+'.join(v.given_back)} back to torch" if v.given_back else ""
        print(f"layer check {v.call.kind} {problem_text(v.call.problems[0])}: {kept}{back} ({v.reason})")
    if step:
        print(f"step check: {len(step.layers_kept)} layers keep kernels of ours, {len(step.layers_given_back)} "
              f"given back to torch ({step.reason})")
    saved = sum(e.vendor_ms - e.median_ms for e in entries if e.vendor_ms and e.trustworthy)
    cached = sum(1 for e in entries if e.from_cache)
    print(f"{len(entries)} problems; per training step the chosen kernels save {saved:.3f} ms over torch's ops "
          f"(kernel time only); speed-up = torch ms / chosen ms, > 1 is faster than torch\ncached in {cache.path}")
    if cached and args.trials_given and not args.force:
        print(f"{cached} of them cached; use --force to re-tune")
    return 0


def _check_layers(args, cache: Cache, calls, entries: list, plan: list) -> list:
    """Time each layer that runs a kernel of ours the way training calls it (autotune.layer_check);
    `entries` (in `plan` order) are updated to what the check left in the cache."""
    from autotune.layer_check import check_layers

    if not args.json:
        print("checking the layers as training calls them (forward + backward) ...", file=sys.stderr)
    # The thread count is part of the cache key: look entries up as the search stored them.
    with measure.pinned_threads(args.threads if args.device == "cpu" else None):
        verdicts = check_layers(calls, cache=cache, device=args.device)
        if verdicts:
            entries[:] = [_after_check(e, cache, args.device, specs) for e, (_, specs) in zip(entries, plan, strict=True)]
    from autotune.decision import share

    checked = {p for v in verdicts for p in v.call.problems if p is not None}
    for entry in entries:
        if entry.problem in checked and entry.layer_check:  # re-cached: other machines pull this one
            share(_study_storage(args), entry)
    return verdicts


def _check_step(args, cache: Cache, model, example, calls, entries: list, plan: list):
    """Time the whole training step, tuned against torch's (autotune.step_check); `entries` are
    updated to what the check left in the cache."""
    from autotune.decision import share
    from autotune.step_check import check_step

    with measure.pinned_threads(args.threads if args.device == "cpu" else None):
        verdict = check_step(model, example, calls, cache=cache, device=args.device)
        if verdict is not None and verdict.layers_given_back:
            before = {e.problem: e.algorithm for e in entries}
            entries[:] = [_after_check(e, cache, args.device, specs) for e, (_, specs) in zip(entries, plan, strict=True)]
            for entry in entries:
                if before[entry.problem] != entry.algorithm:  # re-cached: other machines pull this one
                    share(_study_storage(args), entry)
    return verdict


def _after_check(entry, cache: Cache, device: str, specs):
    """The entry as the layer check left it in the cache (the same one where it changed nothing)."""
    if not entry.trustworthy:
        return entry
    now = cache.find(entry.problem, device, specs)
    return entry if now is None else dataclasses.replace(now, from_cache=entry.from_cache)


def _search_problems(args, cache: Cache, plan, bar) -> list:
    """Search each problem of `plan` in turn. Workers sharing a database storage split them: each
    claims the next problem nobody has claimed (autotune.claims, key #problem in the problem's
    study), skips those other live workers hold, then waits for those and takes their results
    from the shared studies (a dead worker's problem is taken over after the heartbeat timeout)."""
    from autotune import claims

    shared = claims.for_storage(_study_storage(args))
    entries: dict[int, object] = {}
    waiting: dict[int, str] = {}  # problem index -> its study (generation) another worker tunes

    def tune(i: int, study: str) -> bool:
        problem, specs = plan[i]
        bar.set_description(f"{problem.op} {problem.describe().split(' ', 2)[1]}")
        if shared.claim(study, claims.PROBLEM) == claims.MINE:
            entries[i] = _search(args, cache, problem, specs, progress=bar, join=True)
            shared.finish(study, claims.PROBLEM)
            return True
        if shared.state(study, claims.PROBLEM) == claims.DONE:  # tuned elsewhere: its result, no measuring
            entries[i] = _search(args, cache, problem, specs, progress=bar, join=True)
            return True
        return False

    for i, (problem, specs) in enumerate(plan):
        if not args.force and cache.find(problem, args.device, specs) is not None:
            entries[i] = _search(args, cache, problem, specs, progress=bar)  # a cache hit
            continue
        name = _study_name(args, problem)
        study = claims.generation_name(name, shared.generation(name, args.force))
        if not tune(i, study):
            waiting[i] = study
    while waiting:
        time.sleep(shared.poll_s)
        for i, study in list(waiting.items()):
            if tune(i, study):
                del waiting[i]
    return [entries[i] for i in range(len(plan))]


# show / cache / info ----------------------------------------------------------------------------
def cmd_show(args) -> int:
    _existing_cache_dir(args.cache_dir)
    cache = Cache(args.cache_dir)
    entries = [e for e in cache.entries().values() if not args.op or e.op == args.op]
    entries.sort(key=lambda e: (e.op, _shape_order(e.problem), devices.label(e.device)))
    if args.json:
        print(json.dumps({"cache": str(cache.path), "entries": [e.as_dict() for e in entries]}, indent=1))
        return 0
    if not entries:
        print(f"no cached results in {cache.path}" + (f" for {args.op}" if args.op else ""))
        return 0
    # One device (and thread count) for all: said once below instead of a column on every row.
    where = {_device_text(e) for e in entries}
    rows = [(SHOW_OP.get(e.op, e.op), problem_text(e.problem), *([_device_text(e)] if len(where) > 1 else []),
             e.algorithm, knobs_text(e.knobs, SHOW_KNOBS_WIDTH), ms(e.median_ms), ms(e.vendor_ms),
             ratio(e.vendor_ms, e.median_ms)) for e in entries]
    headers = ("op", "problem", *(["device"] if len(where) > 1 else []), "runs", "knobs", "ms", "torch ms",
               "speed-up")
    print(format_table(headers, rows))
    device_note = f" measured on {where.pop()}" if len(where) == 1 else ""
    print(f"{len(rows)} entries{device_note} in {cache.path}\nop: conv = conv2d, conv.dx = conv2d_bwd_data, "
          "conv.dw = conv2d_bwd_weight\nspeed-up = torch ms / ms (> 1: faster than torch); "
          "--json for every field")
    return 0


def _shape_order(problem: Problem) -> tuple:
    """Shapes in numeric order (8x... before 64x...), then the rest of the description."""
    from autotune.problem import problem_to_dict

    data = problem_to_dict(problem)
    return tuple((0, v, "") if isinstance(v, int) else (1, 0, str(v)) for v in data.values())


def _device_text(entry) -> str:
    """`cpu 1t` (the thread count is part of the key) or the GPU's name."""
    if entry.device.get("kind") == "cuda":
        return devices.label(entry.device)
    return f"cpu {entry.threads} thread{'s' if entry.threads != 1 else ''}"


def cmd_cache(args) -> int:
    _existing_cache_dir(args.cache_dir)
    cache = Cache(args.cache_dir)
    if args.action in ("pull", "push"):
        return _cache_sync(args, cache)
    if args.storage:
        raise AutotuneError(f"--storage applies to cache pull and push, not {args.action}")
    if args.action == "path":
        print(json.dumps({"cache": str(cache.path)}) if args.json else cache.path)
        return 0
    removed, aside = cache.clear(keep_studies=args.keep_studies)
    if args.json:
        print(json.dumps({"removed": removed, "moved_to": str(aside) if aside else None}))
    elif aside is None:
        print(f"nothing to clear in {args.cache_dir}")
    else:
        print(f"cleared {removed} entries: {cache.path} moved to {aside}"
              + ("" if args.keep_studies else "; Optuna studies deleted"))
    return 0


def _cache_sync(args, cache: Cache) -> int:
    """`cache pull` / `cache push`: the local cache and a database's results table, merged."""
    from autotune import results_db

    if not args.storage:
        raise AutotuneError(f"cache {args.action} needs --storage URL (the database the workers share)")
    url = _storage_url(args.storage)
    if args.action == "pull":
        taken, total = results_db.pull(url, cache)
        text = f"pulled {taken} of {total} entries from {args.storage} into {cache.path}"
    else:
        taken, total = results_db.push(url, cache)
        text = f"pushed {taken} of {total} entries from {cache.path} to {args.storage}"
    if args.json:
        print(json.dumps({"action": args.action, "merged": taken, "entries": total, "cache": str(cache.path)}))
    else:
        print(text + ("" if taken == total else " (the others were already there, or older)"))
    return 0


def cmd_info(args) -> int:
    specs = [registry.for_device(s, args.device) for s in registry.load(registry.available_backends(args.device))]
    info = {
        "device": args.device,
        "fingerprint": devices.fingerprint(args.device),
        "versions": devices.versions(),
        "cache": str(Cache(args.cache_dir).path),
        "kernels": [{"op": s.op, "algorithm": s.algorithm, "backend": s.backend,
                     "knobs": [p.name for p in s.space], "configs": s.space.size(),
                     "source_hash": s.source_hash, "module": s.module, "plugin": s.plugin} for s in specs],
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(format_pairs([*info["fingerprint"].items(), *info["versions"].items(), ("cache", info["cache"])]))
    print()
    print(format_table(("op", "algorithm", "backend", "knobs", "configs", "from"),
                       [(k["op"], k["algorithm"], k["backend"], " ".join(k["knobs"]) or "-", k["configs"],
                         f"plugin {k['module']}" if k["plugin"] else f"kernels.{k['module']}")
                        for k in info["kernels"]]))
    return 0


def cmd_report(args) -> int:
    from autotune.report_html import build

    if args.peak_gflops is not None and not args.peak_gflops > 0:
        raise AutotuneError(f"--peak-gflops must be positive, got {args.peak_gflops}")
    result = build(args.cache_dir, args.out, summary_path=args.summary, peak_gflops=args.peak_gflops)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"wrote {result['index']}: {len(result['figures'])} figures ({', '.join(result['figures']) or 'none'}) "
          f"from {result['shapes']} cached shapes and {result['studies']} studies; numbers in "
          f"{', '.join(result['data'])}")
    return 0


def cmd_bench(args) -> int:
    from autotune.bench import run_bench

    return run_bench(args)


def cmd_compile_check(args) -> int:
    from autotune.compile_check import run_cli

    return run_cli(args)


COMMANDS = {"search": cmd_search, "show": cmd_show, "bench": cmd_bench, "cache": cmd_cache, "info": cmd_info,
            "report": cmd_report, "compile-check": cmd_compile_check}

__all__ = ["main", "build_parser"]
