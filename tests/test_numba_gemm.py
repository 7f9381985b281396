"""The compiled small GEMM (kernels/numba_gemm.py): numerics against float64 in every layout,
refusal of tensors that do not make the problem, and its place among the CPU GEMM candidates."""

from __future__ import annotations

import pytest
import torch
from test_numpy_gemm import TRANSPOSES, run_and_verify

from autotune import registry
from autotune.measure import Status, evaluate, verify
from autotune.problem import GemmProblem
from autotune.reference import empty_output, make_inputs, reference
from kernels.numba_gemm import UNROLLS


def loop_nest():
    return registry.get("gemm", "loop_nest", "cpu")


@pytest.mark.parametrize("unroll", UNROLLS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("trans_a,trans_b", TRANSPOSES)
def test_loop_nest_correctness_every_layout(trans_a, trans_b, dtype, unroll):
    # Ragged sizes: k and n not multiples of the unroll, so every remainder loop runs; each
    # layout takes its own loop form (rows, dots, or the plain loop for Aᵀ·Bᵀ).
    for m, n, k in [(37, 53, 71), (1, 84, 10), (120, 40, 1), (3, 2, 5), (1, 1, 1)]:
        problem = GemmProblem(m=m, n=n, k=k, trans_a=trans_a, trans_b=trans_b, dtype=dtype)
        run_and_verify(loop_nest(), problem, {"unroll": unroll})


def test_loop_nest_reads_strided_views_by_their_strides():
    # A column slice of a wider tensor: rows are not packed, so the strides (not the shape)
    # say where each element is; reading it as packed would give a wrong product.
    problem = GemmProblem(m=6, n=5, k=4)
    wide_a, wide_b = torch.randn(6, 9, dtype=torch.float32), torch.randn(4, 11, dtype=torch.float32)
    a, b = wide_a[:, 2:6], wide_b[:, 3:8]
    out = empty_output(problem).fill_(float("nan"))
    for unroll in UNROLLS:
        loop_nest().run(problem, {"unroll": unroll}, (a, b), out)
        assert torch.allclose(out, a @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["shape", "dtype", "strided out"])
def test_loop_nest_refuses_tensors_that_do_not_make_the_problem(bad):
    # The loops address raw memory: a mismatch must be an exception, never a read or write
    # outside the tensors. `out` keeps its NaNs: nothing was written.
    problem = GemmProblem(m=4, n=6, k=5)
    a, b = make_inputs(problem)
    out = empty_output(problem).fill_(float("nan"))
    if bad == "shape":
        b = torch.randn(7, 6)
    elif bad == "dtype":
        b = b.double()
    else:
        out = torch.full((6, 4), float("nan")).t()
    with pytest.raises(ValueError, match="compiled GEMM"):
        loop_nest().run(problem, {"unroll": 4}, (a, b), out)
    assert out.isnan().all()


def test_loop_nest_is_a_cpu_candidate_with_a_checked_knob():
    problem = GemmProblem(m=1, n=84, k=10)
    assert "loop_nest" in {s.algorithm for s in registry.kernels_for(problem, "cpu")}
    spec = loop_nest()
    assert spec.space.size() == len(UNROLLS)
    assert spec.check(problem, {"unroll": 3}) is not None
    assert loop_nest().supports(GemmProblem(m=2, n=2, k=2, dtype="bfloat16")) is not None
    outcome = evaluate(problem, spec, {"unroll": 4}, device="cpu", rep_ms=1)
    assert outcome.status is Status.OK, outcome.message


def test_loop_nest_matches_a_linear_layer_at_batch_one():
    # The shape it exists for: y = x·Wᵀ for one image (LeNet's fc1), and its gradients.
    x, w, dy = torch.randn(1, 400), torch.randn(120, 400), torch.randn(1, 120)
    cases = [(GemmProblem(m=1, n=120, k=400, trans_b=True), (x, w)),  # forward
             (GemmProblem(m=1, n=400, k=120), (dy, w)),  # grad input
             (GemmProblem(m=120, n=400, k=1, trans_a=True), (dy, x))]  # grad weight: an outer product
    for problem, inputs in cases:
        out = empty_output(problem)
        loop_nest().run(problem, {"unroll": 4}, inputs, out)
        assert verify(problem, out, reference(problem, inputs))[0], problem.describe()
