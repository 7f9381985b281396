"""The command line through its public entry point: real searches, real files, bad input."""

import json
import os
import subprocess
import sys

import pytest

from autotune.cli import main


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "results"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_search_then_answer_from_cache(capsys, cache_dir):
    argv = ["search", "conv2d", "--shape", "2x3x12x12", "--filters", "4x3x3", "--padding", "1",
            "--trials", "4", "--threads", "1", "--cache-dir", str(cache_dir)]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    for label in ("chosen", "why", "torch (vendor)", "configs measured", "trustworthy", "optuna study"):
        assert label in out
    trusted = "trustworthy       yes" in out  # the noise guard may refuse a timing on a busy machine
    assert (cache_dir / "studies.db").exists() and ("cached in" in out) == trusted
    code, out, _ = run(capsys, *argv, "--json")
    data = json.loads(out)
    assert code == 0 and data["from_cache"] is trusted and data["median_ms"] > 0
    assert data["problem"]["padding"] == 1 and sum(data["trials"].values()) >= 4


def test_trials_n_measures_n_distinct_configs_in_a_readable_study(capsys, cache_dir):
    import optuna

    code, out, _ = run(capsys, "search", "gemm", "--shape", "256x256x256", "--trials", "30", "--json",
                       "--cache-dir", str(cache_dir))
    data = json.loads(out)
    assert code == 0 and sum(data["trials"].values()) == 30 and data["valid_configs"] > 30
    study = optuna.load_study(study_name=data["study_name"], storage=data["storage"])
    assert study.study_name.startswith("gemm-256x256x256-nn-float32-cpu")
    assert len(study.trials) == 30 == len({t.user_attrs["config"] for t in study.trials})
    assert all(isinstance(v, (int, str)) for t in study.trials for v in t.params.values())
    assert study.user_attrs["confirmed"]


def test_search_gemm_json_and_show(capsys, cache_dir):
    code, out, _ = run(capsys, "search", "gemm", "--shape", "24x16x8", "--trans-a", "--trials", "3",
                       "--sampler", "random", "--json", "--cache-dir", str(cache_dir))
    data = json.loads(out)
    assert code == 0 and data["from_cache"] is False and data["algorithm"]
    code, out, _ = run(capsys, "show", "--cache-dir", str(cache_dir))
    # Shown exactly when trustworthy (on a busy machine the noise guard may refuse to cache it).
    assert code == 0 and ("24x16x8 tn" in out) == data["trustworthy"]
    code, out, _ = run(capsys, "show", "--op", "conv2d", "--cache-dir", str(cache_dir))
    assert "no cached results" in out
    code, out, _ = run(capsys, "show", "--json", "--cache-dir", str(cache_dir))
    assert len(json.loads(out)["entries"]) == int(data["trustworthy"])


def test_info_lists_fingerprint_and_kernels(capsys, cache_dir):
    code, out, _ = run(capsys, "info", "--json", "--cache-dir", str(cache_dir))
    info = json.loads(out)
    assert code == 0 and info["fingerprint"]["kind"] == "cpu" and "torch" in info["versions"]
    algorithms = {(k["op"], k["algorithm"]) for k in info["kernels"]}
    assert ("conv2d", "vendor") in algorithms and ("gemm", "vendor") in algorithms


@pytest.mark.parametrize("argv, message", [
    (["search", "conv2d", "--shape", "3x32"], "dimension"),
    (["search", "conv2d", "--shape", "3x0x32"], "positive"),
    (["search", "conv2d", "--shape", "3x-2x32"], "positive"),
    (["search", "conv2d", "--shape", "3xfoox32"], "not an integer"),
    (["search", "conv2d", "--shape", "1x4x4", "--filters", "2x7x7"], "larger than the padded input"),
    (["search", "conv2d", "--shape", "3x32x32", "--filters", "6x4x5x5"], "input channels"),
    (["search", "conv2d", "--shape", "3x32x32", "--padding", "-1"], "padding"),
    (["search", "conv2d", "--shape", "3x32x32", "--stride", "0"], "stride"),
    (["search", "conv3d", "--shape", "3x32x32"], "unknown op"),
    (["search", "conv2d"], "--shape"),
    (["search", "conv2d", "--shape", "3x32x32", "--sampler", "annealing"], "invalid choice"),
    (["search", "conv2d", "--shape", "3x32x32", "--algorithms", "magic"], "unknown algorithm"),
    (["search", "conv2d", "--shape", "3x32x32", "--algorithms", "winograd"], "does not support"),
    (["search", "conv2d", "--shape", "3x32x32", "--trials", "0"], "--trials"),
    (["search", "gemm", "--shape", "8x8x8", "--dtype", "int8"], "invalid choice"),
    (["search", "gemm", "--shape", "8x8"], "dimension"),
    (["search", "conv2d", "--shape", "3x32x32", "--device", "tpu"], "invalid choice"),
    (["bench", "--suite", "lenet", "--batches", "1,x"], "--batches"),
    (["frobnicate"], "invalid choice"),
    (["search", "conv2d", "--shape", "99999999999x99999x99999"], "GiB is available"),
    (["search", "conv2d", "--shape", "512x512x512"], "GiB is available"),
    (["search", "gemm", "--shape", "64x64x64", "--dtype", "float16", "--device", "cpu"], "no kernel of ours"),
    (["search", "gemm", "--shape", "64x64x64", "--filters", "6x5x5"], "--filters does not apply to gemm"),
    (["search", "conv2d", "--shape", "3x8x8", "--trans-b"], "--trans-b does not apply"),
    (["search", "conv2d", "--shape", "3x8x8", "--batch", "-1"], "--batch must be a positive"),
    (["search", "gemm", "--shape", "8x8x8", "--calls", "5"], "--calls"),
    (["search", "gemm", "--shape", "8x8x8", "--threads", "0"], "--threads"),
    (["search", "gemm", "--shape", "8x8x8", "--compile-budget", "0"], "--compile-budget"),
    (["search", "gemm", "--shape", "8x8x8", "--compile-budget", "nan"], "--compile-budget"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(capsys, cache_dir, argv, message):
    with pytest.raises(SystemExit) as exc_info:
        code = main([*argv, "--cache-dir", str(cache_dir)] if argv[0] != "frobnicate" else argv)
        raise SystemExit(code)
    assert exc_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err
    assert "Traceback" not in err
    assert not cache_dir.exists()


@pytest.mark.parametrize("argv", [["show"], ["cache", "clear"], ["cache"]])
def test_a_file_as_cache_dir_is_one_line(capsys, tmp_path, argv):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    assert main([*argv, "--cache-dir", str(blocker)]) == 2
    assert "is not a folder" in capsys.readouterr().err and blocker.read_text() == "keep me"


def test_storage_given_as_a_path_is_an_sqlite_file(capsys, tmp_path):
    code, out, _ = run(capsys, "search", "gemm", "--shape", "8x8x8", "--trials", "2", "--json",
                       "--storage", str(tmp_path / "mine.db"), "--cache-dir", str(tmp_path / "c"))
    assert code == 0 and (tmp_path / "mine.db").exists()
    assert json.loads(out)["storage"] == f"sqlite:///{tmp_path / 'mine.db'}"


def test_algorithms_without_vendor_still_measure_torch(capsys, tmp_path):
    code, out, _ = run(capsys, "search", "gemm", "--shape", "64x64x64", "--trials", "3", "--algorithms", "blocked",
                       "--json", "--cache-dir", str(tmp_path))
    data = json.loads(out)
    assert code == 0 and data["vendor_ms"] > 0 and data["best_own"]["algorithm"] == "blocked"


def test_unreadable_search_space_file(capsys, cache_dir, tmp_path, monkeypatch):
    from autotune import registry

    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "numpy_conv.toml").write_text("[conv2d.im2col_gemm\n")
    monkeypatch.setenv("AUTOTUNE_SEARCH_SPACES", str(spaces))
    registry._load_module.cache_clear()
    try:
        code, out, err = run(capsys, "search", "conv2d", "--shape", "3x32x32", "--cache-dir", str(cache_dir))
    finally:
        registry._load_module.cache_clear()
    assert code == 2 and "not valid TOML" in err and len(err.strip().splitlines()) == 1
    assert not cache_dir.exists()


def test_corrupt_cache_warns_and_retunes(capsys, cache_dir):
    cache_dir.mkdir()
    (cache_dir / "autotune_cache.json").write_text("{ truncated")
    code, out, err = run(capsys, "search", "gemm", "--shape", "8x8x8", "--trials", "2", "--cache-dir", str(cache_dir))
    assert code == 0 and "corrupt" in err and "Traceback" not in err
    if "trustworthy      yes" in out:  # then the corrupt file was set aside and a good one written
        assert json.loads((cache_dir / "autotune_cache.json").read_text())["entries"]


def test_console_script_help():
    """The installed entry point and `python -m autotune` both answer --help."""
    result = subprocess.run([sys.executable, "-m", "autotune", "search", "--help"], capture_output=True,
                            text=True, env={**os.environ}, timeout=120)
    assert result.returncode == 0 and "--trials" in result.stdout and "--sampler" in result.stdout


def test_search_lenet_tunes_every_layer_once(capsys, cache_dir):
    # 18 problems: 14 of the convs and linear layers, forward and gradient of both max-pools
    argv = ["search", "lenet", "--batch", "2", "--trials", "2", "--algorithms", "vendor",
            "--json", "--cache-dir", str(cache_dir)]
    code, out, _ = run(capsys, *argv)
    layers = json.loads(out)["layers"]
    assert code == 0 and len(layers) == 18 and not any(layer["from_cache"] for layer in layers)
    assert len({json.dumps(layer["problem"], sort_keys=True) for layer in layers}) == 18
    code, out, _ = run(capsys, *argv)
    again = json.loads(out)["layers"]
    # Every trustworthy layer is answered from the cache (the noise guard refuses the others).
    assert code == 0 and [a["from_cache"] for a in again] == [first["trustworthy"] for first in layers]
    code, out, _ = run(capsys, *argv[:-3], "--cache-dir", str(cache_dir))  # as a table
    assert code == 0 and "conv2d_bwd_weight  2x1x28x28 k6x5x5" in out


@pytest.mark.parametrize("extra, message", [
    (["--storage", "notadialect://x"], "cannot open the Optuna storage"),
    (["--storage", "sqlite:////nonexistent-dir/x.db"], "cannot open the Optuna storage"),
])
def test_bad_storage_url_is_one_line(capsys, cache_dir, extra, message):
    code, out, err = run(capsys, "search", "gemm", "--shape", "8x8x8", "--trials", "2",
                         "--cache-dir", str(cache_dir), *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not cache_dir.exists()


def test_unwritable_cache_dir_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, out, err = run(capsys, "search", "gemm", "--shape", "8x8x8", "--trials", "2",
                         "--cache-dir", str(blocker / "results"))
    assert code == 2 and "not a writable folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.db").exists()  # refused before any tuning


def test_cache_write_failure_is_one_line(tmp_path):
    from autotune.cache import Cache
    from autotune.errors import CacheWriteError
    from autotune.problem import GemmProblem

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    from autotune.entry import Entry

    entry = Entry(problem=GemmProblem(m=2, n=2, k=2), device={"kind": "cpu"}, versions={}, algorithm="blas",
                  knobs={}, kernel_hashes={"blas": "x"}, median_ms=1.0, p20_ms=1.0, p80_ms=1.0, vendor_ms=None,
                  best_own=None, trials={}, threads=1, trustworthy=True)
    with pytest.raises(CacheWriteError, match="cannot write the cache"):
        Cache(blocker / "results").store(entry)


def _steady(problem, spec, knobs):
    """A timer for seeding the cache deterministically (the noise guard can refuse real timings on
    a busy machine): our kernels at 1 ms, torch's op at 2 ms."""
    from autotune.measure import Measurement, Outcome, Status

    ms = 2.0 if spec.algorithm == "vendor" else 1.0
    return Outcome(status=Status.OK, measurement=Measurement(median=ms, p20=ms, p80=ms, n=9))


def test_bench_remeasures_cached_shapes_against_torch(capsys, cache_dir, monkeypatch):
    import autotune

    problem = autotune.parse_problem("conv2d", "2x3x10x10", filters="4x3x3")
    entry = autotune.search(problem, cache=autotune.Cache(cache_dir), trials=3, evaluate=_steady)
    assert entry.trustworthy and entry.algorithm != "vendor"
    monkeypatch.setenv("AUTOTUNE_PROGRESS", "1")  # bars forced on: --json still keeps them away
    code, out, err = run(capsys, "bench", "--rounds", "1", "--json", "--cache-dir", str(cache_dir))
    data = json.loads(out)
    assert "bench" not in err
    assert code == 0 and len(data["rows"]) == 1
    row = data["rows"][0]
    assert row["torch_ms"] > 0 and row["chosen_ms"] > 0 and row["own_algorithm"] != "vendor"
    assert row["torch_over_own"] == pytest.approx(row["torch_ms"] / row["own_ms"])
    assert data["summary"]["shapes"] == 1
    assert json.loads((cache_dir / "bench-cpu.json").read_text())["rows"][0]["problem"] == row["problem"]


def test_progress_goes_to_stderr_and_never_into_json(capsys, cache_dir, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_PROGRESS", "1")  # as on a terminal
    argv = ["search", "gemm", "--shape", "64x64x64", "--trials", "3", "--cache-dir", str(cache_dir)]
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0 and json.loads(out)["trials"] and "tuning" not in err
    code, out, err = run(capsys, *argv, "--force")
    assert code == 0 and "tuning gemm: 100%|██████████| 3/3" in err and "re-timing gemm finalists" in err
    assert "tuning gemm" not in out
    # The searches above may be refused as untrustworthy on a busy machine (nothing cached, and
    # bench has nothing to do): one entry seeded with a steady timer makes the bench bar certain.
    import autotune

    conv = autotune.parse_problem("conv2d", "2x3x10x10", filters="4x3x3")
    assert autotune.search(conv, cache=autotune.Cache(cache_dir), trials=3, evaluate=_steady).trustworthy
    code, out, err = run(capsys, "bench", "--rounds", "1", "--cache-dir", str(cache_dir))
    trusted = json.loads(run(capsys, "show", "--json", "--cache-dir", str(cache_dir))[1])["entries"]
    assert code == 0 and f"bench: 100%|██████████| {len(trusted)}/{len(trusted)}" in err


def test_bench_without_cached_shapes_says_what_to_do(capsys, cache_dir):
    code, out, err = run(capsys, "bench", "--cache-dir", str(cache_dir))
    assert code == 2 and "autotune search" in err and len(err.strip().splitlines()) == 1


def test_version_and_help_show_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("autotune ")
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    out = capsys.readouterr().out
    assert "(default: 1)" in out and "(default: hybrid)" not in out and "default 40" in out


def test_show_fits_100_columns_and_cached_search_says_force(capsys, cache_dir):
    import autotune

    problem = autotune.parse_problem("conv2d", "2x3x10x10", filters="4x3x3")
    autotune.search(problem, cache=autotune.Cache(cache_dir), trials=3, evaluate=_steady)
    code, out, _ = run(capsys, "show", "--cache-dir", str(cache_dir))
    assert code == 0 and "2x3x10x10 k4x3x3" in out and "speed-up" in out and "thread" in out
    assert all(len(line) <= 100 for line in out.splitlines() if "autotune_cache.json" not in line)
    argv = ["search", "conv2d", "--shape", "2x3x10x10", "--filters", "4x3x3", "--cache-dir", str(cache_dir)]
    code, out, _ = run(capsys, *argv, "--trials", "5")
    assert code == 0 and "cached; use --force to re-tune" in out
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "use --force" not in out
