"""Cost-aware stopping (`--stop auto`): stop a search when more searching cannot pay for itself.

A search costs wall time now; a faster kernel saves time on every later call. After each
measured config the rule asks two things:
  1. Has the best own time stalled? No improvement of at least MIN_GAIN (1%) over the last
     `window` configs (at least 8, or a tenth of the budget).
  2. Would the rest of the budget pay? While stalled, assume (optimistically) that each further
     window may still gain MIN_GAIN of the best time: the remaining expected saving per call is
     best_ms * MIN_GAIN * remaining / window, times the expected number of calls (`--calls`). The
     remaining cost is the remaining configs times the mean wall time a config has taken.
Stop when stalled and the expected saving is less than the remaining cost. A stall is only
counted over configs the sampler chose itself: the defaults and a random start (`start`) say
little about what the model would still find (on the replay suite, a rule that counted them
stopped a ResNet conv search inside its random start, 64% off the optimum).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_GAIN = 0.01
MIN_WINDOW = 8
DEFAULT_CALLS = 10_000  # e.g. 3 epochs of MNIST at batch 16: a layer's calls in a short training


@dataclass
class StopRule:
    budget: int
    calls: int = DEFAULT_CALLS
    start: int = 0  # configs measured before the sampler's own search (defaults, random start)
    history: list[float] = field(default_factory=list)  # best own time (ms) after each config
    seconds: list[float] = field(default_factory=list)  # wall seconds each config took
    reason: str = ""

    @property
    def window(self) -> int:
        return max(MIN_WINDOW, self.budget // 10)

    def update(self, best_ms: float | None, seconds: float) -> bool:
        """Record one measured config; True when the search should stop now (see the module)."""
        self.history.append(best_ms if best_ms is not None else float("inf"))
        self.seconds.append(seconds)
        done, window = len(self.history), self.window
        remaining = self.budget - done
        if remaining <= 0 or done <= self.start + window:
            return False  # the window must lie past the start
        before, now = self.history[-window - 1], self.history[-1]
        if now == float("inf") or now < before * (1 - MIN_GAIN):
            return False  # still improving (or nothing of ours works yet)
        expected_saving_s = now * MIN_GAIN * remaining / window * self.calls / 1e3
        remaining_cost_s = remaining * sum(self.seconds) / done
        if expected_saving_s >= remaining_cost_s:
            return False
        self.reason = (f"stopped after {done} of {self.budget} configs: no 1% gain in the last {window}, and "
                       f"at most {expected_saving_s:.2f} s to save over {self.calls} calls vs "
                       f"{remaining_cost_s:.1f} s more searching")
        return True


@dataclass
class CompileBudget:
    """A cap on the seconds a search spends compiling (`--compile-budget`).

    On a GPU a Triton candidate's first call JIT-compiles it: ~1 s typically, up to 45 s for a
    pathological config (autotune compile-check), against milliseconds of timing. Once the
    compiled candidates' first calls add up to `seconds`, the search proposes no new config of a
    compiled backend; configs already measured stay, and other backends (torch's op, NumPy) go on.
    """

    seconds: float
    spent: float = 0.0
    configs: int = 0  # compiled candidates charged so far
    reason: str = ""

    def charge(self, seconds: float) -> bool:
        """Add one compiled candidate's first-call seconds; True the first time the budget is spent."""
        self.spent += max(0.0, seconds)
        self.configs += 1
        if self.reason or self.spent < self.seconds:
            return False
        self.reason = (f"stopped: compile budget {self.seconds:g} s spent after {self.configs} "
                       f"Triton configs ({self.spent:.1f} s in their first calls)")
        return True
