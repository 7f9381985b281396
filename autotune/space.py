"""Knobs: what a kernel lets the tuner choose.

A `Space` is a tuple of categorical `Param`s (Optuna samples each by name); a `Config` is one
point in it plus the algorithm's name. Spaces are data, read from `search_spaces/*.toml` with
the standard library's safe TOML parser, so they can be edited without touching code:

    [conv2d.im2col_gemm]
    batch_chunk = [1, 4, 16, 64]
    gemm_order = ["nk", "kn"]
"""

from __future__ import annotations

import itertools
import json
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from autotune.errors import SearchSpaceError

Value = int | float | str | bool


@dataclass(frozen=True, kw_only=True)
class Param:
    """One knob and the values it may take (ordered as written in the file)."""

    name: str
    values: tuple[Value, ...]


@dataclass(frozen=True, kw_only=True)
class Space:
    params: tuple[Param, ...] = ()

    def __iter__(self) -> Iterator[Param]:
        return iter(self.params)

    def size(self) -> int:
        total = 1
        for param in self.params:
            total *= len(param.values)
        return total

    def configs(self) -> Iterator[dict[str, Value]]:
        """Every point of the space (the exhaustive grid), constraints not yet applied."""
        names = [p.name for p in self.params]
        for values in itertools.product(*(p.values for p in self.params)):
            yield dict(zip(names, values, strict=True))


@dataclass(frozen=True, kw_only=True)
class Config:
    """An algorithm and its knob values; hashable, with a stable text key."""

    algorithm: str
    knobs: tuple[tuple[str, Value], ...] = field(default=())

    @classmethod
    def make(cls, algorithm: str, knobs: Mapping[str, Value] | None = None) -> Config:
        return cls(algorithm=algorithm, knobs=tuple(sorted((knobs or {}).items())))

    def as_dict(self) -> dict[str, Value]:
        return dict(self.knobs)

    def key(self) -> str:
        return json.dumps({"algorithm": self.algorithm, "knobs": self.as_dict()}, sort_keys=True)

    def describe(self) -> str:
        knobs = " ".join(f"{k}={v}" for k, v in self.knobs)
        return f"{self.algorithm} {knobs}".strip()


def load_spaces(path: Path) -> dict[tuple[str, str], Space]:
    """Read one search-space file: tables named `[op.algorithm]`, each knob a list of values."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SearchSpaceError(f"cannot read search-space file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SearchSpaceError(f"search-space file {path} is not valid TOML: {exc}") from None
    spaces: dict[tuple[str, str], Space] = {}
    for op, algorithms in data.items():
        if not isinstance(algorithms, dict):
            raise SearchSpaceError(f"{path}: [{op}] must be a table of algorithms, e.g. [{op}.blocked]")
        for algorithm, knobs in algorithms.items():
            if not isinstance(knobs, dict):
                raise SearchSpaceError(f"{path}: [{op}.{algorithm}] must be a table of knob = [values]")
            params = []
            for name, values in knobs.items():
                if not isinstance(values, list) or not values:
                    raise SearchSpaceError(
                        f"{path}: {op}.{algorithm}.{name} must be a non-empty list of values"
                    )
                if not all(isinstance(v, (int, float, str, bool)) for v in values):
                    raise SearchSpaceError(
                        f"{path}: {op}.{algorithm}.{name} may hold only numbers, strings or booleans"
                    )
                if len(set(map(repr, values))) != len(values):
                    raise SearchSpaceError(f"{path}: {op}.{algorithm}.{name} lists a value twice")
                params.append(Param(name=name, values=tuple(values)))
            spaces[(op, algorithm)] = Space(params=tuple(params))
    return spaces
