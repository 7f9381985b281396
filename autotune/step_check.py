"""The last word on a model's choices: its whole training step, tuned against torch's own.

The layer check (autotune.layer_check) times one layer at a time, and still misses a cost: our
NumPy kernels build patch matrices R·S times the size of their input, and that traffic evicts
the next layers' weights and activations from the caches, so torch's ops after ours run slower
than they would after torch's direct convolution. Seen on the dev CPU: with LeNet conv1 on our
kernels (0.85x torch's layer alone), conv2 and the linears, all on torch's ops, ran 10-30% slower,
and the whole step 1.09x slower than untuned.

So after the layer check, `search model`/`search lenet` time the model's forward + backward
(a sum as the loss) in interleaved paired rounds: torch's own layers, the tuned model, and the
tuned model with each layer that keeps a kernel of ours given back in turn. The fastest plan
that is clearly faster than torch's (autotune.layer_check.clearly_faster) keeps its layers' kernels;
every other layer's kernels are re-cached as torch's op, with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from autotune import dispatch, layer_check, registry
from autotune.cache import Cache
from autotune.entry import VENDOR
from autotune.nn import TORCH_CLASS, LayerCall, layer_calls, patch

LEAVE_ONE_OUT_MAX = 8  # beyond this many layers on our kernels, the model is checked all or nothing


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepVerdict:
    ratio: float  # the chosen plan's median per-round step time over torch's own step
    layers_kept: tuple[str, ...]  # layers (forward problem) that keep kernels of ours
    layers_given_back: tuple[str, ...]
    reason: str
    rounds: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_step(model: nn.Module, example: torch.Tensor, calls: Sequence[LayerCall], *, cache: Cache,
               device: str, time_plans=None) -> StepVerdict | None:
    """Time the model's training step with and without our kernels (the cache's current choices)
    and give back to torch the layers whose kernels do not pay in the step. None when no layer
    runs a kernel of ours."""
    time_plans = time_plans or layer_check.interleaved
    ours = [call for call in calls if _own_products(call, cache, device)]
    if not ours:
        return None
    with dispatch.policy("cached", cache_dir=cache.dir, quiet=True):
        plain = copy.deepcopy(model).to(device)
        example = example.to(device)
        problems = _forward_problems(plain, example)
        tuned = patch(copy.deepcopy(plain))
        variants: list[tuple[LayerCall, ...]] = [tuple(ours)]
        if 1 < len(ours) <= LEAVE_ONE_OUT_MAX:
            variants += [tuple(c for c in ours if c is not left) for left in ours]
        models = [plain] + [_keeping(tuned, problems, kept) for kept in variants]
        with torch.enable_grad():
            rounds = time_plans([_trainer(m, example, device) for m in models])
    torch_step = rounds[0]
    ratios = [layer_check.paired_ratio(r, torch_step) for r in rounds[1:]]
    winners = [i for i, r in enumerate(rounds[1:]) if layer_check.clearly_faster(r, torch_step)]
    best = min(winners, key=lambda i: ratios[i], default=None)
    kept = variants[best] if best is not None else ()
    n = len(torch_step)
    if best is not None:
        reason = f"the training step with ours took {ratios[best]:.2f}x torch's step ({n} paired rounds)"
    else:
        reason = (f"the training step with ours took {ratios[0]:.2f}x torch's step, not clearly faster "
                  f"({n} paired rounds)")
    given_back = [call for call in ours if call not in kept]
    for call in given_back:
        for entry in _own_products(call, cache, device):
            cache.store(layer_check.given_back(entry, device, reason, lost_in="the training step"))
    return StepVerdict(ratio=ratios[best] if best is not None else ratios[0],
                       layers_kept=tuple(layer_check.describe(c) for c in kept),
                       layers_given_back=tuple(layer_check.describe(c) for c in given_back),
                       reason=reason, rounds=n)


def _own_products(call: LayerCall, cache: Cache, device: str) -> list:
    entries = (cache.find(p, device, registry.kernels_for(p, device)) for p in call.problems if p is not None)
    return [e for e in entries if e is not None and e.algorithm != VENDOR]


def _keeping(tuned: nn.Module, problems: list, kept: tuple) -> nn.Module:
    """A copy of the tuned model where only the layers of `kept` run on autotune's layers
    (`problems`: each module's forward problem, in modules() order, as _forward_problems gives)."""
    model = copy.deepcopy(tuned)
    wanted = {c.problems[0] for c in kept}
    for module, problem in zip(model.modules(), problems, strict=True):
        if type(module) in TORCH_CLASS and problem not in wanted:
            module.__class__ = TORCH_CLASS[type(module)]
    return model


def _forward_problems(plain: nn.Module, example: torch.Tensor) -> list:
    """The forward problem each module of the (unpatched) model computes, None for the others,
    in modules() order."""
    found: dict[int, object] = {}
    layer_calls(plain, example, by_module=found)
    return [found.get(id(m)) for m in plain.modules()]


def _trainer(model: nn.Module, example: torch.Tensor, device: str):
    params = [p for p in model.parameters() if p.requires_grad]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        for p in params:
            p.grad = None
        model(example).float().sum().backward()
        sync()

    return step


__all__ = ["StepVerdict", "check_step"]
