"""Compile every Triton kernel for real GPU targets on a machine without a GPU.

Triton's NVIDIA backend turns a kernel into PTX and then, with the ptxas it bundles, into a cubin;
neither step needs a driver. A worker process (TRITON_INTERPRET unset) makes a stub driver that
reports the target (sm_80, sm_90, ...) active and turns every `kernel[grid](...)` launch into a
compile (`run(..., warmup=True)`), then calls the kernels' own launchers unchanged on CPU tensors
inside `autotune.device.compiling_for(arch)`. So what is compiled is exactly what a search would
launch: the same constexprs, the same integer and pointer specialisations, split-K's second pass.

For each (target, kernel, problem, dtype) the check compiles the kernel's default config and
`samples` random configs its check() admits; configs check() rejects are counted. Per config it
records the compile time, the ptxas registers and spills, and the compiler's shared memory
(metadata.shared) against the estimate the kernel's check() uses (KernelSpec.resources). A config
that check() admits and that does not compile, or that needs more shared memory than the target
has, is a failure: check() should have rejected it.

This is a compile proof, not a run: it says nothing about speed or numerics.

    rows = compile_check(archs=(80, 90), samples=5)
    summary = summarize(rows)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import random
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from autotune import registry
from autotune.device import compiling_for
from autotune.errors import AutotuneError
from autotune.problem import GemmProblem, Problem, problem_from_dict, problem_to_dict

DEFAULT_ARCHS = (80, 90)
DTYPES = ("float32", "float16", "bfloat16")
# A larger GEMM than LeNet's, so big tiles (256x256, 16 warps) are exercised too.
EXTRA_GEMMS = ((4096, 4096, 4096),)
LENET_BATCH = 64
DEFAULT_TIMEOUT_S = 120.0
# Starting a worker imports torch and triton (seconds on a busy machine): not a config's time.
START_TIMEOUT_S = 180.0
SAMPLE_ATTEMPTS = 200  # random draws per wanted sample before giving up on a small space

_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_ERROR = re.compile(r"ptxas[^\n]*(?:error|fatal)[^\n]*", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class Job:
    """One config to compile for one target."""

    arch: int
    op: str
    algorithm: str
    problem: dict
    knobs: dict
    source: str  # "default" or "sample"


@dataclass(frozen=True, kw_only=True)
class Row:
    """What compiling one config gave. status: compiled, failed (check admitted it, the
    compiler or the target refused it) or timeout."""

    arch: int
    op: str
    algorithm: str
    problem: str
    dtype: str
    knobs: dict
    source: str
    status: str
    seconds: float | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    shared: int | None = None  # the compiler's, bytes
    shared_estimate: int | None = None  # check()'s, bytes
    binary: str | None = None  # sha256 prefix of the cubin: equal binaries mean a knob did nothing
    message: str = ""
    # The problem as data (autotune.problem.problem_from_dict), so a saved --json can be re-scored
    # against a changed estimate without compiling again (rescore()).
    problem_spec: dict | None = None

    def smem_ratio(self) -> float | None:
        if self.shared is None or not self.shared_estimate:
            return None
        return self.shared / self.shared_estimate


@dataclass(kw_only=True)
class Plan:
    jobs: list[Job] = field(default_factory=list)
    # (arch, op, algorithm) -> distinct sampled configs check() rejected
    rejected: dict[tuple[int, str, str], int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# What to compile


def default_problems(ops: Sequence[str] | None = None, dtypes: Sequence[str] = DTYPES) -> list[Problem]:
    """LeNet's problems at batch 64 (every conv and GEMM of a training step) plus a 4096³ GEMM,
    in each dtype."""
    from autotune.lenet import lenet_problems
    from autotune.reference import torch_dtype

    problems: list[Problem] = []
    for dtype in dtypes:
        problems.extend(lenet_problems(LENET_BATCH, torch_dtype(dtype)))
        problems.extend(GemmProblem(m=m, n=n, k=k, dtype=dtype) for m, n, k in EXTRA_GEMMS)
    return [p for p in problems if ops is None or p.op in ops]


def triton_specs() -> list[registry.KernelSpec]:
    specs = [s for s in registry.load(("triton",)) if s.backend == "triton"]
    if not specs:
        raise AutotuneError("Triton does not import here; install triton to run compile-check")
    return specs


def plan(problems: Iterable[Problem], *, archs: Sequence[int] = DEFAULT_ARCHS, samples: int = 5,
         seed: int = 0) -> Plan:
    """The default config plus `samples` distinct configs check() admits, per (target, kernel,
    problem); sampled configs that check() rejects are counted, not compiled."""
    result = Plan()
    problems = list(problems)
    for arch in archs:
        with compiling_for(arch):
            for spec in triton_specs():
                for problem in problems:
                    if problem.op != spec.op or spec.supports(problem) is not None:
                        continue
                    _plan_one(result, arch, spec, problem, samples, seed)
    return result


def _plan_one(result: Plan, arch: int, spec, problem: Problem, samples: int, seed: int) -> None:
    rng = random.Random(f"{seed}|{arch}|{spec.op}|{spec.algorithm}|{problem.key()}")
    default = spec.full_knobs(problem, {})
    seen = {json.dumps(default, sort_keys=True)}
    rejected: set[str] = set()
    chosen = [(default, "default")]
    params = list(spec.space)
    attempts = 0
    while params and len(chosen) < samples + 1 and attempts < SAMPLE_ATTEMPTS * max(samples, 1):
        attempts += 1
        knobs = spec.full_knobs(problem, {p.name: rng.choice(p.values) for p in params})
        key = json.dumps(knobs, sort_keys=True)
        if key in seen or key in rejected:
            continue
        if spec.check(problem, knobs) is not None:
            rejected.add(key)
            continue
        seen.add(key)
        chosen.append((knobs, "sample"))
    name = (arch, spec.op, spec.algorithm)
    result.rejected[name] = result.rejected.get(name, 0) + len(rejected)
    for knobs, source in chosen:
        result.jobs.append(Job(arch=arch, op=spec.op, algorithm=spec.algorithm,
                               problem=problem_to_dict(problem), knobs=knobs, source=source))


# ---------------------------------------------------------------------------------------------
# Compiling: a pool of worker processes, one config at a time each, with a timeout


def compile_check(problems: Iterable[Problem] | None = None, *, archs: Sequence[int] = DEFAULT_ARCHS,
                  samples: int = 5, seed: int = 0, workers: int = 2,
                  timeout_s: float = DEFAULT_TIMEOUT_S, progress=None) -> tuple[list[Row], Plan]:
    """Compile the plan's configs in `workers` processes; every config gives one Row."""
    the_plan = plan(default_problems() if problems is None else problems, archs=archs,
                    samples=samples, seed=seed)
    rows = run_jobs(the_plan.jobs, workers=workers, timeout_s=timeout_s, progress=progress)
    return rows, the_plan


def run_jobs(jobs: Sequence[Job], *, workers: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S,
             progress=None, fresh: bool = True) -> list[Row]:
    """Compile `jobs` in `workers` processes. fresh=False lets a config already in Triton's
    on-disk cache load from it (and what is compiled is stored there either way): that is how
    `benchmarks/gpu_check.py --prewarm` compiles a search's first configs ahead, in parallel."""
    todo: queue.Queue[tuple[int, Job]] = queue.Queue()
    for i, job in enumerate(jobs):
        todo.put((i, job))
    results: list[Row | None] = [None] * len(jobs)
    errors: list[BaseException] = []

    def serve() -> None:
        worker = _Worker(fresh=fresh)
        try:
            while True:
                try:
                    i, job = todo.get_nowait()
                except queue.Empty:
                    return
                results[i] = worker.compile(job, timeout_s)
                if progress is not None:
                    progress(results[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)
        finally:
            worker.close()

    threads = [threading.Thread(target=serve, daemon=True) for _ in range(max(1, min(workers, len(jobs))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


def _worker_env(fresh: bool = True) -> dict[str, str]:
    """The interpreter off (tests turn it on), this tree first on the path, fresh compiles (an
    on-disk cache hit would hide the compile time) unless told otherwise, ptxas's -v log printed
    (captured by the worker) for registers and spills."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_ALWAYS_COMPILE")}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    if fresh:
        env["TRITON_ALWAYS_COMPILE"] = "1"
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # compile only: never touch a GPU, even where there is one
    return env


class _Worker:
    """One `python -m autotune.compile_check` process: a job per line in, a row per line out."""

    def __init__(self, fresh: bool = True) -> None:
        self.proc: subprocess.Popen | None = None
        self.fresh = fresh

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autotune.compile_check"], env=_worker_env(self.fresh),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        if self._read(START_TIMEOUT_S, "ready") is None:
            self.close()
            raise AutotuneError("the compile-check worker did not start (does triton import here?)")

    def _read(self, timeout_s: float, prefix: str) -> str | None:
        """The worker's next line that starts with `prefix` (anything a library printed outside a
        compile is skipped), or None when it dies or `timeout_s` passes."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            line = self.proc.stdout.readline()
            if not line:
                return None
            if line.startswith(prefix):
                return line

    def compile(self, job: Job, timeout_s: float) -> Row:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(asdict(job)) + "\n")
        self.proc.stdin.flush()
        line = self._read(timeout_s, "{")
        if line is None:
            dead = self.proc.poll() is not None
            self.close()
            return _row(job, status="failed" if dead else "timeout",
                        message="the worker died" if dead else f"no answer in {timeout_s:g} s",
                        seconds=None if dead else timeout_s)
        return Row(**json.loads(line))

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None


def _row(job: Job, **fields) -> Row:
    problem = problem_from_dict(job.problem)
    return Row(arch=job.arch, op=job.op, algorithm=job.algorithm, problem=problem.describe(),
               dtype=problem.dtype, knobs=job.knobs, source=job.source, problem_spec=job.problem, **fields)


def rescore(rows: Iterable[Row]) -> list[Row]:
    """The rows with shared_estimate recomputed by the kernels' current resources(): iterate on
    the shared-memory model (kernels/triton_smem.py) against a saved `--json` instead of
    recompiling. Rows saved without problem_spec keep their estimate."""
    out = []
    for row in rows:
        spec = registry.get(row.op, row.algorithm, "cuda")
        if row.problem_spec is None or spec.resources is None:
            out.append(row)
            continue
        with compiling_for(row.arch):
            estimate = spec.resources(problem_from_dict(row.problem_spec), row.knobs).get("shared")
        out.append(replace(row, shared_estimate=estimate))
    return out


# ---------------------------------------------------------------------------------------------
# The worker process


class _CompileOnlyDriver:
    """Enough of a Triton driver to compile for `arch` with no GPU. The device id is the arch, so
    Triton's per-device kernel caches keep targets apart."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    @staticmethod
    def is_active() -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device=None) -> int:
        return 0


_compiled: list = []


def _compile_instead_of_launch(kernel, grid):
    def launch(*args, **kwargs):
        _compiled.append(kernel.run(*args, grid=grid, warmup=True, **kwargs))

    return launch


@contextlib.contextmanager
def _captured_output(path: str):
    """fd-level redirect of stdout and stderr (Triton prints the whole PTX on a ptxas failure,
    and the ptxas -v log we ask for)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _compile_job(job: Job) -> Row:
    import torch
    import triton

    from autotune.measure import Status, classify_exception
    from autotune.reference import empty_output, torch_dtype

    problem = problem_from_dict(job.problem)
    spec = registry.get(job.op, job.algorithm, "cuda")
    triton.runtime.driver.set_active(_CompileOnlyDriver(job.arch))
    with compiling_for(job.arch):
        estimate = dict(spec.resources(problem, job.knobs)) if spec.resources else {}
        limit = estimate.get("shared_limit")
        inputs = tuple(torch.empty(s, dtype=torch_dtype(problem.dtype)) for s in problem.input_shapes())
        out = empty_output(problem)
        _compiled.clear()
        fd, log_path = tempfile.mkstemp(suffix=".log")
        os.close(fd)
        error: BaseException | None = None
        start = time.perf_counter()
        try:
            with _captured_output(log_path):
                spec.run(problem, job.knobs, inputs, out)
        except Exception as exc:  # noqa: BLE001 - a failed compile is a result
            error = exc
        seconds = time.perf_counter() - start
        log = Path(log_path).read_text(errors="replace")
        os.unlink(log_path)
    common = dict(seconds=round(seconds, 3), shared_estimate=estimate.get("shared"))
    if error is not None:
        status = classify_exception(error)
        detail = _PTXAS_ERROR.findall(str(error)) or _PTXAS_ERROR.findall(log) or [str(error)]
        return _row(job, status="failed", message=f"{status}: {type(error).__name__}: {detail[0][:300]}",
                    **common)
    main = _compiled[0]  # the config's own kernel (split-K's reduce pass compiles after it)
    registers = [int(n) for n in _REGISTERS.findall(log)]
    spills = [int(a) + int(b) for a, b in _SPILLS.findall(log)]
    shared = int(main.metadata.shared)
    row = _row(job, status="compiled", registers=registers[0] if registers else None,
               spill_bytes=spills[0] if spills else None, shared=shared,
               binary=hashlib.sha256(main.asm["cubin"]).hexdigest()[:16], **common)
    if limit is not None and shared > limit:
        return _row(job, status="failed", message=f"{Status.OUT_OF_RESOURCES}: needs {shared} bytes of "
                    f"shared memory, sm_{job.arch} has {limit}", registers=row.registers,
                    spill_bytes=row.spill_bytes, shared=shared, **common)
    return row


def _serve() -> None:
    from triton.runtime.jit import KernelInterface

    KernelInterface.__getitem__ = _compile_instead_of_launch  # type: ignore[method-assign]
    out = sys.stdout
    print("ready", file=out, flush=True)
    for line in sys.stdin:
        job = Job(**json.loads(line))
        try:
            row = _compile_job(job)
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            row = _row(job, status="failed", message=f"crashed: {type(exc).__name__}: {exc}"[:400])
        print(json.dumps(asdict(row)), file=out, flush=True)


# ---------------------------------------------------------------------------------------------
# Summaries


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(rows: Sequence[Row], the_plan: Plan | None = None) -> dict:
    """Totals and per-(arch, kernel) lines; what `autotune compile-check --json` prints."""
    def block(subset: Sequence[Row], rejected: int) -> dict:
        ratios = [r.smem_ratio() for r in subset if r.smem_ratio() is not None]
        binaries = {(r.arch, r.op, r.algorithm, r.problem, r.binary) for r in subset if r.binary}
        times = [r.seconds for r in subset if r.status == "compiled" and r.seconds is not None]
        return {
            "configs": len(subset) + rejected,
            "compiled": sum(r.status == "compiled" for r in subset),
            "rejected": rejected,
            "failed": sum(r.status != "compiled" for r in subset),
            "spilled": sum(bool(r.spill_bytes) for r in subset),
            # configs whose cubin another config of the same kernel and problem already gave
            "duplicates": sum(r.binary is not None for r in subset) - len(binaries),
            "smem_ratio_min": round(min(ratios), 3) if ratios else None,
            "smem_ratio_max": round(max(ratios), 3) if ratios else None,
            "compile_s_p50": _percentile(times, 0.5),
            "compile_s_p95": _percentile(times, 0.95),
            "compile_s_max": max(times) if times else None,
        }

    rejected = the_plan.rejected if the_plan is not None else {}
    groups = sorted({(r.arch, r.op, r.algorithm) for r in rows} | set(rejected))
    kernels = []
    for arch, op, algorithm in groups:
        subset = [r for r in rows if (r.arch, r.op, r.algorithm) == (arch, op, algorithm)]
        kernels.append({"arch": arch, "op": op, "algorithm": algorithm,
                        **block(subset, rejected.get((arch, op, algorithm), 0))})
    total = block(rows, sum(rejected.values()))
    failures = [asdict(r) for r in rows if r.status != "compiled"]
    return {**total, "archs": sorted({r.arch for r in rows}), "kernels": kernels,
            "failures": failures, "rows": [{**asdict(r), "smem_ratio": r.smem_ratio()} for r in rows]}


# ---------------------------------------------------------------------------------------------
# The command line: `autotune compile-check` (autotune/cli.py parses, this runs)


def add_arguments(parser) -> None:
    parser.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                        help="comma-separated compute capabilities to compile for (default 80,90)")
    parser.add_argument("--samples", type=int, default=5,
                        help="random configs check() admits per (kernel, problem, dtype), besides the default")
    parser.add_argument("--op", help="comma-separated ops (default: every op with a Triton kernel)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated dtypes (default all three)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per config")
    parser.add_argument("--rescore", metavar="JSON", type=Path,
                        help="compile nothing: re-score the rows of a saved --json against check()'s "
                        "current shared-memory estimate (to iterate on kernels/triton_smem.py)")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def load_rows(path: Path) -> list[Row]:
    """The per-config rows of a saved `autotune compile-check --json`."""
    try:
        data = json.loads(path.read_text())
        fields = set(Row.__dataclass_fields__)
        return [Row(**{k: v for k, v in row.items() if k in fields}) for row in data["rows"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AutotuneError(f"--rescore {path}: not a saved compile-check --json ({exc})") from None


def run_cli(args) -> int:
    from autotune.problem import OPS

    if args.rescore is not None:
        summary = summarize(rescore(load_rows(args.rescore)))
        print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
        return 1 if summary["failed"] else 0

    try:
        archs = [int(a) for a in _csv(args.arch)]
    except ValueError:
        raise AutotuneError(f"--arch takes compute capabilities like 80,90, got {args.arch!r}") from None
    if not archs or any(a < 70 for a in archs):
        raise AutotuneError(f"--arch takes compute capabilities >= 70 like 80,90, got {args.arch!r}")
    ops = _csv(args.op) if args.op else None
    for op in ops or ():
        if op not in OPS:
            raise AutotuneError(f"unknown op {op!r} for --op; choose from {', '.join(OPS)}")
    dtypes = _csv(args.dtypes)
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise AutotuneError(f"--dtypes: Triton kernels run {', '.join(DTYPES)}, not {dtype!r}")
    if args.samples < 0 or args.workers < 1 or args.timeout <= 0:
        raise AutotuneError("--samples must be >= 0, --workers >= 1 and --timeout positive")
    rows, the_plan = compile_check(default_problems(ops, dtypes), archs=archs, samples=args.samples,
                                   seed=args.seed, workers=args.workers, timeout_s=args.timeout)
    summary = summarize(rows, the_plan)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 1 if summary["failed"] else 0


def format_summary(summary: dict) -> str:
    """The table `autotune compile-check` prints: a line per (target, kernel), then the total,
    then each failure."""
    from autotune.report import format_table

    lines = [format_table(
        ("target", "op", "algorithm", "configs", "compiled", "rejected", "failed", "spilled",
         "same cubin", "smem compiler/estimate", "compile s p50", "p95"),
        [(f"sm_{k['arch']}", k["op"], k["algorithm"], k["configs"], k["compiled"], k["rejected"],
          k["failed"], k["spilled"], k["duplicates"], _ratio_range(k), k["compile_s_p50"],
          k["compile_s_p95"])
         for k in [*summary["kernels"], {**summary, "arch": "*", "op": "all", "algorithm": ""}]])]
    for failure in summary["failures"]:
        lines.append(f"FAILED sm_{failure['arch']} {failure['problem']} {failure['algorithm']} "
                     f"{failure['knobs']}: {failure['message']}")
    return "\n".join(lines)


def _ratio_range(block: dict) -> str:
    lo, hi = block["smem_ratio_min"], block["smem_ratio_max"]
    return "-" if lo is None else f"{lo:.2f}-{hi:.2f}"


if __name__ == "__main__":
    _serve()
