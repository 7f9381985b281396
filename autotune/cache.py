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

import dataclasses
import hashlib
import itertools
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

from filelock import FileLock, Timeout

from autotune.entry import Entry, EntryFormatError, newer, stamp
from autotune.errors import CacheWriteError
from autotune.problem import Problem, problem_to_dict

# 2: typed Entry records (kernel_hashes, threads, trustworthy, best_own as an object).
SCHEMA_VERSION = 2
CACHE_FILE = "autotune_cache.json"
STUDIES_FILE = "studies.db"  # the Optuna storage `autotune search` keeps next to the cache
TEMP_PREFIX = ".cache-"
FORMAT = "kernel-autotune cache"


LOCK_TIMEOUT_S = 30.0  # a writer holds the lock for milliseconds; 30 s means a stopped process


def _file_mode() -> int:
    """rw for whoever the umask allows (group-shareable under umask 002): mkstemp's 0600 would
    lock a team's shared cache folder to its first writer."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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


class Cache:
    def __init__(self, directory: Path | str | None = None):
        self.dir = Path(directory) if directory is not None else default_dir()
        self.path = self.dir / CACHE_FILE
        self._lock_path = self.dir / (CACHE_FILE + ".lock")

    # Reading -----------------------------------------------------------------------------
    def entries(self) -> dict[str, Entry]:
        """Every well-formed entry on disk, by key; a malformed one is skipped with one warning
        (it is a miss, never a TypeError later); {} when the file is missing or unusable."""
        data = self._read()
        if not data:
            return {}
        good, bad = {}, []
        for key, record in data["entries"].items():
            try:
                good[key] = Entry.from_dict(record)
            except EntryFormatError as exc:
                bad.append(f"{key[:8]}: {exc}")
        if bad:
            warnings.warn(f"{self.path}: skipped {len(bad)} malformed entr{'y' if len(bad) == 1 else 'ies'} "
                          f"({bad[0]}{'; ...' if len(bad) > 1 else ''}); re-run the search to replace "
                          f"{'it' if len(bad) == 1 else 'them'}", CacheWarning, stacklevel=3)
        return good

    def find(self, problem: Problem, device_kind: str, specs) -> Entry | None:
        """lookup() for this machine's fingerprint (thread count included), library versions and
        the registered kernels `specs`; the chosen knobs are checked again by the kernel's own
        constraints (a hand-edited or stale entry the kernel would reject is a miss, with a warning)."""
        from autotune import device

        hashes = {s.algorithm: s.source_hash for s in specs}
        entry = self.lookup(problem, device.fingerprint(device_kind), device.versions(), hashes)
        if entry is None:
            return None
        spec = next(s for s in specs if s.algorithm == entry.algorithm)
        reason = spec.check(problem, spec.full_knobs(problem, entry.knobs))
        if reason is not None:
            warnings.warn(f"{self.path}: the cached {entry.algorithm} knobs for {problem.describe()} are "
                          f"rejected by the kernel ({reason}); tuning again", CacheWarning, stacklevel=2)
            return None
        return entry

    def neighbours(self, problem: Problem, device_kind: str, limit: int = 4) -> list[Entry]:
        """Cached entries of the same op and dtype on this machine for other shapes, nearest
        first (fewest differing shape fields; batch size counts least): their winners are good
        first guesses for `problem` (warm start)."""
        from autotune import device

        fp, versions = device.fingerprint(device_kind), device.versions()
        here = problem_to_dict(problem)

        def distance(entry: Entry) -> tuple[int, int]:
            there = problem_to_dict(entry.problem)
            differ = [k for k in here if here[k] != there.get(k)]
            return (len([k for k in differ if k not in ("n", "m")]), len(differ))

        near = [e for e in self.entries().values()
                if e.problem.op == problem.op and e.problem.dtype == problem.dtype and e.problem != problem
                and e.device == fp and e.versions == versions]
        return sorted(near, key=distance)[:limit]

    def lookup(self, problem: Problem, fingerprint: dict, versions: dict,
               source_hashes: dict[str, str]) -> Entry | None:
        """The entry for this problem on this machine, if no kernel it compared has changed.

        source_hashes maps algorithm -> current source hash of its kernel module; an entry whose
        chosen algorithm is missing there (not registered, or left out by --algorithms) misses.
        """
        entry = self.entries().get(entry_key(problem, fingerprint, versions))
        if entry is None or entry.algorithm not in source_hashes:
            return None
        for algorithm, stored in entry.kernel_hashes.items():
            if algorithm in source_hashes and source_hashes[algorithm] != stored:
                return None
        return dataclasses.replace(entry, from_cache=True)

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
    def store(self, entry: Entry) -> str:
        """Merge one entry into the file under the lock (atomic replace); returns its key.

        Only trustworthy timings are cached: an untrustworthy entry is refused here too, so no
        caller can write one by mistake.
        """
        if not entry.trustworthy:
            raise ValueError("an untrustworthy timing is never cached")
        key = entry_key(entry.problem, entry.device, entry.versions)
        record = entry.as_dict()
        if not record["created"]:
            record["created"] = stamp()

        def put(entries: dict) -> bool:
            entries[key] = record
            return True

        self._update(put)
        return key

    def merge(self, entries) -> int:
        """Merge entries measured elsewhere (`autotune cache pull`): per key, the newest
        trustworthy entry wins. Returns how many were taken."""
        taken = []

        def put(stored: dict) -> bool:
            for entry in entries:
                key = entry_key(entry.problem, entry.device, entry.versions)
                try:
                    old = Entry.from_dict(stored[key]) if key in stored else None
                except EntryFormatError:
                    old = None
                if entry.trustworthy and newer(entry, old):
                    stored[key] = entry.as_dict()
                    taken.append(key)
            return bool(taken)

        self._update(put)
        return len(taken)

    def _update(self, change) -> None:
        """Under the lock: read the file, change(entries) in place, write it back if it says so."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with self._lock():
                data = self._read()
                if data is None:
                    self._set_aside("unreadable")
                    data = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "entries": {}}
                if change(data["entries"]):
                    self._atomic_write(data)
        except OSError as exc:
            raise CacheWriteError(f"cannot write the cache {self.path}: {exc.strerror or exc}; "
                                  "fix its permissions or pass another --cache-dir") from None

    def _lock(self) -> FileLock:
        return _TimedLock(str(self._lock_path), timeout=LOCK_TIMEOUT_S, mode=_file_mode())

    def clear(self, *, keep_studies: bool = False) -> tuple[int, Path | None]:
        """Empty the cache: the file is moved aside (`.cleared-<time>`), never destroyed (it may
        be a newer version's cache); the Optuna studies next to it go too, unless keep_studies,
        or the next search would resume old trials. Returns (entries moved aside, where)."""
        if not self.dir.is_dir():
            if self.dir.exists():
                raise CacheWriteError(f"--cache-dir {self.dir} is not a folder")
            return 0, None
        try:
            with self._lock():
                data = self._read()
                count = len(data["entries"]) if data else 0
                aside = self._set_aside("cleared", warn=False)
                if not keep_studies:
                    for name in (STUDIES_FILE, STUDIES_FILE + "-journal"):
                        (self.dir / name).unlink(missing_ok=True)
        except OSError as exc:
            raise CacheWriteError(f"cannot clear the cache {self.path}: {exc.strerror or exc}") from None
        return count, aside

    def _set_aside(self, why: str, *, warn: bool = True) -> Path | None:
        """Move the file to a new, unique name (never over an older set-aside) for the user to
        inspect instead of overwriting it."""
        if not self.path.exists():
            return None
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for n in itertools.count():
            aside = self.path.with_name(f"{self.path.name}.{why}-{stamp}" + (f"-{n}" if n else ""))
            if not aside.exists():
                break
        os.replace(self.path, aside)
        if warn:
            warnings.warn(f"moved the unusable cache to {aside}", CacheWarning, stacklevel=4)
        return aside

    def _atomic_write(self, data: dict) -> None:
        """Under the lock: temp file, fsync, rename, fsync the folder (so the rename itself
        survives a crash). Temp files left by a writer killed mid-write are removed first: while
        we hold the lock, no other writer can be using one."""
        for stale in self.dir.glob(TEMP_PREFIX + "*.json"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".json", dir=self.dir)
        try:
            os.fchmod(fd, _file_mode())
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class _TimedLock(FileLock):
    """The cache's file lock; waiting more than LOCK_TIMEOUT_S is an error that says what to do."""

    def __enter__(self):
        try:
            return super().__enter__()
        except Timeout:
            raise CacheWriteError(f"another process has held the cache lock {self.lock_file} for "
                                  f"{LOCK_TIMEOUT_S:.0f} s; if no autotune is running, delete that file") from None


