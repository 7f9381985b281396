"""Any model's layers: `autotune search model`, and a patched model that computes what torch does."""

import copy
import json

import pytest
import torch

import autotune
from autotune import device, registry
from autotune.cli import main
from autotune.entry import VENDOR, Entry
from autotune.models import example_input, load_model, model_problems

SHAPE, BATCH = "3x12x12", 2


def test_model_problems_cover_every_patchable_layer_once():
    model = load_model("small_cnn:build")
    problems = model_problems(model, example_input(SHAPE, BATCH, "small_cnn:build", torch.float32))
    convs = [p for p in problems if p.op == "conv2d"]
    assert len(convs) == 4  # the grouped conv stays torch's and is not tuned
    assert {(p.stride, p.padding, p.dilation) for p in convs} == {(1, 1, 1), (2, 1, 1), (1, 2, 2), (1, 0, 1)}
    assert sum(p.op == "conv2d_bwd_data" for p in problems) == 3  # not for the first layer: data needs no grad
    assert sum(p.op == "gemm" for p in problems) == 6
    assert len(problems) == len(set(problems))


def test_search_model_tunes_each_problem_once(capsys, tmp_path):
    argv = ["search", "model", "small_cnn:build", "--shape", SHAPE, "--batch", str(BATCH), "--trials", "2",
            "--threads", "1", "--json", "--cache-dir", str(tmp_path)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    layers = out["layers"]
    assert len(layers) == 17 and not any(layer["from_cache"] for layer in layers)
    # Every layer that cached a kernel of ours was timed as training calls it; what it gave back
    # to torch is what the layers list (and the cache) now say.
    ours = {json.dumps(layer["problem"]) for layer in layers if layer["algorithm"] != "vendor"}
    assert "step_check" in out  # None when no layer kept a kernel of ours
    for check in out["layer_checks"]:
        assert set(check["times"]) >= {"torch"} and set(check["kept"]).isdisjoint(check["given_back"])
    given_back = [layer for layer in layers if layer["reason"].startswith("lost in the layer")]
    assert all(layer["algorithm"] == "vendor" and layer["best_own"] for layer in given_back)
    assert all(json.dumps(layer["problem"]) not in ours for layer in given_back)
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)["layers"]
    assert [a["from_cache"] for a in again] == [first["trustworthy"] for first in layers]
    # What the search reports is what the cache holds (and so what training runs), also after a
    # second run re-checked layers whose products the noise guard had refused the first time.
    assert main(["show", "--json", "--cache-dir", str(tmp_path)]) == 0
    cached = {json.dumps(e["problem"]): e["algorithm"] for e in json.loads(capsys.readouterr().out)["entries"]}
    assert {json.dumps(a["problem"]): a["algorithm"] for a in again if a["trustworthy"]} == cached


@pytest.mark.parametrize("argv, message", [
    (["search", "model", "torchvision:no_such_net", "--shape", SHAPE], "no callable"),
    (["search", "model", "no_such_module:build", "--shape", SHAPE], "cannot import"),
    (["search", "model", "resnet18", "--shape", SHAPE], "torchvision:<name>"),
    (["search", "model", "small_cnn:build"], "needs --shape"),
    (["search", "model", "small_cnn:build", "--shape", "3x12"], "dimension"),
    (["search", "model", "small_cnn:build", "--shape", "3x5x5"], "cannot run on input"),
    (["search", "conv2d", "small_cnn:build", "--shape", SHAPE], "only 'search model'"),
])
def test_bad_model_input_is_one_line_exit_2(capsys, tmp_path, argv, message):
    assert main([*argv, "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def _own_kernels_everywhere(problems, cache_dir):
    """Cache an entry per problem that runs one of OUR kernels (default config), so the patched
    model really leaves torch's ops."""
    cache = autotune.Cache(cache_dir)
    for problem in problems:
        specs = registry.kernels_for(problem, "cpu")
        own = next(c for c in registry.valid_configs(problem, specs) if c.algorithm != VENDOR)
        cache.store(Entry(problem=problem, device=device.fingerprint("cpu"), versions=device.versions(),
                          algorithm=own.algorithm, knobs=own.as_dict(),
                          kernel_hashes={s.algorithm: s.source_hash for s in specs}, median_ms=1.0,
                          p20_ms=1.0, p80_ms=1.0, vendor_ms=2.0, best_own=None, trials={"ok": 1},
                          threads=torch.get_num_threads(), trustworthy=True))


def test_correctness_patched_model_matches_torch_values_and_gradients(tmp_path):
    torch.manual_seed(0)
    reference = load_model("small_cnn:build")
    patched = autotune.patch(copy.deepcopy(reference))
    x = example_input(SHAPE, BATCH, "small_cnn:build", torch.float32)
    _own_kernels_everywhere(model_problems(reference, x), tmp_path)
    with autotune.policy("cached", cache_dir=tmp_path):
        y = patched(x)
        y.square().sum().backward()
        assert {c.spec.algorithm for c in autotune.chosen().values()}.isdisjoint({VENDOR})
        assert len(autotune.chosen()) == 17  # every tuned problem ran our kernel
    reference(x).square().sum().backward()
    torch.testing.assert_close(y, reference(x), rtol=1e-4, atol=1e-5)
    for (name, ours), (_, theirs) in zip(patched.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5, msg=name)
