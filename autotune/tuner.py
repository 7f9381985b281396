"""Search a problem's kernels and knobs with Optuna. The only module that imports optuna.

The space is conditional and define-by-run: the algorithm is chosen first, then that algorithm's
knobs. Each algorithm's default config is enqueued first, so the search starts from known-good
points. Knobs whose values are all ascending numbers (tile sizes) are suggested as an index so
samplers see their order; other knobs are categorical. A failed candidate is a trial result (a
pruned trial with its status in user attrs), never an exception. `--trials N` counts distinct
configs measured: a config the sampler proposes twice is answered from memory, and a config the
kernel's constraints reject costs nothing and does not count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import optuna

from autotune import claims, measure, registry
from autotune.confirm import Candidate, Evaluate, confirm
from autotune.env_seconds import seconds_from_env
from autotune.errors import AutotuneError, UnknownNameError
from autotune.measure import Measurement, Outcome, Status
from autotune.problem import Problem
from autotune.progress import bar as progress_bar
from autotune.space import Config, Param
from autotune.stopping import CompileBudget, StopRule

SAMPLERS = ("tpe", "hybrid", "hybrid-local", "random", "grid", "cmaes")
HYBRID_STARTUP = 16  # configs measured at random before the model proposes...
HYBRID_STARTUP_FRACTION = 0.01  # ... or this share of the valid space, whichever is more...
# ... but at most this share of the budget: a short search (the `tune` policy's 12 configs, 2% of
# a space) must leave the model turns, or it is random search (README, "Choosing the default").
HYBRID_STARTUP_SHARE = 0.25
HYBRID_EVERY = 3  # after that, one proposal in HYBRID_EVERY stays random
HYBRID_LOCAL_SHORT = 8  # budgets of at most this many configs past the defaults only hill-climb
# The last HYBRID_POLISH of a budget of at least HYBRID_POLISH_FROM configs polishes the best
# configs: one-knob changes, the one whose new value went with the fastest times first (README,
# "Choosing the default sampler": it took the replay's ResNet conv from a worst seed 3.3% off the
# optimum to the optimum, and an 8192x8192x128 GEMM from a median 1.0% off to 0.8%).
HYBRID_POLISH = 0.2
HYBRID_POLISH_FROM = 32
ALGORITHM_FOCUS = 8  # random turns favour algorithms whose best is near the best (_Proposer._promise)
VENDOR = "vendor"
CANDIDATE_TIMEOUT_S = 60.0  # a GPU candidate that takes longer is recorded as a timeout
CANDIDATE_TIMEOUT_ENV = "AUTOTUNE_CANDIDATE_TIMEOUT_S"  # overrides it (seconds; tests use a few)
COMPILED_BACKENDS = ("triton",)  # whose first call JIT-compiles: what --compile-budget counts
# An Optuna sampler made from the seed (SamplerPlan.model).
SamplerFactory = Callable[[int | None], optuna.samplers.BaseSampler]


@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    number: int
    config: Config
    status: Status
    measurement: Measurement | None = None
    message: str = ""

    @property
    def median_ms(self) -> float | None:
        return self.measurement.median if self.measurement else None


@dataclass(frozen=True, kw_only=True)
class TuneResult:
    """What a search measured. Which one a layer should run is decided by autotune.search."""

    problem: Problem
    best_own: Candidate | None  # the best of our own kernels
    vendor: Candidate | None  # torch's op, measured in the same run
    trials: tuple[TrialRecord, ...] = field(default=())
    study_name: str = ""
    # The noise guard: False when the finalists' re-timing kept disagreeing with the search.
    trustworthy: bool = True
    distrust: str = ""  # why not, in words
    valid_configs: int = 0  # size of the space the kernels' constraints admit for this problem
    rejected: int = 0  # sampler proposals the constraints rejected (free: never measured)
    stopped: str = ""  # why --stop auto or the compile budget ended (part of) the search early

    @property
    def best(self) -> Candidate | None:
        """The fastest confirmed candidate, torch's op included (by time alone)."""
        found = [c for c in (self.best_own, self.vendor) if c is not None]
        return min(found, key=lambda c: c.measurement.median) if found else None

    def counts(self) -> dict[str, int]:
        """Distinct configs measured, by status (a config is never measured twice)."""
        first = {}
        for t in self.trials:
            first.setdefault(t.config.key(), t.status)
        counted = Counter(status.value for status in first.values())
        return {s.value: counted.get(s.value, 0) for s in Status if counted.get(s.value)}


@dataclass(frozen=True, kw_only=True)
class SamplerPlan:
    """How the next config is chosen: `model` (an Optuna sampler made from the seed) proposes,
    except for the first max(random_first, random_fraction * valid configs) proposals (at most
    random_share of the budget) and every `random_every`-th one after (0: never), which are drawn
    at random from the valid configs not measured yet (uniformly, or algorithm first when
    by_algorithm). model None: random search."""

    model: SamplerFactory | None = None
    random_first: int = 0
    random_fraction: float = 0.0
    random_every: int = 0
    random_share: float = 1.0  # the random start takes at most this share of the budget
    # Random turns pick the algorithm first (uniformly among those with configs left), then one
    # of its configs, as a sampler over the conditional space does: an algorithm with 5 configs
    # is tried as often as one with 42 (uniform over configs would rarely try it at all), weighted
    # by how close its best time is to the best (_Proposer._promise).
    by_algorithm: bool = False
    # After the random start, proposal j (j = 1, 2, ...) that is not a random turn is a local turn
    # when j % local_every == 1: the nearest unmeasured config to the best one of an algorithm
    # (picked by promise, as random turns pick it). 0: never. A hill-climbing step: a kernel's
    # optimum is often one knob step from a good config (LeNet's tensordot batch_chunk 4 next to
    # its default 16), which a model with a handful of points rarely proposes.
    local_every: int = 0
    # A search whose budget leaves at most this many proposals after the defaults hill-climbs
    # from the start: every proposal is a local turn. A random start of a few configs teaches a
    # model nothing, while the defaults are the best-informed configs there are, and a good
    # config is often one knob step from one (LeNet's conv table: at 11 configs of 75 every plan
    # with a random start left some seed 4.7% off; README, "Choosing the default sampler").
    local_when_short: int = 0
    # The last ceil(local_tail * budget) proposals are local turns: the search ends by polishing
    # its best configs, where the model or a random turn would explore regions it cannot finish.
    local_tail: float = 0.0
    # ... for budgets of at least this many configs: a shorter search is still finding a region,
    # and a polish of its few configs spends turns the model or a random draw would use better.
    local_tail_from: int = 0
    # How a local turn measures "near": "scaled" counts an ordered knob's index steps scaled to
    # its range (a step of a 5-value knob is 1/4) and any categorical change as 1, so it tries
    # every small numeric step before flipping a categorical knob; "steps" counts one per index
    # step and one per categorical change, so every one-knob neighbour is equally near.
    local_metric: str = "scaled"
    # Which of the equally near configs a local turn takes: "random", or "effects": the one whose
    # changed knob values went with the fastest times so far (each value's mean log time over the
    # algorithm's measured configs, a main-effects estimate; a value not measured yet counts as
    # the mean), so a polish tries the promising one-knob changes first.
    local_rank: str = "random"

    def short(self, budget: int | None, defaults: int) -> bool:
        """Whether a search of `budget` configs, `defaults` of them defaults, only hill-climbs."""
        return (self.model is not None and budget is not None
                and budget - defaults <= self.local_when_short)

    def random_turns(self, valid: int, budget: int | None = None) -> int:
        turns = max(self.random_first, round(self.random_fraction * valid))
        if budget is None or self.random_share >= 1:
            return turns
        return min(turns, math.ceil(self.random_share * budget))

    def tail(self, budget: int | None) -> int:
        """How many proposals at the end of a `budget`-config search are local turns."""
        if budget is None or self.model is None or budget < self.local_tail_from:
            return 0
        return math.ceil(self.local_tail * budget)

    @property
    def depends_on_budget(self) -> bool:
        """Whether a run with a smaller budget differs from the start of a longer one."""
        return self.model is not None and (self.random_share < 1 or self.local_tail > 0)


def _tpe(seed: int | None, startup: int = 8) -> optuna.samplers.BaseSampler:
    # multivariate + group model the knobs of one algorithm jointly, and keep algorithms'
    # conditional sub-spaces apart.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=startup)


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler behind `name` (for hybrid: its model, TPE)."""
    if name == "tpe":
        return _tpe(seed)
    if name in ("hybrid", "hybrid-local"):
        return _tpe(seed, startup=0)  # the plan's random start stands in for TPE's own
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        # Exhaustive over the conditional space; stops the study when every config was tried.
        return optuna.samplers.BruteForceSampler(seed=seed)
    if name == "cmaes":
        # CMA-ES (the `cmaes` package) models the ordered (index) knobs; categorical knobs and the
        # algorithm choice fall back to random sampling.
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False,
                                            independent_sampler=optuna.samplers.RandomSampler(seed=seed))
    raise UnknownNameError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def sampler_plan(name: str) -> SamplerPlan:
    """The plan a sampler name stands for (the README's "Choosing the default sampler" has the
    replay evidence behind each one and behind the default)."""
    if name not in SAMPLERS:
        raise UnknownNameError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if name == "random":
        return SamplerPlan()
    if name == "hybrid":
        # Random search first, then TPE; one proposal in HYBRID_EVERY stays random, so a model
        # that settled on one plateau keeps sampling the rest of the space.
        return SamplerPlan(model=functools.partial(make_sampler, "hybrid"), random_first=HYBRID_STARTUP,
                           random_fraction=HYBRID_STARTUP_FRACTION, random_share=HYBRID_STARTUP_SHARE,
                           random_every=HYBRID_EVERY, by_algorithm=True, local_when_short=HYBRID_LOCAL_SHORT,
                           local_tail=HYBRID_POLISH, local_tail_from=HYBRID_POLISH_FROM, local_metric="steps",
                           local_rank="effects")
    if name == "hybrid-local":
        # hybrid whose model turns are hill-climbing steps (local_every=1): the better plan for
        # small budgets and spaces whose optimum sits one knob from a good config, the worse one
        # for spaces of many far-apart good configs (README, "Choosing the default sampler").
        return dataclasses.replace(sampler_plan("hybrid"), local_every=1)
    return SamplerPlan(model=functools.partial(make_sampler, name))


def _is_ordinal(param: Param) -> bool:
    values = param.values
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return numeric and len(values) > 1 and list(values) == sorted(values)


def _suggest(trial: optuna.Trial, name: str, param: Param):
    if _is_ordinal(param):
        return param.values[trial.suggest_int(name, 0, len(param.values) - 1)]
    return trial.suggest_categorical(name, list(param.values))


def _encode(algorithm: str, knobs: dict, spec) -> dict:
    """A config as Optuna params (for enqueueing defaults)."""
    params: dict = {"algorithm": algorithm}
    for param in spec.space:
        value = knobs.get(param.name)
        if value not in param.values:
            continue  # a default outside an edited space: let the sampler pick
        name = f"{algorithm}.{param.name}"
        params[name] = param.values.index(value) if _is_ordinal(param) else value
    return params


def tune(
    problem: Problem,
    *,
    device: str = "cpu",
    trials: int = 40,
    timeout: float | None = None,
    sampler: str | SamplerPlan = "hybrid",
    storage: str | None = None,
    study_name: str | None = None,
    seed: int | None = 0,
    evaluate: Evaluate | None = None,
    specs: Sequence | None = None,
    progress=False,
    fresh: bool = False,
    confirm_top: int = 3,
    warm_start: Sequence[Config] = (),
    stop_calls: int | None = None,
    in_process: bool = False,
    compile_budget: float | None = None,
) -> TuneResult:
    """Find the fastest correct (algorithm, knobs) for `problem` on `device`.

    evaluate(problem, spec, knobs) -> Outcome verifies then times one candidate (default: in an
    isolated worker process, or in this one with `in_process`). specs defaults to every
    registered kernel that supports the problem on the device. storage is any Optuna storage URL (None: in memory); a study of the
    same name resumes where it stopped unless `fresh`. confirm_top re-times the best few
    candidates and the vendor in interleaved rounds at the end, so the winner is not a lucky
    sample; our kernel is chosen over the vendor only when faster beyond the noise. warm_start
    configs (e.g. winners of neighbouring shapes) are measured right after the defaults, where
    this problem's constraints admit them. stop_calls turns on cost-aware stopping
    (autotune.stopping) for a kernel expected to run that many times. compile_budget (seconds)
    stops proposing Triton configs once their first calls, which JIT-compile them, have taken
    that long in all (autotune.stopping.CompileBudget); the result's `stopped` says so.
    """
    if specs is None:
        specs = registry.kernels_for(problem, device)
    if not specs:
        raise UnknownNameError(f"no kernel supports {problem.describe()} on {device}")
    with contextlib.ExitStack() as stack:
        if evaluate is None:
            evaluate = _default_evaluator(device, seed or 0, stack, in_process)
        return _search(problem, specs, evaluate, device=device, trials=trials, timeout=timeout,
                       sampler=sampler, storage=storage, study_name=study_name, seed=seed,
                       progress=progress, fresh=fresh, confirm_top=confirm_top, warm_start=warm_start,
                       stop_calls=stop_calls, compile_budget=compile_budget)


def _default_evaluator(device: str, seed: int, stack: contextlib.ExitStack, in_process: bool) -> Evaluate:
    """Candidates run in a worker process with a per-candidate timeout, restarted after a crash:
    a kernel that segfaults, calls os._exit, hangs or (on a GPU) poisons the CUDA context is a
    recorded result, not the end of the search. `in_process` trades that for less overhead."""
    if in_process:
        return functools.partial(measure.evaluate, device=device, seed=seed)
    import torch

    from autotune.worker import IsolatedEvaluator

    return stack.enter_context(IsolatedEvaluator(
        device=device, seed=seed, timeout_s=candidate_timeout_s(),
        threads=torch.get_num_threads() if device == "cpu" else None))


def candidate_timeout_s() -> float:
    """Seconds a candidate may run in the worker: $AUTOTUNE_CANDIDATE_TIMEOUT_S, else 60."""
    return seconds_from_env(CANDIDATE_TIMEOUT_ENV, CANDIDATE_TIMEOUT_S)


def _seeds(problem, specs, valid: list[Config], budget: int) -> list[Config]:
    """The kernels' seed configs this problem admits, the algorithms taking turns, at most half
    the budget (the sampler keeps the rest)."""
    keys = {c.key() for c in valid}
    per_algorithm = [[c for c in spec.seed_configs(problem) if c.key() in keys] for spec in specs]
    turns = [c for group in itertools.zip_longest(*per_algorithm) for c in group if c is not None]
    return list(dict.fromkeys(turns))[:budget // 2]


def _search(problem, specs, evaluate, *, device, trials, timeout, sampler, storage, study_name, seed,
            progress, fresh, confirm_top, warm_start=(), stop_calls=None, compile_budget=None) -> TuneResult:
    by_name = {spec.algorithm: spec for spec in specs}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    name = study_name or f"{problem.slug()}-{device}"
    shared = claims.for_storage(storage)
    if shared is not None:  # --force: a new generation, never a study deleted under other workers
        name = claims.generation_name(name, shared.generation(name, fresh))
    study = _open_study(name, storage)
    seen: dict[str, Outcome] = _outcomes_from(study)
    valid = registry.valid_configs(problem, specs)
    budget = min(trials, len(valid))
    if shared is not None:
        shared.adopt(name, list(seen))
        shared.reopen(name, budget)
    if sampler == "grid" and trials < len(valid):
        warnings.warn(f"grid: {problem.describe()} has {len(valid)} valid configs; --trials {trials} "
                      f"measures the first {trials} only (raise --trials to cover them all)", stacklevel=3)
    warm = [Config.make(c.algorithm, by_name[c.algorithm].full_knobs(problem, c.as_dict()))
            for c in warm_start if c.algorithm in by_name]
    if sampler != "grid":
        warm += _seeds(problem, specs, valid, budget)
    proposer = _Proposer(sampler, seed, problem, by_name, valid, seen, warm, budget)
    # progress: True for a bar of our own, or a tqdm bar to share (one bar over many problems).
    own_bar = progress is True
    bar = (progress_bar(desc=f"tuning {problem.op}", unit="cfg", total=budget, initial=len(seen))
           if own_bar else (None if progress is None or progress is False else progress))
    deadline = None if timeout is None else time.monotonic() + timeout
    stop = StopRule(budget=budget, calls=stop_calls, start=proposer.start) if stop_calls else None
    compiling = CompileBudget(compile_budget) if compile_budget is not None else None
    # The isolated evaluator's per-candidate timeout is shortened near the deadline; it is put
    # back afterwards, for the finalists' re-timing and for whoever shares the evaluator (seen on
    # an H200: left short, it timed out every later candidate of gpu_check's other shapes).
    candidate_timeout = getattr(evaluate, "timeout_s", None)
    held: dict[str, Config] = {}  # proposals other workers hold (or the budget's end refused)

    def learn_from_others() -> None:
        """Trials other workers added since: the sampler learns from them and never repeats them."""
        for key, outcome in _outcomes_from(study).items():
            if key not in seen:
                seen[key] = outcome
                proposer.tell(_config_from_key(key), outcome)
                held.pop(key, None)
                if bar is not None:
                    bar.update(1)

    def measure_more() -> bool:
        """Measure until the budget is spent; False when this worker may not measure more (its
        --timeout or cost-aware stopping ended it, or it has no config left to propose)."""
        while len(seen) < budget:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            started = time.monotonic()
            config = proposer.next()
            if config is None:  # every valid config measured
                return False
            if shared is not None:
                got = shared.claim(name, config.key(), budget)
                if got != claims.MINE:
                    proposer.skip(config)
                    held[config.key()] = config
                    if got == claims.SPENT:
                        return True
                    learn_from_others()
                    continue
            spec = by_name[config.algorithm]
            if deadline is not None and hasattr(evaluate, "timeout_s"):
                # --timeout bounds the whole search, the candidate in flight included.
                evaluate.timeout_s = max(1.0, min(candidate_timeout, deadline - time.monotonic()))
            outcome = evaluate(problem, spec, config.as_dict())
            seen[config.key()] = outcome
            proposer.tell(config, outcome)
            _add_trial(study, spec, config, outcome)
            if compiling is not None and spec.backend in COMPILED_BACKENDS:
                # A candidate killed before its first call returned (timeout) cost its whole time.
                first = outcome.first_call_s if outcome.first_call_s is not None else time.monotonic() - started
                if compiling.charge(first):
                    proposer.drop({a for a, s in by_name.items() if s.backend in COMPILED_BACKENDS})
                    study.set_user_attr("compile_budget", compiling.reason)
            if shared is not None:
                shared.finish(name, config.key())
                learn_from_others()
            if bar is not None:
                bar.update(1)
                _show_best(bar, seen)
            if stop is not None and stop.update(_best_own_ms(seen), time.monotonic() - started):
                study.set_user_attr("stopped", stop.reason)
                return False
        return True

    step = "confirm"
    try:
        with shared.beating() if shared is not None else contextlib.nullcontext():
            can_measure = measure_more()
            while shared is not None:  # the budget is shared: wait for the others, then confirm once
                learn_from_others()
                shared.adopt(name, list(seen))  # trials of workers killed before they marked them
                for key, config in held.items():
                    if key not in seen:
                        proposer.restore(config)
                held.clear()
                step = shared.next_step(name, budget, can_measure and bool(proposer.unmeasured))
                if step == "more":
                    can_measure = measure_more()
                elif step == "wait":
                    time.sleep(shared.poll_s)
                else:
                    break
            if candidate_timeout is not None:
                evaluate.timeout_s = candidate_timeout
            stopped = "; ".join(r.reason for r in (compiling, stop) if r is not None and r.reason)
            if step == "done":  # another worker re-timed the finalists: its conclusion is ours
                return _result(problem, study, by_name, None, confirm_top, device, progress=False,
                               invalid=proposer.invalid, valid=len(valid), stopped=stopped)
            result = _result(problem, study, by_name, evaluate, confirm_top, device, progress=_shows(progress),
                             invalid=proposer.invalid, valid=len(valid), stopped=stopped)
            if shared is not None:
                shared.finish(name, claims.CONFIRM, claims.DONE if result.trustworthy else claims.UNTRUSTED)
            return result
    finally:
        if candidate_timeout is not None:
            evaluate.timeout_s = candidate_timeout
        if own_bar:
            bar.close()


def _best_own_ms(seen: dict[str, Outcome]) -> float | None:
    times = [o.measurement.median for k, o in seen.items()
             if o.status is Status.OK and _config_from_key(k).algorithm != VENDOR]
    return min(times, default=None)


class _Proposer:
    """Proposes the next config to measure: always a valid one not measured yet.

    The defaults come first (torch's op first: every search measures the baseline, however small
    its budget). Then the plan (SamplerPlan) says whose turn it is. A random turn draws uniformly
    from the valid configs not measured yet. A model turn asks the sampler, in a scratch in-memory
    study that mirrors what was measured (knobs with ordered numeric values as indices, so TPE
    sees their order). A proposal the kernel's constraints reject is told to the scratch study as
    pruned (the sampler learns to avoid the region), one already measured is told its known time;
    either way the config measured instead is the nearest valid unmeasured one (fewest knob steps
    away, ties at random), so every turn costs one proposal and neither costs a measurement or a
    trial in the real study. `grid` walks the valid configs in order: truly exhaustive.
    """

    def __init__(self, sampler: str | SamplerPlan, seed, problem, by_name, valid: list[Config],
                 seen: dict[str, Outcome], warm: Sequence[Config] = (), budget: int | None = None):
        self.problem, self.by_name, self.seen = problem, by_name, seen
        keys = [c.key() for c in valid]
        self.valid_keys = set(keys)
        # Defaults first (torch's op first), then the warm-start configs this problem admits
        # (winners of cached neighbouring shapes), then space order.
        defaults = [Config.make(s.algorithm, s.full_knobs(problem, s.default_config(problem).as_dict()))
                    for s in sorted(by_name.values(), key=lambda s: s.algorithm != VENDOR)]
        head = [c for c in dict.fromkeys([*defaults, *warm]) if c.key() in self.valid_keys]
        ordered = list(dict.fromkeys(head + valid))
        # Valid configs not measured yet, by key, in that order.
        self.unmeasured = {c.key(): c for c in ordered if c.key() not in seen}
        self.defaults = len(head)
        self.rng = random.Random(seed)
        self.best_by_algorithm: dict[str, float] = {}
        self.best_config: dict[str, Config] = {}  # the config behind each best_by_algorithm
        # Per algorithm, per (knob, value): (sum, count) of the log times measured with that value,
        # and ("", None) for all of them: the main-effects estimate behind local_rank="effects".
        self.log_sums: dict[str, dict[tuple, tuple[float, int]]] = {}
        for key, outcome in seen.items():  # a resumed study's measurements count too
            self._note_best(_config_from_key(key), outcome)
        self.invalid = 0
        self.grid = sampler == "grid"
        self.plan = sampler if isinstance(sampler, SamplerPlan) else (
            SamplerPlan() if self.grid else sampler_plan(sampler))
        self.turns = 0
        self.short = self.plan.short(budget, self.defaults)
        # Proposal number (turns) from which every proposal is a local turn (the plan's tail).
        self.polish_from = math.inf if budget is None or not self.plan.tail(budget) else (
            budget - len(seen) - self.defaults - self.plan.tail(budget) + 1)
        self.random_first = 0 if self.short else self.plan.random_turns(len(valid), budget)
        # Configs measured before the model proposes (a stall among them means little: stopping).
        self.start = self.defaults + (self.random_first if self.plan.model is not None else 0)
        self.scratch = None
        if self.plan.model is not None:
            self.scratch = optuna.create_study(sampler=self.plan.model(seed), direction="minimize")
            for key, outcome in seen.items():
                self._tell(self._trial_for(_config_from_key(key)), outcome)
            self.near = _Neighbours(by_name, valid, self.unmeasured, metric=self.plan.local_metric)
        self._pending: dict[str, optuna.Trial] = {}
        self.dropped: set[str] = set()

    def drop(self, algorithms: set[str]) -> None:
        """Propose no more configs of these algorithms (a spent compile budget)."""
        self.dropped |= algorithms
        for key in [k for k, c in self.unmeasured.items() if c.algorithm in algorithms]:
            del self.unmeasured[key]
            if self.scratch is not None:
                self.near.measured(key)

    def next(self) -> Config | None:
        if not self.unmeasured:
            return None
        if self.grid or self.defaults > 0:
            self.defaults -= 1
            return next(iter(self.unmeasured.values()))
        self.turns += 1
        plan = self.plan
        j = self.turns - self.random_first
        if self.short or (self.turns >= self.polish_from and self.best_config):
            return self._local()
        if plan.model is None or j <= 0 or (plan.random_every and j % plan.random_every == 0):
            return self._random()
        if plan.local_every and j % plan.local_every == 1 % plan.local_every and self.best_config:
            return self._local()
        trial = self.scratch.ask()
        algorithm = trial.suggest_categorical("algorithm", list(self.by_name))
        spec = self.by_name[algorithm]
        knobs = {p.name: _suggest(trial, f"{algorithm}.{p.name}", p) for p in spec.space}
        config = Config.make(algorithm, spec.full_knobs(self.problem, knobs))
        key = config.key()
        if algorithm in self.dropped:  # not the config's fault: no lesson for the sampler's count
            self.scratch.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return self.rng.choice(list(self.unmeasured.values()))
        if key in self.unmeasured:
            self._pending[key] = trial
            return config
        if key in self.seen:
            self._tell(trial, self.seen[key])
        else:
            self.invalid += 1
            self.scratch.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return self.near.nearest(config, self.unmeasured, self.rng)

    def _random(self) -> Config:
        left = list(self.unmeasured.values())
        algorithms = sorted({c.algorithm for c in left}) if self.plan.by_algorithm else []
        if len(algorithms) > 1:
            algorithm = self.rng.choices(algorithms, weights=self._promise(algorithms))[0]
            left = [c for c in left if c.algorithm == algorithm]
        return self.rng.choice(left)

    def _local(self) -> Config:
        """A hill-climbing step: the nearest unmeasured config (fewest knob steps) to the best
        measured config of an algorithm drawn by promise, among algorithms with configs left."""
        algorithms = sorted({c.algorithm for c in self.unmeasured.values()} & set(self.best_config))
        if not algorithms:
            return self._random()
        algorithm = self.rng.choices(algorithms, weights=self._promise(algorithms))[0]
        best = self.best_config[algorithm]
        ties = self.near.nearest_all(best, self.unmeasured)
        if self.plan.local_rank == "effects" and len(ties) > 1:
            return self._most_promising(best, ties)
        return self.near.choose(ties, self.unmeasured, self.rng)

    def _most_promising(self, best: Config, candidates: list[Config]) -> Config:
        """The candidate whose knob changes from `best` have the lowest main-effect estimate
        (SamplerPlan.local_rank); ties keep a random order."""
        sums = self.log_sums.get(best.algorithm, {})
        total, count = sums.get(("", None), (0.0, 0))
        overall = total / count if count else 0.0

        def mean(item: tuple) -> float:
            total, count = sums.get(item, (0.0, 0))
            return total / count if count else overall

        here = best.as_dict()

        def score(config: Config) -> float:
            return sum(mean((name, value)) - mean((name, here.get(name)))
                       for name, value in config.as_dict().items() if here.get(name) != value)

        shuffled = self.rng.sample(candidates, len(candidates))
        return min(shuffled, key=score)

    def _promise(self, algorithms: list[str]) -> list[float]:
        """How often a random turn tries each algorithm: (best time of all / its best time) to the
        ALGORITHM_FOCUS power, 1 for one not measured yet. Every algorithm's default is measured
        first, so a sub-space whose best is twice the best time gets ~1/250 of the turns and two
        within a few percent of each other share them: the budget goes where the optimum can be."""
        if not self.best_by_algorithm:
            return [1.0] * len(algorithms)
        best = min(self.best_by_algorithm.values())
        return [(best / self.best_by_algorithm[a]) ** ALGORITHM_FOCUS if a in self.best_by_algorithm else 1.0
                for a in algorithms]

    def skip(self, config: Config) -> None:
        """Another worker holds `config`: propose others (the sampler learns its outcome later)."""
        self.unmeasured.pop(config.key(), None)
        self._pending.pop(config.key(), None)
        if self.scratch is not None:
            self.near.measured(config.key())

    def restore(self, config: Config) -> None:
        """A skipped config whose worker died unmeasured: it may be proposed again."""
        self.unmeasured[config.key()] = config
        if self.scratch is not None:
            self.near.restore(config.key())

    def tell(self, config: Config, outcome: Outcome) -> None:
        self.unmeasured.pop(config.key(), None)
        self._note_best(config, outcome)
        if self.scratch is None:
            return
        self.near.measured(config.key())
        trial = self._pending.pop(config.key(), None) or self._trial_for(config)
        self._tell(trial, outcome)

    def _note_best(self, config: Config, outcome: Outcome) -> None:
        if outcome.status is Status.OK and outcome.measurement.median > 0:
            log_time, sums = math.log(outcome.measurement.median), self.log_sums.setdefault(config.algorithm, {})
            for item in (("", None), *config.as_dict().items()):
                total, count = sums.get(item, (0.0, 0))
                sums[item] = (total + log_time, count + 1)
        if outcome.status is Status.OK and outcome.measurement.median < self.best_by_algorithm.get(
                config.algorithm, math.inf):
            self.best_by_algorithm[config.algorithm] = outcome.measurement.median
            self.best_config[config.algorithm] = config

    def _trial_for(self, config: Config) -> optuna.Trial:
        """A scratch trial that proposes exactly `config` (history, random turns, nearest configs)."""
        self.scratch.enqueue_trial(_encode(config.algorithm, config.as_dict(), self.by_name[config.algorithm]))
        trial = self.scratch.ask()
        spec = self.by_name[config.algorithm]
        trial.suggest_categorical("algorithm", list(self.by_name))
        for p in spec.space:
            _suggest(trial, f"{config.algorithm}.{p.name}", p)
        return trial

    def _tell(self, trial: optuna.Trial, outcome: Outcome) -> None:
        if outcome.status is Status.OK:
            self.scratch.tell(trial, outcome.measurement.median)
        else:
            self.scratch.tell(trial, state=optuna.trial.TrialState.PRUNED)


class _Neighbours:
    """The valid configs of each algorithm as knob-index vectors, to find the nearest unmeasured
    one to a proposal: ordered knobs count index steps (scaled to 0..1), other knobs 0 or 1."""

    def __init__(self, by_name, valid: list[Config], unmeasured: dict[str, Config], metric: str = "scaled"):
        self.names: dict[str, list[str]] = {}
        self.index: dict[str, list[dict]] = {}
        self.weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.keys: dict[str, list[str]] = {}
        self.vectors: dict[str, np.ndarray] = {}
        self.alive: dict[str, np.ndarray] = {}
        self.where: dict[str, tuple[str, int]] = {}
        for algorithm, spec in by_name.items():
            params = list(spec.space)
            self.names[algorithm] = [p.name for p in params]
            self.index[algorithm] = [{v: i for i, v in enumerate(p.values)} for p in params]
            steps = [1.0 if metric == "steps" else 1.0 / max(len(p.values) - 1, 1) for p in params]
            self.weights[algorithm] = (np.array(steps),
                                       np.array([_is_ordinal(p) for p in params], dtype=bool))
            mine = [c for c in valid if c.algorithm == algorithm]
            self.keys[algorithm] = [c.key() for c in mine]
            self.vectors[algorithm] = np.array([self._vector(algorithm, c.as_dict()) for c in mine],
                                               dtype=float).reshape(len(mine), len(params))
            self.alive[algorithm] = np.array([k in unmeasured for k in self.keys[algorithm]], dtype=bool)
            self.where.update({k: (algorithm, i) for i, k in enumerate(self.keys[algorithm])})

    def _vector(self, algorithm: str, knobs: dict) -> list[float]:
        return [index.get(knobs.get(name), -1)
                for name, index in zip(self.names[algorithm], self.index[algorithm], strict=True)]

    def measured(self, key: str, alive: bool = False) -> None:
        if key in self.where:
            algorithm, i = self.where[key]
            self.alive[algorithm][i] = alive

    def restore(self, key: str) -> None:
        self.measured(key, alive=True)

    def nearest(self, config: Config, unmeasured: dict[str, Config], rng: random.Random) -> Config:
        return self.choose(self.nearest_all(config, unmeasured), unmeasured, rng)

    @staticmethod
    def choose(ties: list[Config], unmeasured: dict[str, Config], rng: random.Random) -> Config:
        """One of nearest_all's configs at random (any unmeasured one if it found none)."""
        return ties[rng.randrange(len(ties))] if ties else rng.choice(list(unmeasured.values()))

    def nearest_all(self, config: Config, unmeasured: dict[str, Config]) -> list[Config]:
        """Every unmeasured config of config's algorithm at the least distance from it."""
        algorithm = config.algorithm
        alive = np.flatnonzero(self.alive.get(algorithm, np.zeros(0, dtype=bool)))
        if alive.size == 0:
            return []
        step, ordinal = self.weights[algorithm]
        diff = self.vectors[algorithm][alive] - np.array(self._vector(algorithm, config.as_dict()), dtype=float)
        cost = np.where(ordinal, np.abs(diff) * step, diff != 0).sum(axis=1)
        best = alive[np.flatnonzero(cost <= cost.min() + 1e-9)]
        return [unmeasured[self.keys[algorithm][int(i)]] for i in best]


def _add_trial(study: optuna.Study, spec, config: Config, outcome: Outcome) -> None:
    """One trial per measured config in the real study: the knobs' real values as params, named
    `<algorithm>.<knob>` (readable in optuna-dashboard and optuna.load_study; knobs of different
    algorithms never share a distribution), the algorithm and the outcome in user attrs."""
    knobs = config.as_dict()
    params = {f"{config.algorithm}.{p.name}": knobs[p.name] for p in spec.space}
    distributions = {f"{config.algorithm}.{p.name}": optuna.distributions.CategoricalDistribution(list(p.values))
                     for p in spec.space}
    attrs = {"algorithm": config.algorithm, "config": config.key(), "status": outcome.status.value}
    if outcome.measurement is not None:
        attrs["measurement"] = outcome.measurement.as_dict()
    if outcome.error is not None and math.isfinite(outcome.error):
        attrs["error"] = outcome.error
    if outcome.message:
        attrs["message"] = outcome.message[:300]
    if outcome.first_call_s is not None:
        attrs["first_call_s"] = round(outcome.first_call_s, 4)
    ok = outcome.status is Status.OK
    study.add_trial(optuna.trial.create_trial(
        params=params, distributions=distributions, user_attrs=attrs,
        value=outcome.measurement.median if ok else None,
        state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.PRUNED))


def _open_study(name: str, storage: str | None) -> optuna.Study:
    """The study to run, resumed from `storage`; a bad storage URL is the user's to fix, so it
    becomes an AutotuneError (one line, exit status 2) rather than a traceback."""
    try:
        # Trials are added whole (measured configs only), so the study's own sampler never runs.
        return optuna.create_study(storage=_storage(storage), study_name=name, direction="minimize",
                                   load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy, driver and URL errors alike: the URL is the cause
        raise AutotuneError(f"cannot open the Optuna storage {storage!r}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}; give --storage a URL "
                            "such as sqlite:///results/studies.db") from None


def _storage(url: str | None):
    """Optuna's storage for `url`. Workers that open a new database at once race to create its
    tables and its alembic_version row: the loser retries (the tables are then there). SQLite
    writers queue for the lock instead of failing (claims.serialise_sqlite)."""
    if not claims.is_database_url(url):
        return url
    if not url.startswith("sqlite"):
        return claims.retry_creating(lambda: optuna.storages.RDBStorage(url))
    storage = claims.retry_creating(lambda: optuna.storages.RDBStorage(
        url, engine_kwargs={"connect_args": {"timeout": claims.SQLITE_WAIT_S}}))
    claims.serialise_sqlite(storage.engine)  # Optuna's own read-then-write transactions too
    return storage


def _outcomes_from(study: optuna.Study) -> dict[str, Outcome]:
    """Outcomes already in a (resumed) study, by config key."""
    seen: dict[str, Outcome] = {}
    for t in study.get_trials(deepcopy=False):
        status = t.user_attrs.get("status")
        key = t.user_attrs.get("config")
        if status is None or key is None or t.state not in (
            optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
        ):
            continue
        m = t.user_attrs.get("measurement")
        seen[key] = Outcome(status=Status(status), measurement=Measurement.from_dict(m) if m else None,
                            message=t.user_attrs.get("message", ""))
    return seen


def _config_from_key(key: str) -> Config:
    data = json.loads(key)
    return Config.make(data["algorithm"], data["knobs"])


def _result(problem, study, by_name, evaluate, confirm_top, device, *, progress: bool, invalid: int, valid: int,
            stopped: str = "") -> TuneResult:
    records = []
    for t in study.get_trials(deepcopy=False):
        if "status" not in t.user_attrs:
            continue
        m = t.user_attrs.get("measurement")
        records.append(TrialRecord(number=t.number, config=_config_from_key(t.user_attrs["config"]),
                                   status=Status(t.user_attrs["status"]),
                                   measurement=Measurement.from_dict(m) if m else None,
                                   message=t.user_attrs.get("message", "")))
    ok = {}
    for rec in records:
        if rec.status is Status.OK:
            ok.setdefault(rec.config.key(), rec)
    ranked = sorted(ok.values(), key=lambda r: r.median_ms)
    own = [r for r in ranked if r.config.algorithm != VENDOR][: max(confirm_top, 1)]
    vendor = [r for r in ranked if r.config.algorithm == VENDOR][:1]
    if evaluate is None:  # another worker re-timed the finalists (below) and recorded them
        attrs = study.user_attrs
        confirmed = [Candidate(config=Config.make(c["algorithm"], c["knobs"]),
                               measurement=Measurement.from_dict(c["measurement"]))
                     for c in attrs.get("confirmed", [])]
        distrust = attrs.get("distrust", "" if attrs.get("trustworthy", True) else "not trusted")
    elif confirm_top > 0:
        confirmed, distrust = confirm([Candidate(config=r.config, measurement=r.measurement)
                                       for r in own + vendor], problem, by_name, evaluate,
                                      progress=progress)
    else:
        confirmed, distrust = [Candidate(config=r.config, measurement=r.measurement) for r in own + vendor], ""
    confirmed.sort(key=lambda c: c.measurement.median)
    if evaluate is not None:
        # The re-timed finalists on the study itself, so Optuna's tools show what the search
        # concluded (a trial's value is its search-phase time; the re-timing is what the decision
        # used), and the other workers of a shared study take the same decision.
        study.set_user_attr("confirmed", [{"algorithm": c.algorithm, "knobs": c.config.as_dict(),
                                           "median_ms": c.measurement.median,
                                           "measurement": c.measurement.as_dict()} for c in confirmed])
        study.set_user_attr("trustworthy", not distrust)
        study.set_user_attr("distrust", distrust)
    return TuneResult(problem=problem,
                      best_own=next((c for c in confirmed if c.algorithm != VENDOR), None),
                      vendor=next((c for c in confirmed if c.algorithm == VENDOR), None),
                      trials=tuple(records), study_name=study.study_name,
                      trustworthy=not distrust, distrust=distrust, valid_configs=valid, rejected=invalid,
                      stopped=stopped)


def _shows(progress) -> bool:
    """Whether the caller wants progress shown: True, or a bar of its own that is enabled."""
    if progress is None or isinstance(progress, bool):
        return bool(progress)
    return not getattr(progress, "disable", True)


def _show_best(bar, seen: dict[str, Outcome]) -> None:
    ok = [(o.measurement.median, k) for k, o in seen.items() if o.status is Status.OK]
    if ok:
        median, key = min(ok)
        bar.set_postfix_str(f"best {median:.3f} ms ({_config_from_key(key).algorithm})", refresh=False)


def study_histories(storage: str) -> list[dict]:
    """Every study in `storage`, trials in the order they were measured, for reports: name and
    [{"number", "algorithm", "status", "median_ms" (None unless ok)}]; [] when the storage holds
    no study. Read-only; an unreadable storage is an AutotuneError."""
    try:
        summaries = optuna.study.get_all_study_summaries(storage=storage, include_best_trial=False)
        histories = []
        for summary in summaries:
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            trials = []
            for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
                if "status" not in t.user_attrs:
                    continue
                m = t.user_attrs.get("measurement") or {}
                ok = t.user_attrs["status"] == Status.OK.value and t.state == optuna.trial.TrialState.COMPLETE
                trials.append({"number": t.number, "algorithm": t.user_attrs.get("algorithm", "?"),
                               "status": t.user_attrs["status"],
                               "median_ms": (t.value if t.value is not None else m.get("median_ms")) if ok else None})
            histories.append({"name": summary.study_name, "trials": trials})
        return histories
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy and driver errors alike: the file is the cause
        raise AutotuneError(f"cannot read the Optuna studies in {storage}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
