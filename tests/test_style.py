"""The code's form, checked like its behaviour: ruff's formatting and lint, the size limits that keep a recipe
readable in one sitting, and a library whose modules import each other in one direction only."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(ROOT.glob("train_*.py"))
LIBRARY = sorted((ROOT / "nanotune").rglob("*.py"))  # (its packages too: serve/, bench/)


@pytest.mark.parametrize("command", [["format", "--check", "--diff"], ["check"]])
def test_ruff(command):
    r = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_functions_and_files_stay_short():
    # a recipe function fits on a screen or three (150 lines), a library function 120, a file 400
    too_long = [f"{f.name}:{name} {n} lines" for f in RECIPES for name, n in functions(f) if n > 150]
    too_long += [f"{f.relative_to(ROOT)}:{name} {n} lines" for f in LIBRARY for name, n in functions(f) if n > 120]
    too_long += [f"{f.name} {n} lines" for f in RECIPES + LIBRARY if (n := len(f.read_text().splitlines())) > 400]
    assert not too_long, too_long


def module_name(path: Path) -> str:
    """nanotune/lifecycle/run.py -> lifecycle.run; a package's __init__.py -> the package (nanotune's own: "")."""
    parts = path.relative_to(ROOT / "nanotune").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """The nanotune modules (and recipes) a file imports, anywhere in it (function-local imports too), as dotted
    names under nanotune (lifecycle.run, utils)."""
    inside = ROOT / "nanotune" in path.parents
    package = list(path.parent.relative_to(ROOT / "nanotune").parts) if inside else []  # where `.` points
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .model.gpt import GPT, from ..utils import die, from . import checkpoint
                base, name = package[: len(package) - node.level + 1], node.module
            elif node.module == "nanotune" or (node.module or "").startswith("nanotune."):
                base, name = [], node.module.removeprefix("nanotune").lstrip(".")
            else:
                continue
            module = ".".join(base + ([name] if name else []))
            names = [f"{module}.{a.name}".lstrip(".") for a in node.names]  # a name may be a module of its own
            found |= {n for n in names if (ROOT / "nanotune" / f"{n.replace('.', '/')}.py").is_file()} or {module}
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("nanotune.") for a in node.names if a.name.startswith(("nanotune.", "train_"))
            }
    return found - {""}


def first_circle(graph: dict) -> list | None:
    """An import circle of graph {module: the modules it imports}, as a path, or None."""
    state = {}  # depth-first search: 1 = on the current path, 2 = done

    def visit(module, path):
        if state.get(module) == 1:
            return path[path.index(module) :] + [module]
        if state.get(module) == 2:
            return None
        state[module] = 1
        for imported in sorted(graph.get(module, ())):
            if circle := visit(imported, path + [module]):
                return circle
        state[module] = 2
        return None

    return next((circle for module in sorted(graph) if (circle := visit(module, []))), None)


def test_the_library_has_no_import_circle_and_the_ground_floor_imports_nothing():
    modules = {module_name(f): project_imports(f) for f in LIBRARY if f.name != "__init__.py"}
    assert modules["utils"] == set(), modules["utils"]  # the ground floor
    assert (circle := first_circle(modules)) is None, "import circle: " + " -> ".join(circle)
    # nor between the packages as wholes (data/, model/, lifecycle/...): each one stands above or below another
    rooms = {}
    for module, imported in modules.items():
        room = module.split(".")[0]
        rooms.setdefault(room, set()).update(i.split(".")[0] for i in imported if i.split(".")[0] != room)
    assert (circle := first_circle(rooms)) is None, "import circle between packages: " + " -> ".join(circle)


def test_no_recipe_imports_another():
    for recipe in RECIPES:
        assert not any(name.startswith("train_") for name in project_imports(recipe)), recipe.name
