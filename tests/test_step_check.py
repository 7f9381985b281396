"""autotune.step_check: a model's kernels of ours confirmed on its whole training step."""

from __future__ import annotations

import torch
from test_layer_check import _own_entry
from torch import nn

from autotune import registry, step_check
from autotune.cache import Cache
from autotune.measure import pinned_threads
from autotune.nn import layer_calls


def _model():
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3), nn.Flatten(),
                         nn.Linear(8 * 14 * 14, 10))


def test_a_step_that_ours_slows_gives_our_kernels_back(tmp_path):
    """A cached FFT forward (slow in truth) is timed in the model's real training step against
    torch's own step and given back; the other layers never ran ours and stay as they were."""
    model, example = _model(), torch.randn(4, 16, 16, 16)
    calls = layer_calls(model, example)
    forward = calls[0].problems[0]
    cache = Cache(tmp_path)
    with pinned_threads(1):
        cache.store(_own_entry(forward, "fft", {"fft_size": "pow2", "contraction": "einsum"}, ms=0.001,
                               vendor_ms=0.01))
        verdict = step_check.check_step(model, example, calls, cache=cache, device="cpu")
        entry = cache.find(forward, "cpu", registry.kernels_for(forward, "cpu"))
        again = step_check.check_step(model, example, calls, cache=cache, device="cpu")
    assert verdict.layers_kept == () and verdict.layers_given_back == (forward.describe(),)
    assert verdict.ratio > 1 and verdict.rounds >= 20
    assert entry.algorithm == "vendor" and entry.best_own.algorithm == "fft"
    assert entry.reason.startswith("lost in the training step")
    assert again is None  # nothing of ours left to check


def test_leave_one_out_keeps_the_layers_that_pay(tmp_path):
    """Faked step times: ours in both convs is faster than torch's step, but faster still without
    the second conv's: the first conv keeps ours, the second is given back."""
    model, example = _model(), torch.randn(2, 16, 16, 16)
    calls = layer_calls(model, example)
    first, second = calls[0].problems[0], calls[1].problems[0]
    cache = Cache(tmp_path)
    cache.store(_own_entry(first, "im2col_gemm", {}, ms=0.01, vendor_ms=0.02))
    cache.store(_own_entry(second, "im2col_gemm", {}, ms=0.01, vendor_ms=0.02))

    def time_plans(plans):  # torch, both, without the first, without the second
        assert len(plans) == 4
        return [[2.0] * 40, [1.6] * 40, [1.9] * 40, [1.2] * 40]

    verdict = step_check.check_step(model, example, calls, cache=cache, device="cpu", time_plans=time_plans)
    assert verdict.layers_kept == (first.describe(),) and verdict.layers_given_back == (second.describe(),)
    assert verdict.ratio == 0.6
    algorithms = {p: cache.find(p, "cpu", registry.kernels_for(p, "cpu")).algorithm for p in (first, second)}
    assert algorithms == {first: "im2col_gemm", second: "vendor"}
