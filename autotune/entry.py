"""The one record of a tuning decision, from the search to the cache to dispatch, `show` and `bench`.

An `Entry` says which algorithm (torch's op, `vendor`, or one of ours) and knobs a layer runs for
one problem on one machine, and why: the times that decided it, torch's time on the same inputs,
our best kernel (kept even where torch's op was chosen), the trials, the thread count and
whether the timing could be trusted. It is built once by `autotune.search` and parsed, with its
types checked, once when the cache is read; nothing else reads the cache file as loose dicts.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from datetime import datetime

from autotune.errors import AutotuneError
from autotune.problem import Problem, problem_from_dict, problem_to_dict

VENDOR = "vendor"  # torch's own op (cuDNN / cuBLAS / oneDNN) as one more algorithm
CREATED_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # Entry.created: local time with its UTC offset


class EntryFormatError(AutotuneError, ValueError):
    """A cache record whose fields are missing or of the wrong type."""


@dataclass(frozen=True, kw_only=True)
class OwnKernel:
    """Our fastest kernel for the problem, whether or not it was chosen."""

    algorithm: str
    knobs: dict
    median_ms: float


@dataclass(frozen=True, kw_only=True)
class Entry:
    problem: Problem
    device: dict  # the fingerprint of the machine it was measured on (autotune.device)
    versions: dict  # library versions whose code was timed
    algorithm: str  # what runs: VENDOR or one of ours
    knobs: dict  # full knob setting of `algorithm`
    kernel_hashes: dict  # algorithm -> source hash of every kernel the decision compared
    median_ms: float  # the chosen algorithm's time (final interleaved re-timing)
    p20_ms: float
    p80_ms: float
    vendor_ms: float | None  # torch's op on the same inputs in the same run
    best_own: OwnKernel | None
    trials: dict  # distinct configs measured, by status
    valid_configs: int = 0  # how many configs the kernels' constraints admit (the search's space)
    stopped: str = ""  # why --stop auto or --compile-budget ended (part of) the search early, if one did
    threads: int  # torch's CPU thread count during the measurement
    trustworthy: bool  # the final re-timing agreed with the search (see measure.agree)
    reason: str = ""  # why this algorithm, or why the timing is not trusted
    source: str = "search"  # "search", "benchmark" (the dispatch policy) or "tune" (policy)
    created: str = ""
    # What timing the whole layer as training calls it said (autotune.layer_check): "kept: ..." or
    # "lost: ..." with the times; "" where no layer was checked (a single-problem search).
    layer_check: str = ""
    # Where this entry came from in this process (not stored).
    from_cache: bool = field(default=False, compare=False)

    @property
    def op(self) -> str:
        return self.problem.op

    @property
    def uses_torch(self) -> bool:
        return self.algorithm == VENDOR

    def as_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "from_cache"}
        data["problem"] = problem_to_dict(self.problem)
        data["best_own"] = dataclasses.asdict(self.best_own) if self.best_own else None
        return data

    @classmethod
    def from_dict(cls, data: object) -> Entry:
        """Parse and type-check a stored record; EntryFormatError names the first bad field."""
        if not isinstance(data, dict):
            raise EntryFormatError("an entry must be a JSON object")
        try:
            problem = problem_from_dict(data.get("problem"))
        except AutotuneError as exc:
            raise EntryFormatError(f"field 'problem': {exc}") from None
        own = data.get("best_own")
        if own is not None:
            _check(own, {"algorithm": str, "knobs": dict, "median_ms": float}, "best_own.")
            own = OwnKernel(algorithm=own["algorithm"], knobs=own["knobs"], median_ms=float(own["median_ms"]))
        _check(data, _FIELD_TYPES, "")
        values = {name: data[name] for name in _FIELD_TYPES if name in data}
        for name in ("median_ms", "p20_ms", "p80_ms", "vendor_ms"):
            if values.get(name) is not None:
                values[name] = float(values[name])
        return cls(problem=problem, best_own=own, **values)


# Stored fields and their JSON types; a type in a tuple with None may be null. `float` accepts
# integers too (JSON writes 2.0 as 2 in some tools).
_FIELD_TYPES: dict[str, object] = {
    "device": dict, "versions": dict, "algorithm": str, "knobs": dict, "kernel_hashes": dict,
    "median_ms": float, "p20_ms": float, "p80_ms": float, "vendor_ms": (float, None), "trials": dict,
    "threads": int, "trustworthy": bool, "reason": (str,), "source": (str,), "created": (str,),
    "valid_configs": (int,), "stopped": (str,), "layer_check": (str,),
}
_OPTIONAL = {"reason", "source", "created", "valid_configs", "stopped", "layer_check"}


def _check(data: dict, types: dict, prefix: str) -> None:
    for name, expected in types.items():
        if name not in data:
            if name in _OPTIONAL:
                continue
            raise EntryFormatError(f"field '{prefix}{name}' is missing")
        allowed = expected if isinstance(expected, tuple) else (expected,)
        if not any(_is(data[name], t) for t in allowed):
            names = " or ".join("null" if t is None else t.__name__ for t in allowed)
            raise EntryFormatError(f"field '{prefix}{name}' should be {names}, got {data[name]!r:.40}")


def _is(value: object, expected: object) -> bool:
    if expected is None:
        return value is None
    if isinstance(value, bool):  # bool is an int in Python, never in our records
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    return isinstance(value, expected)  # type: ignore[arg-type]


def stamp() -> str:
    """Now, as Entry.created."""
    return time.strftime(CREATED_FORMAT)


def newer(a: Entry, b: Entry | None) -> bool:
    """Whether `a` should replace `b` when caches merge: b missing, or a created later (an entry
    without a readable date counts as oldest)."""
    return b is None or _when(a) > _when(b)


def _when(entry: Entry) -> datetime:
    try:
        return datetime.strptime(entry.created, CREATED_FORMAT)
    except ValueError:
        return datetime.fromtimestamp(0).astimezone()
