"""README's "How an image flows" stays true: at most eight modules, each exists and defines the
functions and classes its line names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def flow_steps(readme: str) -> list[tuple[str, list[str]]]:
    """(module path, names in its parentheses) for each numbered line of the section."""
    section = readme.split("### How an image flows", 1)[1].split("\n#", 1)[0]
    steps = []
    for item in re.split(r"\n(?=\d+\. )", "\n" + section.split("\n1. ", 1)[1]):
        if not item.strip():
            continue
        module = re.match(r"(?:\d+\. )?`([\w/]+\.py)`", item.strip())
        assert module, f"a step without its module first: {item[:60]!r}"
        names = re.findall(r"`([A-Za-z_][\w.]*)`", re.search(r"\(([^)]*)\)", item).group(1))
        steps.append((module.group(1), [n for n in names if not n.endswith(".py")]))
    return steps


def defined_names(path: Path) -> set[str]:
    """Top-level classes and functions, and methods as ``Class.method``."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{item.name}" for item in node.body
                         if isinstance(item, ast.FunctionDef))
    return names


def flow_problems(readme: str) -> list[str]:
    steps = flow_steps(readme)
    problems = [] if len(steps) <= 8 else [f"{len(steps)} modules on the path, more than 8"]
    for module, names in steps:
        if not (ROOT / module).is_file():
            problems.append(f"{module} does not exist")
            continue
        if not names:
            problems.append(f"the line of {module} names no function or class")
        missing = set(names) - defined_names(ROOT / module)
        if missing:
            problems.append(f"{module} has no {', '.join(sorted(missing))}")
    return problems


def test_the_image_flow_in_the_readme_names_real_modules_and_functions() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(flow_steps(readme)) >= 5
    assert flow_problems(readme) == []


def test_the_check_finds_a_renamed_function_and_a_missing_module() -> None:
    readme = ("### How an image flows\n\n1. `workers/pipeline.py`: the steps "
              "(`Pipeline.run_everything`, `Pipeline.process`).\n"
              "2. `workers/sender.py`: sends (`send`).\n")
    assert flow_problems(readme) == ["workers/pipeline.py has no Pipeline.run_everything",
                                     "workers/sender.py does not exist"]
