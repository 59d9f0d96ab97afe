"""The layering rule, as a test: cloud and edge share only `tandem` and the wire contract.

Arrows point one way: `cloud` and `edge` import `tandem`; `tandem` imports neither
of them nor the command line; the command line (`tandem_cli`) wires both sides, and so does the regional
aggregator (`region`: a coordinator to its agents, an agent to its parent); the
lab (`tandem_lab`: benchmarks, scenarios, fuzzers, network emulation) may import
anything, and nothing else imports the lab.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services"

# package -> top-level packages it must never import
FORBIDDEN: dict[str, frozenset[str]] = {
    "tandem": frozenset({"cloud", "edge", "region", "tandem_cli", "tandem_lab"}),
    "cloud": frozenset({"edge", "region", "tandem_cli", "tandem_lab"}),
    "edge": frozenset({"cloud", "region", "tandem_cli", "tandem_lab"}),
    "region": frozenset({"tandem_cli", "tandem_lab"}),  # wires cloud and edge, as the command line does
    "tandem_cli": frozenset({"tandem_lab"}),
    "tandem_lab": frozenset(),
}


def imported_packages(source: str, module: str) -> Iterator[tuple[int, str]]:
    """(line, top-level package) for every import in a module's source, relative ones resolved."""
    package = module.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x, inside package a.b: resolves under `a`
                yield node.lineno, package[0]
            elif node.module:
                yield node.lineno, node.module.split(".")[0]


def violations(source: str, module: str) -> list[str]:
    forbidden = FORBIDDEN.get(module.split(".")[0], frozenset())
    return [f"{module}:{line} imports {target}" for line, target in imported_packages(source, module)
            if target in forbidden]


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(SERVICES.rglob("*.py")):
        relative = path.relative_to(SERVICES).with_suffix("")
        if relative.parts[0] in FORBIDDEN:
            yield ".".join(relative.parts), path


def test_every_package_is_covered() -> None:
    packages = {p.name for p in SERVICES.iterdir() if (p / "__init__.py").exists()}
    assert packages <= set(FORBIDDEN), "a new package under services/ needs a line in FORBIDDEN"


def test_no_import_runs_the_wrong_way() -> None:
    found = [v for module, path in modules() for v in violations(path.read_text(), module)]
    assert found == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("cloud.replica", "from edge.transfer import Download\n"),
        ("edge.agent", "import cloud.store\n"),
        ("tandem.wire", "def f():\n    from tandem_cli import main\n"),
        ("tandem_cli.main", "from tandem_lab import bench\n"),
    ],
)
def test_a_wrong_arrow_is_caught(module: str, source: str) -> None:
    assert len(violations(source, module)) == 1


def test_allowed_arrows_pass() -> None:
    source = "from tandem import codec\nimport numpy\nfrom . import sibling\n"
    assert violations(source, "edge.agent") == []
    assert violations("from cloud import app\nfrom edge import app\n", "tandem_cli.run") == []
    assert violations("from tandem_cli import admin\nfrom cloud import store\n", "tandem_lab.bench") == []
