"""Search landscapes as data: every valid config of a search space and its time (a replay table).

A landscape is what the search efficiency benchmark replays (Kernel Tuner's simulation mode): the
tuner's `evaluate` looks a config up instead of running it, so a sampler's result depends on the
search alone. Three kinds:

- measured: every valid config of a real kernel timed once on this CPU (`measure_cpu`), cached in
  results/ while it runs, then saved compactly under benchmarks/landscapes/ (committed), so the
  benchmark replays without measuring again;
- modelled: the Triton spaces priced by benchmarks/gpu_model.py (an H100 model), validity from the
  kernels' own check(); rebuilt from code on each run (deterministic);
- external: any table in the compact format below (`load`), e.g. a published exhaustive GPU table.

Compact format (JSON):

    {"format": "autotune-landscape/1", "name": "...", "source": "how the times were obtained",
     "problem": {...} (optional, autotune.problem's dict),
     "algorithms": [{"name": "blocked",
                     "space": {"BLOCK_M": [32, 64, ...], ...},    # knob domains, in order
                     "default": {"BLOCK_M": 64, ...},             # measured first by the tuner
                     "rows": [[32, 64, ..., 1.234], ...]}]}       # knob values in space order,
                                                                  # then ms (null: failed)

Only valid configs have rows: a config without a row is one the constraints reject (the replay's
check() says so, as the kernel's would). A row whose time is null is a valid config that failed
(wrong answer, crash); the replay answers it as crashed.
"""

# ruff: noqa: E402 - the thread counts must be in the environment before NumPy/torch load BLAS.
from __future__ import annotations

import os

if __name__ == "__main__":  # measuring: BLAS on one thread, or the two cores stall each other
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", os.environ["OPENBLAS_NUM_THREADS"])

import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from autotune import device, measure, registry
from autotune.measure import Measurement, Outcome, Status
from autotune.problem import Conv2dProblem, GemmProblem, Problem, problem_from_dict, problem_to_dict
from autotune.registry import KernelSpec
from autotune.space import Config, Param, Space

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
COMMITTED = Path(__file__).resolve().parent / "landscapes"
FORMAT = "autotune-landscape/1"
CHECKPOINT_EVERY = 25  # configs measured between saves, so an interrupted measurement resumes
# A problem for tables that name none (the tuner only uses it for names).
PLACEHOLDER = GemmProblem(m=1, n=1, k=1, dtype="float32")


@dataclass(frozen=True, kw_only=True)
class Algorithm:
    name: str
    space: Space
    default: dict
    times: dict[tuple, float | None]  # knob values in space order -> ms (None: failed)


@dataclass(frozen=True, kw_only=True)
class Landscape:
    """A replay table: the valid configs of one problem's space and their times."""

    name: str
    problem: Problem
    algorithms: tuple[Algorithm, ...]
    source: str = ""
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for alg in self.algorithms:
            for values, ms in alg.times.items():
                knobs = dict(zip((p.name for p in alg.space), values, strict=True))
                self._index[Config.make(alg.name, knobs).key()] = ms

    @property
    def valid(self) -> int:
        return len(self._index)

    @property
    def grid(self) -> int:
        return sum(a.space.size() for a in self.algorithms)

    @property
    def optimum(self) -> float:
        return min(ms for ms in self._index.values() if ms is not None)

    def specs(self) -> list[KernelSpec]:
        """KernelSpecs whose check() admits exactly the table's rows and whose run() never runs."""

        def check(problem, knobs, *, _alg: str) -> str | None:
            return None if Config.make(_alg, knobs).key() in self._index else "not in the table"

        def run(*_):
            raise RuntimeError("a replayed kernel is looked up, never run")

        return [KernelSpec(op=self.problem.op, algorithm=a.name, backend="replay", run=run,
                           check=lambda p, k, _alg=a.name: check(p, k, _alg=_alg),
                           defaults=dict(a.default), space=a.space)
                for a in self.algorithms]

    def evaluate(self, problem, spec, knobs) -> Outcome:
        """The tuner's evaluate: a table lookup (a config missing from the table is a crash)."""
        ms = self._index.get(Config.make(spec.algorithm, knobs).key(), math.nan)
        if ms is None or (isinstance(ms, float) and math.isnan(ms)):
            return Outcome(status=Status.CRASHED, message="no time in the table")
        return Outcome(status=Status.OK, measurement=Measurement(median=ms, p20=ms, p80=ms, n=1))

    def to_json(self) -> dict:
        data: dict = {"format": FORMAT, "name": self.name, "source": self.source,
                      "problem": problem_to_dict(self.problem), "algorithms": []}
        for a in self.algorithms:
            data["algorithms"].append({
                "name": a.name,
                "space": {p.name: list(p.values) for p in a.space},
                "default": a.default,
                "rows": [[*values, None if ms is None else round(ms, 6)] for values, ms in a.times.items()],
            })
        return data


def from_json(data: dict) -> Landscape:
    if data.get("format") != FORMAT:
        raise ValueError(f"not a landscape table (format {data.get('format')!r}, expected {FORMAT!r})")
    algorithms = []
    for a in data["algorithms"]:
        space = Space(params=tuple(Param(name=n, values=tuple(v)) for n, v in a["space"].items()))
        times = {tuple(row[:-1]): (None if row[-1] is None else float(row[-1])) for row in a["rows"]}
        default = a.get("default") or dict(zip(a["space"], next(iter(times)), strict=True))
        algorithms.append(Algorithm(name=a["name"], space=space, default=default, times=times))
    problem = problem_from_dict(data["problem"]) if data.get("problem") else PLACEHOLDER
    return Landscape(name=data["name"], problem=problem, algorithms=tuple(algorithms),
                     source=data.get("source", ""))


def load(path: Path) -> Landscape:
    with open(path) as fh:
        return from_json(json.load(fh))


def write_json(path: Path, data: dict, *, indent: int | None = 1) -> None:
    """Atomic write: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=indent, sort_keys=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_compact(landscape: Landscape, path: Path) -> None:
    """One row per line: small, diffable, and readable."""
    data = landscape.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["{", f' "format": {json.dumps(data["format"])},', f' "name": {json.dumps(data["name"])},',
             f' "source": {json.dumps(data["source"])},', f' "problem": {json.dumps(data["problem"])},',
             ' "algorithms": [']
    for i, a in enumerate(data["algorithms"]):
        lines.append(f'  {{"name": {json.dumps(a["name"])}, "space": {json.dumps(a["space"])},')
        lines.append(f'   "default": {json.dumps(a["default"])}, "rows": [')
        lines += [f"    {json.dumps(r)}{',' if j < len(a['rows']) - 1 else ''}" for j, r in enumerate(a["rows"])]
        lines.append("  ]}" + ("," if i < len(data["algorithms"]) - 1 else ""))
    lines += [" ]", "}"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


# --- measured on this CPU ---------------------------------------------------------------------

# The measured landscapes: name -> (problem, algorithms). LeNet's second convolution at batch 64
# over every NumPy conv2d algorithm (a conditional space: the algorithm, then its knobs).
LENET_CONV2 = Conv2dProblem(op="conv2d", n=64, c=6, h=14, w=14, k=16, r=5, s=5, dtype="float32")
MEASURED = {
    "cpu-gemm-blocked-512": (GemmProblem(m=512, n=512, k=512, dtype="float32"), ("blocked",)),
    "cpu-conv2d-lenet2": (LENET_CONV2, ("im2col_gemm", "per_tap", "tensordot", "einsum", "fft")),
}


def _identity(problem, spec, rep_ms) -> dict:
    return {"problem": problem_to_dict(problem), "algorithm": spec.algorithm,
            "space": {p.name: list(p.values) for p in spec.space}, "kernel_source_hash": spec.source_hash,
            "rep_ms": rep_ms, "device": device.fingerprint("cpu"),
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", ""), "versions": device.versions()}


def _measure_spec(problem, spec, *, rep_ms, path: Path, remeasure: bool) -> dict[tuple, float | None]:
    """Every valid config of one algorithm timed once; resumes from (or reuses) results/<path>."""
    identity = _identity(problem, spec, rep_ms)
    entries: dict = {}
    if path.exists() and not remeasure:
        data = json.loads(path.read_text())
        if data.get("identity") == identity:
            entries = data["entries"]
        else:
            print(f"{path.name}: recorded for another problem/space/kernel/machine; measuring again")
    names = [p.name for p in spec.space]
    valid = [k for k in spec.space.configs() if spec.check(problem, spec.full_knobs(problem, k)) is None]
    todo = [k for k in valid if json.dumps([k[n] for n in names]) not in entries]
    if todo:
        print(f"timing {len(todo)} of {len(valid)} valid configs of {spec.algorithm} on {problem.describe()}")
    start = time.perf_counter()
    for i, knobs in enumerate(todo, 1):
        outcome = measure.evaluate(problem, spec, knobs, device="cpu", rep_ms=rep_ms)
        entries[json.dumps([knobs[n] for n in names])] = outcome.as_dict()
        if i % CHECKPOINT_EVERY == 0 or i == len(todo):
            write_json(path, {"identity": identity, "entries": entries,
                              "measure_seconds": round(time.perf_counter() - start, 1)})
            print(f"  {i}/{len(todo)} ({time.perf_counter() - start:.0f} s)", flush=True)
    times = {}
    for key, data in entries.items():
        o = Outcome.from_dict(data)
        times[tuple(json.loads(key))] = o.measurement.median if o.status is Status.OK else None
    return times


def measure_cpu(name: str, *, rep_ms: float | None = None, remeasure: bool = False) -> Landscape:
    """Time a MEASURED landscape on this CPU (once: cached in results/), and save its compact copy
    under benchmarks/landscapes/."""
    problem, algorithms = MEASURED[name]
    parts = []
    for alg in algorithms:
        spec = registry.get(problem.op, alg, "cpu")
        times = _measure_spec(problem, spec, rep_ms=rep_ms, path=RESULTS / f"landscape-{name}-{alg}.json",
                              remeasure=remeasure)
        default = {p.name: spec.default_config(problem).as_dict()[p.name] for p in spec.space}
        parts.append(Algorithm(name=alg, space=spec.space, default=default, times=times))
    fp = device.fingerprint("cpu")
    landscape = Landscape(name=name, problem=problem, algorithms=tuple(parts),
                          source=f"measured: {fp['cpu']}, {fp['cores']} cores shared with other work, "
                                 f"{fp['blas']} on {os.environ.get('OPENBLAS_NUM_THREADS', '?')} thread(s); "
                                 "median of >= 5 runs per config, each config timed once")
    save_compact(landscape, COMMITTED / f"{name}.json")
    return landscape


# --- the catalogue ----------------------------------------------------------------------------


def committed(name: str) -> Landscape:
    return load(COMMITTED / f"{name}.json")


def modelled(name: str) -> Landscape:
    import gpu_model  # benchmarks/gpu_model.py (imports Triton's kernels through the interpreter)

    return gpu_model.landscape(name)


def catalogue() -> list[str]:
    import gpu_model

    return [*MEASURED, *gpu_model.LANDSCAPES]


def get(name: str) -> Landscape:
    """A landscape by name (measured ones from their committed copy), or a table file's path."""
    if name.endswith(".json"):
        return load(Path(name))
    if name in MEASURED:
        path = COMMITTED / f"{name}.json"
        return load(path) if path.exists() else measure_cpu(name)
    return modelled(name)


def synthetic(name: str = "synthetic", *, sizes: Sequence[int] = (6, 6, 5), seed: int = 0) -> Landscape:
    """A small made-up landscape (a smooth bowl with noise, one corner invalid), for tests."""
    import random

    rng = random.Random(seed)
    params = tuple(Param(name=f"k{i}", values=tuple(2 ** j for j in range(n))) for i, n in enumerate(sizes))
    space = Space(params=params)
    times: dict[tuple, float | None] = {}
    for knobs in space.configs():
        idx = [params[i].values.index(v) for i, v in enumerate(knobs.values())]
        if idx[0] + idx[1] > len(params[0].values) + 2:
            continue  # invalid corner
        bowl = sum((j - 0.6 * (len(p.values) - 1)) ** 2 for j, p in zip(idx, params, strict=True))
        times[tuple(knobs.values())] = round((1.0 + 0.1 * bowl) * (1 + 0.03 * rng.random()), 6)
    default = dict(zip((p.name for p in params), next(iter(times)), strict=True))
    return Landscape(name=name, problem=PLACEHOLDER,
                     algorithms=(Algorithm(name="synthetic", space=space, default=default, times=times),),
                     source="synthetic: a noisy bowl with an invalid corner (tests)")


if __name__ == "__main__":
    import sys

    for landscape_name in sys.argv[1:] or list(MEASURED):
        land = measure_cpu(landscape_name)
        print(f"{land.name}: {land.valid} valid configs of {land.grid}, optimum {land.optimum:.4f} ms")
