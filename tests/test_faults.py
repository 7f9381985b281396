"""Fault injection through a plugin: kernels that raise, compute wrong values or NaN, hang, exit
the process, segfault or cannot allocate. Each is a recorded trial with the right status, the
search (and the process that runs it) survives, and torch's op wins.

The kernels are in tests/fault_kernels.py, named by AUTOTUNE_PLUGINS as a user would: the CLI's
process and the isolated worker both load it through the registry. The hang is cut short by
AUTOTUNE_CANDIDATE_TIMEOUT_S.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autotune.cli import main
from autotune.measure import Status, classify_exception

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SHORT_TIMEOUT_S = "3"

# algorithm -> the status its trial must get
FAULTS = {
    "fault_raises": Status.CRASHED,
    "fault_wrong": Status.WRONG_ANSWER,
    "fault_nan": Status.WRONG_ANSWER,
    "fault_hangs": Status.TIMEOUT,
    "fault_exits": Status.CRASHED,
    "fault_segfault": Status.CRASHED,
    "fault_oom": Status.OUT_OF_RESOURCES,
}


@pytest.fixture
def fault_plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))  # spawn hands sys.path on to the worker
    monkeypatch.setenv("AUTOTUNE_PLUGINS", "fault_kernels")
    monkeypatch.setenv("AUTOTUNE_CANDIDATE_TIMEOUT_S", SHORT_TIMEOUT_S)


def test_every_fault_kernel_is_registered(fault_plugin):
    import fault_kernels

    from autotune import registry

    assert set(FAULTS) == set(fault_kernels.FAULTS)
    assert all(registry.get("gemm", name, "cpu").plugin for name in FAULTS)


@pytest.mark.parametrize("algorithm", list(FAULTS))
def test_fault_is_classified_and_torch_wins(capsys, fault_plugin, tmp_path, algorithm):
    code = main(["search", "gemm", "--shape", "16x16x16", "--algorithms", f"{algorithm},vendor", "--json",
                 "--cache-dir", str(tmp_path / "results")])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["trials"] == {"ok": 1, FAULTS[algorithm].value: 1}
    assert data["algorithm"] == "vendor" and data["best_own"] is None


def test_segfault_from_the_command_line_then_again(tmp_path):
    """The issue's check, as a user runs it: exit 0, torch's op chosen, the crash counted; and the
    same command again (resuming the study that recorded the crash) is fine too."""
    env = {**os.environ, "AUTOTUNE_PLUGINS": "fault_kernels", "AUTOTUNE_CANDIDATE_TIMEOUT_S": SHORT_TIMEOUT_S,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    argv = [sys.executable, "-m", "autotune", "search", "gemm", "--shape", "16x16x16",
            "--algorithms", "fault_segfault,vendor", "--json", "--cache-dir", str(tmp_path / "results")]
    for extra in ([], ["--force"]):
        done = subprocess.run(argv + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr[-2000:]
        data = json.loads(done.stdout)
        assert data["algorithm"] == "vendor" and data["trials"] == {"ok": 1, "crashed": 1}
    assert not list(tmp_path.glob("core*"))


def test_memory_error_is_out_of_resources():
    assert classify_exception(MemoryError("Unable to allocate 8.9 PiB")) is Status.OUT_OF_RESOURCES
    assert classify_exception(RuntimeError("boom")) is Status.CRASHED


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_bad_candidate_timeout_is_one_line(capsys, monkeypatch, tmp_path, value):
    monkeypatch.setenv("AUTOTUNE_CANDIDATE_TIMEOUT_S", value)
    code = main(["search", "gemm", "--shape", "16x16x16", "--cache-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2 and "AUTOTUNE_CANDIDATE_TIMEOUT_S" in err and len(err.strip().splitlines()) == 1
