"""torch's own op as a candidate: its TF32 knob on a GPU, and the caller's flags left alone."""

import pytest
import torch

from autotune import registry, tuner
from autotune.measure import Status, evaluate
from autotune.problem import Conv2dProblem, GemmProblem

GEMM32 = GemmProblem(m=64, n=48, k=32, dtype="float32")
CONV32 = Conv2dProblem(n=2, c=3, h=10, w=10, k=4, r=3, s=3, padding=1)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _vendor(problem, device):
    return next(s for s in registry.kernels_for(problem, device) if s.algorithm == "vendor")


def _vendor_configs(problem, device):
    specs = registry.kernels_for(problem, device)
    return [c.as_dict() for c in registry.valid_configs(problem, specs) if c.algorithm == "vendor"]


@pytest.fixture
def switches():
    """Sets torch's TF32 switches (matrix products, convolutions) and puts them back after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def set_switches(matmul: bool, conv: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv

    yield set_switches
    set_switches(*saved)


@pytest.fixture
def tf32_on(switches):
    switches(True, True)


@pytest.fixture
def tf32_off(switches):
    switches(False, False)


@pytest.mark.parametrize("problem", [GEMM32, CONV32, CONV32.with_op("conv2d_bwd_data"),
                                     CONV32.with_op("conv2d_bwd_weight")], ids=lambda p: p.op)
def test_a_gpu_search_weighs_torch_in_tf32_as_soon_as_it_may_pick_our_tf32(problem, tf32_on):
    """Our float32 kernels may compute in TF32 (input_precision); torch's op must be measured in
    TF32 too, right after the defaults, or a GPU search compares our TF32 kernel with torch's IEEE
    one (an H200 run: cuBLAS TF32 0.38 ms, IEEE 2.70 ms, our TF32 0.84 ms for a 4096^3 GEMM)."""
    assert _vendor_configs(problem, "cuda") == [{"allow_tf32": False}, {"allow_tf32": True}]
    specs = registry.kernels_for(problem, "cuda")
    valid = registry.valid_configs(problem, specs)
    seeds = tuner._seeds(problem, specs, valid, budget=12)
    assert seeds[0].algorithm == "vendor" and seeds[0].as_dict() == {"allow_tf32": True}
    ours_tf32 = [c for c in valid if c.as_dict().get("input_precision") == "tf32"]
    assert ours_tf32, "the premise: our kernels search TF32 for this problem"


@pytest.mark.parametrize("problem", [GEMM32, CONV32], ids=lambda p: p.op)
def test_a_cpu_search_measures_torch_once(problem):
    """The TF32 flags change nothing on a CPU: the knob is pinned to its default there."""
    assert [p.name for p in _vendor(problem, "cpu").space] == []
    assert _vendor_configs(problem, "cpu") == [{"allow_tf32": False}]
    assert registry.get(problem.op, "vendor", "cpu").space.size() == 1
    specs = registry.kernels_for(problem, "cpu")
    valid = registry.valid_configs(problem, specs)
    assert all(c.algorithm != "vendor" for c in tuner._seeds(problem, specs, valid, budget=12))


def test_tf32_is_refused_for_other_dtypes():
    half = GemmProblem(m=64, n=48, k=32, dtype="float16")
    assert _vendor_configs(half, "cuda") == [{"allow_tf32": False}]
    assert "float32" in _vendor(half, "cuda").check(half, {"allow_tf32": True})


def test_the_cpu_ignores_the_knob_and_the_flags_stay():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    spec = _vendor(GEMM32, "cpu")
    outcome = evaluate(GEMM32, spec, {"allow_tf32": True}, device="cpu", seed=1)
    assert outcome.status == Status.OK, outcome.error
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("allow", [False, True])
def test_torch_in_tf32_passes_verification_and_restores_the_flags(allow):
    """Both settings verify against float64 (TF32 under the TF32 tolerance) and the user's global
    flags are what they were afterwards, whatever the config set while torch's op launched."""
    for problem in (GEMM32, CONV32, CONV32.with_op("conv2d_bwd_weight")):
        spec = _vendor(problem, "cuda")
        for user in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = user
            outcome = evaluate(problem, spec, {"allow_tf32": allow}, device="cuda", seed=3)
            assert outcome.status == Status.OK, outcome.error
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (user, user)


@cuda
@pytest.mark.gpu
def test_an_untuned_layer_runs_torch_as_the_user_set_it_up():
    """No cache entry: the layer's torch op runs under the user's TF32 flags, exactly as plain
    torch (cuDNN's default is TF32 for convolutions), and leaves them as they were."""
    import warnings

    from autotune import nn as tuned_nn

    x = torch.randn(8, 3, 16, 16, device="cuda", requires_grad=True)
    w = torch.randn(5, 3, 3, 3, device="cuda", requires_grad=True)
    b = torch.randn(5, device="cuda", requires_grad=True)
    for user in (False, True):
        torch.backends.cudnn.allow_tf32 = user
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = tuned_nn.conv2d(x, w, b, padding=1)
        ours_grads = torch.autograd.grad(ours.square().sum(), (x, w, b))
        plain = torch.nn.functional.conv2d(x, w, b, padding=1)
        plain_grads = torch.autograd.grad(plain.square().sum(), (x, w, b))
        assert torch.equal(ours, plain)
        assert all(torch.equal(a, c) for a, c in zip(ours_grads, plain_grads, strict=True))
        assert torch.backends.cudnn.allow_tf32 is user


def test_a_layer_on_torch_ops_is_torch_own_unless_a_gpu_choice_pins_tf32():
    """torch_only (torch's native layer, no autograd.Function) loses the chosen TF32 knobs for
    the gradients, so on a GPU it is used only where no tuned choice pins them."""
    from autotune.dispatch import Choice
    from autotune.nn import _Plan

    spec = _vendor(CONV32, "cpu")
    tuned = Choice(spec=spec, knobs={"allow_tf32": True}, source="cache")
    untuned = Choice(spec=spec, knobs={}, source="default")

    def plan(choice, on_gpu):
        return _Plan(generation=0, forward=CONV32, grad_input=None, grad_weight=CONV32.with_op("conv2d_bwd_weight"),
                     forward_choice=choice, grad_input_choice=None, grad_weight_choice=choice, on_gpu=on_gpu)

    assert plan(tuned, on_gpu=False).torch_only and plan(untuned, on_gpu=True).torch_only
    assert not plan(tuned, on_gpu=True).torch_only
    assert plan(tuned, on_gpu=True).torch_gradient_knobs == {"allow_tf32": True}
    assert plan(untuned, on_gpu=True).torch_gradient_knobs == {}


@cuda
@pytest.mark.gpu
def test_a_benchmarked_gpu_layer_matches_float64_and_leaves_the_flags():
    """The benchmark policy on a GPU: every product chosen among torch (IEEE and TF32) and our
    Triton kernels, then the layer's forward and gradients within TF32 tolerance of float64, and
    the user's TF32 flags as they were (whatever the chosen kernels set while they ran)."""
    import warnings

    import autotune
    from autotune import nn as tuned_nn

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    x = torch.randn(16, 6, 14, 14, device="cuda", requires_grad=True)
    w = torch.randn(16, 6, 5, 5, device="cuda", requires_grad=True)
    b = torch.randn(16, device="cuda", requires_grad=True)
    dy = torch.randn(16, 16, 10, 10, device="cuda")
    with autotune.policy("benchmark"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # the first call chooses, the second runs the held plan
            y = tuned_nn.conv2d(x, w, b)
            grads = torch.autograd.grad(y, (x, w, b), dy)
    ref_in = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = torch.nn.functional.conv2d(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, dy.double())
    for got, want in zip((y, *grads), (ref, *ref_grads), strict=True):
        assert ((got.double() - want).norm() / want.norm()).item() < 2e-3
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, True)


@pytest.mark.parametrize("problem", [GEMM32, CONV32, CONV32.with_op("conv2d_bwd_weight")], ids=lambda p: p.op)
def test_where_torch_forbids_tf32_no_kernel_searches_it(problem, tf32_off):
    """With torch's switch off, neither our kernels' input_precision nor torch's allow_tf32 is
    searched in TF32, and every default is IEEE."""
    specs = registry.kernels_for(problem, "cuda")
    valid = registry.valid_configs(problem, specs)
    assert len({c.algorithm for c in valid}) >= 2  # ours and torch's
    tf32 = [c for c in valid if c.as_dict().get("input_precision") == "tf32" or c.as_dict().get("allow_tf32")]
    assert not tf32
    defaults = [s.default_config(problem).as_dict() for s in specs]
    assert all(d.get("input_precision", "ieee") == "ieee" and not d.get("allow_tf32") for d in defaults)
    assert not [c for c in tuner._seeds(problem, specs, valid, budget=12) if c not in valid]


def test_each_op_kind_follows_its_own_switch(switches):
    """Matrix products follow torch.backends.cuda.matmul.allow_tf32 (off by default in torch),
    convolutions torch.backends.cudnn.allow_tf32 (on by default), as torch's own ops do."""
    switches(False, True)

    def searches_tf32(problem):
        return any(c.as_dict().get("allow_tf32") for c in
                   registry.valid_configs(problem, registry.kernels_for(problem, "cuda")))

    assert not searches_tf32(GEMM32) and searches_tf32(CONV32)
    switches(True, False)
    assert searches_tf32(GEMM32) and not searches_tf32(CONV32)


def test_the_gpu_fingerprint_names_the_tf32_policy(monkeypatch, switches):
    """A result tuned with TF32 allowed is cached (and its study named) apart from one tuned
    without: the policy is part of the GPU's fingerprint and of the machine tag."""
    from autotune import device

    monkeypatch.setattr(device, "_fingerprint", lambda kind, threads: {"kind": kind, "gpu": "test GPU"})
    switches(False, True)
    off = device.fingerprint("cuda"), device.machine_tag("cuda")
    switches(True, True)
    on = device.fingerprint("cuda"), device.machine_tag("cuda")
    assert off[0]["tf32"].startswith("matmul ieee") and on[0]["tf32"].startswith("matmul tf32")
    assert off[0] != on[0] and off[1] != on[1]
