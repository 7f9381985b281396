"""Split a model's problems over 1, 2, 4 local worker processes sharing one PostgreSQL database.

Each run gets a new, empty database on the server and its workers their own cache folders (as on
separate machines); every worker runs the same `autotune search model ...` command. Printed per
worker count: wall time until the last worker exits, the speed-up over one worker, the CPU time
of all workers together (the work itself: constant when nothing is done twice), problems and
configs measured, and duplicated work (a config measured twice in one study, or a problem tuned
by two workers; both should be 0). Never asserted in tests: the machine is shared and noisy.

    eval "$(bash .ci/postgres.sh start /tmp/pg)"
    python benchmarks/many_workers.py --url "$AUTOTUNE_TEST_POSTGRES_URL" --workers 1,2,4 \\
        -- lenet --batch 16 --trials 4
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent


def _children_cpu() -> float:
    """CPU seconds of every finished child process (and their candidate processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def new_database(url: str) -> str:
    name = f"bench{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return url.rsplit("/", 1)[0] + "/" + name


def run(url: str, workers: int, model_args: list[str], threads: int) -> dict:
    storage = new_database(url)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "autotune", "search", "model", *model_args, "--threads", str(threads),
                "--json", "--storage", storage]
        cpu_before = _children_cpu()
        started = time.perf_counter()
        procs = [subprocess.Popen([*argv, "--cache-dir", str(Path(tmp) / f"w{i}")], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i in range(workers)]
        errors = [p.communicate()[1] for p in procs]
        wall = time.perf_counter() - started
        cpu = _children_cpu() - cpu_before
    failed = [e[-500:] for p, e in zip(procs, errors, strict=True) if p.returncode != 0]
    engine = sa.create_engine(storage)
    with engine.connect() as conn:
        trials, distinct = conn.execute(sa.text(
            "SELECT count(*), count(DISTINCT (t.study_id, a.value_json)) FROM trials t "
            "JOIN trial_user_attributes a ON a.trial_id = t.trial_id AND a.key = 'config'")).one()
        problems, tuners = conn.execute(sa.text(
            "SELECT count(*), count(DISTINCT worker) FROM autotune_claims WHERE key = '#problem'")).one()
    engine.dispose()
    return {"workers": workers, "wall_s": wall, "cpu_s": cpu, "problems": problems, "tuners": tuners, "configs": trials,
            "duplicated": trials - distinct, "failed": failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("AUTOTUNE_TEST_POSTGRES_URL"),
                        help="a PostgreSQL server URL whose user may CREATE DATABASE")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("model_args", nargs="*", default=["lenet", "--batch", "16", "--trials", "4"])
    args = parser.parse_args()
    if not args.url:
        parser.exit(2, "many_workers.py: give --url or set AUTOTUNE_TEST_POSTGRES_URL\n")
    print(f"autotune search model {' '.join(args.model_args)} --threads {args.threads}, "
          f"{os.cpu_count()} CPUs, PostgreSQL at {args.url.rsplit('@', 1)[-1]}")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| workers | wall s | speed-up | CPU s, all workers | problems | workers that tuned | configs measured "
          "| measured twice |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for n in (int(w) for w in args.workers.split(",")):
        r = run(args.url, n, args.model_args, args.threads)
        base = base or r["wall_s"]
        print(f"| {n} | {r['wall_s']:.1f} | {base / r['wall_s']:.2f}x | {r['cpu_s']:.0f} | {r['problems']} | {r['tuners']} | "
              f"{r['configs']} | {r['duplicated']} |" + (f" FAILED: {r['failed']}" if r["failed"] else ""),
              flush=True)


if __name__ == "__main__":
    main()
