"""Tune the Triton kernels on a GPU and compare each winner with torch's own op.

Run by benchmarks/gpu_check.sh after the GPU tests. For each shape: a short Optuna search over
our Triton kernels (autotune.tuner.tune, candidates evaluated in an isolated worker process so a
kernel that crashes the CUDA context or hangs costs one trial, not the run), then torch's op
(cuDNN with cudnn.benchmark=True, cuBLAS) timed in this process on the same inputs with the same
timer (autotune.measure.bench -> triton.testing.do_bench), TF32 allowed exactly when the Triton
winner uses TF32. Prints a table and writes everything as JSON.

    python benchmarks/gpu_check.py --budget-s 270          # $OUT/gpu_check.json (or results/)
    python benchmarks/gpu_check.py --prewarm 14            # first configs compiled ahead in 14 processes

On a machine without CUDA it says so, writes a JSON that says so, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from autotune.lenet import lenet_problems  # noqa: E402
from autotune.problem import CONV_OPS, Conv2dProblem, GemmProblem, problem_to_dict  # noqa: E402

# The search's deadline is this share of a shape's time: the candidate in flight when it passes
# (a Triton compile, up to seconds), the final re-timing of the finalists and torch's timing come
# on top. On the H100 (2026-11-27) shapes given 15 s took 21-31 s, and the last three were cut.
SEARCH_SHARE = 0.6


def shapes(lenet_batches=(64, 256)) -> list:
    """Every problem of the check, most informative first (a spent budget cuts the tail)."""
    problems = [GemmProblem(m=s, n=s, k=s, dtype=d) for s in (1024, 4096) for d in ("float16", "float32")]
    resnet = Conv2dProblem(n=32, c=64, h=56, w=56, k=64, r=3, s=3, padding=1)
    problems += [resnet.with_op(op) for op in CONV_OPS]
    for batch in lenet_batches:  # LeNet's convolutions, as a training step runs them
        problems += [p for p in lenet_problems(batch) if p.op in CONV_OPS]
    return problems


def torch_time(problem, tf32: bool):
    """torch's op on fresh inputs: cuDNN autotuned (benchmark=True), TF32 as the Triton winner."""
    from autotune import registry
    from autotune.measure import bench
    from autotune.reference import empty_output, make_inputs

    torch.backends.cudnn.benchmark = True
    spec = registry.get(problem.op, "vendor", "cuda")
    inputs = make_inputs(problem, device="cuda")
    out = empty_output(problem, device="cuda")
    knobs = {"allow_tf32": tf32}
    return bench(lambda: spec.run(problem, knobs, inputs, out), device="cuda")


def prewarm_jobs(problem, arch: int) -> list:
    """The configs a search of `problem` measures first: each Triton kernel's default and seed
    configs that its check() admits, as compile jobs for `arch`."""
    from autotune import registry
    from autotune.compile_check import Job

    jobs = []
    for spec in registry.kernels_for(problem, "cuda"):
        if spec.backend != "triton":
            continue
        for config in dict.fromkeys([spec.default_config(problem), *spec.seed_configs(problem)]):
            knobs = spec.full_knobs(problem, config.as_dict())
            if spec.check(problem, knobs) is None:
                jobs.append(Job(arch=arch, op=spec.op, algorithm=spec.algorithm,
                                problem=problem_to_dict(problem), knobs=knobs, source="prewarm"))
    return jobs


def prewarm(problems, arch: int, workers: int) -> dict:
    """Compile every search's first configs in `workers` processes at once, before the searches
    (autotune.compile_check's workers, Triton's on-disk cache kept), so each search's own compiles
    of them are cache loads: a Triton compile (~1 s a config on the H100 machine's CPU) was most
    of a GPU search's time, one after another."""
    from autotune.compile_check import run_jobs

    jobs = [job for problem in problems for job in prewarm_jobs(problem, arch)]
    start = time.monotonic()
    rows = run_jobs(jobs, workers=workers, fresh=False)
    return {"configs": len(jobs), "compiled": sum(r.status == "compiled" for r in rows),
            "seconds": round(time.monotonic() - start, 1),
            "compile_s_sum": round(sum(r.seconds or 0.0 for r in rows), 1)}


def check_problem(problem, evaluate, *, trials: int, timeout_s: float) -> dict:
    from autotune.tuner import tune

    t0 = time.monotonic()
    result = tune(problem, device="cuda", trials=trials, timeout=timeout_s, evaluate=evaluate, seed=0)
    row = {"problem": problem_to_dict(problem), "describe": problem.describe(),
           "trials": sum(result.counts().values()), "statuses": result.counts(),
           "valid_configs": result.valid_configs, "trustworthy": result.trustworthy}
    own = result.best_own
    if own is not None:
        knobs = own.config.as_dict()
        tf32 = knobs.get("input_precision") == "tf32"
        torch_m = torch_time(problem, tf32)
        row.update(algorithm=own.algorithm, knobs=knobs, triton=own.measurement.as_dict(),
                   torch=torch_m.as_dict(), torch_tf32=tf32,
                   speedup=torch_m.median / own.measurement.median,
                   winner="triton" if own.measurement.median < torch_m.median else "torch")
    if result.vendor is not None:
        row["tuner_vendor"] = result.vendor.measurement.as_dict()
        row["tuner_vendor_knobs"] = result.vendor.config.as_dict()
    if own is not None or result.vendor is not None:
        # What a cached decision would run (autotune.decision): ours only when faster than the
        # best torch config the search measured (TF32 included) beyond the noise.
        from autotune.decision import decide

        chosen, why = decide(own, result.vendor)
        row["tuner_chose"] = chosen.config.describe()
        row["tuner_why"] = why
    row["seconds"] = round(time.monotonic() - t0, 1)
    return row


def fmt_row(row: dict) -> str:
    name = row["describe"].replace(" stride 1", "").replace(" dil 1", "").replace(" pad 0", "")
    if "triton" not in row:
        return f"{name:<58} {'-':>10} {'-':>10} {'-':>7}  {row.get('error', 'no valid Triton config')}"
    return (f"{name:<58} {row['triton']['median_ms']:>10.4f} {row['torch']['median_ms']:>10.4f} "
            f"{row['speedup']:>7.2f}  {row['winner']:<6} {row['algorithm']} "
            f"({row['trials']}/{row.get('valid_configs', '?')} cfgs{', tf32' if row['torch_tf32'] else ''}"
            f"{'' if row.get('trustworthy', True) else ', UNTRUSTED'}); tuner chose "
            f"{_short(row.get('tuner_chose', '-'))}")


def _short(config: str) -> str:
    """'vendor allow_tf32=True' -> 'torch tf32'; one of ours -> its algorithm."""
    if config.startswith("vendor"):
        return "torch tf32" if "allow_tf32=True" in config else "torch"
    return "ours " + config.split()[0]


def run(args) -> dict:
    from autotune.worker import IsolatedEvaluator

    problems = [p for p in shapes() if re.search(args.only, p.describe())]
    # TF32 allowed for matrix products as well as convolutions (torch allows it for convolutions
    # only by default; `torch.set_float32_matmul_precision("high")` does this): the float32 rows
    # then compare tensor-core kernels, ours and cuBLAS/cuDNN, under one policy
    # (autotune.precision: the searches follow these switches).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    started = time.monotonic()
    warmed = None
    if args.prewarm:
        major, minor = torch.cuda.get_device_capability()
        try:
            warmed = prewarm(problems, 10 * major + minor, args.prewarm)
            print(f"prewarm: {warmed['compiled']}/{warmed['configs']} default and seed configs compiled in "
                  f"{warmed['seconds']:g} s by {args.prewarm} processes ({warmed['compile_s_sum']:g} s of "
                  "compiling)", flush=True)
        except Exception as exc:  # noqa: BLE001 - the searches run without it
            warmed = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"prewarm failed, searching without it: {warmed['error']}", flush=True)
    rows = []
    print(f"{'problem':<58} {'triton ms':>10} {'torch ms':>10} {'speedup':>7}  winner algorithm", flush=True)
    with IsolatedEvaluator(device="cuda", timeout_s=args.candidate_timeout_s) as evaluate:
        for i, problem in enumerate(problems):
            left = args.budget_s - (time.monotonic() - started)
            if left < 5:
                rows.append({"problem": problem_to_dict(problem), "describe": problem.describe(),
                             "error": "skipped: time budget spent"})
                print(fmt_row(rows[-1]), flush=True)
                continue
            share = left / (len(problems) - i)
            try:
                row = check_problem(problem, evaluate, trials=args.trials, timeout_s=share * SEARCH_SHARE)
            except Exception as exc:  # noqa: BLE001 - one broken shape must not hide the others
                row = {"problem": problem_to_dict(problem), "describe": problem.describe(),
                       "error": f"{type(exc).__name__}: {exc}"[:300]}
            rows.append(row)
            print(fmt_row(row), flush=True)
    won = [r for r in rows if r.get("winner") == "triton"]
    print(f"Triton wins {len(won)} of {sum('winner' in r for r in rows)} shapes "
          f"(speedup = torch ms / Triton ms; > 1 means Triton is faster)")
    return {"rows": rows, "prewarm": warmed, "seconds": round(time.monotonic() - started, 1)}


def environment() -> dict:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   shared_memory_per_block_optin=getattr(props, "shared_memory_per_block_optin", None))
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=270.0, help="wall time for all tuning")
    parser.add_argument("--trials", type=int, default=40,
                        help="most configs per shape (the time share per shape usually stops it first)")
    parser.add_argument("--only", default="", metavar="REGEX",
                        help="check only the problems whose description matches (e.g. 'bwd_weight|gemm')")
    parser.add_argument("--prewarm", type=int, default=0, metavar="WORKERS",
                        help="compile every shape's default and seed configs in this many processes "
                        "before the searches (Triton's cache then serves the searches' compiles); 0: off")
    parser.add_argument("--candidate-timeout-s", type=float, default=60.0)
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json or results/)")
    args = parser.parse_args(argv)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "results"
    path = Path(args.out) if args.out else out_dir / "gpu_check.json"
    report = {"environment": environment()}
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; skipping the GPU tuning runs.")
        report["skipped"] = "no CUDA GPU"
    else:
        print(f"gpu_check on {report['environment']['gpu']}, torch {torch.__version__}", flush=True)
        report.update(run(args))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
