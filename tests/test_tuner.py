"""The search logic with a fake timer (deterministic), and one real study on real kernels."""

import contextlib
import dataclasses

import pytest

from autotune.confirm import CONFIRM_ROUNDS
from autotune.decision import decide
from autotune.errors import UnknownNameError
from autotune.measure import Measurement, Outcome, Status
from autotune.problem import Conv2dProblem, GemmProblem
from autotune.registry import KernelSpec
from autotune.space import Param, Space
from autotune.tuner import tune

PROBLEM = GemmProblem(m=8, n=8, k=8)


def _spec(algorithm, space, defaults, check=lambda problem, knobs: None):
    return KernelSpec(op="gemm", algorithm=algorithm, backend="numpy", run=lambda *a: None,
                      defaults=defaults, space=space, check=check)


def _no_64(problem, knobs):
    return "too big" if knobs.get("BLOCK") == 64 else None


TILED = _spec("tiled", Space(params=(Param(name="BLOCK", values=(8, 16, 32, 64)),
                                     Param(name="order", values=("ab", "ba")))), {"BLOCK": 16, "order": "ab"},
              check=_no_64)
PLAIN = _spec("plain", Space(), {})


class FakeTimer:
    """Times from a formula; BLOCK=64 is 'invalid', order 'ba' with BLOCK 8 is a wrong answer."""

    def __init__(self):
        self.calls = []

    @property
    def measured(self):
        """Calls that ran a kernel (invalid configs are rejected first and cost nothing)."""
        return [c for c in self.calls if ("BLOCK", 64) not in c[1]]

    def __call__(self, problem, spec, knobs):
        knobs = spec.full_knobs(problem, knobs)
        self.calls.append((spec.algorithm, tuple(sorted(knobs.items()))))
        if spec.algorithm == "plain":
            return _ok(5.0)
        if knobs["BLOCK"] == 64:
            return Outcome(status=Status.INVALID, message="too big")
        if knobs["BLOCK"] == 8 and knobs["order"] == "ba":
            return Outcome(status=Status.WRONG_ANSWER, error=1.0)
        return _ok(abs(knobs["BLOCK"] - 32) / 8 + (0.5 if knobs["order"] == "ab" else 0.1) + 1)


def _ok(t):
    return Outcome(status=Status.OK, measurement=Measurement(median=t, p20=t, p80=t, n=1))


def test_grid_is_exhaustive_and_finds_the_best():
    timer = FakeTimer()
    result = tune(PROBLEM, specs=[TILED, PLAIN], evaluate=timer, sampler="grid", trials=100, confirm_top=0)
    # 6 tiled configs the constraints admit + plain, each once; BLOCK=64 is never run.
    assert len(timer.calls) == len(set(timer.calls)) == 7 == result.valid_configs
    assert result.best.config.as_dict() == {"BLOCK": 32, "order": "ba"}
    assert result.best.measurement.median == pytest.approx(1.1)
    assert result.counts() == {"ok": 6, "wrong_answer": 1}
    assert result.vendor is None and result.best_own == result.best


def test_defaults_first_and_failures_are_results():
    timer = FakeTimer()
    result = tune(PROBLEM, specs=[TILED, PLAIN], evaluate=timer, sampler="tpe", trials=6, seed=1, confirm_top=0)
    assert timer.calls[0] == ("tiled", (("BLOCK", 16), ("order", "ab")))
    assert timer.calls[1] == ("plain", ())
    assert len(timer.measured) == len(set(timer.measured)) == 6
    statuses = {t.status for t in result.trials}
    assert Status.OK in statuses
    assert all(t.median_ms is None for t in result.trials if t.status is not Status.OK)


@pytest.mark.parametrize("sampler", ["random", "cmaes"])
def test_other_samplers_respect_the_budget(sampler):
    timer = FakeTimer()
    result = tune(PROBLEM, specs=[TILED, PLAIN], evaluate=timer, sampler=sampler, trials=5, seed=3, confirm_top=0)
    assert len(timer.calls) == len(set(timer.calls)) == 5 and result.best is not None


def test_resume_from_storage(tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    first, second = FakeTimer(), FakeTimer()
    tune(PROBLEM, specs=[TILED, PLAIN], evaluate=first, trials=4, storage=storage, study_name="s", confirm_top=0)
    result = tune(PROBLEM, specs=[TILED, PLAIN], evaluate=second, trials=7, storage=storage, study_name="s",
                  confirm_top=0)
    assert len(first.measured) == 4 and len(second.measured) == 3  # resumed: only 3 new configs ran
    assert not set(first.calls) & set(second.calls)
    measured = {t.config.key() for t in result.trials if t.status is not Status.INVALID}
    assert len(measured) == 7
    fresh = FakeTimer()
    tune(PROBLEM, specs=[TILED, PLAIN], evaluate=fresh, trials=2, storage=storage, study_name="s",
         fresh=True, confirm_top=0)
    assert len(fresh.measured) == 2


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid"])
def test_exact_budget_no_repeats_no_invalid_runs(sampler):
    """--trials N is N distinct measured configs; rejected and repeated proposals cost nothing."""
    timer = FakeTimer()
    with pytest.warns(UserWarning, match="7 valid configs") if sampler == "grid" else contextlib.nullcontext():
        result = tune(PROBLEM, specs=[TILED, PLAIN], evaluate=timer, sampler=sampler, trials=6, seed=2,
                      confirm_top=0)
    assert len(timer.calls) == len(set(timer.calls)) == 6
    assert not any(("BLOCK", 64) in knobs for _, knobs in timer.calls)
    assert sum(result.counts().values()) == 6 == len(result.trials)


def test_budget_larger_than_the_valid_space_measures_it_all():
    timer = FakeTimer()
    result = tune(PROBLEM, specs=[TILED, PLAIN], evaluate=timer, sampler="tpe", trials=50, confirm_top=0)
    assert len(timer.calls) == len(set(timer.calls)) == 7 == result.valid_configs


def test_real_study_has_one_trial_per_measured_config_with_real_knob_values(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    tune(PROBLEM, specs=[TILED, PLAIN], evaluate=FakeTimer(), trials=5, storage=storage, study_name="s")
    study = optuna.load_study(study_name="s", storage=storage)
    assert len(study.trials) == 5
    tiled = [t for t in study.trials if t.user_attrs["algorithm"] == "tiled"]
    assert tiled and all(t.params["tiled.BLOCK"] in (8, 16, 32) for t in tiled)  # values, not indices
    confirmed = study.user_attrs["confirmed"]
    assert confirmed and {"algorithm", "knobs", "median_ms"} <= set(confirmed[0])


def test_confirmation_retimes_finalists():
    timer = FakeTimer()
    tune(PROBLEM, specs=[TILED, PLAIN], evaluate=timer, sampler="grid", trials=100, confirm_top=2)
    assert len(timer.calls) == 7 + 2 * CONFIRM_ROUNDS  # the two best own configs, in rounds


VENDOR_SPEC = _spec("vendor", Space(), {})


@pytest.mark.parametrize("ours_ms, spread, winner", [
    (0.90, 0.02, "tiled"),  # 10% faster, 2% noise: ours
    (0.97, 0.05, "vendor"),  # 3% faster, 5% noise: a tie, which goes to torch
    (1.20, 0.01, "vendor"),
    (0.99, 0.001, "vendor"),  # faster beyond noise, but 10 µs saved is less than a layer's overhead
])
def test_our_kernel_must_beat_the_vendor_beyond_noise(ours_ms, spread, winner):
    def timer(problem, spec, knobs):
        t = 1.0 if spec.algorithm == "vendor" else ours_ms
        return Outcome(status=Status.OK, measurement=Measurement(median=t, p20=t * (1 - spread),
                                                                 p80=t * (1 + spread), n=5))

    result = tune(PROBLEM, specs=[TILED, VENDOR_SPEC], evaluate=timer, sampler="random", trials=3)
    assert result.best_own.algorithm == "tiled" and result.vendor.algorithm == "vendor"
    chosen, why = decide(result.best_own, result.vendor)
    assert chosen.algorithm == winner and why


def test_vendor_is_measured_first_even_on_a_tiny_budget():
    calls = []

    def timer(problem, spec, knobs):
        calls.append(spec.algorithm)
        return _ok(1.0)

    result = tune(PROBLEM, specs=[TILED, PLAIN, VENDOR_SPEC], evaluate=timer, trials=1, confirm_top=0)
    assert calls == ["vendor"] and result.vendor is not None


def test_unknown_sampler():
    with pytest.raises(UnknownNameError, match="sampler"):
        tune(PROBLEM, specs=[PLAIN], evaluate=FakeTimer(), sampler="annealing")


def test_real_study_on_real_kernels():
    """A real Optuna search over the registered CPU kernels of a small conv: every measured
    candidate was verified, the winner is OK, and torch's op was measured in the same run."""
    problem = Conv2dProblem(n=2, c=3, h=10, w=10, k=4, r=3, s=3, padding=1)
    result = tune(problem, device="cpu", trials=6, seed=0)
    assert result.best is not None and result.vendor is not None
    assert result.best.measurement.median > 0
    assert result.counts().get("ok", 0) >= 2
    assert all(t.median_ms is None or t.median_ms > 0 for t in result.trials)


def test_warm_start_configs_come_right_after_the_defaults():
    from autotune.space import Config

    timer = FakeTimer()
    warm = [Config.make("tiled", {"BLOCK": 32, "order": "ba"}), Config.make("tiled", {"BLOCK": 64, "order": "ab"})]
    tune(PROBLEM, specs=[TILED, PLAIN], evaluate=timer, trials=4, seed=0, confirm_top=0, warm_start=warm)
    # defaults (tiled's, plain), then the admissible warm config; BLOCK=64 is rejected by check.
    assert timer.calls[:3] == [("tiled", (("BLOCK", 16), ("order", "ab"))), ("plain", ()),
                               ("tiled", (("BLOCK", 32), ("order", "ba")))]
    assert len(timer.calls) == 4


def test_seed_configs_follow_the_warm_start_and_take_at_most_half_the_budget():
    seeded = dataclasses.replace(TILED, seeds=lambda problem: [{"BLOCK": 8}, {"BLOCK": 64}, {"order": "ba"},
                                                             {"BLOCK": 32, "order": "ba"}])
    timer = FakeTimer()
    tune(PROBLEM, specs=[seeded, PLAIN], evaluate=timer, trials=6, seed=0, confirm_top=0)
    # defaults, then the admissible seeds (BLOCK=64 is rejected by check) up to 6 // 2 of them.
    assert timer.calls[:5] == [("tiled", (("BLOCK", 16), ("order", "ab"))), ("plain", ()),
                               ("tiled", (("BLOCK", 8), ("order", "ab"))),
                               ("tiled", (("BLOCK", 16), ("order", "ba"))),
                               ("tiled", (("BLOCK", 32), ("order", "ba")))]
    timer = FakeTimer()
    tune(PROBLEM, specs=[seeded, PLAIN], evaluate=timer, trials=4, seed=0, confirm_top=0)
    assert timer.calls[2:4] == [("tiled", (("BLOCK", 8), ("order", "ab"))),
                                ("tiled", (("BLOCK", 16), ("order", "ba")))]


def test_a_deadline_shortens_the_candidate_timeout_only_during_the_search():
    """--timeout bounds the candidate in flight; the evaluator's own timeout is restored after
    (the re-timing of finalists and later searches sharing the evaluator need it whole)."""
    class Evaluator(FakeTimer):
        timeout_s = 60.0

        def __call__(self, problem, spec, knobs):
            self.seen_timeouts = [*getattr(self, "seen_timeouts", []), self.timeout_s]
            return super().__call__(problem, spec, knobs)

    evaluator = Evaluator()
    tune(PROBLEM, specs=[TILED, PLAIN], evaluate=evaluator, trials=3, timeout=30, confirm_top=1)
    assert all(t <= 30 for t in evaluator.seen_timeouts[:3])
    assert evaluator.seen_timeouts[3:] and all(t == 60.0 for t in evaluator.seen_timeouts[3:])
    assert evaluator.timeout_s == 60.0


WIDE = _spec("wide", Space(params=(Param(name="BLOCK", values=(8, 16, 32)), Param(name="order", values=("ab", "ba")),
                                   Param(name="unroll", values=(1, 2, 4, 8)))),
             {"BLOCK": 16, "order": "ab", "unroll": 1})


class Compiling(FakeTimer):
    """A Triton-like kernel whose first call (the JIT compile) takes 10 s, beside a NumPy one."""

    def __call__(self, problem, spec, knobs):
        if spec.algorithm == "wide":
            self.calls.append((spec.algorithm, tuple(sorted(spec.full_knobs(problem, knobs).items()))))
            outcome = _ok(1.0 + knobs.get("unroll", 1) / 10)
        else:
            outcome = super().__call__(problem, spec, knobs)
        return dataclasses.replace(outcome, first_call_s=10.0 if spec.backend == "triton" else 0.001)


@pytest.mark.parametrize("sampler", ["random", "tpe", "grid"])
def test_a_compile_budget_stops_proposing_triton_configs(sampler):
    """Once the Triton candidates' first calls add up to the budget, no new Triton config is
    proposed; the other backend's configs are still measured, and the result says why."""
    triton_spec = dataclasses.replace(WIDE, backend="triton")
    timer = Compiling()
    result = tune(PROBLEM, specs=[triton_spec, TILED], evaluate=timer, trials=30, sampler=sampler,
                  compile_budget=25, confirm_top=0)
    assert sum(c[0] == "wide" for c in timer.calls) == 3  # 10 + 10 + 10 s >= 25 s
    assert {c for c in timer.calls if c[0] == "tiled"} == {  # all six valid NumPy configs
        ("tiled", (("BLOCK", b), ("order", o))) for b in (8, 16, 32) for o in ("ab", "ba")}
    assert result.stopped == "stopped: compile budget 25 s spent after 3 Triton configs (30.0 s in their first calls)"
    assert sum(result.counts().values()) == 9


def test_without_a_compile_budget_compiled_kernels_use_the_whole_budget():
    timer = Compiling()
    result = tune(PROBLEM, specs=[dataclasses.replace(WIDE, backend="triton"), TILED], evaluate=timer,
                  trials=30, sampler="random", confirm_top=0)
    assert sum(c[0] == "wide" for c in timer.calls) == 24 and result.stopped == ""


def test_random_turns_favour_algorithms_whose_best_is_near_the_best():
    """hybrid's random start picks the algorithm first: weighted by how close its best time is to
    the best so far, so an algorithm whose default took 3x the best gets almost no turns (uniform
    turns would give it half of them)."""
    space = Space(params=(Param(name="BLOCK", values=(1, 2, 3, 4, 5, 6, 7, 8)),))
    fast, slow = _spec("fast", space, {"BLOCK": 1}), _spec("slow", space, {"BLOCK": 1})

    def timer(problem, spec, knobs):
        knobs = spec.full_knobs(problem, knobs)
        calls.append(spec.algorithm)
        return _ok((3.0 if spec.algorithm == "slow" else 1.0) + knobs["BLOCK"] / 100)

    for seed in range(3):
        calls = []
        tune(PROBLEM, specs=[fast, slow], evaluate=timer, sampler="hybrid", trials=12, seed=seed, confirm_top=0)
        # two defaults, then the random start (a quarter of the budget: 3 turns)
        assert sorted(calls[:2]) == ["fast", "slow"] and calls[2:5] == ["fast"] * 3, calls
