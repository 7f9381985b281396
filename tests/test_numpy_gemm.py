"""The NumPy GEMM kernels: numerics against the float64 reference, and what check() accepts."""

from __future__ import annotations

import tracemalloc

import pytest

from autotune import registry
from autotune.measure import Status, evaluate, verify
from autotune.problem import GemmProblem
from autotune.reference import empty_output, make_inputs, reference
from kernels.numpy_gemm import BLAS_CALLS, LOOP_ORDERS

TRANSPOSES = [(False, False), (True, False), (False, True), (True, True)]
DTYPES = ["float32", "float64"]
# Tiles that divide none of the dimensions, so every loop ends on a ragged tile.
RAGGED = dict(m=37, n=53, k=71)
RAGGED_TILES = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=8)


def blocked():
    return registry.get("gemm", "blocked", "cpu")


def blas():
    return registry.get("gemm", "blas", "cpu")


def run_and_verify(spec, problem, knobs, seed=0):
    """Run into a NaN-poisoned output (unwritten elements fail) and compare with float64."""
    inputs = make_inputs(problem, seed=seed)
    out = empty_output(problem).fill_(float("nan"))
    result = spec.run(problem, spec.full_knobs(problem, knobs), inputs, out)
    ok, error = verify(problem, result, reference(problem, inputs))
    assert ok, f"{spec.algorithm} {knobs} on {problem.describe()}: relative error {error:.2e}"
    assert result is out, "the kernel must write into `out` and return it"
    return result


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANSPOSES)
def test_blocked_correctness_transposes_ragged(trans_a, trans_b, dtype):
    problem = GemmProblem(**RAGGED, trans_a=trans_a, trans_b=trans_b, dtype=dtype)
    run_and_verify(blocked(), problem, {**RAGGED_TILES, "loop_order": "mnk"})


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
def test_blocked_correctness_each_loop_order(loop_order):
    # Transposed A and B too: the loop order must not depend on the layout being plain.
    for trans_a, trans_b in TRANSPOSES:
        problem = GemmProblem(**RAGGED, trans_a=trans_a, trans_b=trans_b)
        run_and_verify(blocked(), problem, {**RAGGED_TILES, "loop_order": loop_order}, seed=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_correctness_single_tile_larger_than_dims(dtype):
    # Blocks between a dimension and twice it are allowed: one ragged tile per dimension.
    problem = GemmProblem(m=20, n=30, k=40, trans_a=True, dtype=dtype)
    knobs = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "loop_order": "kmn"}
    assert blocked().check(problem, knobs) is None
    run_and_verify(blocked(), problem, knobs)


def test_blocked_correctness_dividing_tiles_and_default_config():
    problem = GemmProblem(m=512, n=256, k=384, trans_b=True)
    run_and_verify(blocked(), problem, {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "loop_order": "nkm"})
    run_and_verify(blocked(), problem, blocked().default_config(problem).as_dict())


@pytest.mark.parametrize("call", BLAS_CALLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANSPOSES)
def test_blas_correctness(trans_a, trans_b, dtype, call):
    problem = GemmProblem(**RAGGED, trans_a=trans_a, trans_b=trans_b, dtype=dtype)
    run_and_verify(blas(), problem, {"call": call})


@pytest.mark.parametrize("call", BLAS_CALLS)
@pytest.mark.parametrize("m,n,k", [(1, 84, 10), (120, 40, 1), (1, 1, 7)])
def test_blas_correctness_vector_and_outer_products(m, n, k, call):
    # A linear layer at batch 1: M=1 (a row times a matrix) and, for its grad weight, K=1 (an
    # outer product, the shape for which np.matmul leaves BLAS and np.dot does not).
    for trans_a, trans_b in TRANSPOSES:
        run_and_verify(blas(), GemmProblem(m=m, n=n, k=k, trans_a=trans_a, trans_b=trans_b), {"call": call})


def test_blas_dot_writes_into_an_output_it_cannot_hand_to_np_dot():
    # np.dot only writes into a C-contiguous out; a strided out (a transposed view) must still be
    # filled, by np.matmul, not refused or left unwritten.
    problem = GemmProblem(m=24, n=16, k=8)
    inputs = make_inputs(problem)
    out = empty_output(GemmProblem(m=16, n=24, k=8)).fill_(float("nan")).t()
    result = blas().run(problem, {"call": "dot"}, inputs, out)
    assert result is out
    assert verify(problem, out, reference(problem, inputs))[0]


def test_blas_call_knob_is_searched_and_checked():
    spec = blas()
    assert spec.space.size() == len(BLAS_CALLS)
    assert spec.check(GemmProblem(m=4, n=4, k=4), {"call": "einsum"}) is not None


def test_blocked_correctness_through_evaluate():
    problem = GemmProblem(m=64, n=48, k=80, trans_a=True, trans_b=True)
    outcome = evaluate(problem, blocked(), {**RAGGED_TILES, "loop_order": "knm"}, device="cpu", rep_ms=1)
    assert outcome.status is Status.OK, outcome.message


def test_blocked_transposes_are_views_not_copies():
    # A copy of op(A) or op(B) would allocate at least one operand's bytes; the kernel may only
    # allocate its BLOCK_M x BLOCK_N scratch tile.
    problem = GemmProblem(m=256, n=256, k=256, trans_a=True, trans_b=True)
    knobs = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "loop_order": "mkn"}
    inputs = make_inputs(problem)
    out = empty_output(problem)
    operand_bytes = inputs[0].numel() * inputs[0].element_size()
    tracemalloc.start()
    try:
        blocked().run(problem, knobs, inputs, out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < operand_bytes // 4, f"peak allocation {peak} B suggests a copy of an operand"


# --- check() and supports() -------------------------------------------------------------------


@pytest.mark.parametrize(
    "knobs,fragment",
    [
        ({"loop_order": "mmk"}, "loop_order"),
        ({"BLOCK_M": 0}, "BLOCK_M must be a positive integer"),
        ({"BLOCK_N": -32}, "BLOCK_N must be a positive integer"),
        ({"BLOCK_K": 32.0}, "BLOCK_K must be a positive integer"),
        ({"BLOCK_K": True}, "BLOCK_K must be a positive integer"),
        ({"BLOCK_M": 256}, "BLOCK_M=256 is at least twice M=100"),
        ({"BLOCK_N": 512}, "BLOCK_N=512 is at least twice N=256"),
    ],
)
def test_blocked_check_rejects(knobs, fragment):
    problem = GemmProblem(m=100, n=256, k=300)
    base = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "loop_order": "mnk"}
    reason = blocked().check(problem, {**base, **knobs})
    assert reason is not None and fragment in reason


def test_blocked_check_accepts_block_just_below_twice_the_dim():
    problem = GemmProblem(m=100, n=256, k=300)
    knobs = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 512, "loop_order": "knm"}
    assert blocked().check(problem, knobs) is None


def test_invalid_config_is_a_result_not_a_crash():
    problem = GemmProblem(m=40, n=40, k=40)
    outcome = evaluate(problem, blocked(), {"BLOCK_M": 1024}, device="cpu")
    assert outcome.status is Status.INVALID
    assert "BLOCK_M=1024" in outcome.message


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_numpy_gemm_refuses_half_precision(dtype):
    problem = GemmProblem(m=8, n=8, k=8, dtype=dtype)
    for spec in (blocked(), blas()):
        assert spec.supports(problem) is not None
    assert {s.algorithm for s in registry.kernels_for(problem, "cpu")}.isdisjoint({"blocked", "blas"})


def test_blocked_space_is_large_and_every_knob_has_a_default():
    spec = blocked()
    assert spec.space.size() >= 300
    assert {p.name for p in spec.space} == set(spec.defaults)
    orders = next(p.values for p in spec.space if p.name == "loop_order")
    assert sorted(orders) == sorted(LOOP_ORDERS)
    # The default is tried first, so it must be valid on the benchmark's problem.
    problem = GemmProblem(m=1024, n=1024, k=1024)
    assert spec.check(problem, spec.default_config(problem).as_dict()) is None


def test_blocked_and_blas_are_registered_for_cpu_gemm():
    names = {s.algorithm for s in registry.kernels_for(GemmProblem(m=64, n=64, k=64), "cpu")}
    assert {"blocked", "blas"} <= names
