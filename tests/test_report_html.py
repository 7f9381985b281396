"""`autotune report`: index.html and real (non-blank) PNG figures from a cache and its studies."""

import json

import numpy as np
import pytest

from autotune.cli import main


def _pixels_vary(path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    return pixels.size > 0 and pixels.std() > 1.0


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("report") / "results"
    for argv in (["search", "conv2d", "--shape", "2x3x12x12", "--filters", "4x3x3"],
                 ["search", "gemm", "--shape", "32x32x32"]):
        assert main([*argv, "--trials", "4", "--threads", "1", "--cache-dir", str(cache_dir), "--json"]) == 0
    return cache_dir


def test_report_writes_index_and_nonblank_figures(searched, tmp_path, capsys):
    capsys.readouterr()
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({
        "dataset": "fashion-mnist", "device": "cpu", "tuned": True, "policy": "cached",
        "losses": [2.3 - 0.02 * i for i in range(40)],
        "epochs": [{"epoch": 1, "test_accuracy": 0.5}, {"epoch": 2, "test_accuracy": 0.7}],
        "compare_batch_sizes": [{"batch": b, "mode": m, "step_ms": b * (0.9 if m == "tuned" else 1.0)}
                                for b in (16, 64) for m in ("tuned", "untuned")]}))
    out = tmp_path / "R"
    code = main(["report", "--cache-dir", str(searched), "--out", str(out), "--summary", str(summary),
                 "--peak-gflops", "100", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    index = (out / "index.html").read_text()
    studies_expected = (searched / "studies.db").exists()
    # The cache holds only trustworthy entries: on a busy machine a search may cache nothing.
    expected = {"training.png"} | ({"studies.png"} if studies_expected else set())
    assert expected <= set(result["figures"])
    if result["shapes"]:
        assert {"speedup.png", "roofline.png"} <= set(result["figures"])
    for name in result["figures"]:
        assert f"src='{name}'" in index
        assert _pixels_vary(out / name), f"{name} is a blank canvas"
    data = json.loads((out / "report.json").read_text())
    assert len(data["shapes"]) == result["shapes"]
    assert (out / "shapes.csv").exists() and (out / "studies.csv").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_report_bad_input_is_one_line_exit_2(searched, tmp_path, capsys):
    file = tmp_path / "afile"
    file.write_text("x")
    assert main(["report", "--cache-dir", str(searched), "--out", str(file)]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and len(err.strip().splitlines()) == 1
    assert main(["report", "--cache-dir", str(searched), "--out", str(tmp_path / "R"),
                 "--summary", str(file), "--peak-gflops", "100"]) == 2
    err = capsys.readouterr().err
    assert "--summary" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "R").exists()  # nothing written before the input was checked


def test_report_on_an_empty_cache_still_writes_an_index(tmp_path, capsys):
    assert main(["report", "--cache-dir", str(tmp_path / "none"), "--out", str(tmp_path / "R")]) == 0
    assert "No cached shapes" in (tmp_path / "R" / "index.html").read_text()
