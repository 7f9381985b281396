import torch

from autotune import KernelSpec
from autotune.measure import Status, bench_cpu, evaluate, tolerance, verify
from autotune.problem import GemmProblem

PROBLEM = GemmProblem(m=16, n=12, k=20)


def _matmul(problem, knobs, inputs, out):
    a, b = inputs
    return torch.matmul(a, b, out=out)


def test_correctness_verify_accepts_exact_and_rejects_wrong():
    a, b = torch.randn(16, 20, dtype=torch.float64), torch.randn(20, 12, dtype=torch.float64)
    ref = a @ b
    assert verify(PROBLEM, ref.float(), ref)[0]
    wrong = ref.float().clone()
    wrong[3, 4] += 0.01 * ref.abs().max()
    ok, error = verify(PROBLEM, wrong, ref)
    assert not ok and error > tolerance("float32", 20)
    nan = ref.float().clone()
    nan[0, 0] = float("nan")
    assert verify(PROBLEM, nan, ref) == (False, float("inf"))


def test_correctness_unwritten_elements_fail():
    """The output is NaN-poisoned, so a kernel that skips the last row is a wrong answer."""

    def lazy(problem, knobs, inputs, out):
        a, b = inputs
        out[:-1] = a[:-1] @ b
        return out

    spec = KernelSpec(op="gemm", algorithm="lazy", backend="numpy", run=lazy)
    assert evaluate(PROBLEM, spec, {}, device="cpu").status is Status.WRONG_ANSWER
    good = KernelSpec(op="gemm", algorithm="good", backend="numpy", run=_matmul)
    outcome = evaluate(PROBLEM, good, {}, device="cpu")
    assert outcome.status is Status.OK and outcome.measurement.median > 0


def test_failures_become_statuses():
    def boom(problem, knobs, inputs, out):
        raise RuntimeError("kernel exploded")

    def check(problem, knobs):
        return "BLOCK must divide" if knobs.get("BLOCK") == 3 else None

    spec = KernelSpec(op="gemm", algorithm="boom", backend="numpy", run=boom, check=check, defaults={"BLOCK": 4})
    assert evaluate(PROBLEM, spec, {"BLOCK": 3}, device="cpu").status is Status.INVALID
    crashed = evaluate(PROBLEM, spec, {"BLOCK": 4}, device="cpu")
    assert crashed.status is Status.CRASHED and "exploded" in crashed.message
    # A failed first call is still charged to a compile budget; a rejected config never ran.
    assert crashed.first_call_s is not None
    assert evaluate(PROBLEM, spec, {"BLOCK": 3}, device="cpu").first_call_s is None


def test_the_first_call_is_recorded_and_crosses_a_worker_pipe():
    """The first call's seconds (a Triton kernel's JIT compile) travel with the outcome."""
    from autotune.measure import Outcome

    spec = KernelSpec(op="gemm", algorithm="matmul", backend="numpy",
                      run=lambda problem, knobs, inputs, out: torch.matmul(*inputs, out=out), defaults={})
    outcome = evaluate(PROBLEM, spec, {}, device="cpu", timed=False)
    assert outcome.status is Status.OK and outcome.first_call_s is not None
    assert Outcome.from_dict(outcome.as_dict()) == outcome


def test_bench_cpu_reports_ordered_quantiles():
    m = bench_cpu(lambda: sum(range(1000)), rep_ms=5)
    assert m.n >= 5 and 0 < m.p20 <= m.median <= m.p80


def test_tolerance_grows_with_reduction_and_precision():
    assert tolerance("float32", 10_000) > tolerance("float32", 10)
    assert tolerance("float16", 100) > tolerance("float32", 100) > tolerance("float64", 100)
