"""The code layout: thin stages over a library that never imports upward (docs/pipeline.md, "Code layout").

- every `stages/*.py` is the module of one DVC stage (dvc.yaml or magnification/dvc.yaml), ≤ 150 lines;
- `mer/` imports nothing from `model/` or `stages/`, `model/` nothing from `stages/` (lazy imports
  inside functions included), and the module import graph has no cycle;
- each stage's code deps in dvc.yaml are exactly the repository files its module imports, directly or
  through other modules, lazy imports included (a package's `__init__.py` counts when it holds code):
  editing one stage's algorithm does not invalidate another stage, and no code a stage runs is missed;
- the committed dvc.lock files are of the code and params in the repository (a clone's `dvc status`
  is clean).
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "mer", "model")
LAYER = {"mer": 0, "model": 1, "stages": 2}  # a module may import its own layer or a lower one
MAX_STAGE_LINES = 150


def module_file(name: str) -> Path | None:
    """The repository file of module `name` (a package: its __init__.py), None outside the repository."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = REPO.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Repository modules that `path` imports, at module level or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from mer import face`: face may be a module of its own
            names |= {f"{node.module}.{alias.name}" for alias in node.names
                      if module_file(f"{node.module}.{alias.name}") is not None
                      and module_file(f"{node.module}.{alias.name}").name != "__init__.py"}
    return {n for n in names if module_file(n) is not None}


def with_parents(name: str) -> list[str]:
    """`a.b.c` -> the packages Python initialises first (a, a.b) and the module itself."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def has_code(init: Path) -> bool:
    body = ast.parse(init.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def code_files(module: str) -> set[str]:
    """Repository files that `python -m module` may run: the transitive import closure."""
    seen: set[str] = set()
    todo = with_parents(module)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported in imported_modules(module_file(name)):
            todo.extend(with_parents(imported))
    files = {module_file(n) for n in seen}
    return {str(f.relative_to(REPO)) for f in files if f.name != "__init__.py" or has_code(f)}


def dvc_stages() -> dict[str, tuple[str, set[str]]]:
    """stage name -> (the `python -m` module of its cmd, its .py deps relative to the repository)."""
    stages = {}
    for dvc_file in (REPO / "dvc.yaml", REPO / "magnification" / "dvc.yaml"):
        base = dvc_file.parent
        for name, stage in yaml.safe_load(dvc_file.read_text())["stages"].items():
            root = (base / stage.get("wdir", ".")).resolve()
            cmd = stage["cmd"].split()
            module = cmd[cmd.index("-m") + 1]
            deps = {str((root / d).resolve().relative_to(REPO)) for d in stage.get("deps", [])
                    if str(d).endswith(".py")}
            stages[name] = (module, deps)
    return stages


def all_modules() -> list[str]:
    return sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                  for package in PACKAGES for p in (REPO / package).glob("*.py"))


def test_every_stage_module_is_a_dvc_stage_and_thin() -> None:
    modules = {module for module, _ in dvc_stages().values()}
    for path in sorted((REPO / "stages").glob("*.py")):
        if path.name == "__init__.py":
            continue
        assert f"stages.{path.stem}" in modules, f"{path.name} is not the module of any DVC stage"
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_STAGE_LINES, f"{path.name}: {lines} lines (at most {MAX_STAGE_LINES})"


def test_no_import_runs_upward_and_no_cycle() -> None:
    graph = {}
    for module in all_modules():
        imported = imported_modules(module_file(module)) - {module}
        layer = LAYER[module.split(".")[0]]
        upward = sorted(i for i in imported if LAYER[i.split(".")[0]] > layer)
        assert not upward, f"{module} imports {upward} (a higher layer: stages > model > mer)"
        graph[module] = imported

    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            pytest.fail(f"import cycle: {' -> '.join(path[path.index(node):] + [node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        state[node] = 2

    for module in graph:
        visit(module, [])


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_stage_deps_are_exactly_the_code_it_imports(stage: str) -> None:
    module, deps = dvc_stages()[stage]
    imports = code_files(module)
    assert deps == imports, (f"{stage}: dvc.yaml lists {sorted(deps - imports)} that it does not import, "
                             f"and misses {sorted(imports - deps)}")


@pytest.mark.parametrize("lock", ["dvc.lock", "magnification/dvc.lock"])
def test_committed_lock_is_of_this_code_and_params(lock: str) -> None:
    """The committed dvc.lock files record the code and params in the repository, so a clone's
    `dvc status` shows no stage changed (a code edit without its `dvc repro` fails here)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stale = []
    for name, stage in yaml.safe_load((REPO / lock).read_text())["stages"].items():
        for dep in stage.get("deps", []):
            path = REPO / dep["path"]
            if path.suffix == ".py" and hashlib.md5(path.read_bytes()).hexdigest() != dep["md5"]:
                stale.append(f"{name}: {dep['path']}")
        for key, value in stage.get("params", {}).get("params.yaml", {}).items():
            current = params
            for part in key.split("."):
                current = current.get(part) if isinstance(current, dict) else None
            if current != value:
                stale.append(f"{name}: params {key}")
    pipeline = lock.replace(".lock", ".yaml")
    assert not stale, f"{lock} is not of this code/params ({stale}): run dvc repro {pipeline}"
