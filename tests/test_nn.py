"""Gradients of autotune.conv2d / autotune.linear match torch (the `correctness` tests)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autotune


@pytest.fixture(autouse=True, params=["cached", "benchmark"])
def _policy(request, tmp_path):
    """Each test runs with defaults (vendor) and with benchmark-chosen kernels (often ours)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with autotune.policy(request.param, cache_dir=tmp_path):
            yield


@pytest.mark.parametrize("stride, padding, dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), (3, 1, 2)])
def test_correctness_conv2d_gradcheck_float64(stride, padding, dilation):
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: autotune.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation), (x, w, b)
    )


def test_correctness_linear_gradcheck_float64():
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)  # leading dims flattened
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(autotune.linear, (x, w, b))


@pytest.mark.parametrize("seed", range(4))
def test_correctness_conv2d_float32_matches_functional(seed):
    gen = torch.Generator().manual_seed(seed)
    n, c, k = (int(v) for v in torch.randint(1, 5, (3,), generator=gen))
    r, s = (int(v) for v in torch.randint(1, 4, (2,), generator=gen))
    stride, padding, dilation = (int(v) for v in torch.randint(1, 3, (3,), generator=gen))
    h = w = 7 + seed
    x = torch.randn(n, c, h, w, generator=gen, requires_grad=True)
    wt = torch.randn(k, c, r, s, generator=gen, requires_grad=True)
    b = torch.randn(k, generator=gen, requires_grad=True)
    ours = autotune.conv2d(x, wt, b, stride, padding, dilation)
    dy = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, (x, wt, b), dy)
    ref = F.conv2d(x, wt, b, stride, padding, dilation)
    ref_grads = torch.autograd.grad(ref, (x, wt, b), dy)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-4)


def test_correctness_patched_lenet_matches_torch():
    torch.manual_seed(0)
    model = autotune.LeNet5()
    reference = autotune.LeNet5()
    reference.load_state_dict(model.state_dict())
    autotune.patch(model)
    assert isinstance(model.conv1, autotune.Conv2d) and isinstance(model.fc3, autotune.Linear)
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(8, 1, 28, 28)
    y, y_ref = model(x), reference(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    y.sum().backward()
    y_ref.sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_patch_keeps_parameter_identity_and_skips_unsupported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Linear(4, 2))
    params = list(model.parameters())
    autotune.patch(model)
    assert type(model[0]) is autotune.Conv2d and type(model[1]) is nn.Conv2d
    assert type(model[2]) is autotune.Linear and list(model.parameters()) == params


def test_lenet_problems_cover_every_layer():
    problems = autotune.lenet_problems(16)
    ops = [p.op for p in problems]
    # conv1 needs no grad input (its input is data); conv2 needs all three; 3 fc layers x 3 GEMMs
    assert ops.count("conv2d") == 2 and ops.count("conv2d_bwd_data") == 1
    assert ops.count("conv2d_bwd_weight") == 2 and ops.count("gemm") == 9  # fc1 input needs grad (conv2 output)
    # both max-pools: forward and gradient (their inputs come from convs: they need one)
    assert ops.count("max_pool2d") == 2 and ops.count("max_pool2d_bwd") == 2 and len(ops) == 18


@pytest.mark.parametrize("layer", ["conv2d", "linear"])
def test_choices_are_held_by_the_layer_no_lookup_on_the_hot_path(layer):
    """After the first call, a layer call (forward and backward) does no dispatch lookup at all;
    a policy change makes it resolve its choices again."""
    from autotune import dispatch

    x = torch.randn(2, 3, 8, 8) if layer == "conv2d" else torch.randn(4, 12)
    w = torch.randn(5, 3, 3, 3, requires_grad=True) if layer == "conv2d" else torch.randn(6, 12, requires_grad=True)
    x.requires_grad_(True)

    def step():
        y = autotune.conv2d(x, w, padding=1) if layer == "conv2d" else autotune.linear(x, w)
        y.sum().backward()

    step()
    before = sum(dispatch.stats().values())
    assert before >= 3  # forward, grad input and grad weight were each resolved once
    for _ in range(5):
        step()
    assert sum(dispatch.stats().values()) == before  # not one lookup (memo hits included)
    with autotune.policy(autotune.get_policy()):  # same policy, new generation: resolve again
        step()
        assert sum(dispatch.stats().values()) > before
