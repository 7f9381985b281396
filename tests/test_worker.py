"""The isolated evaluator: a crashing or hanging candidate is a result, and the search goes on."""

import sys
import time
from pathlib import Path

import pytest
import torch

from autotune.measure import Outcome, Status
from autotune.problem import GemmProblem
from autotune.worker import IsolatedEvaluator

# The worker imports tests/worker_kernels.py by name; spawn passes sys.path on to it.
TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

PROBLEM = GemmProblem(m=8, n=8, k=8)
VENDOR = ("gemm", "vendor")


@pytest.fixture(scope="module")
def evaluator():
    ev = IsolatedEvaluator(device="cpu", timeout_s=20, kernel_modules=["worker_kernels"], rep_ms=2)
    yield ev
    ev.close()


def test_normal_candidate_is_ok_and_timed(evaluator):
    outcome = evaluator(PROBLEM, VENDOR, {})
    assert outcome.status is Status.OK, outcome.message
    assert outcome.measurement is not None and outcome.measurement.median > 0
    assert outcome.error is not None and outcome.error < 1e-5


def test_registry_spec_object_is_accepted(evaluator):
    from autotune import registry

    outcome = evaluator(PROBLEM, registry.get("gemm", "vendor", "cpu"), {})
    assert outcome.status is Status.OK, outcome.message


def test_process_exit_is_crashed_and_next_candidate_runs(evaluator):
    crashed = evaluator(PROBLEM, ("gemm", "exits"), {})
    assert crashed.status is Status.CRASHED
    assert "exit code 13" in crashed.message
    after = evaluator(PROBLEM, VENDOR, {})
    assert after.status is Status.OK, after.message


def test_hang_is_timeout_and_worker_restarts():
    with IsolatedEvaluator(device="cpu", timeout_s=1.5, kernel_modules=["worker_kernels"], rep_ms=2) as ev:
        assert ev(PROBLEM, VENDOR, {}).status is Status.OK  # the start-up is not the candidate's time
        t0 = time.monotonic()
        outcome = ev(PROBLEM, ("gemm", "sleeps"), {"seconds": 60})
        assert outcome.status is Status.TIMEOUT
        assert time.monotonic() - t0 < 10
        assert ev(PROBLEM, VENDOR, {}).status is Status.OK


def test_unknown_algorithm_is_a_result_not_an_exception(evaluator):
    outcome = evaluator(PROBLEM, ("gemm", "no_such_algorithm"), {})
    assert outcome.status is Status.CRASHED
    assert "no_such_algorithm" in outcome.message


def test_outcome_round_trips_through_plain_data(evaluator):
    outcome = evaluator(PROBLEM, VENDOR, {})
    assert Outcome.from_dict(outcome.as_dict()) == outcome


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_illegal_address_on_gpu_is_crashed_and_next_candidate_runs_gpu():
    with IsolatedEvaluator(device="cuda", timeout_s=60, kernel_modules=["worker_kernels"]) as ev:
        crashed = ev(PROBLEM, ("gemm", "illegal_address"), {})
        assert crashed.status is Status.CRASHED, crashed.message
        assert ev(PROBLEM, VENDOR, {}).status is Status.OK


def test_search_survives_a_crashing_candidate(evaluator):
    """A real Optuna search through the worker: the candidate that kills its process becomes a
    `crashed` trial, and the search still measures torch's op and returns it as the winner."""
    import worker_kernels

    from autotune import registry
    from autotune.tuner import tune

    exits = next(k for k in worker_kernels.KERNELS if k.algorithm == "exits")
    result = tune(PROBLEM, specs=[exits, registry.get("gemm", "vendor", "cpu")], evaluate=evaluator,
                  trials=2, confirm_top=1)
    assert result.counts() == {"ok": 1, "crashed": 1}
    assert result.best.algorithm == "vendor" and result.best_own is None
