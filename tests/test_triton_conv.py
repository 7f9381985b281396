"""Triton convolutions: every op, algorithm and loop order against float64, on tiny shapes.

On a machine without CUDA the kernels run in Triton's interpreter (CPU tensors), which must be
chosen before the kernels are imported; with CUDA they run for real.
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
from autotune.problem import Conv2dProblem  # noqa: E402
from kernels import triton_conv  # noqa: E402
from kernels.triton_tiles import is_interpreted  # noqa: E402

if DEVICE == "cpu" and not is_interpreted(triton_conv._conv_fwd_kernel):
    pytest.skip("kernels.triton_conv was imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FWD = registry.get("conv2d", "implicit_gemm", "cuda")
DIRECT = registry.get("conv2d", "direct", "cuda")
BWD_DATA = registry.get("conv2d_bwd_data", "implicit_gemm", "cuda")
BWD_WEIGHT = registry.get("conv2d_bwd_weight", "implicit_gemm", "cuda")
DOT_SMALL = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 2}

# Tiny shapes, each exercising part of the geometry: plain; stride + padding; dilation + padding
# with a non-square image; LeNet's first layer (1 channel, 6 filters, 5x5, pad 2) scaled down.
PLAIN = Conv2dProblem(n=2, c=3, h=7, w=7, k=5, r=3, s=3)
STRIDED = Conv2dProblem(n=2, c=3, h=9, w=8, k=5, r=3, s=3, stride=2, padding=1)
DILATED = Conv2dProblem(n=1, c=4, h=9, w=7, k=3, r=3, s=2, padding=2, dilation=2)
LENET1 = Conv2dProblem(n=1, c=1, h=8, w=8, k=6, r=5, s=5, padding=2)
GEOMETRIES = {"plain": PLAIN, "strided": STRIDED, "dilated": DILATED, "lenet1": LENET1}


def assert_correct(spec, problem, knobs):
    problem = problem.with_op(spec.op)
    """Run into a NaN-poisoned output and compare with the float64 reference."""
    outcome = check_candidate(problem, spec, knobs, device=DEVICE, seed=1)
    assert outcome.status is Status.OK, f"{problem.describe()} {knobs}: {outcome.status} {outcome.message}"


@pytest.mark.parametrize("loop_order", triton_conv.LOOP_ORDERS)
@pytest.mark.parametrize("geometry", ["strided", "dilated", "lenet1"])
def test_conv2d_implicit_gemm_correctness_loop_orders(loop_order, geometry):
    assert_correct(FWD, GEOMETRIES[geometry], {**DOT_SMALL, "loop_order": loop_order})


@pytest.mark.parametrize("loop_order", triton_conv.LOOP_ORDERS)
@pytest.mark.parametrize("geometry", ["plain", "strided", "dilated"])
def test_conv2d_bwd_data_implicit_gemm_correctness_loop_orders(loop_order, geometry):
    assert_correct(BWD_DATA, GEOMETRIES[geometry], {**DOT_SMALL, "loop_order": loop_order})


@pytest.mark.parametrize("geometry,split_k", [("strided", 1), ("strided", 3), ("lenet1", 1), ("lenet1", 4)])
def test_conv2d_bwd_weight_implicit_gemm_correctness_split_k(geometry, split_k):
    knobs = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 2, "split_k": split_k}
    assert_correct(BWD_WEIGHT, GEOMETRIES[geometry], knobs)


# N·P·Q = 2·12·12 = 288. split_k 8 with BLOCK_K 16 rounds each split up to 48, so it launches 6
# programs per tile, not 8: the last split is not empty-and-skipped but never launched at all.
SPLIT_ROUNDING = Conv2dProblem(n=2, c=2, h=12, w=12, k=3, r=3, s=3, padding=1)


def test_bwd_weight_split_k_that_rounds_to_fewer_programs_is_correct():
    knobs = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 2, "split_k": 8}
    problem = SPLIT_ROUNDING.with_op("conv2d_bwd_weight")
    assert BWD_WEIGHT.check(problem, BWD_WEIGHT.full_knobs(problem, knobs)) is None
    assert_correct(BWD_WEIGHT, SPLIT_ROUNDING, knobs)


def test_bwd_weight_split_k_that_launches_what_half_of_it_does_is_a_duplicate():
    from kernels.triton_tiles import splits_launched

    problem = SPLIT_ROUNDING.with_op("conv2d_bwd_weight")
    assert splits_launched(288, 32, 16) == splits_launched(288, 64, 16) == 18
    knobs = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 2}
    assert BWD_WEIGHT.check(problem, BWD_WEIGHT.full_knobs(problem, {**knobs, "split_k": 32})) is None
    assert "duplicate" in BWD_WEIGHT.check(problem, BWD_WEIGHT.full_knobs(problem, {**knobs, "split_k": 64}))


@pytest.mark.parametrize("batch", [16, 256])
def test_bwd_weight_default_fills_the_gpu_on_lenet_conv1(batch):
    """One program per output tile left an H100 idle (LeNet conv1's grad weight: 3.6 ms against
    cuDNN's 0.05 ms with split_k 4); the default splits N·P·Q until there are ~2 programs per SM."""
    from kernels.triton_tiles import TARGET_PROGRAMS, splits_launched

    problem = Conv2dProblem(n=batch, c=1, h=28, w=28, k=6, r=5, s=5, padding=2).with_op("conv2d_bwd_weight")
    knobs = BWD_WEIGHT.default_config(problem).as_dict()
    assert BWD_WEIGHT.check(problem, knobs) is None
    npq = batch * 28 * 28
    assert splits_launched(npq, knobs["split_k"], knobs["BLOCK_K"]) >= min(TARGET_PROGRAMS // 2, npq // (4 * knobs["BLOCK_K"]))


def test_seeds_are_admitted_and_shrunk_to_the_problem():
    """KernelSpec.seeds: every seed of a LeNet layer and a ResNet layer passes check() (LeNet's 6
    filters get 16-wide tiles, not the seed's 64)."""
    resnet = Conv2dProblem(n=32, c=64, h=56, w=56, k=64, r=3, s=3, padding=1)
    for base in (Conv2dProblem(n=64, c=6, h=14, w=14, k=16, r=5, s=5), resnet):
        for spec in (FWD, BWD_DATA, BWD_WEIGHT):
            problem = base.with_op(spec.op)
            seeds = spec.seed_configs(problem)
            assert len(seeds) >= 4
            for config in seeds:
                assert spec.check(problem, config.as_dict()) is None, config


@pytest.mark.parametrize("geometry", ["plain", "strided", "dilated", "lenet1"])
def test_conv2d_direct_correctness(geometry):
    # The interpreter's cost grows with programs x taps, so tiles are small but not tiny.
    knobs = {"BLOCK_FILTERS": 4, "BLOCK_ROWS": 4, "BLOCK_COLS": 4, "num_warps": 1}
    assert_correct(DIRECT, GEOMETRIES[geometry], knobs)


@pytest.mark.parametrize("spec", [FWD, DIRECT, BWD_DATA, BWD_WEIGHT], ids=lambda s: f"{s.op}.{s.algorithm}")
def test_conv_correctness_float16_default_knobs(spec):
    problem = Conv2dProblem(n=2, c=3, h=8, w=8, k=6, r=3, s=3, padding=1, dtype="float16")
    assert_correct(spec, problem, {})


@pytest.mark.parametrize("spec", [FWD, BWD_DATA, BWD_WEIGHT], ids=lambda s: s.op)
def test_conv_correctness_tf32_knob(spec):
    assert_correct(spec, STRIDED, {"input_precision": "tf32"})


@pytest.mark.parametrize("algorithm", ["implicit_gemm", "direct"])
@pytest.mark.parametrize("relu", [False, True])
def test_conv2d_bias_act_correctness(algorithm, relu):
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((2, 3, 9, 9), (4, 3, 3, 3), (4,)))
    y = triton_conv.conv2d_bias_act(*(t.float().to(DEVICE) for t in (x, w, b)), stride=2, padding=1,
                                    relu=relu, algorithm=algorithm)
    expected = torch.nn.functional.conv2d(x, w, b, stride=2, padding=1)
    if relu:
        expected = expected.clamp(min=0)
    torch.testing.assert_close(y.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_conv_correctness_through_measure_evaluate():
    outcome = evaluate(PLAIN, FWD, {}, device=DEVICE, rep_ms=1)
    assert outcome.status is Status.OK, outcome.message


@pytest.mark.parametrize("spec,change,words", [
    (FWD, {"BLOCK_K": 8}, "tl.dot needs"),
    (FWD, {"loop_order": "random"}, "loop_order"),
    (FWD, {"BLOCK_N": 64}, "wider than needed"),
    (FWD, {"loop_order": "taps_outer", "BLOCK_K": 32}, "wider than needed"),
    (BWD_WEIGHT, {"split_k": 512}, "duplicate"),
    (DIRECT, {"BLOCK_ROWS": 3}, "power of two"),
    (DIRECT, {"BLOCK_FILTERS": 1, "BLOCK_ROWS": 1, "BLOCK_COLS": 4, "num_warps": 4}, "idle"),
], ids=lambda v: f"{v.op}.{v.algorithm}" if hasattr(v, "algorithm") else str(v))
# (ids must not hold object addresses: pytest-xdist's workers must collect identical names.)
def test_check_rejects_with_a_reason(spec, change, words):
    problem = Conv2dProblem(n=4, c=3, h=32, w=32, k=6, r=5, s=5).with_op(spec.op)
    reason = spec.check(problem, spec.full_knobs(problem, change))
    assert reason is not None and words in reason, reason


def test_check_limits_shared_memory():
    problem = Conv2dProblem(n=32, c=256, h=56, w=56, k=256, r=3, s=3, padding=1)
    knobs = {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}
    assert "shared memory" in FWD.check(problem, FWD.full_knobs(problem, knobs))


LAYERS = [  # LeNet's convolutions at batch 64 and a ResNet 3x3 layer, in every dtype
    Conv2dProblem(n=64, c=1, h=28, w=28, k=6, r=5, s=5, padding=2),
    Conv2dProblem(n=64, c=3, h=32, w=32, k=6, r=5, s=5),
    Conv2dProblem(n=64, c=6, h=14, w=14, k=16, r=5, s=5),
    Conv2dProblem(n=32, c=64, h=56, w=56, k=64, r=3, s=3, padding=1, dtype="float16"),
    Conv2dProblem(n=1, c=1, h=5, w=5, k=1, r=5, s=5, dtype="bfloat16"),
]


@pytest.mark.parametrize("problem", LAYERS, ids=lambda p: p.describe())
def test_defaults_pass_check(problem):
    for spec in (FWD, DIRECT, BWD_DATA, BWD_WEIGHT):
        p = problem.with_op(spec.op)
        assert spec.check(p, spec.full_knobs(p, {})) is None, (spec.op, spec.algorithm)


def test_search_space_knobs_are_default_knobs():
    for spec in (FWD, DIRECT, BWD_DATA, BWD_WEIGHT):
        names = set(spec.defaults(None))
        assert {p.name for p in spec.space} <= names, (spec.op, spec.algorithm)
        assert set(spec.defaults(PLAIN.with_op(spec.op))) == names
        assert spec.space.size() > 1


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("spec", [FWD, DIRECT, BWD_DATA, BWD_WEIGHT], ids=lambda s: f"{s.op}.{s.algorithm}")
def test_conv_correctness_bfloat16_gpu(spec):
    problem = Conv2dProblem(n=8, c=6, h=14, w=14, k=16, r=5, s=5, stride=2, padding=2, dtype="bfloat16")
    assert_correct(spec, problem, {})


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("spec", [FWD, DIRECT, BWD_DATA, BWD_WEIGHT], ids=lambda s: f"{s.op}.{s.algorithm}")
def test_conv_correctness_search_space_sample_gpu(spec):
    """A spread of real configs compile and compute right on LeNet's second layer."""
    import random

    problem = Conv2dProblem(n=64, c=3, h=32, w=32, k=6, r=5, s=5).with_op(spec.op)
    configs = [c for c in spec.space.configs() if spec.check(problem, spec.full_knobs(problem, c)) is None]
    for knobs in random.Random(0).sample(configs, min(8, len(configs))):
        assert_correct(spec, problem, knobs)


@gpu
@pytest.mark.gpu
def test_timing_smoke_gpu():
    problem = Conv2dProblem(n=64, c=6, h=14, w=14, k=16, r=5, s=5)
    outcome = evaluate(problem, FWD, {}, device="cuda")
    assert outcome.status is Status.OK, outcome.message
    assert outcome.measurement.median > 0
