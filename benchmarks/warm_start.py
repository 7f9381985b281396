"""Warm start: how many configs a search needs to get within 5% of the best, cold vs warm.

For every problem of a LeNet training step at --batch (default 16), two real searches of
--trials configs each: cold (empty cache) and warm (a cache holding the same layers tuned at
--from-batch, default 64, whose winners the search measures right after the defaults). For each,
the number of configs measured until one of our kernels came within 5% of the better of the two
runs' best own kernel (trials + 1 when it never did). Timings are real and this machine may be
noisy: read the totals, not single rows.

    .venv/bin/python benchmarks/warm_start.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import autotune
from autotune.cache import Cache
from autotune.tuner import tune


def configs_to_within(records, reference_ms: float, tolerance: float = 1.05) -> int | None:
    for i, rec in enumerate(records, start=1):
        if rec.config.algorithm != "vendor" and rec.median_ms is not None and rec.median_ms <= reference_ms * tolerance:
            return i
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--from-batch", type=int, default=64)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    with autotune.measure.pinned_threads(args.threads) as threads, tempfile.TemporaryDirectory() as tmp:
        warm_cache = Cache(tmp)
        for problem in autotune.lenet_problems(args.from_batch):
            autotune.search(problem, cache=warm_cache, trials=args.trials, warm_start=False)
        print(f"LeNet batch {args.batch} given batch {args.from_batch} cached; {args.trials} configs per "
              f"search; {threads} torch thread(s)")
        print(f"{'problem':<70} {'cold':>5} {'warm':>5}")
        cold_n, warm_n = [], []
        for problem in autotune.lenet_problems(args.batch):
            warm_configs = _warm(warm_cache, problem)
            cold = tune(problem, trials=args.trials, confirm_top=0, seed=0)
            warm = tune(problem, trials=args.trials, confirm_top=0, seed=0, warm_start=warm_configs)
            bests = [r.median_ms for res in (cold, warm) for r in res.trials
                     if r.config.algorithm != "vendor" and r.median_ms is not None]
            if not bests:
                continue
            ref = min(bests)
            c = configs_to_within(cold.trials, ref) or args.trials + 1
            w = configs_to_within(warm.trials, ref) or args.trials + 1
            cold_n.append(c)
            warm_n.append(w)
            print(f"{problem.describe():<70} {c:>5} {w:>5}")
        print(f"total configs to within 5%: cold {sum(cold_n)}, warm {sum(warm_n)} "
              f"(median per problem {statistics.median(cold_n)} vs {statistics.median(warm_n)}; "
              f"saving {1 - sum(warm_n) / sum(cold_n):.0%})")


def _warm(cache: Cache, problem):
    from autotune.decision import warm_configs

    return warm_configs(cache.neighbours(problem, "cpu"))


if __name__ == "__main__":
    main()
