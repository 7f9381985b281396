"""Progress bars: on stderr, off unless a terminal or $AUTOTUNE_PROGRESS=1, and counting what ran.

Bars are forced on here (stderr is captured, not a terminal) and their last drawn counts read back.
"""

import re

import pytest
import torch
from torch import nn

import autotune
from autotune import dispatch, progress
from autotune.confirm import CONFIRM_ROUNDS
from autotune.errors import AutotuneError
from autotune.measure import Measurement, Outcome, Status
from autotune.problem import GemmProblem
from autotune.registry import KernelSpec
from autotune.space import Param, Space
from autotune.tuner import tune

TILED = KernelSpec(op="gemm", algorithm="tiled", backend="numpy", run=lambda *a: None, defaults={"BLOCK": 8},
                   space=Space(params=(Param(name="BLOCK", values=(8, 16, 32, 64, 128)),)))


def _steady(problem, spec, knobs):
    """A timer without noise: 1 ms per 8 of BLOCK."""
    ms = spec.full_knobs(problem, knobs)["BLOCK"] / 8
    return Outcome(status=Status.OK, measurement=Measurement(median=ms, p20=ms, p80=ms, n=5))


def _counts(err: str, desc: str) -> list[str]:
    """Every drawn state of the bars called `desc`: "n/total" or, without a total, "n"."""
    return re.findall(re.escape(desc) + r": (?:\s*\d+%\|[^|]*\| )?(\d+(?:/\d+)?)", err)


def _runs(counts: list[str]) -> list[int]:
    """The final count of each bar, for bars that count without a total (each starts at 0)."""
    finals: list[int] = []
    for n in map(int, counts):
        if not finals or n < finals[-1]:
            finals.append(n)
        finals[-1] = n
    return finals


def test_forced_on_a_pipe_and_silenced_by_the_caller(capsys, monkeypatch):
    with progress.bar(desc="steps", unit="step", total=3) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""  # captured stderr is no terminal: off by default
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    with progress.bar(desc="steps", unit="step", total=3, delay=60) as bar:  # forced: no delay either
        bar.update(3)
    out, err = capsys.readouterr()
    assert out == "" and _counts(err, "steps")[-1] == "3/3"
    with progress.bar(desc="quiet", unit="step", total=3, enabled=False) as bar:  # --json, --no-progress
        bar.update(3)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(progress.PROGRESS_ENV, "maybe")
    with pytest.raises(AutotuneError, match="AUTOTUNE_PROGRESS"):
        progress.bar(desc="steps", unit="step")


def test_search_and_final_retiming_report_their_totals(capsys, monkeypatch):
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    problem = GemmProblem(m=8, n=8, k=8)
    tune(problem, specs=[TILED], evaluate=_steady, sampler="random", trials=4, confirm_top=2, progress=True)
    err = capsys.readouterr().err
    assert _counts(err, "tuning gemm")[-1] == "4/4"  # the budget, not the 5 configs of the space
    runs = 2 * CONFIRM_ROUNDS  # the two best configs, re-timed in rounds (no torch op among these kernels)
    assert _counts(err, "re-timing gemm finalists")[-1] == f"{runs}/{runs}"
    tune(problem, specs=[TILED], evaluate=_steady, sampler="random", trials=4, confirm_top=2,
         progress=False)  # the library default: silent, even when forced
    assert capsys.readouterr().err == ""


def test_benchmark_policy_counts_the_new_shapes_of_a_step(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    torch.manual_seed(0)
    model = autotune.patch(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)))
    x = torch.randn(2, 1, 6, 6)
    with autotune.policy("benchmark", cache_dir=tmp_path):
        model(x).sum().backward()  # conv fwd and grad weight, linear fwd, grad input, grad weight
        assert dispatch._state.measuring.open
        model(x)  # runs on the choices made: the measuring is over, its bar goes
        assert not dispatch._state.measuring.open
    err = capsys.readouterr().err
    measured = autotune.stats()["benchmark"]
    assert measured == 5 and _runs(_counts(err, "measuring new shapes")) == [measured]
    assert "benchmark conv2d_bwd_weight-2x1x6x6" in err  # says which shape is being timed

    dispatch.reset()
    with autotune.policy("benchmark", cache_dir=tmp_path / "other", progress=False):  # --no-progress
        model(x).sum().backward()
    assert "measuring" not in capsys.readouterr().err
