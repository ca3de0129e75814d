"""The README is a map a new user follows: short, and every command in it (and in docs/) uses flags that exist."""

import ast
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(markdown: str):
    """Every python/torchrun command of the ```bash blocks, with the block's VAR="..." lines substituted."""
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        variables = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if m := re.fullmatch(r'([A-Z]+)=("?)(.*)\2', line):
                variables[m.group(1)] = m.group(3)
                continue
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            if line.startswith(("python ", "torchrun ")):
                yield line


def script_of(words: list[str]) -> str | None:
    """The module a command runs: train_sft for train_sft.py, nanotune.evaluate for -m nanotune.evaluate."""
    for i, word in enumerate(words):
        if word.endswith(".py"):
            return word.removesuffix(".py")
        if word == "-m" and words[i + 1].startswith("nanotune."):
            return words[i + 1]
    return None


def help_flags(module: str) -> set[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        if "/" in module:  # a script in a folder (experiments/sentiment_frontier.py): loaded from its path
            spec = importlib.util.spec_from_file_location(module.replace("/", "_"), ROOT / f"{module}.py")
            script = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(script)
        else:
            script = importlib.import_module(module)
            if hasattr(script, "__path__"):  # a package (nanotune.serve): the module its __main__.py runs
                main_of = re.search(
                    r"from \.(\w+) import main", (ROOT / module.replace(".", "/") / "__main__.py").read_text()
                )
                script = importlib.import_module(f"{module}.{main_of.group(1)}")
        script.main(["--help"])
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", out.getvalue()))


def test_every_flag_in_the_readme_and_docs_exists():
    known, missing, checked = {}, [], 0
    for doc in DOCS:
        for command in commands(doc.read_text()):
            words = shlex.split(command)
            module = script_of(words)
            if module is None:
                continue
            if module not in known:
                known[module] = help_flags(module)
            start = words.index(module + ".py") if module + ".py" in words else words.index(module)
            for word in words[start + 1 :]:
                flag = word.split("=")[0]
                checked += flag.startswith("--")
                if flag.startswith("--") and flag not in known[module]:
                    missing.append(f"{doc.name}: {flag} in `{command}`")
    assert not missing, missing
    assert checked >= 100 and {"train_ppo", "train_dpo", "nanotune.evaluate", "nanotune.verify"} <= set(known)


def test_the_readme_is_a_map():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 16 * 1024 and readme.count("\n") <= 250
    for heading in ("## Install and test", "## Quickstart", "## The recipes", "## Layout"):
        assert heading in readme
    layout = readme.split("## Layout", 1)[1]
    for module in sorted((ROOT / "nanotune").glob("*.py")):  # the map names every module...
        assert module.name == "__init__.py" or f"nanotune/{module.name}" in layout, module.name
    for package in sorted(p.parent for p in (ROOT / "nanotune").glob("*/__init__.py")):  # ...and every package,
        assert f"nanotune/{package.name}/" in layout, package.name
        # whose docstring names each of its modules
        listed = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        for module in sorted(package.glob("*.py")):
            assert module.name in ("__init__.py", "__main__.py") or module.name in listed, (
                f"{package.name}/{module.name}"
            )
