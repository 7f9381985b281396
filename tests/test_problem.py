import pytest

from autotune.errors import ShapeError, UnknownNameError
from autotune.problem import Conv2dProblem, GemmProblem, parse_problem, problem_from_dict, problem_to_dict


def test_lenet_conv1_defaults():
    p = parse_problem("conv2d", "3x32x32")
    assert (p.n, p.c, p.h, p.w, p.k, p.r, p.s) == (64, 3, 32, 32, 6, 5, 5)
    assert (p.stride, p.padding, p.dilation, p.dtype) == (1, 0, 1, "float32")
    assert (p.p, p.q) == (28, 28)


def test_full_grammar():
    p = parse_problem("conv2d_bwd_data", "8x6x14x14", filters="16x6x5x5", stride=2, padding=1, dilation=1)
    assert (p.n, p.k, p.p, p.q) == (8, 16, 6, 6)
    assert p.input_shapes() == ((8, 16, 6, 6), (16, 6, 5, 5))
    assert p.output_shape() == (8, 6, 14, 14)
    g = parse_problem("gemm", "64x120x400", trans_b=True)
    assert g.input_shapes() == ((64, 400), (120, 400)) and g.output_shape() == (64, 120)


@pytest.mark.parametrize("shape, message", [
    ("3x32", "dimension"),
    ("1x2x3x4x5", "dimension"),
    ("3x0x32", "positive"),
    ("3x-1x32", "positive"),
    ("3xax32", "not an integer"),
    ("3x2.5x32", "not an integer"),
])
def test_bad_shapes(shape, message):
    with pytest.raises(ShapeError, match=message):
        parse_problem("conv2d", shape)


def test_filter_larger_than_padded_input():
    with pytest.raises(ShapeError, match="larger than the padded input"):
        parse_problem("conv2d", "1x4x4", filters="2x5x5")
    assert parse_problem("conv2d", "1x4x4", filters="2x5x5", padding=1).p == 2


def test_channel_mismatch_and_batch_conflict():
    with pytest.raises(ShapeError, match="input channels"):
        parse_problem("conv2d", "3x32x32", filters="6x4x5x5")
    with pytest.raises(ShapeError, match="contradicts"):
        parse_problem("conv2d", "8x3x32x32", batch=16)


def test_unknown_op_and_dtype():
    with pytest.raises(UnknownNameError, match="unknown op"):
        parse_problem("conv3d", "3x32x32")
    with pytest.raises(UnknownNameError, match="dtype"):
        parse_problem("gemm", "2x2x2", dtype="int8")


def test_roundtrip_and_keys():
    p = Conv2dProblem(n=2, c=3, h=8, w=8, k=4, r=3, s=3, padding=1)
    assert problem_from_dict(problem_to_dict(p)) == p
    assert p.key() != p.with_op("conv2d_bwd_data").key()
    g = GemmProblem(m=2, n=3, k=4)
    assert problem_from_dict(problem_to_dict(g)) == g
    with pytest.raises(ShapeError):
        problem_from_dict({"op": "gemm", "m": 1, "n": 1, "k": 1, "evil": "x"})
