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
import functools
import json
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import optuna

from autotune import measure, registry
from autotune.confirm import Candidate, Evaluate, confirm
from autotune.errors import AutotuneError, UnknownNameError
from autotune.measure import Measurement, Outcome, Status
from autotune.problem import Problem
from autotune.space import Config, Param

SAMPLERS = ("tpe", "random", "grid", "cmaes")
VENDOR = "vendor"
CANDIDATE_TIMEOUT_S = 60.0  # a GPU candidate that takes longer is recorded as a timeout


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

    @property
    def best(self) -> Candidate | None:
        """The fastest confirmed candidate, torch's op included (by time alone)."""
        found = [c for c in (self.best_own, self.vendor) if c is not None]
        return min(found, key=lambda c: c.measurement.median) if found else None

    def counts(self) -> dict[str, int]:
        """Distinct configs by status (a config proposed twice was measured once)."""
        first = {}
        for t in self.trials:
            first.setdefault(t.config.key(), t.status)
        counted = Counter(status.value for status in first.values())
        return {s.value: counted.get(s.value, 0) for s in Status if counted.get(s.value)}


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # multivariate + group model the knobs of one algorithm jointly, and keep algorithms'
        # conditional sub-spaces apart.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=8)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        # Exhaustive over the conditional space; stops the study when every config was tried.
        return optuna.samplers.BruteForceSampler(seed=seed)
    if name == "cmaes":
        # CMA-ES models the ordered (index) knobs; the categorical algorithm choice falls back
        # to independent sampling.
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False,
                                            independent_sampler=optuna.samplers.TPESampler(seed=seed))
    raise UnknownNameError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


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


def _space_size(specs) -> int:
    return sum(spec.space.size() for spec in specs)


def tune(
    problem: Problem,
    *,
    device: str = "cpu",
    trials: int = 40,
    timeout: float | None = None,
    sampler: str = "tpe",
    storage: str | None = None,
    study_name: str | None = None,
    seed: int | None = 0,
    evaluate: Evaluate | None = None,
    specs: Sequence | None = None,
    progress=False,
    fresh: bool = False,
    confirm_top: int = 3,
) -> TuneResult:
    """Find the fastest correct (algorithm, knobs) for `problem` on `device`.

    evaluate(problem, spec, knobs) -> Outcome verifies then times one candidate (default: in
    process, measure.evaluate). specs defaults to every registered kernel that supports the
    problem on the device. storage is any Optuna storage URL (None: in memory); a study of the
    same name resumes where it stopped unless `fresh`. confirm_top re-times the best few
    candidates and the vendor in interleaved rounds at the end, so the winner is not a lucky
    sample; our kernel is chosen over the vendor only when faster beyond the noise.
    """
    if specs is None:
        specs = registry.kernels_for(problem, device)
    if not specs:
        raise UnknownNameError(f"no kernel supports {problem.describe()} on {device}")
    with contextlib.ExitStack() as stack:
        if evaluate is None:
            evaluate = _default_evaluator(device, seed or 0, stack)
        return _search(problem, specs, evaluate, device=device, trials=trials, timeout=timeout,
                       sampler=sampler, storage=storage, study_name=study_name, seed=seed,
                       progress=progress, fresh=fresh, confirm_top=confirm_top)


def _default_evaluator(device: str, seed: int, stack: contextlib.ExitStack) -> Evaluate:
    """In process on the CPU. On a GPU a bad candidate can kill the CUDA context or hang, so
    candidates run in a worker process with a per-candidate timeout, restarted after a crash."""
    if device != "cuda":
        return functools.partial(measure.evaluate, device=device, seed=seed)
    from autotune.worker import IsolatedEvaluator

    return stack.enter_context(IsolatedEvaluator(device=device, seed=seed, timeout_s=CANDIDATE_TIMEOUT_S))


def _search(problem, specs, evaluate, *, device, trials, timeout, sampler, storage, study_name, seed,
            progress, fresh, confirm_top) -> TuneResult:
    by_name = {spec.algorithm: spec for spec in specs}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    name = study_name or f"autotune-{problem.key()}-{device}"
    study = _open_study(name, storage, make_sampler(sampler, seed), fresh)
    seen: dict[str, Outcome] = _outcomes_from(study)
    if not study.trials:
        # torch's op first: every search measures the baseline, however small its budget.
        for spec in sorted(specs, key=lambda spec: spec.algorithm != VENDOR):
            study.enqueue_trial(_encode(spec.algorithm, spec.default_config(problem).as_dict(), spec))

    space_size = _space_size(specs)
    budget = min(trials, space_size)
    # progress: True for a bar of our own, or a tqdm bar to share (one bar over many problems).
    own_bar = progress is True
    bar = _progress_bar(problem, budget, _measured(seen)) if own_bar else (progress or None)

    def objective(trial: optuna.Trial) -> float:
        algorithm = trial.suggest_categorical("algorithm", list(by_name))
        spec = by_name[algorithm]
        knobs = {p.name: _suggest(trial, f"{algorithm}.{p.name}", p) for p in spec.space}
        config = Config.make(algorithm, spec.full_knobs(problem, knobs))
        trial.set_user_attr("config", config.key())
        outcome = seen.get(config.key())
        if outcome is None:
            outcome = evaluate(problem, spec, knobs)
            seen[config.key()] = outcome
            if bar is not None and outcome.status is not Status.INVALID:
                bar.update(1)
        _record(trial, outcome)
        if bar is not None:
            _show_best(bar, seen)
        if outcome.status is not Status.OK:
            raise optuna.TrialPruned(outcome.message)
        return outcome.measurement.median

    def stop_when_spent(study: optuna.Study, _trial) -> None:
        if _measured(seen) >= budget or len(seen) >= space_size:
            study.stop()

    if _measured(seen) < budget and len(seen) < space_size:
        try:
            # Repeated proposals are free, so allow more Optuna trials than measurements.
            study.optimize(objective, n_trials=4 * budget + len(specs), timeout=timeout,
                           callbacks=[stop_when_spent], catch=())
        finally:
            if own_bar:
                bar.close()
    return _result(problem, study, by_name, evaluate, confirm_top, device)


def _open_study(name: str, storage: str | None, sampler, fresh: bool) -> optuna.Study:
    """The study to run, resumed from `storage` unless `fresh`; a bad storage URL is the user's
    to fix, so it becomes an AutotuneError (one line, exit status 2) rather than a traceback."""
    try:
        if fresh and storage is not None:
            try:
                optuna.delete_study(study_name=name, storage=storage)
            except KeyError:
                pass
        return optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                   direction="minimize", load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy, driver and URL errors alike: the URL is the cause
        raise AutotuneError(f"cannot open the Optuna storage {storage!r}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}; give --storage a URL "
                            "such as sqlite:///results/studies.db") from None


def _measured(seen: dict[str, Outcome]) -> int:
    """Configs that cost a run: an invalid config is rejected before it runs, so it is free."""
    return sum(1 for o in seen.values() if o.status is not Status.INVALID)


def _record(trial: optuna.Trial, outcome: Outcome) -> None:
    trial.set_user_attr("status", outcome.status.value)
    if outcome.measurement is not None:
        trial.set_user_attr("measurement", outcome.measurement.as_dict())
    if outcome.error is not None and math.isfinite(outcome.error):
        trial.set_user_attr("error", outcome.error)
    if outcome.message:
        trial.set_user_attr("message", outcome.message[:300])


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


def _result(problem, study, by_name, evaluate, confirm_top, device) -> TuneResult:
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
    distrust = ""
    if confirm_top > 0:
        confirmed, distrust = confirm([Candidate(config=r.config, measurement=r.measurement)
                                       for r in own + vendor], problem, by_name, evaluate)
    else:
        confirmed = [Candidate(config=r.config, measurement=r.measurement) for r in own + vendor]
    confirmed.sort(key=lambda c: c.measurement.median)
    return TuneResult(problem=problem,
                      best_own=next((c for c in confirmed if c.algorithm != VENDOR), None),
                      vendor=next((c for c in confirmed if c.algorithm == VENDOR), None),
                      trials=tuple(records), study_name=study.study_name,
                      trustworthy=not distrust, distrust=distrust)


def _progress_bar(problem: Problem, total: int, done: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=min(done, total), desc=f"tuning {problem.op}", unit="cfg",
                dynamic_ncols=True, leave=False)


def _show_best(bar, seen: dict[str, Outcome]) -> None:
    ok = [(o.measurement.median, k) for k, o in seen.items() if o.status is Status.OK]
    if ok:
        median, key = min(ok)
        bar.set_postfix_str(f"best {median:.3f} ms ({_config_from_key(key).algorithm})", refresh=False)
