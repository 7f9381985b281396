"""NumPy CPU convolutions (kernels/numpy_conv.py) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from autotune import registry
from autotune.measure import verify
from autotune.problem import CONV_OPS, Conv2dProblem
from autotune.reference import empty_output, make_inputs, reference

SPECS = [spec for spec in registry.load(("numpy",)) if spec.module == "numpy_conv"]
SPEC_IDS = [f"{spec.op}-{spec.algorithm}" for spec in SPECS]

# (n, c, h, w, k, r, s, stride, padding, dilation): odd sizes, non-square filters, and every
# geometry knob, alone and together.
GEOMETRIES = [
    (2, 3, 9, 8, 4, 3, 2, 1, 0, 1),
    (3, 2, 11, 10, 5, 3, 3, 2, 1, 1),
    (2, 2, 12, 11, 3, 3, 2, 1, 2, 2),
    (2, 3, 13, 12, 4, 2, 3, 3, 1, 2),
    (1, 1, 7, 7, 2, 5, 5, 1, 2, 1),
    (2, 2, 10, 9, 3, 3, 3, 2, 4, 1),  # padding wider than the filter reach
]
PLAIN = dict(n=2, c=3, h=8, w=9, k=4, r=3, s=3)


def _problem(op, geometry, dtype="float32"):
    n, c, h, w, k, r, s, stride, padding, dilation = geometry
    return Conv2dProblem(op=op, n=n, c=c, h=h, w=w, k=k, r=r, s=s, stride=stride,
                         padding=padding, dilation=dilation, dtype=dtype)


def _run_and_verify(spec, problem, knobs, seed=0):
    """Run on fresh inputs into a NaN-poisoned output; return (ok, error)."""
    inputs = make_inputs(problem, seed=seed)
    out = empty_output(problem)
    out.fill_(float("nan"))
    result = spec.run(problem, spec.full_knobs(problem, knobs), inputs, out)
    assert isinstance(result, torch.Tensor)
    assert result.dtype == out.dtype
    return verify(problem, result, reference(problem, inputs))


def _knob_variants(spec, problem):
    """The default config, then for each value of each knob the first valid config of the space
    that uses it (some values need a partner, e.g. layout=wide needs gemm_order=w_by_cols)."""
    yield {}
    grid = list(spec.space.configs())
    for param in spec.space:
        for value in param.values:
            for knobs in grid:
                if knobs[param.name] == value and spec.check(problem, spec.full_knobs(problem, knobs)) is None:
                    yield knobs
                    break


def test_registry_lists_required_algorithms():
    names = {(spec.op, spec.algorithm) for spec in SPECS}
    for algorithm in ("im2col_gemm", "per_tap", "tensordot", "fft", "einsum"):
        assert ("conv2d", algorithm) in names
    for op in ("conv2d_bwd_data", "conv2d_bwd_weight"):
        assert sum(o == op for o, _ in names) >= 2


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_search_space_knobs_are_default_keys_and_valid(spec):
    defaults = spec.default_config(None).as_dict()
    problem = Conv2dProblem(op=spec.op, **PLAIN)
    assert spec.check(problem, spec.full_knobs(problem, {})) is None
    for param in spec.space:
        assert param.name in defaults
    # Every value of the space can be used on a plain problem.
    used = {(name, value) for knobs in _knob_variants(spec, problem) for name, value in knobs.items()}
    for param in spec.space:
        for value in param.values:
            assert (param.name, value) in used, f"{param.name}={value!r} is never valid"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_every_knob_value_correctness(spec, dtype):
    """Each knob value at least once, on a plain and on a strided/padded/dilated problem."""
    problems = [Conv2dProblem(op=spec.op, dtype=dtype, **PLAIN),
                _problem(spec.op, (3, 2, 11, 10, 3, 3, 2, 2, 1, 2), dtype)]
    tried = 0
    for problem in problems:
        if spec.supports(problem) is not None:
            continue
        for knobs in _knob_variants(spec, problem):
            ok, error = _run_and_verify(spec, problem, knobs)
            assert ok, f"{problem.describe()} {knobs}: relative error {error:.2e}"
            tried += 1
    assert tried > 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_geometry_correctness(spec, geometry, dtype):
    problem = _problem(spec.op, geometry, dtype)
    reason = spec.supports(problem)
    if reason is not None:
        pytest.skip(reason)
    assert spec.check(problem, spec.full_knobs(problem, {})) is None, "the default config must be valid"
    ok, error = _run_and_verify(spec, problem, {}, seed=1)
    assert ok, f"{problem.describe()}: relative error {error:.2e}"


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_ragged_chunks_correctness(spec):
    """Blocks that do not divide the batch or the column count (the last block is short)."""
    knobs = spec.default_config(None).as_dict()
    small = {name: value for name, value in (("batch_chunk", 2), ("col_chunk", 37)) if name in knobs}
    if not small:
        pytest.skip("no blocking knob")
    problem = Conv2dProblem(op=spec.op, n=5, c=2, h=9, w=7, k=3, r=3, s=2, padding=1)
    for layout in ("exact", "wide") if "layout" in knobs else (None,):
        variant = small | ({"layout": layout} if layout else {})
        ok, error = _run_and_verify(spec, problem, variant)
        assert ok, f"{variant}: relative error {error:.2e}"


def test_wrong_answer_is_detected_correctness():
    """The harness above can fail: a kernel that skips one image is caught."""
    spec = registry.get("conv2d", "im2col_gemm", "cpu")
    problem = Conv2dProblem(op="conv2d", **PLAIN)
    inputs = make_inputs(problem)
    out = empty_output(problem)
    out.fill_(float("nan"))
    result = spec.run(problem, spec.full_knobs(problem, {}), inputs, out)
    result[0] = 0.0
    ok, _ = verify(problem, result, reference(problem, inputs))
    assert not ok


@pytest.mark.parametrize("op", CONV_OPS)
def test_every_algorithm_supports_the_plain_case(op):
    for spec in SPECS:
        if spec.op == op:
            assert spec.supports(Conv2dProblem(op=op, **PLAIN)) is None, spec.algorithm


@pytest.mark.parametrize("op, algorithm", [
    ("conv2d", "per_tap"), ("conv2d", "fft"), ("conv2d_bwd_data", "per_tap"),
    ("conv2d_bwd_weight", "per_tap"), ("conv2d_bwd_weight", "fft"),
])
def test_stride_one_algorithms_refuse_strides(op, algorithm):
    spec = registry.get(op, algorithm, "cpu")
    reason = spec.supports(Conv2dProblem(op=op, stride=2, **PLAIN))
    assert isinstance(reason, str) and "stride" in reason


@pytest.mark.parametrize("op, algorithm, knobs, stride, words", [
    ("conv2d", "im2col_gemm", {"gemm_order": "diagonal"}, 1, "gemm_order"),
    ("conv2d", "im2col_gemm", {"batch_chunk": 0}, 1, "batch_chunk"),
    ("conv2d", "im2col_gemm", {"batch_chunk": 2.5}, 1, "batch_chunk"),
    ("conv2d", "im2col_gemm", {"layout": "wide"}, 2, "stride 1"),
    ("conv2d", "im2col_gemm", {"layout": "wide", "gemm_order": "cols_by_w"}, 1, "w_by_cols"),
    ("conv2d", "per_tap", {"loop_order": "sideways"}, 1, "loop_order"),
    ("conv2d", "per_tap", {"col_chunk": -1}, 1, "col_chunk"),
    ("conv2d", "tensordot", {"batch_chunk": True}, 1, "batch_chunk"),
    ("conv2d", "einsum", {"optimize": "optimal"}, 1, "optimize"),
    ("conv2d", "fft", {"fft_size": "prime"}, 1, "fft_size"),
    ("conv2d", "fft", {"contraction": "loop"}, 1, "contraction"),
    ("conv2d_bwd_data", "gemm_col2im", {"layout": "wide"}, 2, "stride 1"),
    ("conv2d_bwd_data", "direct_transpose", {"layout": "wide", "gemm_order": "cols_by_w"}, 2, "w_by_cols"),
    ("conv2d_bwd_data", "per_tap", {"col_chunk": 0}, 1, "col_chunk"),
    ("conv2d_bwd_weight", "im2col_gemm", {"gemm_order": "w_by_cols"}, 1, "gemm_order"),
    ("conv2d_bwd_weight", "per_tap", {"col_chunk": "big"}, 1, "col_chunk"),
])
def test_check_rejects_invalid_configs(op, algorithm, knobs, stride, words):
    spec = registry.get(op, algorithm, "cpu")
    problem = Conv2dProblem(op=op, stride=stride, **PLAIN)
    reason = spec.check(problem, spec.full_knobs(problem, knobs))
    assert isinstance(reason, str) and words in reason


def test_bwd_data_transpose_runs_stride_one_so_wide_is_valid_for_strides():
    """direct_transpose's inner conv is always stride 1, so its wide layout stays valid."""
    spec = registry.get("conv2d_bwd_data", "direct_transpose", "cpu")
    problem = Conv2dProblem(op="conv2d_bwd_data", stride=2, **PLAIN)
    assert spec.check(problem, spec.full_knobs(problem, {"layout": "wide"})) is None


@pytest.mark.parametrize("geometry", GEOMETRIES[:4])
def test_correctness_bias_epilogue_matches_conv_plus_bias(geometry):
    """Kernels with bias_epilogue add a layer's bias in their last copy: every layout and GEMM
    order gives conv(x, w) + b, per output channel."""
    fused = [spec for spec in SPECS if spec.bias_epilogue]
    assert fused, "im2col_gemm fuses the bias"
    problem = _problem("conv2d", geometry)
    x, w = make_inputs(problem, seed=3)
    b = torch.randn(problem.k, dtype=torch.float32)
    expected = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), problem.stride,
                                          problem.padding, problem.dilation)
    for spec in fused:
        for knobs in _knob_variants(spec, problem):
            full = spec.full_knobs(problem, knobs)
            if spec.check(problem, full) is not None:
                continue
            out = empty_output(problem).fill_(float("nan"))
            spec.run(problem, full, (x, w, b), out)
            ok, error = verify(problem, out, expected)
            assert ok, (spec.algorithm, full, error)


def test_correctness_kept_workspaces_never_leak_between_calls():
    """Buffers kept between calls (padded copies, patch matrices, widened dy) give the right answer
    on the next call with other inputs, and when another geometry with buffers of the same shape
    but a different zero region (a different filter size) ran in between."""
    same_buffers = [  # the batch, P and W + 2·pad agree; the filter widths (and so Q) differ
        (2, 3, 10, 10, 4, 3, 3, 1, 1, 1),
        (2, 3, 10, 10, 4, 3, 5, 1, 1, 1),
    ]
    kept = [spec for spec in SPECS if spec.algorithm in ("im2col_gemm", "direct_transpose")]
    for spec in kept:
        problems = [_problem(spec.op, g) for g in same_buffers]
        for knobs in _knob_variants(spec, problems[0]):
            for seed in range(3):
                for problem in problems:
                    if spec.check(problem, spec.full_knobs(problem, knobs)) is None:
                        ok, error = _run_and_verify(spec, problem, knobs, seed=seed)
                        assert ok, (spec.op, spec.algorithm, knobs, problem.describe(), seed, error)
