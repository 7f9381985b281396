"""examples/train_lenet.py end to end on a few real Fashion-MNIST batches (Debian's
dataset-fashion-mnist, installed here and in CI), called in-process through its main(argv)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def train_lenet():
    # examples/ is no package: load the script by path (it finds its helper modules itself).
    spec = importlib.util.spec_from_file_location("train_lenet", EXAMPLES / "train_lenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


needs_fashion = pytest.mark.skipif(not FASHION.exists(),
                                   reason="apt-get install dataset-fashion-mnist")


def _common(tmp_path: Path, data_dir: Path) -> list[str]:
    return ["--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--no-download",
            "--cache-dir", str(tmp_path / "cache"), "--batch-size", "32", "--test-batch-size", "100",
            "--no-progress", "--threads", "1"]


@needs_fashion
def test_tuned_training_logs_profiles_and_reuses_the_cache(train_lenet, data_dir, tmp_path, capsys, monkeypatch):
    tb, prof, summary = tmp_path / "tb", tmp_path / "profile", tmp_path / "summary.json"
    monkeypatch.setenv("AUTOTUNE_PROGRESS", "1")  # bars as on a terminal, except where --no-progress
    argv = [a for a in _common(tmp_path, data_dir) if a != "--no-progress"] + [
        "--tuned", "--epochs", "1", "--limit-batches", "12", "--tensorboard", str(tb),
        "--profile", "--profile-dir", str(prof), "--summary-json", str(summary)]
    assert train_lenet.main(argv) == 0
    result = json.loads(summary.read_text())

    assert result["dataset"] == "fashion-mnist" and result["tuned"]
    losses = result["losses"]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses  # 2.30 -> 2.18 seen
    assert result["epochs"][0]["test_samples"] == 12 * 100
    assert result["selections"]["benchmark"] > 0
    layers = {row["problem"].split()[0] for row in result["choices"]}
    assert layers == {"conv2d", "conv2d_bwd_data", "conv2d_bwd_weight", "gemm", "max_pool2d", "max_pool2d_bwd"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    tags = events.Tags()
    assert tags["graph"]
    assert "LeNet5" in str(events.Graph())
    assert {"train/loss", "train/accuracy", "epoch/test_accuracy", "epoch/train_loss"} <= set(tags["scalars"])
    assert len(events.Scalars("train/loss")) == 12
    assert not any(t.startswith("kernel_ms/") for t in tags["scalars"])  # one figure, not one-dot scalars
    assert "kernels/choice_times" in tags["images"]
    assert any(t.startswith("kernels/choices") for t in tags["tensors"])

    table = (prof / "profile.txt").read_text()
    assert "top 10 operators by self CPU time" in table
    assert "autotune::conv2d" in table and "autotune::gemm" in table
    assert json.loads((prof / "trace.json").read_text())["traceEvents"]
    out, err = capsys.readouterr()
    assert "autotune::" in out
    # The first batch's shapes and the test pass's new ones, each run of them under one bar.
    bursts = re.findall(r"measuring new shapes: (\d+) done", err)
    finals = [int(n) for n, after in zip(bursts, [*bursts[1:], "0"], strict=True) if int(after) < int(n)]
    assert sum(finals) == result["selections"]["benchmark"] and len(finals) == 2, finals
    assert "epoch 1: 100%|██████████| 12/12" in err and "test: 100%|██████████| 12/12" in err

    # A second run finds every trustworthy choice in the cache: it benchmarks only the shapes the
    # noise guard refused the first time (none on a quiet machine).
    second = tmp_path / "second.json"
    argv = _common(tmp_path, data_dir) + ["--tuned", "--epochs", "1", "--dry-run",
                                          "--summary-json", str(second)]
    assert train_lenet.main(argv) == 0
    out, err = capsys.readouterr()
    assert "epoch 1" not in err  # --no-progress
    selections = json.loads(second.read_text())["selections"]
    assert selections["benchmark"] <= result["selections"]["untrusted"] and selections["cache"] > 0, selections
    if result["selections"]["untrusted"] == 0:
        assert "benchmark 0" in out


@needs_fashion
def test_compare_reports_a_ratio(train_lenet, data_dir, tmp_path, capsys):
    import warnings

    summary = tmp_path / "summary.json"
    argv = _common(tmp_path, data_dir) + ["--epochs", "0", "--compare", "--compare-steps", "8",
                                          "--policy", "cached",
                                          "--summary-json", str(summary)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no warning per uncached shape: one line instead
        assert train_lenet.main(argv) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1 and "shapes had no tuned kernel cached" in warned[0]
    assert "autotune search lenet --batch" in warned[0]
    compare = json.loads(summary.read_text())["compare"]
    assert compare["ratio"] > 0 and compare["tuned_ms"] > 0 and compare["untuned_ms"] > 0


def test_no_data_exits_2_with_one_line(train_lenet, tmp_path, capsys):
    argv = ["--dataset", "mnist", "--data-dir", str(tmp_path / "empty"), "--no-download"]
    assert train_lenet.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "apt-get install dataset-fashion-mnist" in err and "MNIST" in err


@pytest.mark.parametrize("argv", [["--device", "tpu"], ["--compare-batch-sizes", "1,x"],
                                  ["--epochs", "-1"], ["--limit-batches", "0"], ["--bogus"],
                                  ["--lr", "-1"], ["--gamma", "0"], ["--epochs", "0"], ["--batch-size", "-1"],
                                  ["--dry-run", "--limit-batches", "3"], ["--tensorboard", __file__],
                                  ["--report", __file__]])
def test_bad_flags_exit_2_with_one_line(train_lenet, capsys, argv):
    assert train_lenet.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_lenet.py: ")


@needs_fashion
def test_dry_run_batch_size_comparison_and_saved_model(train_lenet, data_dir, tmp_path, capsys):
    import torch

    import autotune

    saved, summary = tmp_path / "model" / "lenet5.pt", tmp_path / "summary.json"
    argv = _common(tmp_path, data_dir) + [
        "--tuned", "--policy", "cached", "--dry-run", "--epochs", "1", "--compare-batch-sizes", "1,4",
        "--save-model", str(saved), "--summary-json", str(summary)]
    assert train_lenet.main(argv) == 0
    result = json.loads(summary.read_text())
    assert result["epochs"][0]["steps"] == 1  # --dry-run: one batch
    rows = result["compare_batch_sizes"]
    assert [(r["batch"], r["mode"]) for r in rows] == [(1, "untuned"), (1, "tuned"), (4, "untuned"), (4, "tuned")]
    assert all(r["step_ms"] > 0 and r["samples_per_s"] > 0 and r["top_op"] for r in rows)
    assert result["selections"]["default"] > 0 and result["selections"]["benchmark"] == 0  # policy cached
    model = autotune.LeNet5()
    model.load_state_dict(torch.load(saved, weights_only=True))
    out = capsys.readouterr().out
    assert "batch  mode" in out and "ratio" in out.split("batch  mode")[1].splitlines()[0]
    assert all((r["ratio"] is None) == (r["mode"] == "untuned") for r in rows)
    assert all(r["ratio"] > 0 for r in rows if r["mode"] == "tuned")


@needs_fashion
# On a busy CI machine the noise guard may refuse a benchmark (torch's op then runs): expected.
@pytest.mark.filterwarnings("ignore:.*too busy to tell:UserWarning")
def test_report_writes_a_page_with_five_sections_and_real_figures(train_lenet, data_dir, tmp_path):
    import re

    import numpy as np
    from PIL import Image

    report, summary = tmp_path / "lab", tmp_path / "summary.json"
    argv = _common(tmp_path, data_dir) + ["--tuned", "--epochs", "1", "--limit-batches", "3",
                                          "--report", str(report), "--summary-json", str(summary)]
    assert train_lenet.main(argv) == 0
    page = (report / "index.html").read_text()
    for section in ("environment", "graph", "trends", "profile", "batch-sizes"):
        assert f"<h2 id='{section}'>" in page, section
    for label in ("CPU", "vCPUs", "GPU", "OS", "Python", "torch", "torchvision", "numpy", "triton", "optuna",
                  "CUDA"):
        assert f"<tr><th>{label}</th>" in page, label
    images = re.findall(r"<img src='([^']+)'", page)
    assert set(images) == {"graph.png", "trends.png"}
    for name in images:
        pixels = np.asarray(Image.open(report / name).convert("L"), dtype=float)
        assert pixels.var() > 0 and min(pixels.shape) > 100, name
    profile = page.split("id='profile'")[1].split("id='batch-sizes'")[0]
    assert 2 <= profile.count("<tr>") <= 11  # header + at most 10 operators
    batches = page.split("id='batch-sizes'")[1]
    assert "ratio tuned/untuned" in batches
    assert [int(b) for b in re.findall(r"<tr><td>(\d+)</td>", batches)] == [1, 16, 64]
    result = json.loads(summary.read_text())
    assert len(result["losses"]) == 3 and result["report"]["figures"] == ["graph.png", "trends.png"]
    assert len(result["report"]["profile"]["top"]) == 10
    assert [r["batch"] for r in result["report"]["compare_batch_sizes"]] == [1, 1, 16, 16, 64, 64]
