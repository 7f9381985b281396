"""Users' own kernels: plugin modules named in AUTOTUNE_PLUGINS or by an `autotune.kernels` entry
point are registered like ours (search space beside the module, source hash, `info`), searched
through the isolated worker, and a broken one is one line and exit 2."""

import json
import textwrap
from pathlib import Path

import pytest

from autotune import registry
from autotune.cli import main
from autotune.errors import PluginError
from autotune.problem import parse_problem

ROOT = Path(__file__).resolve().parent.parent

# A correct NumPy GEMM with one knob: C = A·B in slabs of `chunk` rows.
PLUGIN = '''
import numpy as np

from autotune import KernelSpec


def run(problem, knobs, inputs, out):
    a, b = (t.numpy() for t in inputs)
    c = out.numpy()
    for start in range(0, problem.m, knobs["chunk"]):
        rows = slice(start, start + knobs["chunk"])
        np.matmul(a[rows], b, out=c[rows])
    return out


def supports(problem):
    return None if not (problem.trans_a or problem.trans_b) else "no transposes"


KERNELS = [KernelSpec(op="gemm", algorithm="{algorithm}", backend="numpy", run=run, supports=supports,
                      defaults={{"chunk": 8}})]
'''
SPACE = '[gemm.{algorithm}]\nchunk = [4, 8, 16]\n'


def write_plugin(folder: Path, name: str, algorithm: str, *, space: bool = True) -> Path:
    path = folder / f"{name}.py"
    path.write_text(PLUGIN.format(algorithm=algorithm))
    if space:
        (folder / f"{name}.toml").write_text(SPACE.format(algorithm=algorithm))
    return path


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A folder on sys.path (the worker inherits it) for plugin modules; returns a function that
    writes one and names it in AUTOTUNE_PLUGINS."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def add(name: str, source: str | None = None, algorithm: str | None = None) -> Path:
        if source is None:
            path = write_plugin(folder, name, algorithm or name)
        else:
            path = folder / f"{name}.py"
            path.write_text(textwrap.dedent(source))
        monkeypatch.setenv(registry.PLUGIN_ENV, name)
        return path

    return add


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plugin_is_registered_with_its_space_and_hash(plugins):
    path = plugins("plug_registered", algorithm="row_slabs")
    spec = registry.get("gemm", "row_slabs", "cpu")
    assert spec.plugin and spec.module == "plug_registered" and spec.backend == "numpy"
    assert [p.values for p in spec.space] == [(4, 8, 16)]
    assert spec.source_hash == registry.source_hash_of(path, ROOT)
    assert [s.algorithm for s in registry.kernels_for(parse_problem("gemm", "64x64x64"), "cpu")][-1] == "row_slabs"
    assert not registry.get("gemm", "blas", "cpu").plugin


def test_plugin_hash_covers_its_file_and_the_contract_not_the_whole_core(tmp_path):
    """`from autotune import KernelSpec` counts as autotune/registry.py (and what it imports),
    not as autotune/__init__.py, which would tie a plugin's cache entries to every core edit."""
    path = write_plugin(tmp_path, "plug_hash", "hashed")
    closure = {p.relative_to(ROOT).as_posix() for p in registry._project_closure(path, ROOT)
               if p.is_relative_to(ROOT)}
    assert "autotune/registry.py" in closure and "autotune/space.py" in closure
    assert "autotune/__init__.py" not in closure and "autotune/cli.py" not in closure
    before = registry.source_hash_of(path, ROOT)
    path.write_text(path.read_text().replace("np.matmul(a[rows]", "np.dot(a[rows]"))
    assert registry.source_hash_of(path, ROOT) != before


def test_search_tunes_a_plugin_through_the_isolated_worker(capsys, plugins, tmp_path):
    """A real search: the worker (a spawned process) imports the plugin by name too."""
    plugins("plug_searched", algorithm="row_slabs")
    code, out, err = run(capsys, "search", "gemm", "--shape", "32x16x8", "--algorithms", "row_slabs",
                         "--json", "--cache-dir", str(tmp_path / "results"))
    data = json.loads(out)
    assert code == 0, err
    assert data["valid_configs"] == 4  # torch's op + chunk 4, 8, 16 from plug_searched.toml
    assert data["trials"] == {"ok": 4}  # verified and timed in the worker, which found the plugin
    assert data["best_own"]["algorithm"] == "row_slabs"


def test_info_lists_plugins_by_module(capsys, plugins):
    plugins("plug_listed", algorithm="listed")
    code, out, _ = run(capsys, "info", "--device", "cpu", "--json")
    kernels = {k["algorithm"]: k for k in json.loads(out)["kernels"] if k["op"] == "gemm"}
    assert code == 0
    assert kernels["listed"]["plugin"] is True and kernels["listed"]["module"] == "plug_listed"
    assert kernels["listed"]["configs"] == 3 and kernels["blas"]["plugin"] is False
    code, out, _ = run(capsys, "info", "--device", "cpu")
    row = next(line for line in out.splitlines() if " listed " in line)
    assert "plugin plug_listed" in row


def test_entry_point_plugin(capsys, tmp_path, monkeypatch):
    """An installed package's `autotune.kernels` entry point (a .dist-info on sys.path)."""
    site = tmp_path / "site"
    dist = site / "userkernels-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: userkernels\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[autotune.kernels]\nmine = plug_entry_point\n")
    write_plugin(site, "plug_entry_point", "from_entry_point")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(registry.PLUGIN_ENV, raising=False)
    registry._entry_points.cache_clear()
    try:
        spec = registry.get("gemm", "from_entry_point", "cpu")
        assert spec.plugin and spec.module == "plug_entry_point"
        assert registry.plugin_modules()["plug_entry_point"].startswith("entry point 'mine'")
    finally:
        registry._entry_points.cache_clear()


BROKEN = {
    "plug_bad_import": ("import no_such_dependency_xyz\n", "failed to import: ModuleNotFoundError"),
    "plug_raises": ("raise RuntimeError('boom\\nsecond line')\n", "failed to import: RuntimeError: boom"),
    "plug_syntax": ("def f(:\n", "failed to import: SyntaxError"),
    "plug_no_kernels": ("x = 1\n", "has no KERNELS list"),
    "plug_not_a_spec": ("KERNELS = [{'op': 'gemm'}]\n", "KERNELS[0] is a dict, not an autotune.KernelSpec"),
    "plug_clash": ("from autotune import KernelSpec\n"
                   "KERNELS = [KernelSpec(op='gemm', algorithm='blas', backend='numpy', run=print)]\n",
                   "gemm.blas is already registered by built-in kernels.numpy_gemm"),
    "plug_backend": ("from autotune import KernelSpec\n"
                     "KERNELS = [KernelSpec(op='gemm', algorithm='x', backend='cuda', run=print)]\n",
                     "has backend 'cuda'"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_plugin_is_one_line_and_exit_2(capsys, plugins, tmp_path, name):
    source, expected = BROKEN[name]
    plugins(name, source=source)
    for argv in (["search", "gemm", "--shape", "16x16x16"], ["info"]):
        code, out, err = run(capsys, *argv, "--cache-dir", str(tmp_path / "results"))
        assert code == 2 and expected in err and name in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "results").exists()


def test_missing_plugin_module_says_where_to_look(plugins, monkeypatch):
    monkeypatch.setenv(registry.PLUGIN_ENV, "plug_nowhere_to_be_found")
    with pytest.raises(PluginError, match="is its folder on PYTHONPATH"):
        registry.load()


def test_bad_search_space_beside_a_plugin(plugins):
    path = plugins("plug_bad_space", algorithm="bad_space")
    path.with_suffix(".toml").write_text("[gemm.bad_space]\nBLOCK_Q = [1, 2]\n")
    with pytest.raises(PluginError, match="unknown knob"):
        registry.load()
