"""The README's module map names every module under `services/`, and nothing that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services"


def module_map(readme: str) -> dict[str, set[str]]:
    """Package directory (as in the map's first column) -> the file and folder names its row mentions."""
    section = readme.split("## How it fits together", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = line.split(" | ")
        path = re.fullmatch(r"\| `(services/[\w/]+/)`", cells[0])
        if path and len(cells) >= 2:
            rows[path.group(1)] = set(re.findall(r"`([\w]+(?:\.py|/))`", " | ".join(cells[1:])))
    return rows


def package_contents(directory: Path) -> set[str]:
    files = {p.name for p in directory.glob("*.py") if p.name != "__init__.py"}
    folders = {f"{p.name}/" for p in directory.iterdir() if (p / "__init__.py").exists()}
    return files | folders


def packages() -> list[Path]:
    return sorted(p.parent for p in SERVICES.rglob("__init__.py") if "v1" not in p.relative_to(SERVICES).parts)


def test_every_package_has_a_row() -> None:
    rows = module_map((ROOT / "README.md").read_text())
    assert sorted(f"{p.relative_to(ROOT)}/" for p in packages()) == sorted(rows)


def test_every_module_is_named_and_every_name_exists() -> None:
    rows = module_map((ROOT / "README.md").read_text())
    for package in packages():
        named = rows.get(f"{package.relative_to(ROOT)}/", set())
        actual = package_contents(package)
        assert actual - named == set(), f"{package.relative_to(ROOT)}: modules missing from the README's map"
        assert named - actual == set(), f"{package.relative_to(ROOT)}: the README's map names what is not there"


def test_a_missing_module_is_caught() -> None:
    readme = "## How it fits together\n\n| path | what |\n| `services/edge/` | `agent.py` (the stream) |\n\n## Next\n"
    assert module_map(readme) == {"services/edge/": {"agent.py"}}
    assert package_contents(SERVICES / "edge") - module_map(readme)["services/edge/"]
