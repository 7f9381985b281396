"""Cost-aware stopping (--stop auto) with a fake clock and a fake timer."""

from autotune.stopping import StopRule


def test_stalled_search_that_cannot_pay_stops():
    rule = StopRule(budget=100, calls=10)
    stops = [rule.update(1.0, seconds=0.5) for _ in range(100)]
    assert stops.index(True) == rule.window  # the first moment a whole window passed without gain
    assert "no 1% gain" in rule.reason


def test_a_stall_counts_only_after_the_samplers_start():
    rule = StopRule(budget=100, calls=10, start=20)  # defaults and random start: 20 configs
    stops = [rule.update(1.0, seconds=0.5) for _ in range(100)]
    assert stops.index(True) == 20 + rule.window


def test_stalled_search_that_pays_goes_on():
    rule = StopRule(budget=100, calls=10**9)  # a kernel run a billion times: every µs counts
    assert not any(rule.update(1.0, seconds=0.5) for _ in range(99))


def test_improving_search_goes_on():
    rule = StopRule(budget=100, calls=1)
    assert not any(rule.update(10.0 * 0.97**i, seconds=0.5) for i in range(99))


def test_tune_stops_early_and_says_why():
    from autotune.measure import Measurement, Outcome, Status
    from autotune.problem import GemmProblem
    from autotune.registry import KernelSpec
    from autotune.space import Param, Space
    from autotune.tuner import tune

    flat = KernelSpec(op="gemm", algorithm="flat", backend="numpy", run=lambda *a: None, defaults={"X": 0},
                      space=Space(params=(Param(name="X", values=tuple(range(40))),)))

    def timer(problem, spec, knobs):  # a flat landscape: nothing to gain after the first config
        return Outcome(status=Status.OK, measurement=Measurement(median=1.0, p20=1.0, p80=1.0, n=5))

    problem = GemmProblem(m=8, n=8, k=8)
    short = tune(problem, specs=[flat], evaluate=timer, trials=40, confirm_top=0, stop_calls=1)
    # hybrid: the default and a random start of 10 (a quarter of 40) come first; then a window of 8
    # configs of its own without gain, and the search stops at the next one.
    assert len(short.trials) == 1 + 10 + 8 + 1 and "stopped after 20 of 40" in short.stopped
    full = tune(problem, specs=[flat], evaluate=timer, trials=40, confirm_top=0, stop_calls=10**12)
    assert len(full.trials) == 40 and not full.stopped
