"""autotune.layer_check: a layer's choices confirmed by timing the layer as training calls it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autotune
from autotune import device as devices
from autotune import layer_check, registry
from autotune.cache import Cache
from autotune.entry import Entry, OwnKernel
from autotune.measure import pinned_threads
from autotune.nn import layer_calls


def _own_entry(problem, algorithm: str, knobs: dict, *, ms: float, vendor_ms: float) -> Entry:
    """A cached entry that chose our `algorithm`, as a product-by-product search would store it."""
    specs = registry.kernels_for(problem, "cpu")
    spec = next(s for s in specs if s.algorithm == algorithm)
    full = spec.full_knobs(problem, knobs)
    return Entry(problem=problem, device=devices.fingerprint("cpu"), versions=devices.versions(),
                 algorithm=algorithm, knobs=full, kernel_hashes={s.algorithm: s.source_hash for s in specs},
                 median_ms=ms, p20_ms=ms, p80_ms=ms, vendor_ms=vendor_ms,
                 best_own=OwnKernel(algorithm=algorithm, knobs=full, median_ms=ms), trials={"ok": 3},
                 threads=torch.get_num_threads(), trustworthy=True, reason="planted by the test")


def test_a_kernel_that_loses_in_the_layer_is_given_back_to_torch(tmp_path):
    """A cached FFT forward that claims a 10x win is timed in the real layer (forward + backward
    against torch's own layer) and, as it does not win there, re-cached as torch's op."""
    calls = layer_calls(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)), torch.randn(4, 16, 16, 16))
    forward = calls[0].problems[0]
    cache = Cache(tmp_path)
    # One thread, as `--threads 1` searches: torch's 2-thread pool stalls on a busy 2-core machine.
    with pinned_threads(1):
        cache.store(_own_entry(forward, "fft", {"fft_size": "pow2", "contraction": "einsum"}, ms=0.001,
                               vendor_ms=0.01))
        (verdict,) = layer_check.check_layers(calls, cache=cache, device="cpu")
        entry = cache.find(forward, "cpu", registry.kernels_for(forward, "cpu"))
        again = layer_check.check_layers(calls, cache=cache, device="cpu")

    assert verdict.given_back == ("fwd",) and verdict.kept == ()
    assert set(verdict.times) == {"torch", "ours fwd"}
    assert all(m.n >= layer_check.MIN_ROUNDS for m in verdict.times.values())
    assert entry.algorithm == "vendor" and entry.median_ms == 0.01
    assert entry.best_own.algorithm == "fft" and entry.layer_check.startswith("lost: ")
    assert entry.reason.startswith("lost in the layer")
    assert again == []  # nothing of ours is left in the layer: a second check times nothing


ORDER = [(0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,), ()]  # as check_layers builds the plans


def _fake_times(per_round: dict[tuple, list[float]]):
    """A TimePlans that answers from `per_round` (times per round), keyed by the subset of our
    products each plan keeps (plans come largest subset first, as check_layers builds them)."""
    def time_plans(plans):
        assert len(plans) == len(ORDER)
        return [per_round[s] for s in ORDER]
    return time_plans


def test_the_fastest_plan_keeps_ours_where_it_wins_and_gives_back_the_rest(tmp_path):
    """Timings (faked) where forward + grad weight of ours beat torch's layer but our grad input
    slows the layer: forward and grad weight are kept, grad input goes back to torch."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 3))
    calls = layer_calls(model, torch.randn(2, 2, 9, 9))
    second = calls[1]  # its input needs a gradient: all three products
    forward, grad_input, grad_weight = second.problems
    cache = Cache(tmp_path)
    cache.store(_own_entry(forward, "im2col_gemm", {}, ms=0.01, vendor_ms=0.02))
    cache.store(_own_entry(grad_input, "direct_transpose", {}, ms=0.01, vendor_ms=0.02))
    cache.store(_own_entry(grad_weight, "im2col_gemm", {}, ms=0.01, vendor_ms=0.02))
    medians = {(0, 1, 2): 1.3, (0, 1): 1.6, (0, 2): 1.0, (1, 2): 1.7, (0,): 1.4, (1,): 2.1, (2,): 1.5, (): 2.0}
    # A drifting machine: every plan slows down alike from round to round.
    per_round = {s: [m * (1 + 0.5 * (i % 7)) for i in range(50)] for s, m in medians.items()}

    verdicts = layer_check.check_layers([second], cache=cache, device="cpu", time_plans=_fake_times(per_round))

    assert [(v.kept, v.given_back) for v in verdicts] == [(("fwd", "dw"), ("dx",))]
    found = {p.op: cache.find(p, "cpu", registry.kernels_for(p, "cpu")) for p in second.problems}
    assert found["conv2d"].algorithm == "im2col_gemm" and found["conv2d"].layer_check.startswith("kept: ")
    assert found["conv2d_bwd_weight"].algorithm == "im2col_gemm"
    assert found["conv2d_bwd_data"].algorithm == "vendor" and found["conv2d_bwd_data"].best_own

    def must_not_time(plans):
        raise AssertionError("a layer checked before is not timed again")

    assert layer_check.check_layers([second], cache=cache, device="cpu", time_plans=must_not_time) == []


@pytest.mark.parametrize("ours", [
    [1.8, 2.2] * 25,  # as often faster as slower: a coin flip
    [1.98] * 50,  # faster in every round, but by 1%: less than MIN_GAIN
    [1.5] * 28 + [2.5] * 22,  # 25% faster in the median round, yet winning only 28 of 50 rounds
])
def test_a_tie_with_torchs_layer_is_torchs(tmp_path, ours):
    """Unless a plan is clearly faster round by round (paired with torch's layer), nothing of
    ours is kept."""
    calls = layer_calls(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 3)), torch.randn(2, 2, 9, 9))
    second = calls[1]
    cache = Cache(tmp_path)
    for problem, algorithm in zip(second.problems, ("im2col_gemm", "direct_transpose", "im2col_gemm"), strict=True):
        cache.store(_own_entry(problem, algorithm, {}, ms=0.01, vendor_ms=0.02))
    per_round = {s: ([2.0] * 50 if s == () else ours) for s in ORDER}

    (verdict,) = layer_check.check_layers([second], cache=cache, device="cpu", time_plans=_fake_times(per_round))
    assert verdict.kept == () and verdict.given_back == ("fwd", "dx", "dw")


def test_the_benchmark_policy_checks_a_layer_before_it_runs_ours(tmp_path, monkeypatch):
    """With `--policy benchmark`, a layer whose products were just benchmarked with a kernel of
    ours among the choices is checked as training calls it before its first step; what the layer
    then runs is what the check left in the cache."""
    checked = []
    real = layer_check.check_layers
    monkeypatch.setattr(layer_check, "check_layers", lambda calls, **kw: checked.append(calls) or real(calls, **kw))
    model = autotune.patch(nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.Conv2d(6, 16, 5)))
    x = torch.randn(1, 1, 28, 28)
    with pinned_threads(1), autotune.policy("benchmark", cache_dir=tmp_path, quiet=True):
        model(x).sum().backward()
        chosen = dict(autotune.dispatch.chosen())
        entries = list(Cache(tmp_path).entries().values())
    for entry in entries:  # each product runs what its entry says, ours only once confirmed
        assert chosen[entry.problem].spec.algorithm == entry.algorithm
        if entry.algorithm != "vendor":
            assert entry.layer_check.startswith("kept: ")
        if entry.layer_check.startswith("lost: "):
            assert entry.algorithm == "vendor" and entry.best_own is not None
    # One check per layer whose benchmark picked a kernel of ours (at batch 1 that is usually
    # both; where the noise guard gave every product to torch, none).
    layers_checked = {e.problem.with_op("conv2d") for e in entries if e.layer_check}
    assert [c[0].problems[0] for c in checked] == sorted(layers_checked, key=lambda p: p.c)


def _vendor_entry(problem, own_algorithm: str, *, ms: float, own_ms: float) -> Entry:
    """A cached entry where torch's op won alone; our best kernel stays on record as best_own."""
    specs = registry.kernels_for(problem, "cpu")
    vendor = next(s for s in specs if s.algorithm == "vendor")
    own = next(s for s in specs if s.algorithm == own_algorithm)
    return Entry(problem=problem, device=devices.fingerprint("cpu"), versions=devices.versions(),
                 algorithm="vendor", knobs=vendor.full_knobs(problem, {}),
                 kernel_hashes={s.algorithm: s.source_hash for s in specs},
                 median_ms=ms, p20_ms=ms, p80_ms=ms, vendor_ms=ms,
                 best_own=OwnKernel(algorithm=own_algorithm, knobs=own.full_knobs(problem, {}), median_ms=own_ms),
                 trials={"ok": 2}, threads=torch.get_num_threads(), trustworthy=True, reason="planted by the test")


@pytest.mark.parametrize("wins", [True, False])
def test_a_max_pool_layer_is_checked_all_or_none(tmp_path, wins):
    """A pool's forward and gradient are timed together (torch's gradient needs its own
    forward's indices): our forward won alone, torch's gradient did; the layer times both of
    ours against torch's layer and caches both as ours when that wins, both as torch's when not."""
    calls = layer_calls(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2)), torch.randn(2, 1, 10, 10))
    (pool,) = [c for c in calls if c.kind == "max_pool2d"]
    forward, gradient, _ = pool.problems
    cache = Cache(tmp_path)
    cache.store(_own_entry(forward, "strided", {}, ms=0.01, vendor_ms=0.05))
    cache.store(_vendor_entry(gradient, "strided", ms=0.02, own_ms=0.03))

    def time_plans(plans):
        assert len(plans) == 2  # ours for both products, then torch's layer: no mixed plan
        ours = [1.0 if wins else 3.0] * 50
        return [ours, [2.0] * 50]

    (verdict,) = layer_check.check_layers([pool], cache=cache, device="cpu", time_plans=time_plans)
    found = {p.op: cache.find(p, "cpu", registry.kernels_for(p, "cpu")) for p in (forward, gradient)}
    if wins:
        assert verdict.kept == ("fwd", "dx") and verdict.given_back == ()
        assert found["max_pool2d_bwd"].algorithm == "strided" and found["max_pool2d_bwd"].median_ms == 0.03
        assert found["max_pool2d_bwd"].reason.startswith("won in the layer")
        assert found["max_pool2d"].algorithm == "strided"
    else:
        assert verdict.kept == () and set(verdict.given_back) == {"fwd", "dx"}
        assert found["max_pool2d"].algorithm == "vendor" and found["max_pool2d"].best_own.algorithm == "strided"
        assert found["max_pool2d_bwd"].algorithm == "vendor"
    assert all(e.layer_check.startswith("kept: " if wins else "lost: ") for e in found.values())


def test_a_pool_forward_that_writes_indices_is_checked_as_any_layer(tmp_path):
    """The compiled forward writes torch's argmax indices, so our forward with torch's gradient
    is a plan of its own (no second forward): the four subsets are timed, and the one that wins
    keeps our forward and gives our gradient back."""
    calls = layer_calls(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2)), torch.randn(2, 1, 10, 10))
    (pool,) = [c for c in calls if c.kind == "max_pool2d"]
    forward, gradient, _ = pool.problems
    cache = Cache(tmp_path)
    cache.store(_own_entry(forward, "loop_nest", {}, ms=0.01, vendor_ms=0.05))
    cache.store(_own_entry(gradient, "loop_nest", {}, ms=0.02, vendor_ms=0.06))

    def time_plans(plans):
        assert len(plans) == 4  # ours fwd+dx, ours fwd, ours dx, torch's layer
        return [[1.5] * 50, [1.0] * 50, [2.5] * 50, [2.0] * 50]

    (verdict,) = layer_check.check_layers([pool], cache=cache, device="cpu", time_plans=time_plans)
    found = {p.op: cache.find(p, "cpu", registry.kernels_for(p, "cpu")) for p in (forward, gradient)}
    assert verdict.kept == ("fwd",) and verdict.given_back == ("dx",)
    assert found["max_pool2d"].algorithm == "loop_nest" and found["max_pool2d_bwd"].algorithm == "vendor"


def test_a_plan_with_more_of_our_products_must_win_by_min_gain():
    """Each product of ours pays for itself: within MIN_GAIN of the fastest plan, the plan with
    fewer of our products wins; beyond it, the fastest."""
    close = {(0, 1): 0.50, (0,): 0.50 + layer_check.MIN_GAIN / 2, (1,): 0.9}
    assert layer_check.fewest_products(list(close), close) == (0,)
    apart = {(0, 1): 0.50, (0,): 0.50 + 2 * layer_check.MIN_GAIN, (1,): 0.9}
    assert layer_check.fewest_products(list(apart), apart) == (0, 1)
    assert layer_check.fewest_products([], {}) == ()


def test_correctness_our_pool_forward_hands_torch_gradient_its_indices(tmp_path):
    """Our compiled forward with torch's gradient in the layer: the forward finds torch's argmax
    indices and the output is a gather at them, whose native backward scatters dy there. Values
    and gradient are torch's bit for bit (a NaN window and ReLU ties included), torch's own pool
    forward never runs, and no Python autograd node is in the backward pass."""
    gen = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(4, 6, 12, 12, generator=gen))
    x[0, 0, :2, :4] = float("nan")
    x.requires_grad_(True)
    dy = torch.randn(4, 6, 6, 6, generator=gen)
    (pool,) = layer_calls(nn.Sequential(nn.MaxPool2d(2)), x)
    forward, gradient, _ = pool.problems
    cache = Cache(tmp_path)
    cache.store(_own_entry(forward, "loop_nest", {}, ms=0.01, vendor_ms=0.05))
    cache.store(_vendor_entry(gradient, "loop_nest", ms=0.02, own_ms=0.03))
    with autotune.policy("cached", cache_dir=tmp_path), torch.profiler.profile() as prof:
        y = autotune.max_pool2d(x, 2)
        (dx,) = torch.autograd.grad(y, x, dy)
    ran = {e.key for e in prof.key_averages()}
    assert "autotune::max_pool2d:loop_nest" in ran and "GatherBackward0" in ran
    assert "aten::max_pool2d_with_indices" not in ran and not any("Function" in k for k in ran)
    ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.max_pool2d(ref, 2)
    (dx_ref,) = torch.autograd.grad(y_ref, ref, dy)
    assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(y.nan_to_num(), y_ref.nan_to_num())
    assert torch.equal(dx, dx_ref)


def test_patch_with_an_example_leaves_layers_cached_as_torch_to_torch(tmp_path):
    """patch(model, example): a layer whose every product is cached as torch's op stays torch's
    own module (no wrapper: what the step check timed); a layer with a kernel of ours, or an
    uncached product, is patched; without an example every layer is."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    x = torch.randn(2, 1, 8, 8)
    conv, pool, linear = layer_calls(model, x)
    cache = Cache(tmp_path)
    for problem in (p for p in conv.problems if p is not None):
        cache.store(_vendor_entry(problem, "im2col_gemm", ms=0.01, own_ms=0.02))
    forward, gradient, _ = pool.problems
    cache.store(_own_entry(forward, "loop_nest", {}, ms=0.01, vendor_ms=0.05))
    cache.store(_vendor_entry(gradient, "loop_nest", ms=0.02, own_ms=0.03))
    # the linear layer's products are not cached at all
    with autotune.policy("cached", cache_dir=tmp_path):
        patched = autotune.patch(copy.deepcopy(model), x)
        everything = autotune.patch(copy.deepcopy(model))
        assert [type(m) for m in patched][:2] == [nn.Conv2d, autotune.nn.MaxPool2d]
        assert type(patched[3]) is autotune.nn.Linear
        assert [type(m) for m in everything][:2] == [autotune.nn.Conv2d, autotune.nn.MaxPool2d]
        y = patched(x)
        assert torch.allclose(y, model(x), atol=1e-6)
