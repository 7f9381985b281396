import dataclasses
import json
import multiprocessing
import os
import warnings

import pytest

from autotune.cache import CACHE_FILE, SCHEMA_VERSION, Cache, CacheWarning, entry_key
from autotune.entry import Entry, OwnKernel
from autotune.problem import Conv2dProblem, GemmProblem

FP = {"kind": "cpu", "cpu": "Test CPU", "cores": 2, "threads": 2, "blas": "openblas"}
VERSIONS = {"numpy": "2.0", "torch": "2.14.1", "python": "3.11"}
PROBLEM = Conv2dProblem(n=64, c=3, h=32, w=32, k=6, r=5, s=5)


def make_entry(problem=PROBLEM, fp=FP, versions=VERSIONS, algorithm="im2col_gemm", kernel_hash="abc",
               trustworthy=True):
    return Entry(problem=problem, device=fp, versions=versions, algorithm=algorithm,
                 knobs={"batch_chunk": 16}, kernel_hashes={algorithm: kernel_hash, "vendor": "v1"},
                 median_ms=0.5, p20_ms=0.45, p80_ms=0.55, vendor_ms=0.6,
                 best_own=OwnKernel(algorithm=algorithm, knobs={"batch_chunk": 16}, median_ms=0.5),
                 trials={"ok": 3}, threads=2, trustworthy=trustworthy)


def store(cache, **change):
    return cache.store(make_entry(**change))


def test_hit_after_store(tmp_path):
    cache = Cache(tmp_path)
    store(cache)
    entry = cache.lookup(PROBLEM, FP, VERSIONS, {"im2col_gemm": "abc"})
    assert entry is not None and entry.algorithm == "im2col_gemm" and entry.knobs == {"batch_chunk": 16}
    assert entry.from_cache and entry.created  # stamped when stored
    assert dataclasses.replace(entry, created="") == make_entry()  # every field survives the round trip
    data = json.loads((tmp_path / CACHE_FILE).read_text())  # human-readable JSON on disk
    assert data["schema_version"] == SCHEMA_VERSION and len(data["entries"]) == 1


def test_untrustworthy_entry_is_never_stored(tmp_path):
    cache = Cache(tmp_path)
    with pytest.raises(ValueError, match="untrustworthy"):
        store(cache, trustworthy=False)
    assert not (tmp_path / CACHE_FILE).exists()


@pytest.mark.parametrize("change", [
    {"problem": dataclasses.replace(PROBLEM, op="conv2d_bwd_data")},
    {"problem": dataclasses.replace(PROBLEM, n=32)},
    {"problem": dataclasses.replace(PROBLEM, dtype="float64")},
    {"problem": dataclasses.replace(PROBLEM, padding=1)},
    {"fp": {**FP, "cpu": "Other CPU"}},
    {"versions": {**VERSIONS, "torch": "2.11.0"}},
    {"hashes": {"im2col_gemm": "changed"}},
    {"hashes": {"im2col_gemm": "abc", "vendor": "changed"}},  # a kernel it was compared with changed
    {"hashes": {"vendor": "v1"}},  # the chosen kernel is not registered (or not asked for)
])
def test_miss_on_each_key_field(tmp_path, change):
    cache = Cache(tmp_path)
    store(cache)
    problem = change.get("problem", PROBLEM)
    hit = cache.lookup(problem, change.get("fp", FP), change.get("versions", VERSIONS),
                       change.get("hashes", {"im2col_gemm": "abc"}))
    assert hit is None


def test_schema_version_is_part_of_the_key(tmp_path, monkeypatch):
    cache = Cache(tmp_path)
    store(cache)
    old = entry_key(PROBLEM, FP, VERSIONS)
    monkeypatch.setattr("autotune.cache.SCHEMA_VERSION", SCHEMA_VERSION + 1)
    assert entry_key(PROBLEM, FP, VERSIONS) != old


@pytest.mark.parametrize("content", [
    '{"format": "kernel-autotune cache", "schema_version": 1, "entries": {',  # truncated
    "\x00\x01garbage",
    '{"some": "other tool"}',
    '[1, 2, 3]',
    '{"format": "kernel-autotune cache", "schema_version": 99, "entries": {}}',
])
def test_corrupt_or_foreign_file_is_a_warning_and_a_miss(tmp_path, content):
    (tmp_path / CACHE_FILE).write_text(content)
    cache = Cache(tmp_path)
    with pytest.warns(CacheWarning):
        assert cache.lookup(PROBLEM, FP, VERSIONS, {"im2col_gemm": "abc"}) is None
    # Writing afterwards keeps the unusable file aside instead of destroying it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        store(cache)
        assert cache.lookup(PROBLEM, FP, VERSIONS, {"im2col_gemm": "abc"}) is not None
    kept = list(tmp_path.glob(CACHE_FILE + ".unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text() == content


@pytest.mark.parametrize("field, value", [
    ("knobs", "not a dict"), ("median_ms", "0.5"), ("device", "cpu"), ("trustworthy", "yes"),
    ("threads", 2.5), ("vendor_ms", -1), ("best_own", {"algorithm": "x"}), ("problem", {"op": "conv2d"}),
])
def test_entry_with_wrong_types_is_a_warning_and_a_miss(tmp_path, field, value):
    cache = Cache(tmp_path)
    store(cache)
    data = json.loads((tmp_path / CACHE_FILE).read_text())
    key = next(iter(data["entries"]))
    data["entries"][key][field] = value
    (tmp_path / CACHE_FILE).write_text(json.dumps(data))
    with pytest.warns(CacheWarning, match=field):
        assert cache.lookup(PROBLEM, FP, VERSIONS, {"im2col_gemm": "abc"}) is None


def _writer(directory: str, index: int, count: int) -> None:
    cache = Cache(directory)
    for j in range(count):
        store(cache, problem=GemmProblem(m=index + 1, n=j + 1, k=7))


def test_two_writers_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), i, 15)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    entries = Cache(tmp_path).entries()
    assert len(entries) == 30
    assert not list(tmp_path.glob(".cache-*"))  # no temp files left behind


def test_clear_moves_the_file_aside_and_drops_the_studies(tmp_path):
    cache = Cache(tmp_path)
    store(cache)
    (tmp_path / "studies.db").write_text("x")
    removed, aside = cache.clear()
    assert removed == 1 and aside.exists() and json.loads(aside.read_text())["entries"]
    assert cache.entries() == {} and not (tmp_path / "studies.db").exists()
    store(cache)
    (tmp_path / "studies.db").write_text("x")
    removed, second = cache.clear(keep_studies=True)
    assert second != aside and aside.exists() and (tmp_path / "studies.db").exists()


def test_clear_never_destroys_a_newer_schema_file(tmp_path):
    newer = '{"format": "kernel-autotune cache", "schema_version": 99, "entries": {"k": {}}}'
    (tmp_path / CACHE_FILE).write_text(newer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        removed, aside = Cache(tmp_path).clear()
    assert removed == 0 and aside.read_text() == newer


def test_files_follow_the_umask_and_stale_temp_files_go(tmp_path):
    import os

    (tmp_path / ".cache-left-by-a-killed-writer.json").write_text("{")
    old = os.umask(0o002)
    try:
        store(Cache(tmp_path))
    finally:
        os.umask(old)
    assert (tmp_path / CACHE_FILE).stat().st_mode & 0o777 == 0o664  # group-shareable, not 0600
    assert not list(tmp_path.glob(".cache-*"))


def test_a_held_lock_times_out_with_a_clear_error(tmp_path, monkeypatch):
    from filelock import FileLock


    holder = FileLock(str(tmp_path / (CACHE_FILE + ".lock")))
    ctx = multiprocessing.get_context("spawn")
    with holder:  # a lock held by another process (filelock is re-entrant within one)
        p = ctx.Process(target=_store_one, args=(str(tmp_path),))
        p.start()
        p.join(timeout=60)
    assert p.exitcode == 3


def _store_one(directory):
    import autotune.cache as cache_module
    from autotune.errors import CacheWriteError

    cache_module.LOCK_TIMEOUT_S = 0.2
    try:
        store(Cache(directory))
    except CacheWriteError as exc:
        raise SystemExit(3 if "held the cache lock" in str(exc) else 4) from None


def test_set_aside_names_never_collide(tmp_path):
    for _ in range(3):
        (tmp_path / CACHE_FILE).write_text("corrupt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CacheWarning)
            store(Cache(tmp_path))
            (tmp_path / CACHE_FILE).write_text("corrupt")
            store(Cache(tmp_path))
    assert len(list(tmp_path.glob(CACHE_FILE + ".unreadable-*"))) == 6


def test_cached_knobs_the_kernel_rejects_are_a_miss(tmp_path):
    from autotune import registry
    from autotune.problem import GemmProblem

    problem = GemmProblem(m=64, n=64, k=64)
    specs = registry.kernels_for(problem, "cpu")
    blocked = next(s for s in specs if s.algorithm == "blocked")
    from autotune import device

    bad = {**blocked.default_config(problem).as_dict(), "BLOCK_M": 1024}  # tiles past twice the size
    assert blocked.check(problem, bad) is not None
    Cache(tmp_path).store(Entry(problem=problem, device=device.fingerprint("cpu"), versions=device.versions(),
                                algorithm="blocked", knobs=bad,
                                kernel_hashes={s.algorithm: s.source_hash for s in specs}, median_ms=1.0,
                                p20_ms=1.0, p80_ms=1.0, vendor_ms=2.0, best_own=None, trials={}, threads=1,
                                trustworthy=True))
    with pytest.warns(CacheWarning, match="rejected by the kernel"):
        assert Cache(tmp_path).find(problem, "cpu", specs) is None


def _keep_writing(directory: str, done) -> None:
    cache = Cache(directory)
    for j in range(10_000):
        store(cache, problem=GemmProblem(m=1, n=j + 1, k=7))
        done.value = j + 1


def test_a_writer_killed_at_random_points_loses_no_committed_entry(tmp_path):
    """kill -9 a writer mid-stream, several times: the file always loads, every store that
    returned is there, and the next write clears the killed writer's temp file."""
    import random
    import signal
    import time

    ctx = multiprocessing.get_context("spawn")
    rng = random.Random(0)
    for _ in range(4):
        done = ctx.Value("i", 0)
        p = ctx.Process(target=_keep_writing, args=(str(tmp_path), done))
        p.start()
        deadline = time.monotonic() + 60
        while done.value < 3 and time.monotonic() < deadline:  # let it start writing
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(p.pid, signal.SIGKILL)
        p.join(timeout=30)
        committed = done.value
        with warnings.catch_warnings():
            warnings.simplefilter("error", CacheWarning)  # never a corrupt or half-written file
            entries = Cache(tmp_path).entries()
        assert committed >= 3 and len(entries) >= committed
    store(Cache(tmp_path), problem=GemmProblem(m=2, n=2, k=2))
    assert not list(tmp_path.glob(".cache-*"))
