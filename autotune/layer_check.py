"""Tune what training runs: a layer's choices confirmed on the layer, not product by product.

A search times each product (forward, grad input, grad weight) of a layer on its own. A layer
pays more for leaving torch's op than those timings show: our autograd.Function, the bias add
and the bias gradient as separate passes, and above all torch's backward computes dx, dw and db
in ONE convolution_backward call, cheaper than its two products timed apart. A kernel that wins
in isolation can lose in the layer.

So after a model's products are searched, every layer whose cached choices run a kernel of ours
is timed the way training calls it (forward + backward of the real layer API, interleaved
rounds), once with torch's own layer and once for every way of giving some of our products
back to torch. The fastest plan wins only when it is clearly faster than torch's layer beyond
the measured noise (a tie, or a busy machine, is torch's). Products the winner gives back are
re-cached as torch's op with the reason, so `autotune show` and training keep agreeing.

Max-pool layers whose forward kernel cannot write torch's argmax indices are checked all or none
(COUPLED): our forward with torch's gradient would cost a second forward, so the layer times our
best kernel of both products, even one that lost alone, against torch's layer, and caches both
as ours when that wins. A forward that writes the indices (the compiled `loop_nest`) is checked
as any layer: our forward with torch's index-based gradient is one of the plans.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from autotune import measure, registry
from autotune.cache import Cache
from autotune.dispatch import Choice
from autotune.entry import VENDOR, Entry, stamp
from autotune.measure import Measurement
from autotune.nn import LayerCall, run_layer

PRODUCTS = ("fwd", "dx", "dw")  # forward, grad input, grad weight: positions in LayerCall.problems
# Layers whose products only pay together: torch's max-pool gradient needs the argmax indices its
# own forward keeps, so after a forward of ours that cannot write them torch's gradient must
# find them again (a second, slow forward). Their layer check times our best kernel of every
# product (chosen alone or not) against torch's layer, all or none.
COUPLED = frozenset({"max_pool2d"})
ROUND_BUDGET_MS = 300.0  # timing per plan (the rounds stop when every plan has had about this)
MIN_ROUNDS, MAX_ROUNDS, WARMUP_ROUNDS = 20, 400, 3
MIN_GAIN = 0.02  # a plan must save at least this share of torch's layer time...
SIGN_TEST_Z = 2.58  # ... and win more rounds than chance would (one-sided, p < 0.005)

# Times a list of plans (each a zero-argument training call) in interleaved rounds -> for each
# plan its time (ms) in every round, rounds aligned across plans. Replaceable in tests.
TimePlans = Callable[[Sequence[Callable[[], None]]], list[list[float]]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerVerdict:
    call: LayerCall
    times: dict[str, Measurement]  # plan label ("torch", "ours fwd+dw", ...) -> layer step time
    ratios: dict[str, float]  # plan label -> median per-round time over torch's layer
    kept: tuple[str, ...]  # our products the layer keeps ("fwd", "dx", "dw")
    given_back: tuple[str, ...]  # our products that lost in the layer, now cached as torch's op
    reason: str

    def as_dict(self) -> dict:
        return {"layer": describe(self.call), "kept": list(self.kept), "given_back": list(self.given_back),
                "reason": self.reason, "times": {k: m.as_dict() for k, m in self.times.items()},
                "ratio_to_torch": self.ratios}


def describe(call: LayerCall) -> str:
    """The layer by its forward problem, e.g. `conv2d 1x1x28x28 * 6x1x5x5 stride 1 pad 2 ...`."""
    return call.problems[0].describe()


def check_layers(calls: Sequence[LayerCall], *, cache: Cache, device: str,
                 time_plans: TimePlans | None = None) -> list[LayerVerdict]:
    """Check every layer whose cached choices run a kernel of ours; re-cache the products that
    lose in the layer as torch's op. Layers that run torch's op only are not timed."""
    time_plans = time_plans or interleaved
    verdicts = []
    for call in calls:
        entries = _entries(call, cache, device)
        if call.kind in COUPLED and not _forward_writes_indices(call, entries[0], device):
            # Our best kernel of every product, whether or not it won alone, all or none.
            ours = [i for i, e in enumerate(entries) if e is not None and e.best_own is not None
                    and e.vendor_ms is not None]
            if len(ours) < sum(p is not None for p in call.problems):
                continue  # a product without a trustworthy own kernel: the layer stays torch's
            subsets = [tuple(ours), ()]
        else:
            ours = [i for i, e in enumerate(entries) if e is not None and e.algorithm != VENDOR
                    and e.vendor_ms is not None]
            # Every subset of our products (the empty one is torch's own layer), largest first.
            subsets = [s for n in range(len(ours), -1, -1) for s in itertools.combinations(ours, n)]
        if ours and not all(entries[i].layer_check for i in ours):  # checked before: trust it
            verdicts.append(_check(call, entries, ours, subsets, cache, device, time_plans))
    return verdicts


def _entries(call: LayerCall, cache: Cache, device: str) -> list[Entry | None]:
    return [None if p is None else cache.find(p, device, registry.kernels_for(p, device)) for p in call.problems]


def _forward_writes_indices(call: LayerCall, forward: Entry | None, device: str) -> bool:
    """Our pool forward can hand torch's gradient its argmax indices (KernelSpec.run_with_indices)."""
    if forward is None or forward.algorithm == VENDOR:
        return False
    spec = next(s for s in registry.kernels_for(call.problems[0], device) if s.algorithm == forward.algorithm)
    return spec.run_with_indices is not None


def _own(entry: Entry) -> tuple[str, dict]:
    """The kernel of ours an entry offers the layer: its choice, or its best own where torch won."""
    if entry.algorithm != VENDOR:
        return entry.algorithm, entry.knobs
    return entry.best_own.algorithm, entry.best_own.knobs


def _check(call, entries, ours, subsets, cache, device, time_plans) -> LayerVerdict:
    own = {i: _choice(call.problems[i], device, *_own(entries[i])) for i in ours}
    vendor = {i: _choice(p, device, VENDOR, {}) for i, p in enumerate(call.problems) if p is not None}
    step = _trainer(call, device)
    plans = [step(tuple(own[i] if i in s else vendor.get(i) for i in range(3))) for s in subsets]
    with torch.enable_grad():  # also when a layer is first called under no_grad (evaluation)
        rounds = dict(zip(subsets, time_plans(plans), strict=True))
    ratios = {sub: paired_ratio(rounds[sub], rounds[()]) for sub in subsets if sub}
    winners = [sub for sub in subsets if sub and clearly_faster(rounds[sub], rounds[()])]
    best = fewest_products(winners, ratios)
    times = {_label(sub): measure.summarize(t) for sub, t in rounds.items()}
    torch_ms = times["torch"].median
    if best:
        reason = (f"the layer with ours ({'+'.join(PRODUCTS[i] for i in best)}) took {ratios[best]:.2f}x "
                  f"the time of torch's layer per training call ({torch_ms:.4g} ms), {len(rounds[()])} paired rounds")
    else:
        fastest = min(ratios, key=ratios.get)
        reason = (f"in the layer, ours ({'+'.join(PRODUCTS[i] for i in fastest)}) took {ratios[fastest]:.2f}x the "
                  f"time of torch's layer per training call ({torch_ms:.4g} ms), not clearly faster "
                  f"over {len(rounds[()])} paired rounds")
    lost = [i for i in ours if i not in best]
    for i in ours:
        # A new date: the checked entry supersedes the unchecked one where caches merge (cache pull).
        entry = entries[i]
        if i in best:
            cache.store(taken(entry, reason) if entry.algorithm == VENDOR
                        else dataclasses.replace(entry, layer_check=f"kept: {reason}", created=stamp()))
        elif entry.algorithm == VENDOR:
            cache.store(dataclasses.replace(entry, layer_check=f"lost: {reason}", created=stamp()))
        else:
            cache.store(given_back(entry, device, reason))
    return LayerVerdict(call=call, times=times, ratios={_label(sub): r for sub, r in ratios.items()},
                        kept=tuple(PRODUCTS[i] for i in best),
                        given_back=tuple(PRODUCTS[i] for i in lost), reason=reason)


def fewest_products(winners: Sequence[tuple[int, ...]], ratios: dict) -> tuple[int, ...]:
    """The winning plan with the fewest of our products among those within MIN_GAIN of the
    fastest: each product of ours must pay for itself. In a training step our kernels meet
    colder caches than in this check (a pool gradient of ours ran ~2x slower there, torch's
    index-based one did not), so a tie here is a loss there."""
    if not winners:
        return ()
    fastest = min(ratios[sub] for sub in winners)
    return min((sub for sub in winners if ratios[sub] <= fastest + MIN_GAIN), key=lambda sub: (len(sub), ratios[sub]))


def paired_ratio(ours: Sequence[float], torch_layer: Sequence[float]) -> float:
    """Median over rounds of our time / torch's time in the same round."""
    return statistics.median(a / b for a, b in zip(ours, torch_layer, strict=True))


def clearly_faster(ours: Sequence[float], torch_layer: Sequence[float]) -> bool:
    """Ours saves at least MIN_GAIN (median paired ratio) and wins more rounds than a coin would."""
    n = len(ours)
    wins = sum(a < b for a, b in zip(ours, torch_layer, strict=True))
    return paired_ratio(ours, torch_layer) < 1 - MIN_GAIN and wins > n / 2 + SIGN_TEST_Z * math.sqrt(n) / 2


def _label(subset: tuple[int, ...]) -> str:
    return "ours " + "+".join(PRODUCTS[i] for i in subset) if subset else "torch"


def _choice(problem, device: str, algorithm: str, knobs: dict) -> Choice:
    spec = next(s for s in registry.kernels_for(problem, device) if s.algorithm == algorithm)
    return Choice(spec=spec, knobs=spec.full_knobs(problem, knobs), source="cache")


def given_back(entry: Entry, device: str, reason: str, *, lost_in: str = "the layer") -> Entry:
    """The product's entry with torch's op chosen (our best stays on record as best_own), dated
    now so it supersedes the unchecked entry where caches merge."""
    vendor = next(s for s in registry.kernels_for(entry.problem, device) if s.algorithm == VENDOR)
    ms = entry.vendor_ms if entry.vendor_ms is not None else entry.median_ms
    return _rechosen(entry, VENDOR, vendor.full_knobs(entry.problem, {}), ms,
                     reason=f"lost in {lost_in}: {reason}", layer_check=f"lost: {reason}")


def taken(entry: Entry, reason: str) -> Entry:
    """A product torch won alone, cached as our best kernel because the layer with it won."""
    own = entry.best_own
    return _rechosen(entry, own.algorithm, own.knobs, own.median_ms,
                     reason=f"won in the layer: {reason}", layer_check=f"kept: {reason}")


def _rechosen(entry: Entry, algorithm: str, knobs: dict, ms: float, *, reason: str, layer_check: str) -> Entry:
    """`entry` with another algorithm chosen, at the one time on record for it (no spread), dated now."""
    return dataclasses.replace(entry, algorithm=algorithm, knobs=knobs, median_ms=ms, p20_ms=ms, p80_ms=ms,
                               reason=reason, layer_check=layer_check, created=stamp())


def _trainer(call: LayerCall, device: str):
    """plan choices -> a zero-argument forward + backward of the layer on random tensors of its
    shapes; gradients are reset as an optimizer's zero_grad(set_to_none=True) would."""
    gen = torch.Generator().manual_seed(0)

    def rand(shape, grad):
        return torch.randn(shape, generator=gen, dtype=call.dtype).to(device).requires_grad_(grad)

    x = rand(call.x_shape, call.x_requires_grad)
    w = rand(call.weight_shape, True) if call.weight_shape else None  # a pool has no weight
    b = rand(call.weight_shape[:1], True) if call.has_bias else None
    with torch.no_grad():
        out_shape = run_layer(call, (None, None, None), x, w, b).shape
    dy = rand(out_shape, False)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def plan(choices):
        def train_call():
            for t in leaves:
                t.grad = None
            run_layer(call, choices, x, w, b).backward(dy)
            sync()

        return train_call

    return plan


def interleaved(plans: Sequence[Callable[[], None]]) -> list[list[float]]:
    """Each plan once per round, the order rotating every round, so a busy spell on a shared
    machine hits all plans alike; rounds until every plan had ~ROUND_BUDGET_MS. Returns each
    plan's time (ms) per round."""
    for _ in range(WARMUP_ROUNDS):
        for run in plans:
            run()
    times: list[list[float]] = [[] for _ in plans]
    rounds = 0
    while rounds < MAX_ROUNDS and (rounds < MIN_ROUNDS or min(sum(t) for t in times) < ROUND_BUDGET_MS):
        shift = rounds % len(plans)
        for k in [*range(shift, len(plans)), *range(shift)]:
            t0 = time.perf_counter()
            plans[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return times


__all__ = ["LayerVerdict", "check_layers", "interleaved"]
