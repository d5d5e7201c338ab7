"""The import contract of the package (docs/CONTRIBUTING.md draws the same map).

Read from the source with ``ast`` (nothing is imported), counting imports inside
functions too: a lazy import is still a dependency, and a lazy circle is still a
circle. Imports under ``if TYPE_CHECKING:`` (annotations only) do not count.

- The math (losses, metrics, tasks with their parsers, pairing, row checks)
  imports no Ray, DeepSpeed, MLflow, boto3 and no storage or filesystem code.
- The edges (storage, tracking, registry, model folders) import no stage.
- A stage package is imported only by itself, the CLI, the demo and the
  comparison flow (which trains arms and evaluates them); jobs/ may import any.
  The teacher component is used by other stages through its interface only
  (``teachers.protocol``, ``teachers.loader``).
- No module imports itself back through others.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mint_ray"

MATH = ("mint_ray.losses", "mint_ray.metrics", "mint_ray.tasks", "mint_ray.preferences.pairs",
        "mint_ray.preferences.validate", "mint_ray.text_baseline")
MATH_MAY_NOT_IMPORT = ("ray", "deepspeed", "mlflow", "boto3", "botocore", "pyarrow", "fsspec", "os",
                       "shutil", "tempfile", "pathlib", "subprocess", "socket", "urllib", "requests",
                       "mint_ray.storage", "mint_ray.filesystems", "mint_ray.blobs", "mint_ray.untrusted_files",
                       "mint_ray.tracking", "mint_ray.registry", "mint_ray.model_folders", "mint_ray.ray_cluster")
EDGES = ("mint_ray.storage", "mint_ray.filesystems", "mint_ray.blobs", "mint_ray.untrusted_files",
         "mint_ray.tracking", "mint_ray.registry", "mint_ray.model_folders",
         "mint_ray.errors", "mint_ray.config", "mint_ray.console", "mint_ray.ray_cluster")
STAGES = ("mint_ray.data", "mint_ray.teachers", "mint_ray.preferences", "mint_ray.training",
          "mint_ray.evaluation", "mint_ray.serving")
FLOWS = ("mint_ray.cli", "mint_ray.demo", "mint_ray.evaluation.compare", "mint_ray.evaluation.compare_config")
TEACHER_INTERFACE = ("mint_ray.teachers", "mint_ray.teachers.protocol", "mint_ray.teachers.loader")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Nodes under ``if TYPE_CHECKING:``: annotations only, never executed."""
    return {id(inner) for node in ast.walk(tree)
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
            for stmt in node.body for inner in ast.walk(stmt)}


def imports_of(path: Path) -> Iterator[str]:
    """Every module ``path`` imports; ``from pkg import sub`` names ``pkg.sub`` when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    yield f"{node.module}.{alias.name}"


GRAPH = {name: sorted(set(imports_of(path))) for name, path in MODULES.items()}


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def stage_of(name: str) -> str | None:
    return next((s for s in STAGES if within(name, (s,))), None)


@pytest.mark.parametrize("module", [m for m in MODULES if within(m, MATH)])
def test_math_imports_no_infrastructure(module: str) -> None:
    bad = [i for i in GRAPH[module] if within(i, MATH_MAY_NOT_IMPORT)]
    assert not bad, f"{module} is math (pure functions) but imports {bad}"


@pytest.mark.parametrize("module", EDGES)
def test_edges_import_no_stage(module: str) -> None:
    bad = [i for i in GRAPH[module] if stage_of(i)]
    assert not bad, f"{module} is an edge module but imports the stages {bad}"


def test_stages_are_imported_only_by_flows_and_through_interfaces() -> None:
    bad = []
    for module, imported in GRAPH.items():
        if within(module, FLOWS):
            continue
        for target in imported:
            stage = stage_of(target)
            if stage is None or stage == stage_of(module):
                continue
            if stage == "mint_ray.teachers" and target in TEACHER_INTERFACE:
                continue
            bad.append(f"{module} -> {target}")
    assert not bad, "stage packages imported from outside:\n" + "\n".join(bad)


def test_no_import_circles() -> None:
    internal = {m: [i for i in deps if i in MODULES and i != m] for m, deps in GRAPH.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in internal[node]:
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in internal:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_contract_sees_the_package() -> None:
    # Guards the checks above against passing on an empty or mis-read tree.
    assert len(MODULES) > 40
    assert "mint_ray.storage" in GRAPH["mint_ray.training.run"]
    assert {"mint_ray.preferences.pairs", "mint_ray.teachers.loader"} <= set(MODULES)
