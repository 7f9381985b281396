"""autotune.flat_optimizer: the same update as torch's optimizer over each parameter, in a few
whole-buffer ops (real LeNet training steps, compared bit for bit)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import autotune
from autotune.errors import OptimizerError
from autotune.flat_params import FlatAdadelta


def _train(model, optimizer, steps=5, *, zero=None):
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        (zero or optimizer.zero_grad)()
        F.nll_loss(model(x), y).backward()
        optimizer.step()


def _pair():
    torch.manual_seed(0)
    model = autotune.LeNet5()
    return model, copy.deepcopy(model)


def _same_parameters(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.01}, {"maximize": True, "rho": 0.8}])
@pytest.mark.parametrize("foreach", [False, True])
def test_flat_adadelta_is_torchs_update_bit_for_bit(options, foreach):
    ref, flat = _pair()
    reference = torch.optim.Adadelta(ref.parameters(), lr=1.0, foreach=foreach, **options)
    optimizer = autotune.flat_optimizer(flat.parameters(), torch.optim.Adadelta, lr=1.0, fused=False, **options)
    assert isinstance(optimizer, FlatAdadelta) and len(optimizer.param_groups[0]["params"]) == 1
    _train(ref, reference)
    _train(flat, optimizer)
    assert _same_parameters(ref, flat)
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert set(state) == {"step", "square_avg", "acc_delta"} and float(state["step"]) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.01}, {"maximize": True, "rho": 0.8}])
def test_fused_flat_adadelta_is_torchs_update_within_rounding(options, dtype):
    """The one-pass update (the default where Numba is installed) does torch's arithmetic in
    torch's order; rounding differs (torch rounds every op, and may fuse a multiply-add), so
    after 5 LeNet steps parameters and both running averages agree to float rounding."""
    pytest.importorskip("numba")
    ref, flat = _pair()
    ref, flat = ref.to(dtype), flat.to(dtype)
    before = [p.detach().clone() for p in ref.parameters()]
    reference = torch.optim.Adadelta(ref.parameters(), lr=1.0, foreach=False, **options)
    optimizer = autotune.flat_optimizer(flat.parameters(), torch.optim.Adadelta, lr=1.0, **options)
    assert optimizer.fused

    def train(model, opt):
        gen = torch.Generator().manual_seed(3)
        for _ in range(5):
            x, y = torch.randn(8, 1, 28, 28, generator=gen, dtype=dtype), torch.randint(0, 10, (8,), generator=gen)
            opt.zero_grad()
            F.nll_loss(model(x), y).backward()
            opt.step()

    train(ref, reference)
    train(flat, optimizer)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    for p, q in zip(ref.parameters(), flat.parameters(), strict=True):
        torch.testing.assert_close(q, p, **tol)
    assert all(not torch.equal(p, b) for p, b in zip(ref.parameters(), before, strict=True))  # they moved
    ours = optimizer.state[optimizer.param_groups[0]["params"][0]]
    theirs = [reference.state[p] for p in ref.parameters()]
    for key in ("square_avg", "acc_delta"):
        torch.testing.assert_close(ours[key], torch.cat([t[key].reshape(-1) for t in theirs]), **tol)
    assert float(ours["step"]) == 5


@pytest.mark.parametrize("cls, options", [(torch.optim.Adam, {"lr": 1e-3}), (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})])
def test_other_elementwise_optimizers_run_as_torchs_class_over_the_flat_buffer(cls, options):
    ref, flat = _pair()
    _train(ref, cls(ref.parameters(), foreach=False, **options))
    optimizer = autotune.flat_optimizer(flat.parameters(), cls, **options)
    assert isinstance(optimizer, cls) and len(optimizer.param_groups[0]["params"]) == 1
    _train(flat, optimizer)
    for p, q in zip(ref.parameters(), flat.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_gradients_set_to_none_elsewhere_are_taken_back():
    # model.zero_grad() sets .grad to None: autograd then makes new gradient tensors, outside the
    # flat buffer. The step must still see them (and the buffer stays the parameters' storage).
    ref, flat = _pair()
    reference = torch.optim.Adadelta(ref.parameters(), lr=1.0)
    optimizer = autotune.flat_optimizer(flat.parameters(), torch.optim.Adadelta, lr=1.0, fused=False)
    _train(ref, reference)
    _train(flat, optimizer, zero=flat.zero_grad)
    assert _same_parameters(ref, flat)
    buffer = optimizer.param_groups[0]["params"][0]
    assert all(p.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for p in flat.parameters())


def test_scheduler_and_state_dict_work_on_the_flat_model():
    _, model = _pair()
    optimizer = autotune.flat_optimizer(model.parameters(), torch.optim.Adadelta, lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    _train(model, optimizer, steps=1)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.5
    other = autotune.LeNet5()
    model.load_state_dict(other.state_dict())  # copies into the views, the buffer stays shared
    assert _same_parameters(model, other)
    assert model.state_dict().keys() == other.state_dict().keys()


def test_optimizers_whose_update_is_not_elementwise_are_refused():
    model = autotune.LeNet5()
    with pytest.raises(OptimizerError, match="not elementwise"):
        autotune.flat_optimizer(model.parameters(), torch.optim.LBFGS, lr=1.0)
    with pytest.raises(OptimizerError, match="no parameters"):
        autotune.flat_optimizer([], torch.optim.Adadelta, lr=1.0)


def test_step_hooks_and_the_profiler_label_still_work():
    _, model = _pair()
    optimizer = autotune.flat_optimizer(model.parameters(), torch.optim.Adadelta, lr=1.0)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    _train(model, optimizer, steps=2)
    assert calls == ["pre", "post"] * 2
    with torch.profiler.profile() as prof:
        _train(model, optimizer, steps=1)
    assert any(e.key == "Optimizer.step#FlatAdadelta.step" for e in prof.key_averages())


def test_hooks_run_once_after_torch_wrapped_the_base_class():
    # Creating an ordinary Adam makes torch wrap Adam.step (label and hooks) on the class; the
    # flat subclass's step must not run that wrapper on top of its own.
    torch.optim.Adam(autotune.LeNet5().parameters())
    _, model = _pair()
    optimizer = autotune.flat_optimizer(model.parameters(), torch.optim.Adam, lr=1e-3)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    _train(model, optimizer, steps=2)
    assert calls == ["pre", "pre"]
