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


def project_imports(path: Path) -> set[str]:
    """The nanotune modules (and recipes) a file imports, anywhere in it (function-local imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .model import GPT
                found.add(node.module or "__init__")
            elif node.module and node.module.startswith("nanotune."):
                found.add(node.module.removeprefix("nanotune."))
            elif node.module == "nanotune":
                found |= {alias.name for alias in node.names if (ROOT / "nanotune" / f"{alias.name}.py").is_file()}
                found.add("__init__")
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("nanotune.") for a in node.names if a.name.startswith(("nanotune.", "train_"))
            }
    return found


def test_the_library_has_no_import_circle_and_the_ground_floor_imports_nothing():
    graph = {f.stem: project_imports(f) - {"__init__"} for f in LIBRARY if f.stem != "__init__"}
    assert graph["utils"] == set(), graph["utils"]  # the ground floor
    state = {}  # depth-first search: 1 = on the current path, 2 = done

    def visit(module, path):
        if state.get(module) == 1:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module) :] + [module]))
        if state.get(module) == 2:
            return
        state[module] = 1
        for imported in sorted(graph.get(module, ())):
            visit(imported, path + [module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])


def test_no_recipe_imports_another():
    for recipe in RECIPES:
        assert not any(name.startswith("train_") for name in project_imports(recipe)), recipe.name
