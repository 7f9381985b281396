"""Run-time selection: memo -> cache -> policy, like cudnn.benchmark but persistent."""

import warnings

import pytest
import torch

import autotune
from autotune import dispatch, registry
from autotune.cache import Cache
from autotune.problem import Conv2dProblem, GemmProblem

PROBLEM = Conv2dProblem(n=2, c=3, h=10, w=10, k=4, r=3, s=3, padding=1)


def test_cached_policy_miss_uses_default_and_warns_once():
    with pytest.warns(UserWarning, match="no tuned kernel cached"):
        first = dispatch.select(PROBLEM, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = dispatch.select(PROBLEM, "cpu")
    assert first.source == "default" and second is first
    assert dispatch.stats() == {"default": 1, "memo": 1}


def _until_trusted(select, attempts=3):
    """The noise guard may refuse a timing on a busy machine (then nothing is cached, with a
    warning this test expects); a new process would measure again, so the test does too."""
    for _ in range(attempts):
        dispatch.reset()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*too busy to tell", category=UserWarning)
            choice = select()
        if not dispatch.stats().get("untrusted"):
            return choice
    pytest.fail(f"the noise guard refused {attempts} measurements in a row")


def test_benchmark_policy_writes_cache_and_next_process_reads_it(tmp_path):
    with autotune.policy("benchmark", cache_dir=tmp_path):
        choice = _until_trusted(lambda: dispatch.select(PROBLEM, "cpu"))
        assert choice.source == "benchmark" and choice.median_ms > 0
        assert dispatch.select(PROBLEM, "cpu") is choice  # memo
    entry = Cache(tmp_path).find(PROBLEM, "cpu", [choice.spec])
    assert entry is not None and entry.algorithm == choice.spec.algorithm
    assert entry.source == "benchmark" and entry.trustworthy
    dispatch.reset()  # as if a new process started
    with autotune.policy("benchmark", cache_dir=tmp_path):
        again = dispatch.select(PROBLEM, "cpu")
    assert again.source == "cache" and again.spec.algorithm == choice.spec.algorithm
    assert dispatch.stats() == {"cache": 1}


def test_benchmark_choice_is_correct_on_real_tensors(tmp_path):
    x = torch.randn(PROBLEM.x_shape)
    w = torch.randn(PROBLEM.w_shape)
    with autotune.policy("benchmark", cache_dir=tmp_path):
        y = autotune.conv2d(x, w, padding=1)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)


def test_tune_policy_runs_a_short_search(tmp_path):
    problem = GemmProblem(m=8, n=6, k=5)
    with autotune.policy("tune", cache_dir=tmp_path):
        choice = _until_trusted(lambda: dispatch.select(problem, "cpu"))
    assert choice.source == "tune"
    assert Cache(tmp_path).entries()


def test_policy_context_restores_and_rejects_unknown():
    autotune.set_policy("cached")
    with autotune.policy("benchmark"):
        assert autotune.get_policy() == "benchmark"
    assert autotune.get_policy() == "cached"
    with pytest.raises(autotune.AutotuneError, match="unknown policy"):
        autotune.set_policy("fastest")


def test_default_choice_upgrades_when_policy_changes(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dispatch.select(PROBLEM, "cpu").source == "default"
    with autotune.policy("benchmark", cache_dir=tmp_path):
        assert dispatch.select(PROBLEM, "cpu").source == "benchmark"


def test_importing_autotune_does_not_import_optuna():
    import subprocess
    import sys

    code = "import sys, autotune; assert 'optuna' not in sys.modules, 'optuna imported'"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.parametrize("algorithm", ["vendor", "im2col_gemm"])
def test_dispatch_follows_the_cached_entry(tmp_path, algorithm):
    """The decision is the entry's (made once, by autotune.decision); dispatch does not re-decide,
    so `autotune show` tells exactly what training runs."""
    from autotune import device
    from autotune.entry import Entry

    specs = registry.kernels_for(PROBLEM, "cpu")
    spec = next(s for s in specs if s.algorithm == algorithm)
    Cache(tmp_path).store(Entry(
        problem=PROBLEM, device=device.fingerprint("cpu"), versions=device.versions(), algorithm=algorithm,
        knobs=spec.default_config(PROBLEM).as_dict(), kernel_hashes={s.algorithm: s.source_hash for s in specs},
        median_ms=0.1, p20_ms=0.1, p80_ms=0.1, vendor_ms=0.5, best_own=None, trials={"ok": 2}, threads=2,
        trustworthy=True))
    with autotune.policy("cached", cache_dir=tmp_path):
        choice = dispatch.select(PROBLEM, "cpu")
    assert choice.source == "cache" and choice.spec.algorithm == algorithm


def test_unwritable_cache_warns_and_training_goes_on(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with autotune.policy("benchmark", cache_dir=blocker / "results"):
            choice = _until_trusted(lambda: dispatch.select(PROBLEM, "cpu"))
    assert choice.source == "benchmark"
    assert any("kept for this process only" in str(w.message) for w in seen)


def test_quiet_policy_collects_uncached_shapes_instead_of_warning(tmp_path):
    import warnings

    import autotune
    from autotune import dispatch

    problem = autotune.parse_problem("gemm", "8x8x8")
    dispatch.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a per-shape warning would fail the test
        with autotune.policy("cached", cache_dir=tmp_path, quiet=True):
            dispatch.select(problem, "cpu")
            dispatch.select(problem, "cpu")
            assert autotune.uncached() == [(problem, "cpu")]
    dispatch.reset()
    assert autotune.uncached() == []
