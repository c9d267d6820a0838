"""Each distribution builds a wheel and, installed with only its declared dependencies,
imports and registers exactly its own components (and those of gigagan packages it needs).

A fresh virtual environment gets the package's wheel, the wheels of the gigagan
distributions it declares, and links to exactly the third-party distributions in the
closure of its declared requirements (read from this environment's metadata). A missing
dependency declaration therefore shows up as an import failure here.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "gigagan-core": [],
    "gigagan-losses": ["gigagan-core"],
    "gigagan-upsampler": ["gigagan-core"],
    "gigagan-train": ["gigagan-core", "gigagan-losses", "gigagan-upsampler"],
}
PLUGIN_NAMES = {
    "gigagan-core": "core",
    "gigagan-losses": "losses",
    "gigagan-upsampler": "upsampler",
    "gigagan-train": "train",
}

pytestmark = pytest.mark.slow


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    # Build from copies: setuptools writes build/ and *.egg-info into the source folder,
    # which races between test workers and would litter the checkout.
    sources = tmp_path_factory.mktemp("sources")
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    for name in PACKAGES:
        shutil.copytree(REPO / "packages" / name, sources / name, ignore=ignore)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(out),
    ]
    cmd += [str(sources / name) for name in PACKAGES]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    found = {}
    for wheel in out.glob("*.whl"):
        dist = _canonical(wheel.name.split("-")[0])
        found[dist] = wheel
    return found


def test_all_four_wheels_build_with_entry_points_and_declared_requirements(wheels):
    assert set(wheels) == set(PACKAGES)
    for dist, wheel in wheels.items():
        with zipfile.ZipFile(wheel) as zf:
            info = next(n.split("/")[0] for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            entry_points = zf.read(f"{info}/entry_points.txt").decode()
            metadata = zf.read(f"{info}/METADATA").decode()
        module = dist.replace("-", "_")
        assert f"[gigagan]\n{PLUGIN_NAMES[dist]} = {module}._plugin" in entry_points
        requires = {
            _canonical(Requirement(line.split(":", 1)[1].strip()).name)
            for line in metadata.splitlines()
            if line.startswith("Requires-Dist:")
        }
        assert {d for d in requires if d.startswith("gigagan-")} == set(PACKAGES[dist])


def _third_party_closure(dist: str) -> set[str]:
    """Distributions (canonical names) needed by ``dist``, other gigagan ones excluded."""
    seen: set[str] = set()
    stack = [dist]
    while stack:
        name = stack.pop()
        for line in md.distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = _canonical(req.name)
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return {d for d in seen if not d.startswith("gigagan-")}


def _link_distribution(name: str, site: Path) -> None:
    dist = md.distribution(name)
    base = Path(dist.locate_file(""))
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops:
        target = site / top
        if not target.exists():
            target.symlink_to(base / top)


@pytest.mark.parametrize("dist", list(PACKAGES))
def test_package_imports_and_registers_alone(dist: str, wheels, tmp_path: Path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    for dep in sorted(_third_party_closure(dist)):
        _link_distribution(dep, site)
    own = [wheels[d] for d in [*PACKAGES[dist], dist]]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(site),
            *map(str, own),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    module = dist.replace("-", "_")
    others = [d.replace("-", "_") for d in PACKAGES if d != dist and d not in PACKAGES[dist]]
    script = f"""
import importlib, importlib.util, json, pkgutil
mod = importlib.import_module({module!r})
for info in pkgutil.walk_packages(mod.__path__, prefix={module!r} + "."):
    importlib.import_module(info.name)
from gigagan_core.plugins import load_registry
reg = load_registry()
print(json.dumps({{
    "plugins": sorted(d for _, d, _ in reg.plugins()),
    "component_dists": sorted({{r.distribution for r in reg.list_components()}}),
    "visible_others": [m for m in {others!r} if importlib.util.find_spec(m) is not None],
    "file": mod.__file__,
}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "GIGAGAN_"))}
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = sorted([*PACKAGES[dist], dist])
    assert result["plugins"] == expected
    assert set(result["component_dists"]) <= set(expected)
    assert result["visible_others"] == []
    assert result["file"].startswith(str(site))  # the wheel, not the source tree


# ---------------------------------------------------------------------------------------------
# Import arrows point one way inside each package
# ---------------------------------------------------------------------------------------------


def _module_name(src: Path, path: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every module of ``known`` this module imports, wherever the import statement is
    (top level, inside a function, under ``if TYPE_CHECKING``): a deferred import is still
    an arrow."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import sub`` imports the submodule when there is one.
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def _import_graph(src: Path) -> dict[str, set[str]]:
    files = {_module_name(src, p): p for p in src.rglob("*.py")}
    known = set(files)
    return {
        name: _imports(
            ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py", known
        )
        for name, path in files.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles between modules, ignoring arrows into package ``__init__`` modules (a package
    re-exports its submodules, and importing ``a.b`` runs ``a/__init__`` by design)."""
    packages = {name for name in graph if any(other.startswith(name + ".") for other in graph)}
    edges = {m: {t for t in targets if t not in packages} for m, targets in graph.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return cycles


SOURCES = {
    "gigagan_core": REPO / "packages" / "gigagan-core" / "src",
    "gigagan_losses": REPO / "packages" / "gigagan-losses" / "src",
    "gigagan_upsampler": REPO / "packages" / "gigagan-upsampler" / "src",
    "gigagan_train": REPO / "packages" / "gigagan-train" / "src",
    "gigagan_example_plugin": REPO / "examples" / "gigagan-example-plugin" / "src",
}


@pytest.mark.parametrize("top", list(SOURCES))
def test_no_import_cycles_inside_a_package(top: str):
    graph = _import_graph(SOURCES[top])
    assert top in graph
    assert _cycles(graph) == []


def _private_imports(path: Path, module: str) -> list[str]:
    """``from other import _name`` of a project module other than ``module`` itself, at any
    depth of the file: ``"module: other._name"`` for each."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if not node.module.startswith("gigagan_") or node.module == module:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{module}: {node.module}.{alias.name}")
    return found


@pytest.mark.parametrize("top", list(SOURCES))
def test_no_module_imports_a_private_name_from_another(top: str):
    src = SOURCES[top]
    found = [
        hit
        for path in sorted((src / top).rglob("*.py"))
        for hit in _private_imports(path, _module_name(src, path))
    ]
    assert found == []


def test_the_private_import_check_sees_nested_imports(tmp_path: Path):
    pkg = tmp_path / "gigagan_pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from gigagan_pkg.b import _hidden, shown\n")
    (pkg / "b.py").write_text("from gigagan_pkg.b import _self_is_fine\n")
    hits = _private_imports(pkg / "a.py", "gigagan_pkg.a")
    assert hits == ["gigagan_pkg.a: gigagan_pkg.b._hidden"]
    assert _private_imports(pkg / "b.py", "gigagan_pkg.b") == []


def test_the_cycle_check_sees_deferred_and_type_checking_imports(tmp_path: Path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import x\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
    )
    (pkg / "c.py").write_text("def f():\n    from . import a\n")
    assert _cycles(_import_graph(tmp_path)) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
