import dataclasses
import json
import multiprocessing
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


def test_clear(tmp_path):
    cache = Cache(tmp_path)
    store(cache)
    assert cache.clear() == 1
    assert cache.entries() == {}
