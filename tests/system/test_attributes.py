"""Every attribute an object has is set in its `__init__`: a reader (and mypy) finds the
whole state of a class in one place, and no attribute appears only after `start()`."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[2] / "services"

# Classes that still set attributes later, to be brought in line (then removed here).
PENDING: set[str] = set()


def _self_targets(function: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[str]:
    for node in ast.walk(function):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name) \
                        and element.value.id == "self":
                    yield element.attr


def late_attributes(source: str, module: str) -> list[tuple[str, str, str]]:
    """(module.Class, attribute, method) for each attribute first set outside `__init__`,
    in the classes that have an `__init__`."""
    found = set()
    for cls in (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)):
        methods = [f for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
        init = next((f for f in methods if f.name == "__init__"), None)
        if init is None:
            continue
        declared = set(_self_targets(init))
        found |= {(f"{module}.{cls.name}", attr, method.name) for method in methods for attr in _self_targets(method)
                  if attr not in declared}
    return sorted(found)


def test_attributes_are_set_in_init() -> None:
    found = []
    for path in sorted(SERVICES.rglob("*.py")):
        module = ".".join(path.relative_to(SERVICES).with_suffix("").parts)
        if ".v1." in module:
            continue  # generated code
        found += [f for f in late_attributes(path.read_text(), module) if f[0] not in PENDING]
    assert found == []


def test_a_late_attribute_is_caught() -> None:
    source = "class A:\n    def __init__(self):\n        self.a = 1\n    async def start(self):\n        self.a, self.b = 2, 3\n"
    assert late_attributes(source, "m") == [("m.A", "b", "start")]
