"""Triton GEMM: numerics of every knob family against float64, constraints, search space.

On a machine without CUDA the kernels run in Triton's interpreter (CPU tensors, tl.dot in IEEE
fp32), which must be chosen before the kernels are imported; with CUDA they run for real.
"""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from autotune import registry  # noqa: E402
from autotune.measure import Status, check_candidate, evaluate  # noqa: E402
from autotune.problem import GemmProblem  # noqa: E402
from kernels import triton_gemm, triton_tiles  # noqa: E402

if DEVICE == "cpu" and not triton_tiles.is_interpreted(triton_gemm._gemm_kernel):
    pytest.skip("kernels.triton_gemm was imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SPEC = registry.get("gemm", "tiled", "cuda")
# Small tiles so that tiny matrices still have several tiles in every direction.
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 2}


def assert_correct(problem, knobs):
    """Run into a NaN-poisoned output and compare with the float64 reference."""
    outcome = check_candidate(problem, SPEC, knobs, device=DEVICE, seed=1)
    assert outcome.status is Status.OK, f"{problem.describe()} {knobs}: {outcome.status} {outcome.message}"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_gemm_correctness_dtypes_and_transposes(dtype, trans_a, trans_b):
    problem = GemmProblem(m=37, n=29, k=45, trans_a=trans_a, trans_b=trans_b, dtype=dtype)
    assert_correct(problem, SMALL)


@pytest.mark.parametrize("program_order", ["row_major", "column_major"])
@pytest.mark.parametrize("group_m", [1, 3])
def test_gemm_correctness_launch_order(program_order, group_m):
    # 4 x 3 tiles: a group of 3 leaves a partial group at the edge.
    problem = GemmProblem(m=61, n=40, k=20)
    assert_correct(problem, {**SMALL, "GROUP_M": group_m, "program_order": program_order})


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gemm_correctness_split_k(split_k, dtype):
    problem = GemmProblem(m=20, n=18, k=100, dtype=dtype)
    assert_correct(problem, {**SMALL, "split_k": split_k})


def test_gemm_correctness_tf32_knob_and_default_config():
    problem = GemmProblem(m=33, n=17, k=40)
    assert_correct(problem, {**SMALL, "input_precision": "tf32"})
    assert_correct(problem, {})  # the defaults, whatever they are, must be right


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("split_k", [1, 2])
def test_gemm_bias_act_correctness_linear_layer(relu, split_k):
    """y = act(x·Wᵀ + b) on W as stored (the transpose is a stride, not a copy)."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((19, 40), (23, 40), (23,)))
    wt = w.float().to(DEVICE).T
    assert not wt.is_contiguous()
    y = triton_gemm.gemm_bias_act(x.float().to(DEVICE), wt, b.float().to(DEVICE), relu=relu,
                                  knobs={**SPEC.full_knobs(GemmProblem(m=19, n=23, k=40), SMALL),
                                         "split_k": split_k})
    expected = x @ w.T + b
    if relu:
        expected = expected.clamp(min=0)
    torch.testing.assert_close(y.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_gemm_bias_act_correctness_default_knobs_float16():
    gen = torch.Generator().manual_seed(0)
    a, b, bias = (torch.randn(shape, generator=gen) for shape in ((24, 32), (32, 20), (20,)))
    y = triton_gemm.gemm_bias_act(*(t.half().to(DEVICE) for t in (a, b, bias)), relu=True)
    assert y.dtype == torch.float16
    expected = (a.half().double() @ b.half().double() + bias.half().double()).clamp(min=0)
    torch.testing.assert_close(y.cpu().double(), expected, rtol=2e-3, atol=2e-2)


def test_gemm_correctness_through_measure_evaluate():
    outcome = evaluate(GemmProblem(m=20, n=20, k=20), SPEC, SMALL, device=DEVICE, rep_ms=1)
    assert outcome.status is Status.OK, outcome.message


@pytest.mark.parametrize("change,words", [
    ({"BLOCK_K": 8}, "tl.dot needs"),
    ({"BLOCK_M": 48}, "power of two"),
    ({"num_warps": 16}, "too many"),
    ({"num_warps": 3}, "num_warps"),
    ({"program_order": "diagonal"}, "program_order"),
    ({"split_k": 64}, "duplicate"),
])
def test_check_rejects_with_a_reason(change, words):
    problem = GemmProblem(m=64, n=64, k=64)
    reason = SPEC.check(problem, SPEC.full_knobs(problem, {**SMALL, **change}))
    assert reason is not None and words in reason


def test_check_limits_shared_memory_and_registers():
    problem = GemmProblem(m=4096, n=4096, k=4096)
    big = {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 16, "num_stages": 5}
    assert "shared memory" in SPEC.check(problem, SPEC.full_knobs(problem, big))
    spilling = {"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    assert "registers" in SPEC.check(problem, SPEC.full_knobs(problem, spilling))


def test_tf32_is_invalid_for_half_precision():
    problem = GemmProblem(m=64, n=64, k=64, dtype="float16")
    assert "float32" in SPEC.check(problem, SPEC.full_knobs(problem, {"input_precision": "tf32"}))


@pytest.mark.parametrize("problem", [
    GemmProblem(m=1, n=1, k=1), GemmProblem(m=64, n=120, k=400), GemmProblem(m=84, n=10, k=120),
    GemmProblem(m=4096, n=4096, k=4096, dtype="float16"), GemmProblem(m=1024, n=1024, k=1024, dtype="bfloat16"),
])
def test_defaults_pass_check(problem):
    assert SPEC.check(problem, SPEC.full_knobs(problem, {})) is None


def test_search_space_knobs_are_default_knobs():
    names = set(SPEC.defaults(None))
    assert {p.name for p in SPEC.space} <= names
    assert set(SPEC.defaults(GemmProblem(m=8, n=8, k=8))) == names
    assert SPEC.space.size() > 1


def test_float64_is_not_supported():
    assert "float64" in SPEC.supports(GemmProblem(m=8, n=8, k=8, dtype="float64"))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, True)])
def test_gemm_correctness_bfloat16_gpu(trans_a, trans_b):
    problem = GemmProblem(m=300, n=200, k=500, trans_a=trans_a, trans_b=trans_b, dtype="bfloat16")
    assert_correct(problem, {})
    assert_correct(problem, {"split_k": 4, "BLOCK_K": 32, "program_order": "column_major"})


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gemm_correctness_search_space_sample_gpu(dtype):
    """A spread of real configs (big tiles, deep pipelines, tf32) compile and compute right."""
    import random

    problem = GemmProblem(m=513, n=257, k=1031, dtype=dtype)
    configs = [c for c in SPEC.space.configs() if SPEC.check(problem, SPEC.full_knobs(problem, c)) is None]
    for knobs in random.Random(0).sample(configs, 12):
        assert_correct(problem, knobs)


@gpu
@pytest.mark.gpu
def test_timing_smoke_gpu():
    outcome = evaluate(GemmProblem(m=1024, n=1024, k=1024, dtype="float16"), SPEC, {}, device="cuda")
    assert outcome.status is Status.OK, outcome.message
    assert outcome.measurement.median > 0
