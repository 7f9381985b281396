"""The registry: folders import one way, and a kernel's hash covers the project code it imports."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autotune import registry
from autotune.cache import Cache
from autotune.entry import Entry
from autotune.errors import UnknownNameError
from autotune.problem import parse_problem

ROOT = Path(__file__).resolve().parent.parent


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_only_the_registry_imports_kernels():
    """grep -rn "import kernels\\|from kernels" autotune/ finds only autotune/registry.py."""
    pattern = re.compile(r"import kernels|from kernels")
    grep = sorted(p.name for p in (ROOT / "autotune").rglob("*.py") if pattern.search(p.read_text()))
    assert grep in ([], ["registry.py"])
    # The same through the syntax tree, which a reformatted import cannot slip past.
    parsed = sorted(p.name for p in (ROOT / "autotune").rglob("*.py")
                    if any(n == "kernels" or n.startswith("kernels.") for n in _imported_names(p)))
    assert parsed == []  # the registry reaches kernel modules by name, through importlib


def test_importing_autotune_imports_no_kernel_code_optuna_or_triton():
    code = ("import sys, autotune; autotune.KernelSpec; "
            "print(sorted(m for m in ('optuna', 'triton', 'kernels') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"
    import autotune

    assert autotune.KernelSpec is registry.KernelSpec and "KernelSpec" in autotune.__all__


def test_tile_helpers_are_not_a_kernel_module():
    assert "triton_tiles" not in registry.MODULES
    tree = ast.parse((ROOT / "kernels" / "triton_tiles.py").read_text())
    assigned = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    assert "KERNELS" not in assigned
    with pytest.raises(UnknownNameError, match="triton_tiles"):
        registry.module("triton_tiles")


def test_module_accessor_resolves_once():
    assert registry.module("vendor") is registry.module("vendor")
    assert callable(registry.module("vendor").conv2d_bias)


# ---------------------------------------------------------------------------------------------
# Source hashes


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of the project's code and search spaces, to edit freely."""
    copy = tmp_path / "project"
    for folder in ("autotune", "kernels", "search_spaces"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _hash(project: Path, module: str) -> str:
    return registry.source_hash_of(project / "kernels" / f"{module}.py", project)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_registry_hash_is_source_hash_of_and_independent_of_location(project):
    # The registry's spec carries exactly what source_hash_of gives for the same files elsewhere.
    assert registry.get("gemm", "blocked", "cpu").source_hash == _hash(project, "numpy_gemm")
    assert registry.get("conv2d", "vendor", "cpu").source_hash == _hash(project, "vendor")


def test_hash_covers_imported_helpers_transitively(project):
    before = {name: _hash(project, name) for name in ("triton_conv", "triton_gemm", "numpy_gemm")}

    # A helper in the shared tile module: both Triton modules change, the NumPy one does not.
    _edit(project / "kernels" / "triton_tiles.py", "return max(lo, min(hi, triton.next_power_of_2(n)))",
          "return max(lo, min(hi, 2 * triton.next_power_of_2(n)))")
    after_tiles = {name: _hash(project, name) for name in before}
    assert after_tiles["triton_conv"] != before["triton_conv"]
    assert after_tiles["triton_gemm"] != before["triton_gemm"]
    assert after_tiles["numpy_gemm"] == before["numpy_gemm"]

    # An unrelated kernel module changes only its own hash.
    _edit(project / "kernels" / "numpy_gemm.py", '"""', '"""Edited. ')
    assert _hash(project, "triton_conv") == after_tiles["triton_conv"]
    assert _hash(project, "numpy_gemm") != before["numpy_gemm"]

    # Transitive: numpy_gemm imports autotune.registry, which imports autotune.space.
    numpy_gemm = _hash(project, "numpy_gemm")
    _edit(project / "autotune" / "space.py", '"""', '"""Edited. ')
    assert _hash(project, "numpy_gemm") != numpy_gemm

    # Core modules no kernel imports (and package __init__ files) do not count.
    conv = _hash(project, "triton_conv")
    for unrelated in ("autotune/cli.py", "autotune/__init__.py", "kernels/__init__.py"):
        (project / unrelated).write_text((project / unrelated).read_text() + "\n# edited\n")
    assert _hash(project, "triton_conv") == conv


def test_relative_imports_are_followed(project):
    (project / "kernels" / "extra.py").write_text("from . import triton_tiles\nfrom .numpy_gemm import run\n")
    closure = {p.relative_to(project.resolve()).as_posix()
               for p in registry._project_closure((project / "kernels" / "extra.py").resolve(),
                                                  project.resolve())}
    assert {"kernels/triton_tiles.py", "kernels/numpy_gemm.py", "autotune/registry.py"} <= closure
    assert "kernels/__init__.py" not in closure


_REGISTRY_HASHES = """
import json, sys
from autotune import registry
assert registry.__file__.startswith(sys.argv[1]), registry.__file__
print(json.dumps({s.algorithm: s.source_hash for s in registry.load(("triton",)) if s.op == "conv2d"}))
"""


def _conv_hashes_of(project: Path) -> dict[str, str]:
    """The registry's own hashes for the conv kernels, loaded from `project` in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(project)}
    out = subprocess.run([sys.executable, "-c", _REGISTRY_HASHES, str(project)], cwd=project, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_editing_a_tile_helper_misses_cached_conv_results(project, tmp_path):
    """End to end: the registry, loaded from an edited copy, no longer matches a cached entry."""
    pytest.importorskip("triton")
    problem = parse_problem("conv2d", "3x8x8")
    cache = Cache(tmp_path / "cache")
    fingerprint, versions = {"device": "test"}, {"torch": "test"}
    hashes = _conv_hashes_of(project)
    assert hashes["implicit_gemm"] == _hash(project, "triton_conv")
    cache.store(Entry(problem=problem, device=fingerprint, versions=versions, algorithm="implicit_gemm",
                      knobs={}, kernel_hashes={"implicit_gemm": hashes["implicit_gemm"]}, median_ms=1.0,
                      p20_ms=1.0, p80_ms=1.0, vendor_ms=None, best_own=None, trials={}, threads=1,
                      trustworthy=True))
    assert cache.lookup(problem, fingerprint, versions, hashes) is not None

    _edit(project / "kernels" / "numpy_gemm.py", '"""', '"""Edited. ')
    assert cache.lookup(problem, fingerprint, versions, _conv_hashes_of(project)) is not None

    _edit(project / "kernels" / "triton_tiles.py", "REDUCE_BLOCK = 1024", "REDUCE_BLOCK = 512")
    assert cache.lookup(problem, fingerprint, versions, _conv_hashes_of(project)) is None
