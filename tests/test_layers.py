"""The package's layout rules, enforced: imports point down, the core is pure, and
``import cluster`` needs nothing but the standard library and ``sortedcontainers``.

Layers (a module may import its own layer or lower ones at module level; imports
under ``if TYPE_CHECKING:`` are for annotations only and not counted):

0. leaf helpers: errors, validation, the clock, thread primitives
1. pure policies: backoff strategies, the retry policy, repeat schedules
2. the deterministic core: the task record, queues, the scheduler
3. the seams: the builder/handle contract, the executor base, delivery
4. the threaded edge: executors, the service thread, the runtime, builder, Cluster
5. parts built on the public API only (background operations, the CLI, ...): they
   import the ``cluster`` package itself and layer-0 helpers, nothing in between.

``_cluster.py`` (the public face) may import upper layers inside its methods: the
conveniences such as ``Cluster.poll`` are how users reach them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cluster"

LAYERS: dict[str, int] = {
    "_errors": 0,
    "_validate": 0,
    "_clock": 0,
    "_sync": 0,
    "_backoff": 1,
    "_policy": 1,
    "_repeat": 1,
    "_task": 2,
    "_queues": 2,
    "_core": 2,
    "_host": 3,
    "_events": 3,
    "_backend": 3,
    "_delivery": 3,
    "_slots": 4,
    "_service": 4,
    "_asyncio": 4,
    "_child": 4,
    "_process": 4,
    "_dask": 4,
    "_runtime": 4,
    "_builder": 4,
    "_cluster": 4,
    "_group": 4,
    "_completion": 4,
    "_gates": 2,
    "_durable_ids": 0,
    "_durable": 4,
    "_listing": 2,
    "_background": 5,
    "_futures": 5,
    "_store": 4,
    "testing": 5,
    "cli": 5,
    "metrics": 5,
    "web": 5,
    "__main__": 5,
}
#: Sub-packages: each is one layer-5 part (its modules share its key).
SUBPACKAGES = ("cli", "web")
API = 6  # cluster/__init__.py: re-exports, may import anything

#: What the pure layers (1 and 2) may not import.
IMPURE = {"asyncio", "sqlite3", "multiprocessing", "socket", "subprocess", "http", "time"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _key(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    if rel.parts[0] in SUBPACKAGES:
        return rel.parts[0]
    return rel.stem


def _layer_of(key: str) -> int:
    if key == "__init__":
        return API
    assert key in LAYERS, f"cluster/{key}.py has no layer: add it to LAYERS in {__file__}"
    return LAYERS[key]


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(target, line, at module level) for each import outside TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    visit(sub, top)
                continue
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom):
                base = "." * child.level + (child.module or "")
                if child.level and not child.module:  # from . import x: x a module, or not
                    here = path.parent if child.level == 1 else path.parent.parent
                    for a in child.names:
                        is_module = (here / f"{a.name}.py").exists() or (here / a.name).is_dir()
                        found.append((f"{base}{a.name}" if is_module else base, child.lineno, top))
                else:
                    found.append((base, child.lineno, top))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, top) for a in child.names)
            visit(child, inner)

    visit(tree, True)
    return found


def _target_key(source: Path, target: str) -> str | None:
    """The layer key of an import of ours (``._core``, ``..``, ``cluster._x``), or None."""
    if target.startswith("cluster"):
        rest = target.split(".")[1:]
        return rest[0] if rest else "__init__"
    if not target.startswith("."):
        return None
    dots = len(target) - len(target.lstrip("."))
    name = target.lstrip(".")
    in_cli = source.parent.name in SUBPACKAGES
    if in_cli and dots == 1:
        return source.parent.name
    if (in_cli and dots == 2) or (not in_cli and dots == 1):
        return name.split(".")[0] if name else "__init__"
    raise AssertionError(f"{source}: unexpected relative import {target}")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path) -> None:
    key = _key(path)
    layer = _layer_of(key)
    for target, line, top in _imports(path):
        target_key = _target_key(path, target)
        where = f"{path.relative_to(ROOT)}:{line} imports {target}"
        if target_key is None:
            if layer in (1, 2):
                assert target.split(".")[0] not in IMPURE, f"{where}: the core is pure"
            continue
        if target_key == key:
            continue
        target_layer = _layer_of(target_key)
        if layer == 5:
            assert target_layer in (0, 5, API), f"{where}: layer 5 sees the public API only"
            continue
        if key == "_cluster" and not top:
            continue  # the public face reaches the conveniences lazily
        assert target_layer <= layer, f"{where}: layer {layer} imports layer {target_layer}"


def test_import_cluster_needs_only_the_core_dependency() -> None:
    code = (
        "import sys\n"
        "before = set(sys.modules)  # what the interpreter itself loaded (site hooks)\n"
        "import cluster\n"
        "c = cluster.Cluster(1); c.run(); c.add_task(int).submit().result(5); c.stop()\n"
        "mods = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "extra = sorted(m for m in mods if m not in sys.stdlib_module_names\n"
        "               and m not in ('cluster', 'sortedcontainers') and not m.startswith('_'))\n"
        "print(','.join(extra))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"import cluster loaded {done.stdout.strip()}"


def test_every_public_name_is_exported_and_documented() -> None:
    import cluster

    for name in cluster.__all__:
        obj = getattr(cluster, name)
        if name == "UNLIMITED":
            continue
        assert obj.__doc__, f"cluster.{name} has no docstring"
