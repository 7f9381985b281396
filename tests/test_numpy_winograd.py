"""Winograd F(2x2,3x3) and F(4x4,3x3): numerics against float64 per tile size, and its rules."""

import pytest

from autotune import registry
from autotune.measure import Status, check_candidate
from autotune.problem import Conv2dProblem

FWD = registry.get("conv2d", "winograd", "cpu")
BWD = registry.get("conv2d_bwd_data", "winograd", "cpu")
LAYERS = [
    Conv2dProblem(n=4, c=6, h=14, w=14, k=16, r=3, s=3, padding=1),
    Conv2dProblem(n=2, c=3, h=11, w=9, k=5, r=3, s=3),  # odd sizes: partial tiles at the edges
    Conv2dProblem(n=1, c=16, h=7, w=7, k=8, r=3, s=3, padding=2),
]


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("problem", LAYERS, ids=lambda p: p.slug())
@pytest.mark.parametrize("spec", [FWD, BWD], ids=lambda s: s.op)
def test_winograd_correctness(spec, problem, dtype, tile):
    problem = Conv2dProblem(**{**problem.__dict__, "op": spec.op, "dtype": dtype})
    for seed in (0, 1):  # fresh random inputs: the same function on any valid input
        outcome = check_candidate(problem, spec, {"tile": tile}, device="cpu", seed=seed)
        assert outcome.status is Status.OK, outcome.message


def test_winograd_rules():
    assert FWD.supports(Conv2dProblem(n=1, c=1, h=8, w=8, k=1, r=5, s=5)) is not None
    assert FWD.supports(Conv2dProblem(n=1, c=1, h=8, w=8, k=1, r=3, s=3, stride=2)) is not None
    assert FWD.supports(Conv2dProblem(n=1, c=1, h=8, w=8, k=1, r=3, s=3, dilation=2)) is not None
    half = Conv2dProblem(n=1, c=1, h=8, w=8, k=1, r=3, s=3, dtype="float16")
    assert FWD.check(half, {"tile": 4}) is not None and FWD.check(half, {"tile": 2}) is None
    assert "tile" in FWD.check(LAYERS[0], {"tile": 3})


def test_winograd_is_searched_for_3x3_layers():
    problem = LAYERS[0]
    assert "winograd" in {s.algorithm for s in registry.kernels_for(problem, "cpu")}
    assert "winograd" not in {s.algorithm for s in registry.kernels_for(
        Conv2dProblem(n=1, c=1, h=28, w=28, k=6, r=5, s=5), "cpu")}
