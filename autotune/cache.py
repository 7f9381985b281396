"""The results store: tuned winners per shape, in one human-readable JSON file.

An entry is found by a key built from everything that makes a timing valid: op, problem, dtype,
device fingerprint, library versions and SCHEMA_VERSION. The entry also records the winning
kernel's source hash; when that kernel's code changes, the entry no longer matches. Writes take a
file lock, merge with what is on disk and replace the file atomically (temp file + os.replace),
so two tuners writing at once lose nothing and a reader never sees half a file. A corrupt,
truncated or foreign file is a warning and a miss, never a crash; it is moved aside (not
deleted) before the next write.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from autotune.errors import CacheWriteError
from autotune.problem import Problem, problem_to_dict

SCHEMA_VERSION = 1
CACHE_FILE = "autotune_cache.json"
FORMAT = "kernel-autotune cache"


class CacheWarning(UserWarning):
    """The cache file could not be used; it is treated as empty."""


def default_dir() -> Path:
    return Path(os.environ.get("AUTOTUNE_CACHE_DIR") or "results")


def entry_key(problem: Problem, fingerprint: dict, versions: dict) -> str:
    identity = {
        "schema": SCHEMA_VERSION,
        "problem": problem_to_dict(problem),  # op and dtype are fields of the problem
        "device": fingerprint,
        "versions": versions,
    }
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True, kw_only=True)
class Entry:
    """A cached winner. `record` is the JSON object as stored."""

    key: str
    record: dict

    @property
    def algorithm(self) -> str:
        return self.record["algorithm"]

    @property
    def knobs(self) -> dict:
        return self.record["knobs"]


class Cache:
    def __init__(self, directory: Path | str | None = None):
        self.dir = Path(directory) if directory is not None else default_dir()
        self.path = self.dir / CACHE_FILE
        self._lock_path = self.dir / (CACHE_FILE + ".lock")

    # Reading -----------------------------------------------------------------------------
    def entries(self) -> dict[str, dict]:
        """All entries on disk; {} (with a warning) when the file is missing or unusable."""
        data = self._read()
        return data["entries"] if data else {}

    def find(self, problem: Problem, device_kind: str, source_hashes: dict[str, str]) -> Entry | None:
        """lookup() for this machine's fingerprint and library versions."""
        from autotune import device

        return self.lookup(problem, device.fingerprint(device_kind), device.versions(), source_hashes)

    def save(self, problem: Problem, device_kind: str, **fields) -> Entry:
        """store() for this machine's fingerprint and library versions."""
        from autotune import device

        return self.store(problem, device.fingerprint(device_kind), device.versions(), **fields)

    def lookup(self, problem: Problem, fingerprint: dict, versions: dict,
               source_hashes: dict[str, str]) -> Entry | None:
        """The entry for this problem on this machine, if its kernel's code is unchanged.

        source_hashes maps algorithm -> current source hash of its kernel module.
        """
        key = entry_key(problem, fingerprint, versions)
        record = self.entries().get(key)
        if not isinstance(record, dict) or not _well_formed(record):
            return None
        if source_hashes.get(record["algorithm"]) != record["kernel_hash"]:
            return None
        return Entry(key=key, record=record)

    def _read(self) -> dict | None:
        try:
            text = self.path.read_text()
        except (FileNotFoundError, NotADirectoryError):  # no cache yet (or no folder for one)
            return None
        except OSError as exc:
            warnings.warn(f"cannot read cache {self.path}: {exc.strerror}; tuning as if empty",
                          CacheWarning, stacklevel=3)
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            warnings.warn(f"cache {self.path} is corrupt ({exc.msg} at line {exc.lineno}); "
                          "treating it as empty", CacheWarning, stacklevel=3)
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            warnings.warn(f"{self.path} is not a kernel-autotune cache; treating it as empty",
                          CacheWarning, stacklevel=3)
            return None
        if data.get("schema_version") != SCHEMA_VERSION:
            warnings.warn(f"cache {self.path} has schema {data.get('schema_version')}, this version "
                          f"reads {SCHEMA_VERSION}; treating it as empty", CacheWarning, stacklevel=3)
            return None
        return data

    # Writing -----------------------------------------------------------------------------
    def store(self, problem: Problem, fingerprint: dict, versions: dict, *, algorithm: str,
              knobs: dict, kernel_hash: str, result: dict) -> Entry:
        """Merge one winner into the file under the lock; atomic replace."""
        key = entry_key(problem, fingerprint, versions)
        record = {
            "op": problem.op,
            "problem": problem_to_dict(problem),
            "dtype": problem.dtype,
            "device": fingerprint,
            "versions": versions,
            "kernel_hash": kernel_hash,
            "algorithm": algorithm,
            "knobs": knobs,
            **result,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self._lock_path)):
                data = self._read()
                if data is None:
                    self._set_aside_unusable()
                    data = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "entries": {}}
                data["entries"][key] = record
                self._atomic_write(data)
        except OSError as exc:
            raise CacheWriteError(f"cannot write the cache {self.path}: {exc.strerror or exc}; "
                                  "fix its permissions or pass another --cache-dir") from None
        return Entry(key=key, record=record)

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        with FileLock(str(self._lock_path)):
            count = len(self.entries())
            if self.path.exists():
                self._atomic_write({"format": FORMAT, "schema_version": SCHEMA_VERSION, "entries": {}})
        return count

    def _set_aside_unusable(self) -> None:
        """Keep a corrupt or foreign file for the user to inspect instead of overwriting it."""
        if self.path.exists():
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
            os.replace(self.path, aside)
            warnings.warn(f"moved the unusable cache to {aside}", CacheWarning, stacklevel=3)

    def _atomic_write(self, data: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".cache-", suffix=".json", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _well_formed(record: dict) -> bool:
    return (
        isinstance(record.get("algorithm"), str)
        and isinstance(record.get("knobs"), dict)
        and isinstance(record.get("kernel_hash"), str)
    )
