"""The noise guard: re-time the finalists of a search before anything is decided or cached.

Finalists are re-timed in interleaved rounds, so a slow spell of a shared machine hits them
alike and no winner is a lucky sample. The re-timing of every finalist must agree (measure.agree)
with the search's own timing of that config; when one does not, the finalists are re-timed once
more. If a re-timing still disagrees, the machine was too busy to tell which timing is true (two
slow re-timings agreeing with each other prove nothing: a stall can last), and the result is
untrustworthy: reported with the reason, never cached.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from autotune import measure
from autotune.measure import Measurement, Outcome, Status
from autotune.problem import Problem
from autotune.progress import bar as progress_bar
from autotune.space import Config

CONFIRM_ROUNDS = 3  # interleaved re-timing rounds of the finalists
RETIME_ATTEMPTS = 1  # extra re-timings when the first disagrees with the search

Evaluate = Callable[[Problem, object, dict], Outcome]


@dataclass(frozen=True, kw_only=True)
class Candidate:
    config: Config
    measurement: Measurement

    @property
    def algorithm(self) -> str:
        return self.config.algorithm


def confirm(finalists: Sequence[Candidate], problem: Problem, by_name: dict, evaluate: Evaluate, *,
            progress: bool = True) -> tuple[list[Candidate], str]:
    """(re-timed finalists, "" or why the timings cannot be trusted). `finalists` carry the
    search's own timing of each config; by_name maps algorithm -> KernelSpec. progress=False:
    no bar (otherwise one appears when the re-timing lasts over a second, see autotune.progress)."""
    searched = {c.config.key(): c.measurement for c in finalists}
    earlier = [searched]
    confirmed: list[Candidate] = []
    disagreeing: list[Candidate] = []
    runs = CONFIRM_ROUNDS * len(finalists)
    # The bar's total is the first re-timing; a second one, when needed, extends it.
    with progress_bar(desc=f"re-timing {problem.op} finalists", unit="run", total=runs,
                      enabled=None if progress else False, delay=1.0) as bar:
        for attempt in range(1 + RETIME_ATTEMPTS):
            if attempt:
                bar.total += runs
            confirmed = _retime(finalists, problem, by_name, evaluate, bar)
            disagreeing = [c for c in confirmed if not measure.agree(c.measurement, searched[c.config.key()])]
            if not disagreeing:
                return confirmed, ""
            earlier.append({c.config.key(): c.measurement for c in confirmed})
    worst = disagreeing[0]
    times = " then ".join(f"{past[worst.config.key()].median:.4g}" for past in earlier
                          if worst.config.key() in past)
    return confirmed, (f"{worst.algorithm} timed {times} ms on repeated runs: this machine is too busy "
                       "to tell (close other work, or try --threads 1)")


def _retime(finalists: Sequence[Candidate], problem: Problem, by_name: dict, evaluate: Evaluate, bar,
            ) -> list[Candidate]:
    samples: dict[str, list[Measurement]] = {c.config.key(): [] for c in finalists}
    for _ in range(CONFIRM_ROUNDS):
        for cand in finalists:
            outcome = evaluate(problem, by_name[cand.algorithm], cand.config.as_dict())
            bar.update(1)
            if outcome.status is Status.OK:
                samples[cand.config.key()].append(outcome.measurement)
    confirmed = []
    for cand in finalists:
        ms = samples[cand.config.key()]
        if len(ms) == CONFIRM_ROUNDS:  # a candidate that fails once is not trusted
            confirmed.append(Candidate(config=cand.config, measurement=Measurement(
                median=statistics.median(m.median for m in ms), p20=statistics.median(m.p20 for m in ms),
                p80=statistics.median(m.p80 for m in ms), n=sum(m.n for m in ms))))
    return confirmed
