"""Run-time selection: memo -> cache -> policy, like cudnn.benchmark but persistent."""

import warnings

import pytest
import torch

import autotune
from autotune import dispatch
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


def test_benchmark_policy_writes_cache_and_next_process_reads_it(tmp_path):
    with autotune.policy("benchmark", cache_dir=tmp_path):
        choice = dispatch.select(PROBLEM, "cpu")
        assert choice.source == "benchmark" and choice.median_ms > 0
        assert dispatch.select(PROBLEM, "cpu") is choice  # memo
    entry = Cache(tmp_path).find(PROBLEM, "cpu", {choice.spec.algorithm: choice.spec.source_hash})
    assert entry is not None and entry.algorithm == choice.spec.algorithm
    assert entry.record["source"] == "benchmark"
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
        choice = dispatch.select(problem, "cpu")
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


@pytest.mark.parametrize("ours_ms, vendor_ms, expected", [
    (0.010, 0.015, "vendor"),  # 5 µs saved per call does not pay for leaving torch's op
    (0.100, 0.500, "im2col_gemm"),
])
def test_cached_winner_must_save_more_than_the_layer_overhead(tmp_path, ours_ms, vendor_ms, expected):
    from autotune import registry

    spec = registry.get("conv2d", "im2col_gemm", "cpu")
    Cache(tmp_path).save(PROBLEM, "cpu", algorithm="im2col_gemm", knobs=spec.default_config(PROBLEM).as_dict(),
                         kernel_hash=spec.source_hash, result={"median_ms": ours_ms, "vendor_ms": vendor_ms})
    with autotune.policy("cached", cache_dir=tmp_path):
        choice = dispatch.select(PROBLEM, "cpu")
    assert choice.source == "cache" and choice.spec.algorithm == expected


def test_unwritable_cache_warns_and_training_goes_on(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="kept for this process only"):
        with autotune.policy("benchmark", cache_dir=blocker / "results"):
            choice = dispatch.select(PROBLEM, "cpu")
    assert choice.source == "benchmark"
